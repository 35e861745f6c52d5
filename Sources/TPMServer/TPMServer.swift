import Dispatch
import EmulatorBackend
import Synchronization
import TIS
#if canImport(Glibc)
import Glibc
#endif

/// A TPM server in front of a `TISDevice`: swtpm's TCP data and ctrl channels (what tpm2-tss's
/// tcti-swtpm speaks: `tpm2_* -T swtpm:host=127.0.0.1,port=P`), and optionally the mssim TPM
/// and platform ports (tcti-mssim). Every TPM command a client sends is written into the TIS
/// FIFO by the register-level `TISDriver` at the locality the client chose, runs on the
/// backend, and its response is read back out of the FIFO: a client exercises the whole
/// frontend, not just the backend.
///
/// Shape: one I/O thread (non-blocking sockets, `poll`) frames requests from every connection;
/// one engine thread (`TPMEngine`) executes them one at a time. Resources are bounded: at most
/// `maxConnections` connections (at the limit the longest-idle connection without a request is
/// closed for a new one), at most one request per connection in flight, input buffers capped
/// at the TIS buffer plus a header (a larger size field is refused before its body is read),
/// and deadlines on every partial request, idle connection and unread reply. A client that
/// stalls, disconnects mid-command, or floods connections costs its own connection and
/// nothing else; the TIS only ever sees whole commands, one at a time.
///
/// Wire behaviour follows swtpm 0.7.1 (peers §2): data connections may carry one command
/// (tcti-swtpm) or many in a row; ctrl requests are framed by code as swtpm's
/// `ctrlchannel_recv_cmd` frames them, and bytes that arrive with a request belong to it.
public final class TPMServer: @unchecked Sendable {
    public struct Configuration: Sendable {
        /// The address to listen on (IPv4).
        public var host = "127.0.0.1"
        /// The data port; the ctrl port is `dataPort + 1` unless `ctrlPort` is set. 0 picks a
        /// free pair P, P+1.
        public var dataPort: UInt16 = 2321
        public var ctrlPort: UInt16? = nil
        /// The mssim TPM port; the platform port is `mssimPort + 1`. nil: no mssim ports; 0
        /// picks a free pair.
        public var mssimPort: UInt16? = nil
        /// Connections open at once, all ports together.
        public var maxConnections = 64
        /// Seconds from a request's first byte to its last.
        public var commandTimeout: Double = 2
        /// Seconds a connection may sit without a request.
        public var idleTimeout: Double = 30
        /// Seconds a client has to read its reply.
        public var writeTimeout: Double = 5
        /// Send TPM2_Startup(CLEAR) through the TIS once the TPM is up (swtpm's
        /// `--flags startup-clear`); off by default: the TPM comes up as after firmware's
        /// TPM_Init and the client sends the Startup (`tpm2_startup -c`).
        public var startupClear = false
        /// How long the driver waits for a TIS status bit; the backend's own timeouts are
        /// shorter, so this is only a safety net.
        public var driverTimeout: Double = 120

        /// Port 2321 / 2322, no mssim, 64 connections, 2 s / 30 s / 5 s deadlines, no Startup.
        public init() {}
    }

    /// The settings the server runs with.
    public let configuration: Configuration
    /// The TIS device every command goes through (its state, for checks and saves).
    public let device: TISDevice
    let engine: TPMEngine
    let stats: StatisticsBox
    /// The ports bound, by protocol.
    public let ports: [ServerProtocol: UInt16]
    private let listeners: [(fd: Int32, proto: ServerProtocol)]
    private let wakeRead: Int32
    private let wakeWrite: Int32

    private let stopping = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private let threadsLeft = Atomic<Int>(2)

    private struct Job: Sendable { var connection: UInt64; var frame: Frame }
    private struct Done: Sendable { var connection: UInt64; var reply: EngineReply }
    private let jobs = Mutex<[Job]>([])
    private let jobSignal = DispatchSemaphore(value: 0)
    private let done = Mutex<[Done]>([])

