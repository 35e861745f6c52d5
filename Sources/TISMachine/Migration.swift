import EmulatorBackend
import Foundation
import TIS
import VMState
#if canImport(Glibc)
import Glibc
#endif

/// Outgoing migration bookkeeping (`query-migrate` on the source).
struct OutgoingMigration {
    var status: MigrationStatus = .none
    var errorDescription: String?
    var started = Date()
    var setupMilliseconds: Int64 = 0
    var downtimeMilliseconds: Int64 = 0
    var totalMilliseconds: Int64 = 0
    var transferred: Int64 = 0
    /// `migrate_cancel` arrived; the writer stops at its next window.
    var cancelRequested = false
    var isActive: Bool { status == .setup || status == .active }
}

/// Incoming migration bookkeeping (`query-migrate` on the destination).
struct IncomingMigration {
    var started = false
    var status: MigrationStatus = .none
    var errorDescription: String?
    /// The listening address of a `tcp:`/`unix:` incoming migration (`socket-address`).
    var socketAddress: QMPValue?
}

/// `migrate-set-parameters` / `query-migrate-parameters`: QEMU 7.2's parameter names; only
/// `max-bandwidth` changes what this machine does.
struct MigrationParameters {
    /// QEMU 7.2's default: 32 MiB/s.
    var maxBandwidth: Int64 = 32 << 20

    static let names: Set<String> = [
        "announce-initial", "announce-max", "announce-rounds", "announce-step", "compress-level", "compress-threads",
        "compress-wait-thread", "decompress-threads", "throttle-trigger-threshold", "cpu-throttle-initial",
        "cpu-throttle-increment", "cpu-throttle-tailslow", "tls-creds", "tls-hostname", "tls-authz", "max-bandwidth",
        "downtime-limit", "x-checkpoint-delay", "block-incremental", "multifd-channels", "xbzrle-cache-size",
        "max-postcopy-bandwidth", "max-cpu-throttle", "multifd-compression", "multifd-zlib-level",
        "multifd-zstd-level", "block-bitmap-mapping",
    ]
}

extension Machine {
    /// QEMU 7.2's migration capabilities, in `query-migrate-capabilities` order.
    static let migrationCapabilityNames = [
        "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram", "x-colo",
        "release-ram", "block", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
        "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
        "zero-copy-send", "postcopy-preempt",
    ]

    // MARK: stop / cont

    /// QMP `stop` (`qmp_stop`): in `inmigrate` it only clears autostart.
    func stop() {
        lock.lock()
        defer { lock.unlock() }
        switch runStateLocked {
        case .inmigrate: autostart = false
        case .running: setRunStateLocked(.paused)
        default: break
        }
    }

    /// QMP `cont` (`qmp_cont`): in `inmigrate` it sets autostart; otherwise the guest runs.
    func cont() {
        lock.lock()
        defer { lock.unlock() }
        switch runStateLocked {
        case .inmigrate: autostart = true
        case .running, .finishMigrate, .shutdown: break
        default: setRunStateLocked(.running)
        }
    }

    // MARK: capabilities and parameters

    func setCapabilities(_ changes: [(String, Bool)]) throws(QMPCommands.Failure) {
        lock.lock()
        defer { lock.unlock() }
        guard !outgoing.isActive else { throw QMPCommands.Failure("There's a migration process in progress") }
        for (name, state) in changes {
            if let i = capabilities.firstIndex(where: { $0.0 == name }) { capabilities[i].1 = state }
        }
    }

    func capabilityList() -> QMPValue {
        lock.lock()
        defer { lock.unlock() }
        return .array(capabilities.map { .object([("state", .bool($0.1)), ("capability", .string($0.0))]) })
    }

    func setMaxBandwidth(_ v: Int64) {
        lock.lock()
        parameters.maxBandwidth = v
        lock.unlock()
    }

