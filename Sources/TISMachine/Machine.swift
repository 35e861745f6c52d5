import EmulatorBackend
import Foundation
import Synchronization
import TIS
import TISDriver
import VMState
#if canImport(Glibc)
import Glibc
#endif

/// A register-level test VMM: a `pc`/`q35` machine whose only device is a `tpm-tis` at
/// 0xFED40000 (with its PPI RAM), driven over QEMU's qtest protocol and QMP monitor exactly
/// as QEMU 7.2 answers them, and migrating to and from QEMU 7.2 with QEMU's stream.
///
/// The moving parts, each on its own thread: the qtest connection (`-qtest unix:` connects,
/// as QEMU does; `-qtest stdio`), the QMP server (one client at a time), an outgoing migration,
/// an incoming migration. MMIO goes straight to the `TISDevice` through `TISMachineBus` (the
/// device is thread-safe); the run state and migration bookkeeping sit behind one lock.
public final class Machine: @unchecked Sendable {
    /// What the machine was started as.
    public let configuration: MachineConfiguration
    /// The tpm-tis (QEMU `TPMStateISA`), thread-safe.
    public let device: TISDevice
    /// The guest-physical address space qtest accesses go through.
    public let bus: TISMachineBus
    /// The TPM behind the device (`SwtpmBackend` or `LibtpmsBackend`).
    public let backend: any TPMBackend
    /// Where diagnostics go (stderr for the CLI), one line each, as QEMU's `error_report`.
    public let log: @Sendable (String) -> Void

    let lock = NSLock()
    var _runState: RunState
    /// QEMU `autostart`: start the guest when an incoming migration completes (cleared by -S
    /// and by `stop` while in `inmigrate`).
    var autostart: Bool
    var outgoing = OutgoingMigration()
    var incoming = IncomingMigration()
    var capabilities: [(String, Bool)] = Machine.migrationCapabilityNames.map { ($0, false) }
    var parameters = MigrationParameters()

    private let irq: IRQRelay
    private var qmpServer: QMPServer?
    private var qtest: QTestConnection?
    private let quit = DispatchSemaphore(value: 0)
    private let exitStatus = Mutex<Int32?>(nil)

