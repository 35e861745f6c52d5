import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A direct child process started with `posix_spawn`: stdin from /dev/null, stdout and stderr
/// appended to one log file, every inherited descriptor above 2 closed.
///
/// Closing inherited descriptors matters: tests run in parallel in one process, and a socket
/// of another test leaking into QEMU would keep that socket's peer from ever seeing EOF.
/// The process is always reaped: `terminate(grace:)` escalates to SIGKILL and waits.
public final class ChildProcess {
    /// The process id.
    public let pid: pid_t
    /// The absolute path of the executable.
    public let executable: String
    /// The arguments (without argv[0]).
    public let arguments: [String]
    /// Where stdout and stderr go.
    public let outputPath: String
    /// The wait status once reaped.
    public private(set) var exitStatus: Int32?

    /// Finds `name` in `PATH` (or takes it as is when it contains a slash).
    public static func which(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Spawns `executable` (absolute) with `arguments`, output to `outputPath`.
    public init(executable: String, arguments: [String], outputPath: String) throws(HarnessError) {
        self.executable = executable
        self.arguments = arguments
        self.outputPath = outputPath

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        ChildProcess.addCloseFrom(&actions, 3)

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Default signal dispositions and an empty mask in the child: a test runner that blocks
        // or ignores SIGTERM/SIGPIPE must not pass that on to QEMU.
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGTERM)
        sigaddset(&defaults, SIGINT)
        sigaddset(&defaults, SIGPIPE)
        sigaddset(&defaults, SIGCHLD)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var child: pid_t = 0
        let rc = argv.withUnsafeBufferPointer { buf -> Int32 in
            guard let base = buf.baseAddress else { return EINVAL }
            return posix_spawn(&child, executable, &actions, &attr, base, environ)
        }
        guard rc == 0 else {
            throw HarnessError(.spawn, "posix_spawn \(executable) failed: \(String(cString: strerror(rc)))",
                               operation: "spawn", errno: rc)
        }
        self.pid = child
        ChildRegistry.shared.add(child)
    }

    /// glibc ≥ 2.34 `posix_spawn_file_actions_addclosefrom_np`, looked up at run time.
    private static func addCloseFrom(_ actions: inout posix_spawn_file_actions_t, _ from: Int32) {
        typealias Fn = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else {
            return
        }
        let fn = unsafeBitCast(sym, to: Fn.self)
        _ = fn(&actions, from)
    }

    /// Whether the process is still running (reaps it if it has exited).
    public var isRunning: Bool {
        if exitStatus != nil { return false }
        return !reap(block: false)
    }

    /// Non-blocking (or blocking) waitpid; true once reaped.
    @discardableResult
    private func reap(block: Bool) -> Bool {
        if exitStatus != nil { return true }
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, block ? 0 : WNOHANG)
            if r == pid {
                exitStatus = status
                ChildRegistry.shared.remove(pid)
                return true
            }
            if r == 0 { return false }
            if r < 0 && errno == EINTR { continue }
            // ECHILD: someone else reaped it; treat as gone.
            exitStatus = -1
            ChildRegistry.shared.remove(pid)
            return true
        }
    }

    /// Waits up to `timeout` seconds for the process to exit on its own.
    @discardableResult
    public func waitForExit(timeout: Double) -> Bool {
        let deadline = Deadline(seconds: timeout)
        while !reap(block: false) {
            if deadline.expired { return false }
            usleep(2_000)
        }
        return true
    }

    /// Sends `signal` if the process has not been reaped.
    public func signal(_ sig: Int32) {
        guard exitStatus == nil else { return }
        kill(pid, sig)
    }

    /// SIGTERM, up to `grace` seconds, then SIGKILL; always reaps.
    public func terminate(grace: Double = 2) {
        guard exitStatus == nil else { return }
        signal(SIGTERM)
        if waitForExit(timeout: grace) { return }
        signal(SIGKILL)
        reap(block: true)
    }

    /// A readable description of the wait status: `exit 1`, `signal 9`.
    public var exitDescription: String {
        guard let s = exitStatus else { return "running" }
        if s == -1 { return "reaped elsewhere" }
        let sig = s & 0x7F
        if sig == 0 { return "exit \((s >> 8) & 0xFF)" }
        return "signal \(sig)"
    }

    /// The last `limit` bytes of the output file.
    public func outputTail(limit: Int = 4096) -> String {
        guard let data = FileManager.default.contents(atPath: outputPath) else { return "" }
        let tail = data.count > limit ? data.suffix(limit) : data
        return String(decoding: tail, as: UTF8.self)
    }

    deinit { terminate(grace: 0.5) }
}

/// Every child still alive, killed at exit so a test run that forgets one leaks nothing.
final class ChildRegistry: @unchecked Sendable {
    static let shared = ChildRegistry()
    private let lock = NSLock()
    private var pids: Set<pid_t> = []
    private var installed = false

    func add(_ pid: pid_t) {
        lock.lock()
        defer { lock.unlock() }
        pids.insert(pid)
        if !installed {
            installed = true
            atexit { ChildRegistry.shared.killAll() }
        }
    }

    func remove(_ pid: pid_t) {
        lock.lock()
        defer { lock.unlock() }
        pids.remove(pid)
    }

    func killAll() {
        lock.lock()
        let all = pids
        pids.removeAll()
        lock.unlock()
        for p in all {
            kill(p, SIGKILL)
            var st: Int32 = 0
            waitpid(p, &st, 0)
        }
    }
}

/// A monotonic deadline.
struct Deadline {
    let end: UInt64

    init(seconds: Double) {
        end = Deadline.now() &+ UInt64(max(0, seconds) * 1e9)
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    var expired: Bool { Deadline.now() >= end }

    /// Milliseconds left, clamped to 0...Int32.max, for poll(2).
    var remainingMilliseconds: Int32 {
        let now = Deadline.now()
        guard end > now else { return 0 }
        return Int32(clamping: (end - now + 999_999) / 1_000_000)
    }
}