    func parameterList() -> QMPValue {
        lock.lock()
        defer { lock.unlock() }
        return .object([("max-bandwidth", .int(parameters.maxBandwidth)), ("downtime-limit", .int(300)),
                        ("multifd-channels", .int(2)), ("multifd-compression", .string("none"))])
    }

    private func migrationEventLocked(_ status: MigrationStatus) {
        if eventsEnabledLocked { emit("MIGRATION", .object([("status", .string(status.rawValue))])) }
    }

    private func passEventLocked(_ pass: Int) {
        if eventsEnabledLocked { emit("MIGRATION_PASS", .object([("pass", .int(Int64(pass)))])) }
    }

    // MARK: query-migrate

    func migrationInfo() -> QMPValue {
        lock.lock()
        defer { lock.unlock() }
        if incoming.started {
            switch incoming.status {
            case .none, .setup:
                if let a = incoming.socketAddress { return .object([("socket-address", a)]) }
                return .object([])
            case .failed:
                var m: [(String, QMPValue)] = [("status", .string("failed"))]
                if let e = incoming.errorDescription { m.append(("error-desc", .string(e))) }
                return .object(m)
            default:
                return .object([("status", .string(incoming.status.rawValue))])
            }
        }
        let o = outgoing
        switch o.status {
        case .none:
            return .object([])
        case .setup:
            return .object([("status", .string("setup"))])
        case .failed, .cancelled:
            var m: [(String, QMPValue)] = [("status", .string(o.status.rawValue))]
            if let e = o.errorDescription { m.append(("error-desc", .string(e))) }
            return .object(m)
        case .active:
            return .object([("status", .string("active")), ("setup-time", .int(o.setupMilliseconds)),
                            ("total-time", .int(Int64(Date().timeIntervalSince(o.started) * 1000))),
                            ("ram", ramInfo(transferred: o.transferred))])
        case .completed:
            return .object([("status", .string("completed")), ("setup-time", .int(o.setupMilliseconds)),
                            ("downtime", .int(o.downtimeMilliseconds)), ("total-time", .int(o.totalMilliseconds)),
                            ("ram", ramInfo(transferred: o.transferred))])
        }
    }

    /// QEMU's `ram` member: here the only RAM is the TPM's PPI page.
    private func ramInfo(transferred: Int64) -> QMPValue {
        .object([("total", .int(Int64(PPIRegion.ramBlockSize))), ("remaining", .int(0)),
                 ("page-size", .int(4096)), ("transferred", .int(transferred)),
                 ("precopy-bytes", .int(transferred)), ("normal", .int(1)),
                 ("normal-bytes", .int(Int64(PPIRegion.ramBlockSize)))])
    }

    // MARK: outgoing

    /// A `migrate` URI: QEMU 7.2's `exec:`, `tcp:`, `unix:`, and `file:` (QEMU 8.2+).
    enum MigrationURI {
        case exec(String)
        case tcp(String)
        case unix(String)
        case file(String)

        init?(_ uri: String) {
            if uri.hasPrefix("exec:") { self = .exec(String(uri.dropFirst(5))) }
            else if uri.hasPrefix("tcp:") { self = .tcp(String(uri.dropFirst(4))) }
            else if uri.hasPrefix("unix:") { self = .unix(String(uri.dropFirst(5))) }
            else if uri.hasPrefix("file:") {
                // QEMU 8.2 `file:PATH[,offset=N]`; the offset is not supported here.
                let p = String(uri.dropFirst(5))
                self = .file(p.split(separator: ",", maxSplits: 1).first.map(String.init) ?? p)
            } else { return nil }
        }
    }

    /// QMP `migrate` (`qmp_migrate` → `migrate_prepare`): checks the state, reports setup and
    /// runs the migration on its own thread.
    func migrate(uri: String) throws(QMPCommands.Failure) {
        lock.lock()
        defer { lock.unlock() }
        if outgoing.isActive { throw QMPCommands.Failure("There's a migration process in progress") }
        switch runStateLocked {
        case .inmigrate: throw QMPCommands.Failure("Guest is waiting for an incoming migration")
        case .postmigrate: throw QMPCommands.Failure("Can't migrate the vm that was paused due to previous migration")
        default: break
        }
        guard let target = MigrationURI(uri) else {
            throw QMPCommands.Failure("Parameter 'uri' expects a valid migration protocol")
        }
        outgoing = OutgoingMigration()
        outgoing.status = .setup
        migrationEventLocked(.setup)
        let t = Thread { [self] in runOutgoing(target) }
        t.name = "migration-out"
        t.start()
    }