    /// Builds the device over `backend` (a TIS reset: the TPM is started, as firmware's
    /// TPM_Init does), binds the ports and starts serving. The backend stays the caller's: shut
    /// it down after `stop()` / `wait()`.
    public init(backend: any TPMBackend, configuration: Configuration = Configuration(),
                executionMode: ExecutionMode = .worker) throws(TPMServerError) {
        guard configuration.maxConnections >= 2 else {
            throw TPMServerError(.configuration, "maxConnections must be at least 2")
        }
        self.configuration = configuration
        let stats = StatisticsBox()
        self.stats = stats
        let runner = BackendRunner(backend: backend, mode: executionMode)
        let device = TISDevice(runner: runner, events: stats)
        self.device = device
        do {
            try device.reset()
        } catch {
            throw TPMServerError(.backend, "the TPM did not start: \(error)")
        }
        self.engine = TPMEngine(device: device, stats: stats, driverTimeout: configuration.driverTimeout)

        var bound: [(fd: Int32, proto: ServerProtocol)] = []
        var ports: [ServerProtocol: UInt16] = [:]
        do throws(TPMServerError) {
            let (d, c) = try Self.bindPair(host: configuration.host, configuration.dataPort, configuration.ctrlPort)
            bound += [(d.fd, .data), (c.fd, .ctrl)]
            ports[.data] = d.port
            ports[.ctrl] = c.port
            if let m = configuration.mssimPort {
                let (t, p) = try Self.bindPair(host: configuration.host, m, nil)
                bound += [(t.fd, .mssimTPM), (p.fd, .mssimPlatform)]
                ports[.mssimTPM] = t.port
                ports[.mssimPlatform] = p.port
            }
        } catch {
            for l in bound { ServerSocket.close(l.fd) }
            throw error
        }
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            for l in bound { ServerSocket.close(l.fd) }
            throw TPMServerError(.listen, "pipe2 failed", errno: Glibc.errno)
        }
        ServerSocket.makeNonBlocking(fds[0])
        ServerSocket.makeNonBlocking(fds[1])
        self.wakeRead = fds[0]
        self.wakeWrite = fds[1]
        self.listeners = bound
        self.ports = ports

