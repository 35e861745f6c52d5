import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A `swtpm socket` process started as a direct child of this process (posix_spawn, never
/// `-d`), the way libvirt or a test harness starts it for QEMU's `tpm-emulator`.
///
/// - Every path is made absolute (swtpm resolves relative `--tpmstate dir=` against `/` when
///   daemonized, which puts libtpms into failure mode on the first NV write).
/// - The child gets stdin from /dev/null, stdout and stderr into an unlinked temporary file
///   (read it with `diagnosticOutput()`), and no other descriptor of ours: all of ours are
///   close-on-exec and the child closes everything from fd 3 up
///   (`posix_spawn_file_actions_addclosefrom_np`).
/// - `launch` returns once swtpm answers on its ctrl socket; `terminate`/`kill` reap the
///   child, and `deinit` terminates it, so no zombie and no orphan is left behind.
public final class SwtpmProcess: @unchecked Sendable {
    /// How to start swtpm. Paths may be relative; `launch` makes them absolute.
    public struct Options: Sendable {
        public var version: TPMVersion = .tpm20
        /// `--tpmstate dir=`; made absolute; created (mode 0700) if missing.
        public var stateDirectory: String
        /// UnixIO ctrl socket; default `<stateDirectory>/ctrl.sock`. Ignored when the ctrl
        /// channel is TCP (`tcpCtrlPort`, or `tcpDataPort` set).
        public var ctrlSocketPath: String? = nil
        /// If set: `--server type=unixio,path=...` (a data socket besides CMD_SET_DATAFD).
        public var dataSocketPath: String? = nil
        /// If set: `--server type=tcp,port=N,bindaddr=127.0.0.1`, and the ctrl channel becomes
        /// `--ctrl type=tcp,port=<tcpCtrlPort ?? N+1>,bindaddr=127.0.0.1` (tpm2-tss convention).
        public var tcpDataPort: UInt16? = nil
        /// If set: `--ctrl type=tcp,port=N,bindaddr=127.0.0.1`.
        public var tcpCtrlPort: UInt16? = nil
        /// `--flags a,b` (e.g. `not-need-init`, `startup-clear`).
        public var flags: [String] = []
        /// Passed through as `--key <value>`.
        public var key: String? = nil
        /// Passed through as `--migration-key <value>`.
        public var migrationKey: String? = nil
        /// `--log file=<path>,level=<logLevel>`.
        public var logFile: String? = nil
        public var logLevel: Int = 0
        /// Appended to the command line as given.
        public var extraArguments: [String] = []
        /// The swtpm binary; nil = `$SWTPM`, else `swtpm` on `$PATH`, else `/usr/bin/swtpm`.
        public var executable: String? = nil

        public init(stateDirectory: String) {
            self.stateDirectory = stateDirectory
        }
    }

    public let pid: Int32
    /// The options with every path absolute and the ctrl socket path filled in.
    public let options: Options
    /// The full command line that was spawned (argv[0] first).
    public let arguments: [String]

    private struct Reaper {
        var reaped = false
        var waitStatus: Int32 = 0
    }
    private let reaper: Mutex<Reaper>
    /// The unlinked file holding the child's stdout and stderr; closed in deinit.
    private let outputFD: Int32

    /// The UnixIO ctrl socket path (`<stateDirectory>/ctrl.sock` by default). For a TCP ctrl
    /// channel this is the path that would have been used; see `ctrlEndpoint`.
    public var ctrlSocketPath: String { options.ctrlSocketPath ?? options.stateDirectory + "/ctrl.sock" }

    /// Where the ctrl channel listens.
    public var ctrlEndpoint: SwtpmEndpoint { Self.ctrlEndpoint(of: options) }

    /// Where the data channel listens (`--server`), or nil when it is passed by CMD_SET_DATAFD.
    public var dataEndpoint: SwtpmEndpoint? { Self.dataEndpoint(of: options) }

    static func ctrlEndpoint(of o: Options) -> SwtpmEndpoint {
        if let p = o.tcpCtrlPort { return .tcp(host: "127.0.0.1", port: p) }
        if let d = o.tcpDataPort { return .tcp(host: "127.0.0.1", port: d &+ 1) }
        return .unix(path: o.ctrlSocketPath ?? o.stateDirectory + "/ctrl.sock")
    }

    static func dataEndpoint(of o: Options) -> SwtpmEndpoint? {
        if let d = o.tcpDataPort { return .tcp(host: "127.0.0.1", port: d) }
        if let p = o.dataSocketPath { return .unix(path: p) }
        return nil
    }

    private init(pid: Int32, options: Options, arguments: [String], outputFD: Int32) {
        self.pid = pid
        self.options = options
        self.arguments = arguments
        self.outputFD = outputFD
        self.reaper = Mutex(Reaper())
    }

    deinit {
        terminate()
        _ = Glibc.close(outputFD)
    }

    // MARK: Paths and arguments

    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buf, buf.count) != nil else { return path }
        let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let rel = path.hasPrefix("./") ? String(path.dropFirst(2)) : path
        return cwd == "/" ? "/" + rel : cwd + "/" + rel
    }

    /// The options with absolute paths and defaults resolved.
    static func resolved(_ options: Options) -> Options {
        var o = options
        var dir = absolute(o.stateDirectory)
        while dir.count > 1 && dir.hasSuffix("/") { dir.removeLast() }
        o.stateDirectory = dir
        o.ctrlSocketPath = absolute(o.ctrlSocketPath ?? dir + "/ctrl.sock")
        o.dataSocketPath = o.dataSocketPath.map(absolute)
        o.logFile = o.logFile.map(absolute)
        return o
    }

    /// The swtpm command line for `options` (already resolved), argv[0] included.
    static func commandLine(_ o: Options, executable: String) -> [String] {
        var args = [executable, "socket"]
        if o.version == .tpm20 { args.append("--tpm2") }
        args += ["--tpmstate", "dir=\(o.stateDirectory)"]
        switch ctrlEndpoint(of: o) {
        case .unix(let path): args += ["--ctrl", "type=unixio,path=\(path)"]
        case .tcp(_, let port): args += ["--ctrl", "type=tcp,port=\(port),bindaddr=127.0.0.1"]
        }
        if let d = o.tcpDataPort {
            args += ["--server", "type=tcp,port=\(d),bindaddr=127.0.0.1"]
        } else if let p = o.dataSocketPath {
            args += ["--server", "type=unixio,path=\(p)"]
        }
        if !o.flags.isEmpty { args += ["--flags", o.flags.joined(separator: ",")] }
        if let k = o.key { args += ["--key", k] }
        if let k = o.migrationKey { args += ["--migration-key", k] }
        if let l = o.logFile { args += ["--log", "file=\(l),level=\(o.logLevel)"] }
        args += o.extraArguments
        return args
    }

    /// The swtpm binary to run: `$SWTPM`, else `swtpm` on `$PATH`, else nil.
    public static func findExecutable() -> String? {
        if let env = getenv("SWTPM") {
            let s = String(cString: env)
            if !s.isEmpty { return access(s, X_OK) == 0 ? s : nil }
        }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = String(dir) + "/swtpm"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return access("/usr/bin/swtpm", X_OK) == 0 ? "/usr/bin/swtpm" : nil
    }

    // MARK: Launch

    /// Starts swtpm as a direct child and waits until its ctrl socket accepts a connection and
    /// answers CMD_GET_CAPABILITY on it (and, with `--server`, until the data socket exists). On any failure the child is
    /// killed and reaped and a `.process` (or `.timeout`) error carries swtpm's own output.
    public static func launch(_ options: Options, timeout: Double = 10) throws(BackendError) -> SwtpmProcess {
        let o = resolved(options)
        guard o.version != .unspecified else {
            throw BackendError(.unsupported, "swtpm needs TPM version 1.2 or 2.0")
        }
        guard let exe = o.executable ?? findExecutable() else {
            throw BackendError(.process, "swtpm not found (set $SWTPM or install swtpm; scripts/install-deps.sh)", errno: ENOENT)
        }
        // sun_path holds 107 bytes and a NUL: refuse a longer path now rather than letting
        // swtpm fail to bind and the readiness wait run into its timeout.
        for case .unix(let path) in [ctrlEndpoint(of: o), dataEndpoint(of: o)] where path.utf8.count > 107 {
            throw BackendError(.process, "UnixIO socket path longer than 107 bytes: \(path)", errno: ENAMETOOLONG)
        }
        try makeDirectories(o.stateDirectory)
        if case .unix(let path) = ctrlEndpoint(of: o) { try removeStaleSocket(path) }
        if let p = o.dataSocketPath, o.tcpDataPort == nil { try removeStaleSocket(p) }

        let args = commandLine(o, executable: exe)
        let outFD = try makeOutputFile()
        let pid: Int32
        do throws(BackendError) {
            pid = try spawn(exe, args, outputFD: outFD)
        } catch {
            _ = Glibc.close(outFD)
            throw error
        }
        let process = SwtpmProcess(pid: pid, options: o, arguments: args, outputFD: outFD)
        do throws(BackendError) {
            try process.waitUntilReady(timeout: timeout)
        } catch {
            process.kill()
            var e = error
            let out = process.diagnosticOutput()
            if !out.isEmpty { e.message += "; swtpm said: " + out }
            throw e
        }
        return process
    }

    private static func makeDirectories(_ path: String) throws(BackendError) {
        var current = ""
        for part in path.split(separator: "/") {
            current += "/" + part
            if mkdir(current, 0o700) != 0 {
                let e = lastErrno()
                if e == EEXIST { continue }
                throw BackendError(.stateDirectory, "cannot create \(current): \(errnoString(e))", errno: e)
            }
        }
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
            throw BackendError(.stateDirectory, "\(path) is not a directory", errno: ENOTDIR)
        }
    }

    /// A socket file nobody listens on (ECONNREFUSED) is left over from a dead swtpm: remove
    /// it, so the readiness probe cannot be fooled. A live listener is a conflict.
    private static func removeStaleSocket(_ path: String) throws(BackendError) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else {
            throw BackendError(.process, "\(path) exists and is not a socket", errno: EEXIST)
        }
        if let s = try? SwtpmSocket.connectUnix(path: path, timeout: 0.2, label: "probe") {
            s.close()
            throw BackendError(.process, "another process is already listening on \(path)", errno: EADDRINUSE)
        }
        _ = unlink(path)
    }

    private static func makeOutputFile() throws(BackendError) -> Int32 {
        let tmp = getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        var template = Array((tmp + "/swtpm-output-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { buf -> Int32 in
            guard let base = buf.baseAddress else { return -1 }
            return mkstemp(base)
        }
        guard fd >= 0 else {
            let e = lastErrno()
            throw BackendError(.process, "cannot create a file for swtpm's output in \(tmp): \(errnoString(e))", errno: e)
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        template.withUnsafeBufferPointer { buf in if let base = buf.baseAddress { _ = unlink(base) } }
        return fd
    }

    private typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32

    /// glibc ≥ 2.34 `posix_spawn_file_actions_addclosefrom_np`, looked up at run time (the
    /// declaration needs _GNU_SOURCE, which the Glibc module does not define).
    private static let addCloseFrom: AddCloseFrom? = {
        guard let handle = dlopen(nil, RTLD_NOW), let sym = dlsym(handle, "posix_spawn_file_actions_addclosefrom_np") else {
            return nil
        }
        return unsafeBitCast(sym, to: AddCloseFrom.self)
    }()

    private static func spawn(_ exe: String, _ args: [String], outputFD: Int32) throws(BackendError) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outputFD, 1)
        posix_spawn_file_actions_adddup2(&actions, outputFD, 2)
        if let addCloseFrom { _ = addCloseFrom(&actions, 3) }

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // A test runner may ignore SIGPIPE or block signals; swtpm gets the defaults.
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in [SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGUSR1, SIGUSR2] { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        var cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) }
        cargs.append(nil)
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, &attr, cargs, environ)
        guard rc == 0 else {
            throw BackendError(.process, "posix_spawn \(exe) failed: \(errnoString(rc))", errno: rc)
        }
        return pid
    }

    private func waitUntilReady(timeout: Double) throws(BackendError) {
        let deadline = monotonicNow() + timeout
        let ctrl = ctrlEndpoint
        var lastError: BackendError? = nil
        // 1. The ctrl socket accepts a connection (swtpm binds it first, in
        //    handle_ctrlchannel_options) and answers CMD_GET_CAPABILITY on it: swtpm is in its
        //    main loop and has taken the probe off its listen queue. (A probe merely left in
        //    the queue would fill swtpm's backlog, and swtpm_ioctl gives up on a full backlog.)
        //    The probe is then closed; swtpm sees EOF and serves the next client.
        while true {
            if let status = pollExit() {
                throw BackendError(.process, "swtpm exited during startup (\(Self.describe(status)))")
            }
            do throws(BackendError) {
                let s = try SwtpmSocket.connect(to: ctrl, timeout: 0.25, label: "ctrl probe")
                let probe = SwtpmCtrlClient(socket: s, timeout: max(0.01, min(1, deadline - monotonicNow())))
                defer { probe.close() }
                _ = try probe.transact(SwtpmCtrl.GetCapability())
                break
            } catch {
                lastError = error
            }
            guard monotonicNow() < deadline else {
                throw BackendError(.timeout, "swtpm's ctrl socket \(ctrl) did not accept a connection within \(timeout) s"
                                   + (lastError.map { " (last: \($0.message))" } ?? ""))
            }
            usleep(2000)
        }
        // 2. The data socket, bound right after the ctrl socket (handle_server_options).
        if let data = dataEndpoint {
            while true {
                if let status = pollExit() {
                    throw BackendError(.process, "swtpm exited during startup (\(Self.describe(status)))")
                }
                var ready = false
                switch data {
                case .unix(let path):
                    var st = stat()
                    ready = stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK
                case .tcp:
                    if let s = try? SwtpmSocket.connect(to: data, timeout: 0.25, label: "data probe") {
                        s.close()
                        ready = true
                    }
                }
                if ready { break }
                guard monotonicNow() < deadline else {
                    throw BackendError(.timeout, "swtpm's data socket \(data) was not ready within \(timeout) s")
                }
                usleep(2000)
            }
        }
    }

    // MARK: Life and death

    /// The wait status if the child has exited (reaping it), else nil.
    private func pollExit() -> Int32? {
        reaper.withLock { r -> Int32? in
            if r.reaped { return r.waitStatus }
            var status: Int32 = 0
            while true {
                let w = waitpid(pid, &status, WNOHANG)
                if w == pid {
                    r.reaped = true
                    r.waitStatus = status
                    return status
                }
                if w < 0 && lastErrno() == EINTR { continue }
                if w < 0 {
                    // ECHILD: someone else reaped it; it is gone either way.
                    r.reaped = true
                    return 0
                }
                return nil
            }
        }
    }

    /// True until the child has exited (it is reaped as soon as this notices).
    public var isRunning: Bool { pollExit() == nil }

    /// The raw wait status once the child has exited and been reaped, else nil.
    public var exitStatus: Int32? { reaper.withLock { $0.reaped ? $0.waitStatus : nil } }

    static func describe(_ status: Int32) -> String {
        let sig = status & 0x7F
        if sig == 0 { return "exit status \((status >> 8) & 0xFF)" }
        return "killed by signal \(sig)"
    }

    /// SIGTERM, wait up to `timeout` seconds for the child to exit, then SIGKILL; the child is
    /// reaped in every case. Idempotent; a no-op once the child is reaped.
    public func terminate(timeout: Double = 5) {
        reaper.withLock { r in
            guard !r.reaped else { return }
            _ = Glibc.kill(pid, SIGTERM)
            let deadline = monotonicNow() + max(0, timeout)
            var status: Int32 = 0
            while true {
                let w = waitpid(pid, &status, WNOHANG)
                if w == pid { r.reaped = true; r.waitStatus = status; return }
                if w < 0 && lastErrno() != EINTR { r.reaped = true; return }
                if monotonicNow() >= deadline { break }
                usleep(1000)
            }
            _ = Glibc.kill(pid, SIGKILL)
            Self.blockingReap(pid, &r)
        }
    }

    /// SIGKILL and reap. Idempotent.
    public func kill() {
        reaper.withLock { r in
            guard !r.reaped else { return }
            _ = Glibc.kill(pid, SIGKILL)
            Self.blockingReap(pid, &r)
        }
    }

    private static func blockingReap(_ pid: Int32, _ r: inout Reaper) {
        var status: Int32 = 0
        while true {
            let w = waitpid(pid, &status, 0)
            if w == pid { r.reaped = true; r.waitStatus = status; return }
            if w < 0 && lastErrno() == EINTR { continue }
            r.reaped = true
            return
        }
    }

    /// What swtpm wrote to stdout and stderr so far (at most the last 64 KiB).
    public func diagnosticOutput() -> String {
        var st = stat()
        guard fstat(outputFD, &st) == 0, st.st_size > 0 else { return "" }
        let size = Int(st.st_size)
        let count = min(size, 64 * 1024)
        var buf = [UInt8](repeating: 0, count: count)
        let n = buf.withUnsafeMutableBytes { pread(outputFD, $0.baseAddress, count, off_t(size - count)) }
        guard n > 0 else { return "" }
        var s = String(decoding: buf.prefix(n), as: UTF8.self)
        while s.last == "\n" { s.removeLast() }
        return s
    }
}