    /// Builds the machine: the backend (swtpm's ctrl socket connected and probed as QEMU's
    /// `tpm_emulator_handle_device_opts` does, or libtpms on its state directory) and the
    /// device, reset as QEMU resets it (`incoming`: no INIT, the stream brings the state).
    /// `backend` replaces the configured one (in-process tests).
    public init(configuration: MachineConfiguration, backend injected: (any TPMBackend)? = nil,
                log: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) })
        throws(MachineError) {
        // QEMU ignores SIGPIPE (os_setup_signal_handling); a vanished peer is an EPIPE, not death.
        signal(SIGPIPE, SIG_IGN)
        self.configuration = configuration
        self.log = log
        let backend: any TPMBackend
        if let injected {
            backend = injected
        } else {
            switch configuration.backend {
            case .emulator(let path):
                do throws(BackendError) {
                    backend = try SwtpmBackend(SwtpmBackend.Configuration(ctrl: .unix(path: path)))
                } catch {
                    if let e = error.errno, error.code == .io || error.code == .connectionClosed {
                        // QEMU's words for a ctrl socket nobody listens on (the chardev's error).
                        throw MachineError(.backend, "Failed to connect to '\(path)': \(Posix.errnoText(e))",
                                           option: "-chardev socket,path=\(path)")
                    }
                    throw MachineError(.backend, "tpm-emulator: \(error)", option: "-tpmdev emulator")
                }
            case .libtpms(let dir, let version):
                do throws(BackendError) {
                    backend = try LibtpmsBackend(version: version, stateDirectory: dir)
                } catch {
                    throw MachineError(.backend, "libtpms: \(error)", option: "-tpmdev libtpms")
                }
            }
        }
        self.backend = backend
        let irq = IRQRelay()
        self.irq = irq
        let isIncoming = configuration.incoming != nil
        do throws(TISDeviceError) {
            device = try TISDevice(backend: backend, mode: .worker, configuration: .qemu72, irq: irq, incoming: isIncoming)
        } catch {
            backend.shutdown()
            throw MachineError(.backend, "tpm-tis: \(error)", option: "-device tpm-tis")
        }
        bus = TISMachineBus(device: device)
        if isIncoming {
            _runState = .inmigrate
        } else {
            _runState = configuration.startPaused ? .prelaunch : .running
        }
        autostart = !configuration.startPaused
    }

    /// The run state (`query-status`).
    public var runState: RunState {
        lock.lock()
        defer { lock.unlock() }
        return _runState
    }

    /// Sets the run state and emits what QEMU emits on the transition: STOP when the guest
    /// stops running, RESUME when it starts (and the tpm-emulator's `vm_state_change` relock).
    /// Caller holds `lock`.
    func setRunStateLocked(_ new: RunState) {
        let old = _runState
        _runState = new
        if old == .running && new != .running { emit("STOP") }
        if old != .running && new == .running {
            emit("RESUME")
            if let swtpm = backend as? SwtpmBackend { _ = try? swtpm.vmResumed() }
        }
    }

    // MARK: Start and run

    /// Opens the QMP socket, connects the qtest channel and starts `-incoming`. Errors here are
    /// start-up errors: QEMU would exit with them.
    public func start() throws(MachineError) {
        if let path = configuration.qmpSocket {
            let server = try QMPServer(path: path, machine: self)
            qmpServer = server
            if configuration.qmpWait { try server.acceptFirstClient() }
            server.run()
        } else if let path = configuration.qmpConnect {
            let server = try QMPServer(connectingTo: path, machine: self)
            qmpServer = server
            server.run()
        }
        switch configuration.qtest {
        case .unix(let path)?:
            let fd: Int32
            do throws(MachineError) {
                fd = try Posix.connectUnix(path)
            } catch {
                throw MachineError(.io, error.message, option: "-qtest unix:\(path)")
            }
            startQTest(input: fd, output: fd, endsMachine: false)
        case .stdio?:
            startQTest(input: 0, output: 1, endsMachine: true)
        case nil:
            break
        }
        if let uri = configuration.incoming, uri != "defer" {
            do throws(MachineError) {
                try startIncoming(uri: uri, exitOnError: true)
            } catch {
                throw MachineError(error.code, error.message, option: "-incoming \(uri)")
            }
        }
    }

    private func startQTest(input: Int32, output: Int32, endsMachine: Bool) {
        let connection = QTestConnection(input: input, output: output, machine: self)
        qtest = connection
        irq.sink = { [weak connection] level in connection?.irqChanged(level) }
        connection.run { [weak self] in
            if endsMachine { self?.requestExit(0) }
        }
    }

    /// Blocks until `quit` (0), a failed incoming migration (1, as QEMU exits), or the end of
    /// `-qtest stdio`; then shuts the backend down as QEMU does on `quit` (CMD_SHUTDOWN to
    /// swtpm) and returns the exit status.
    public func run() -> Int32 {
        quit.wait()
        let status = exitStatus.withLock { $0 } ?? 0
        close(shutdownBackend: status == 0)
        return status
    }

    /// Ends `run()` with `status`.
    public func requestExit(_ status: Int32) {
        let first = exitStatus.withLock { s -> Bool in
            guard s == nil else { return false }
            s = status
            return true
        }
        if first { quit.signal() }
    }

    private let closed = Atomic<Bool>(false)

    /// Closes the sockets; `shutdownBackend` also sends swtpm CMD_SHUTDOWN (QEMU finalizes the
    /// tpm-emulator on a clean exit, not on `exit(1)`). Idempotent.
    public func close(shutdownBackend: Bool = true) {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        qmpServer?.close()
        qtest?.close()
        device.waitForCompletion()
        if shutdownBackend { backend.shutdown() }
    }

    // MARK: qtest

    /// One qtest request line → its answer (nil for a blank line). Exposed for in-process use.
    public func qtestAnswer(_ line: String, interpreter: inout QTestInterpreter) -> String? {
        interpreter.answer(line, bus: bus)
    }

    // MARK: QMP events

    /// Sends an event to the QMP client, if one has negotiated capabilities.
    func emit(_ name: String, _ data: QMPValue? = nil) {
        qmpServer?.emit(name, data)
    }

    /// Whether migration events (`MIGRATION`, `MIGRATION_PASS`) are on (capability `events`).
    var eventsEnabledLocked: Bool { capabilities.first { $0.0 == "events" }?.1 ?? false }
}