    /// A transport's descriptor and how to finish it.
    private struct Transport {
        var fd: Int32
        var child: pid_t?
        /// QEMU's channel word in write errors: "Unable to write to socket|command|file".
        var kind: String
    }

    private func openOutgoing(_ target: MigrationURI) throws(MachineError) -> Transport {
        switch target {
        case .exec(let cmd):
            let (pid, fd) = try Posix.spawnShell(cmd, writingToChild: true)
            return Transport(fd: fd, child: pid, kind: "command")
        case .tcp(let hp): return Transport(fd: try Posix.connectTCP(hp), child: nil, kind: "socket")
        case .unix(let p): return Transport(fd: try Posix.connectUnix(p), child: nil, kind: "socket")
        case .file(let p):
            let fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw MachineError(.io, "Could not open '\(p)': \(Posix.errnoText())") }
            return Transport(fd: fd, child: nil, kind: "file")
        }
    }

    /// `migration_thread`: connect; active; stop the guest (STOP); save the TPM (the
    /// tpm-emulator's GET_STATEBLOB ×3 through `TISDevice.saveWithBackend`, the tpm-tis state,
    /// the PPI page); write QEMU's stream at `max-bandwidth`; then `postmigrate` and
    /// `completed`. On any failure the guest runs again (RESUME) with its TPM untouched, as
    /// `migration_iteration_finish` restarts a source whose migration failed.
    private func runOutgoing(_ target: MigrationURI) {
        let start = Date()
        let transport: Transport
        do throws(MachineError) {
            transport = try openOutgoing(target)
        } catch {
            finishOutgoing(failure: error.message, wasRunning: false, stopped: false)
            return
        }
        lock.lock()
        outgoing.setupMilliseconds = Int64(Date().timeIntervalSince(start) * 1000)
        passEventLocked(1)
        outgoing.status = .active
        migrationEventLocked(.active)
        let wasRunning = runStateLocked == .running
        let downtimeStart = Date()
        setRunStateLocked(.finishMigrate)
        passEventLocked(2)
        let bandwidth = parameters.maxBandwidth
        lock.unlock()

        var failure: String?
        let stream: [UInt8]
        do {
            let (tis, blobs) = try device.saveWithBackend()
            let ids = configuration.machineType.sectionIDs
            var opts = TPMMigrationState.StreamOptions()
            opts.emulatorSectionID = ids.emulator
            opts.deviceSectionID = ids.tis
            let state = TPMMigrationState(machineType: configuration.machineType.rawValue, tis: tis,
                                          emulatorBlobs: blobs, ppi: device.ppi.contents)
            stream = try state.encodedStream(opts)
        } catch {
            stream = []
            failure = "Failed to save the TPM state: \(error)"
        }
        var cancelled = false
        if failure == nil {
            switch writePaced(transport.fd, stream, bandwidth: bandwidth) {
            case .written: break
            case .cancelled: cancelled = true
            case .failed(let e): failure = "Unable to write to \(transport.kind): \(Posix.errnoText(e))"
            }
        }
        // QEMU's downtime ends when the device state is flushed, before the channel closes.
        let downtime = Int64(Date().timeIntervalSince(downtimeStart) * 1000)
        Glibc.close(transport.fd)
        // `exec:cat > FILE` has written FILE when `completed` is reported.
        if let pid = transport.child { Posix.reap(pid, timeout: 10) }
        lock.lock()
        outgoing.transferred = Int64(stream.count)
        outgoing.downtimeMilliseconds = downtime
        outgoing.totalMilliseconds = Int64(Date().timeIntervalSince(start) * 1000)
        lock.unlock()
        finishOutgoing(failure: failure, wasRunning: wasRunning, stopped: true, cancelled: cancelled)
    }

    private func finishOutgoing(failure: String?, wasRunning: Bool, stopped: Bool, cancelled: Bool = false) {
        lock.lock()
        defer { lock.unlock() }
        if cancelled {
            // `migrate_fd_cancel` → CANCELLED; `migration_iteration_finish` restarts the guest.
            outgoing.status = .cancelled
            if wasRunning { setRunStateLocked(.running) } else { setRunStateLocked(.postmigrate) }
            migrationEventLocked(.cancelled)
        } else if let failure {
            outgoing.status = .failed
            outgoing.errorDescription = failure
            if stopped {
                if wasRunning { setRunStateLocked(.running) } else { setRunStateLocked(.postmigrate) }
            }
            migrationEventLocked(.failed)
            log("tis-sim machine: migration failed: \(failure)")
        } else {
            setRunStateLocked(.postmigrate)
            outgoing.status = .completed
            migrationEventLocked(.completed)
        }
    }

    private enum WriteOutcome { case written, cancelled, failed(Int32) }

    /// QEMU's rate limit: at most `bandwidth / 10` bytes per 100 ms window
    /// (`migration_rate_limit`, BUFFER_DELAY); `migrate_cancel` is looked at between windows.
    private func writePaced(_ fd: Int32, _ bytes: [UInt8], bandwidth: Int64) -> WriteOutcome {
        let perWindow = max(1, Int(clamping: bandwidth / 10))
        var offset = 0
        while offset < bytes.count {
            lock.lock()
            let cancel = outgoing.cancelRequested
            outgoing.transferred = Int64(offset)
            lock.unlock()
            if cancel { return .cancelled }
            let windowStart = Date()
            let n = min(perWindow, bytes.count - offset)
            let e = bytes.withUnsafeBytes { Posix.writeAll(fd, UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + n)])) }
            if let e { return .failed(e) }
            offset += n
            if offset < bytes.count {
                let left = 0.1 - Date().timeIntervalSince(windowStart)
                if left > 0 { usleep(useconds_t(left * 1e6)) }
            }
        }
        return .written
    }

    /// QMP `migrate_cancel`: a running outgoing migration stops at its next window and is
    /// `cancelled`; otherwise nothing happens (as in QEMU).
    func cancelMigration() {
        lock.lock()
        if outgoing.isActive { outgoing.cancelRequested = true }
        lock.unlock()
    }

    // MARK: incoming

    /// QMP `migrate-incoming`, only under `-incoming defer` and only once (QEMU's rules).
    func migrateIncoming(uri: String, exitOnError: Bool) throws(QMPCommands.Failure) {
        lock.lock()
        let deferred = configuration.incoming == "defer"
        let started = incoming.started
        lock.unlock()
        guard deferred else { throw QMPCommands.Failure("'-incoming' was not specified on the command line") }
        guard !started else { throw QMPCommands.Failure("The incoming migration has already been started") }
        do throws(MachineError) {
            try startIncoming(uri: uri, exitOnError: exitOnError)
        } catch {
            throw QMPCommands.Failure(error.message)
        }
    }

    /// `qemu_start_incoming_migration`: listen (`tcp:`, `unix:`), spawn (`exec:`) or open
    /// (`file:`) now, so that errors reach the caller; read the stream on a thread.
    func startIncoming(uri: String, exitOnError: Bool) throws(MachineError) {
        guard let target = MigrationURI(uri) else {
            throw MachineError(.invalidOption, "unknown migration protocol: \(uri)")
        }
        enum Pending { case listener(Int32), ready(Int32, pid_t?) }
        let pending: Pending
        var address: QMPValue?
        switch target {
        case .tcp(let hp):
            let (fd, host, port) = try Posix.listenTCP(hp)
            pending = .listener(fd)
            address = .array([.object([("port", .string(String(port))), ("ipv4", .bool(true)),
                                       ("host", .string(host)), ("type", .string("inet"))])])
        case .unix(let p):
            pending = .listener(try Posix.listenUnix(p))
            address = .array([.object([("path", .string(p)), ("type", .string("unix"))])])
        case .exec(let cmd):
            let (pid, fd) = try Posix.spawnShell(cmd, writingToChild: false)
            pending = .ready(fd, pid)
        case .file(let p):
            let fd = open(p, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw MachineError(.io, "Could not open '\(p)': \(Posix.errnoText())") }
            pending = .ready(fd, nil)
        }
        lock.lock()
        incoming.started = true
        incoming.status = .setup
        incoming.socketAddress = address
        migrationEventLocked(.setup)
        lock.unlock()
        let t = Thread { [self] in
            let fd: Int32
            var child: pid_t?
            switch pending {
            case .listener(let l):
                let accepted = try? Posix.accept(l)
                Glibc.close(l)
                if case .unix(let p) = target { unlink(p) }
                guard let a = accepted else {
                    finishIncoming(failure: "accept failed", exitOnError: exitOnError)
                    return
                }
                fd = a
            case .ready(let f, let pid):
                fd = f
                child = pid
            }
            lock.lock()
            incoming.status = .active
            migrationEventLocked(.active)
            lock.unlock()
            let failure = loadIncoming(fd)
            Glibc.close(fd)
            if let child { Posix.reap(child, timeout: 2) }
            finishIncoming(failure: failure, exitOnError: exitOnError)
        }
        t.name = "migration-in"
        t.start()
    }

    /// `qemu_loadvm_state` for the TPM: walk the whole stream (RAM and every device of a QEMU
    /// stream are framed and skipped), check the machine type as QEMU's configuration
    /// `post_load` does, then restore the backend (STOP, SET_STATEBLOB, INIT(DELETE_VOLATILE):
    /// `tpm_emulator_post_load`), the tpm-tis state and the PPI page. Returns the failure.
    func loadIncoming(_ fd: Int32) -> String? {
        let state: TPMMigrationState
        do throws(StreamError) {
            state = try TPMMigrationState(source: .fileDescriptor(fd))
        } catch {
            return "\(error)"
        }
        let mine = configuration.machineType.rawValue
        guard state.machineType == mine else {
            return "Machine type received is '\(state.machineType)' and local is '\(mine)'"
        }
        if state.crbRegisters != nil && state.tis == nil {
            return "the stream holds a tpm-crb device; this machine has tpm-tis"
        }
        do {
            if let blobs = state.emulatorBlobs {
                if let tis = state.tis {
                    try device.restore(tis, blobs: blobs)
                } else {
                    device.waitForCompletion()
                    try backend.restoreState(blobs)
                }
            } else {
                // QEMU never INITs a TPM whose section is missing; this machine starts it so
                // the guest has a working TPM, and says so.
                log("tis-sim machine: the incoming stream has no tpm-emulator section; starting the TPM fresh")
                try device.runner.startup(bufferSize: device.bufferSize, incoming: false)
                if let tis = state.tis { try device.restore(tis) }
            }
        } catch {
            return "error while loading the TPM state: \(error)"
        }
        if let ppi = state.ppi { device.ppi.load(ppi) }
        return nil
    }

    private func finishIncoming(failure: String?, exitOnError: Bool) {
        lock.lock()
        if let failure {
            incoming.status = .failed
            incoming.errorDescription = failure
            migrationEventLocked(.failed)
            lock.unlock()
            log("tis-sim machine: load of migration failed: \(failure)")
            // QEMU 7.2 `process_incoming_migration_co`: exit(EXIT_FAILURE).
            if exitOnError { requestExit(1) }
            return
        }
        // `process_incoming_migration_bh`: start the guest if autostart, else paused.
        setRunStateLocked(autostart ? .running : .paused)
        incoming.status = .completed
        migrationEventLocked(.completed)
        lock.unlock()
    }
}