        if configuration.startupClear {
            _ = engine.startupClear()
        }
        do throws(TPMServerError) {
            try startThread(name: "tpm-engine") { [self] in engineLoop() }
        } catch {
            for l in bound { ServerSocket.close(l.fd) }
            ServerSocket.close(wakeRead)
            ServerSocket.close(wakeWrite)
            throw error
        }
        do throws(TPMServerError) {
            try startThread(name: "tpm-server-io") { [self] in ioLoop() }
        } catch {
            stopping.store(true, ordering: .releasing)
            jobSignal.signal()
            throw error
        }
    }

    deinit {
        ServerSocket.close(wakeRead)
        ServerSocket.close(wakeWrite)
    }

    /// Binds two ports: `first` and `second ?? first + 1`; with `first` 0, a free pair P, P+1.
    static func bindPair(host: String, _ first: UInt16, _ second: UInt16?) throws(TPMServerError) -> ((fd: Int32, port: UInt16), (fd: Int32, port: UInt16)) {
        if first != 0 {
            guard second != nil || first < UInt16.max else {
                throw TPMServerError(.configuration, "port \(first) has no successor for the second channel")
            }
            let a = try ServerSocket.listen(host: host, port: first)
            do {
                let b = try ServerSocket.listen(host: host, port: second ?? first + 1)
                return (a, b)
            } catch {
                ServerSocket.close(a.fd)
                throw error
            }
        }
        var last = TPMServerError(.listen, "no free port pair found")
        for _ in 0..<64 {
            let a = try ServerSocket.listen(host: host, port: 0)
            guard a.port < UInt16.max else { ServerSocket.close(a.fd); continue }
            do {
                let b = try ServerSocket.listen(host: host, port: second ?? a.port + 1)
                return (a, b)
            } catch {
                ServerSocket.close(a.fd)
                last = error
            }
        }
        throw last
    }

    /// The counters so far.
    public var statistics: ServerStatistics { stats.value.withLock { $0 } }

    /// True once the server has stopped (after `stop()` or a client's CMD_SHUTDOWN).
    public var isStopped: Bool { threadsLeft.load(ordering: .acquiring) == 0 }

    /// Stops accepting, closes every connection, lets the engine finish the command it runs;
    /// returns at once (`wait()` waits). Idempotent.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake()
        jobSignal.signal()
    }

    /// Blocks until the server has stopped: `stop()` was called or a client sent CMD_SHUTDOWN
    /// (after which the TPM is stopped too).
    public func wait() {
        finished.wait()
        finished.signal()
    }

    private func wake() {
        var b: UInt8 = 1
        _ = Glibc.write(wakeWrite, &b, 1)
    }

    private func threadDone() {
        if threadsLeft.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 {
            finished.signal()
        }
    }

    // MARK: Engine thread

    private func engineLoop() {
        defer { threadDone() }
        while true {
            jobSignal.wait()
            if stopping.load(ordering: .acquiring) { return }
            guard let job = jobs.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else { continue }
            let reply = engine.handle(job.frame)
            done.withLock { $0.append(Done(connection: job.connection, reply: reply)) }
            wake()
        }
    }

    private func submit(_ connection: UInt64, _ frame: Frame) {
        jobs.withLock { $0.append(Job(connection: connection, frame: frame)) }
        jobSignal.signal()
    }

    // MARK: I/O thread

    private enum Phase { case reading, waiting, writing, draining }

    private final class Connection {
        let id: UInt64
        let fd: Int32
        let framer: Framer
        var phase = Phase.reading
        var input: [UInt8] = []
        var output: [UInt8] = []
        var written = 0
        var closeAfterWrite = false
        var stopAfterWrite = false
        /// The peer hung up while its request was at the engine: not polled any more (a hung-up
        /// socket polls ready at once, which would spin the loop), closed when the reply comes.
        var peerGone = false
        /// When the current phase's clock started (request's first byte, write start, drain).
        var since: Double
        var lastActivity: Double

        init(id: UInt64, fd: Int32, framer: Framer, now: Double) {
            self.id = id
            self.fd = fd
            self.framer = framer
            self.since = now
            self.lastActivity = now
        }
    }

    private func ioLoop() {
        defer { threadDone() }
        var connections: [UInt64: Connection] = [:]
        var nextID: UInt64 = 1
        var pending = false   // a CMD_SHUTDOWN reply is being written
        let maxCommand = TISGeometry.bufferSize
        let mssimPrefix = engine.version == .tpm20

        func close(_ c: Connection) {
            ServerSocket.close(c.fd)
            connections.removeValue(forKey: c.id)
        }

        func reply(_ c: Connection, _ bytes: [UInt8], close closeAfter: Bool, now: Double) {
            c.output = bytes
            c.written = 0
            c.closeAfterWrite = closeAfter
            c.phase = .writing
            c.since = now
            flush(c, now: now)
        }

        func flush(_ c: Connection, now: Double) {
            while c.written < c.output.count {
                switch ServerSocket.write(c.fd, c.output, from: c.written) {
                case .wrote(let n): c.written += n
                case .wouldBlock: return
                case .failed:
                    if c.stopAfterWrite { stop() }
                    close(c)
                    return
                }
            }
            c.output = []
            c.lastActivity = now
            if c.stopAfterWrite { stop() }
            if c.closeAfterWrite {
                // Half-close and drain what the client still sends, so the reply is not lost
                // to a reset.
                _ = Glibc.shutdown(c.fd, Int32(SHUT_WR))
                c.phase = .draining
                c.since = now
                c.input = []
            } else {
                c.phase = .reading
                c.since = now
                process(c, now: now)
            }
        }

        func refusalReply(_ c: Connection, _ r: Refusal) -> [UInt8] {
            switch c.framer.proto {
            case .data:
                let wrapped = c.input.count >= 4 && Framer.be32(c.input, 0) == 8 && mssimPrefix
                return wrapped ? TPMEngine.mssimWrap(engine.commandSizeError) : engine.commandSizeError
            case .mssimTPM:
                if case .unknownCode = r { return [] }
                return TPMEngine.mssimWrap(engine.commandSizeError)
            case .ctrl:
                return SwtpmCtrl.ResultResponse(result: SwtpmCtrl.Result.badParameter).encoded()
            case .mssimPlatform:
                return [0, 0, 0, 1]
            }
        }

        func refuse(_ c: Connection, _ r: Refusal, now: Double) {
            stats.update { s in
                if case .truncated = r { s.truncatedRequests += 1 } else { s.refusedRequests += 1 }
            }
            reply(c, refusalReply(c, r), close: true, now: now)
        }

        /// Frames what is buffered; hands a whole request to the engine.
        func process(_ c: Connection, now: Double) {
            guard c.phase == .reading, !c.input.isEmpty else { return }
            switch c.framer.frame(c.input) {
            case .needMore:
                return
            case .refuse(let r):
                refuse(c, r, now: now)
            case .complete(let frame, let consumed):
                c.input.removeFirst(min(consumed, c.input.count))
                c.lastActivity = now
                if case .ctrl(let bytes) = frame, bytes.count >= 4, Framer.be32(bytes, 0) == SwtpmCtrl.CommandCode.cancelTPMCommand.rawValue {
                    // CANCEL must not queue behind the command it cancels.
                    let runner = device.runner
                    DispatchQueue.global().async { runner.cancel() }
                    stats.update { $0.ctrlRequests += 1 }
                    reply(c, SwtpmCtrl.ResultResponse(result: 0).encoded(), close: false, now: now)
                    return
                }
                c.phase = .waiting
                c.since = now
                submit(c.id, frame)
            }
        }

        /// Makes room for a new connection: closes one whose reply is already out (draining),
        /// else the longest-idle one without a request, else the slowest partial request (the
        /// oldest first byte). Connections with a request at the engine or a reply being
        /// written are never closed; if all are, the new connection is refused.
        func evictOrRefuse(now: Double) -> Bool {
            let all = Array(connections.values)
            let victim = all.first { $0.phase == .draining }
                ?? all.filter { $0.phase == .reading && $0.input.isEmpty }.min { ($0.lastActivity, $0.id) < ($1.lastActivity, $1.id) }
                ?? all.filter { $0.phase == .reading }.min { ($0.since, $0.id) < ($1.since, $1.id) }
            guard let victim else { return false }
            close(victim)
            stats.update { $0.connectionsEvicted += 1 }
            return true
        }

        var pfds: [pollfd] = []
        var order: [UInt64] = []
        while !stopping.load(ordering: .acquiring) {
            pfds.removeAll(keepingCapacity: true)
            order.removeAll(keepingCapacity: true)
            pfds.append(pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0))
            for l in listeners { pfds.append(pollfd(fd: l.fd, events: pending ? 0 : Int16(POLLIN), revents: 0)) }
            for c in connections.values where !c.peerGone {
                var ev: Int16 = 0
                switch c.phase {
                case .reading, .draining: ev = Int16(POLLIN)
                case .writing: ev = Int16(POLLOUT)
                case .waiting: ev = 0
                }
                pfds.append(pollfd(fd: c.fd, events: ev, revents: 0))
                order.append(c.id)
            }
            let r = poll(&pfds, nfds_t(pfds.count), 100)
            if r < 0 && Glibc.errno != EINTR { break }
            let now = monotonicSeconds()

            // Engine replies.
            if pfds[0].revents != 0 {
                var sink = [UInt8](repeating: 0, count: 256)
                while Glibc.read(wakeRead, &sink, sink.count) > 0 {}
            }
            for d in done.withLock({ q -> [Done] in defer { q.removeAll() }; return q }) {
                guard let c = connections[d.connection] else {
                    // The client that asked for CMD_SHUTDOWN is gone; the TPM is stopped anyway.
                    if d.reply.stopServer { stop() }
                    continue
                }
                if d.reply.stopServer {
                    c.stopAfterWrite = true
                    pending = true
                }
                if c.peerGone || (d.reply.bytes.isEmpty && d.reply.close) {
                    if c.stopAfterWrite { stop() }
                    close(c)
                    continue
                }
                reply(c, d.reply.bytes, close: d.reply.close, now: now)
            }

            // New connections.
            for (i, l) in listeners.enumerated() where pfds[1 + i].revents & Int16(POLLIN) != 0 {
                for _ in 0..<64 {
                    guard let fd = ServerSocket.accept(l.fd) else { break }
                    if connections.count >= configuration.maxConnections && !evictOrRefuse(now: now) {
                        ServerSocket.close(fd)
                        stats.update { $0.connectionsRefused += 1 }
                        continue
                    }
                    let framer = Framer(proto: l.proto, maxCommandSize: maxCommand, acceptsMssimPrefix: mssimPrefix)
                    let c = Connection(id: nextID, fd: fd, framer: framer, now: now)
                    nextID += 1
                    connections[c.id] = c
                    let n = connections.count
                    stats.update { s in
                        s.connectionsAccepted += 1
                        s.peakConnections = max(s.peakConnections, n)
                    }
                }
            }

            // Connection I/O.
            let base = 1 + listeners.count
            for (i, id) in order.enumerated() {
                let ev = pfds[base + i].revents
                guard ev != 0, let c = connections[id] else { continue }
                switch c.phase {
                case .writing:
                    flush(c, now: now)
                case .draining:
                    var scratch: [UInt8] = []
                    switch ServerSocket.read(c.fd, into: &scratch, max: 16 * 1024) {
                    case .data, .wouldBlock: break
                    case .eof, .failed: close(c)
                    }
                case .reading:
                    let wasEmpty = c.input.isEmpty
                    let room = c.framer.inputLimit - c.input.count
                    switch ServerSocket.read(c.fd, into: &c.input, max: max(room, 0)) {
                    case .data:
                        if wasEmpty { c.since = now }
                        process(c, now: now)
                    case .wouldBlock:
                        if room <= 0 { refuse(c, .truncated(have: c.input.count, need: c.framer.needed(c.input)), now: now) }
                    case .eof:
                        if c.input.isEmpty {
                            close(c)
                        } else {
                            stats.update { $0.truncatedRequests += 1 }
                            close(c)
                        }
                    case .failed:
                        close(c)
                    }
                case .waiting:
                    if ev & Int16(POLLHUP | POLLERR) != 0 { c.peerGone = true }
                }
            }

            // Deadlines.
            for c in Array(connections.values) {
                switch c.phase {
                case .reading:
                    if !c.input.isEmpty && now - c.since > configuration.commandTimeout {
                        if c.framer.proto == .ctrl {
                            // swtpm processes what arrived when its 500 ms wait ends.
                            stats.update { $0.truncatedRequests += 1 }
                            let bytes = c.input
                            c.input = []
                            c.phase = .waiting
                            c.since = now
                            submit(c.id, .ctrl(bytes))
                        } else {
                            refuse(c, .truncated(have: c.input.count, need: c.framer.needed(c.input)), now: now)
                        }
                    } else if c.input.isEmpty && now - c.lastActivity > configuration.idleTimeout {
                        stats.update { $0.idleClosed += 1 }
                        close(c)
                    }
                case .writing:
                    if now - c.since > configuration.writeTimeout {
                        if c.stopAfterWrite { stop() }
                        close(c)
                    }
                case .draining:
                    if now - c.since > 1 { close(c) }
                case .waiting:
                    break
                }
            }
        }
        for c in connections.values { ServerSocket.close(c.fd) }
        for l in listeners { ServerSocket.close(l.fd) }
        jobSignal.signal()
    }
}