/// The TIS interrupt line, forwarded to whoever listens (the qtest connection).
final class IRQRelay: TISInterruptLine, @unchecked Sendable {
    private let state = Mutex<(@Sendable (Bool) -> Void)?>(nil)
    var sink: (@Sendable (Bool) -> Void)? {
        get { state.withLock { $0 } }
        set { state.withLock { $0 = newValue } }
    }
    func setLevel(_ high: Bool) { sink?(high) }
}

/// The qtest channel: requests in, answers and `IRQ raise|lower N` lines out.
final class QTestConnection: @unchecked Sendable {
    private let input: Int32
    private let output: Int32
    private unowned let machine: Machine
    private let writeLock = NSLock()
    private var interpreter = QTestInterpreter()
    /// The intercepted IRQ's level as last reported (QEMU `irq_levels[]`, low at intercept).
    private var intercepting = false
    private var reportedLevel = false
    private let isClosed = Atomic<Bool>(false)
    /// QEMU reads lines of any length; a line longer than this is answered FAIL and dropped.
    static let maximumLineLength = 4 << 20

    init(input: Int32, output: Int32, machine: Machine) {
        self.input = input
        self.output = output
        self.machine = machine
    }

    func run(onEnd: @escaping @Sendable () -> Void) {
        let t = Thread { [self] in
            loop()
            onEnd()
        }
        t.name = "qtest"
        t.start()
    }

    private func loop() {
        var pending: [UInt8] = []
        var discarding = false
        var buf = [UInt8](repeating: 0, count: 65536)
        while !isClosed.load(ordering: .acquiring) {
            let n = buf.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            var start = 0
            for i in 0..<n where buf[i] == 0x0A {
                if discarding {
                    discarding = false
                } else {
                    pending += buf[start..<i]
                    handle(String(decoding: pending, as: UTF8.self))
                }
                pending.removeAll(keepingCapacity: true)
                start = i + 1
            }
            if !discarding { pending += buf[start..<n] }
            if pending.count > Self.maximumLineLength {
                pending.removeAll()
                discarding = true
                send("FAIL line too long")
            }
        }
    }

    private func handle(_ line: String) {
        // Bus accesses run outside the write lock: an access may move the IRQ line, and that
        // line is written (before this answer, as QEMU writes it) under the lock.
        guard let answer = interpreter.answer(line, bus: machine.bus) else { return }
        if let path = interpreter.interceptedPath, !intercepting {
            _ = path
            writeLock.lock()
            intercepting = true
            reportedLevel = false
            writeLock.unlock()
        }
        send(answer)
    }

    func irqChanged(_ level: Bool) {
        writeLock.lock()
        defer { writeLock.unlock() }
        guard intercepting, level != reportedLevel else { return }
        reportedLevel = level
        writeLocked("IRQ \(level ? "raise" : "lower") \(machine.device.configuration.irqNumber)")
    }

    private func send(_ line: String) {
        writeLock.lock()
        defer { writeLock.unlock() }
        writeLocked(line)
    }

    private func writeLocked(_ line: String) {
        guard !isClosed.load(ordering: .acquiring) else { return }
        _ = Posix.writeAll(output, Array((line + "\n").utf8))
    }

    func close() {
        guard !isClosed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if input > 2 { shutdown(input, Int32(SHUT_RDWR)) }
    }
}

extension Machine {
    /// The run state without taking `lock` (the caller holds it).
    var runStateLocked: RunState { _runState }
}
