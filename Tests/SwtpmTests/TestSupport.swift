#if canImport(Glibc)
import Glibc
#endif
@testable import EmulatorBackend

/// A fresh directory under /tmp (absolute path), removed with its content on deinit.
final class TempDir: @unchecked Sendable {
    let path: String
    init(_ tag: String) throws {
        var template = Array("/tmp/swtpmtests-\(tag)-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw BackendError(.io, "mkdtemp failed", errno: Glibc.errno)
        }
        path = String(cString: p)
    }
    deinit { removeTree(path) }
}

func removeTree(_ path: String) {
    guard let d = opendir(path) else { _ = unlink(path); return }
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name == "." || name == ".." { continue }
        let child = path + "/" + name
        var st = stat()
        if lstat(child, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR { removeTree(child) } else { _ = unlink(child) }
    }
    closedir(d)
    _ = rmdir(path)
}

private final class ThreadBody {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

/// Runs `body` on a thread of its own (not Dispatch's pool nor the cooperative pool, which have
/// as many threads as cores: a blocked fake peer there would starve the other tests).
func startThread(_ body: @escaping @Sendable () -> Void) {
    let arg = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var attr = pthread_attr_t()
    pthread_attr_init(&attr)
    pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
    var tid = pthread_t()
    let rc = pthread_create(&tid, &attr, { raw in
        if let raw { Unmanaged<ThreadBody>.fromOpaque(raw).takeRetainedValue().body() }
        return nil
    }, arg)
    pthread_attr_destroy(&attr)
    if rc != 0 { Unmanaged<ThreadBody>.fromOpaque(arg).takeRetainedValue().body() }
}

/// What an external tool (swtpm_ioctl) printed and its exit status.
struct ToolResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a program to completion (posix_spawn, stdout/stderr captured, killed after `timeout`).
func runTool(_ args: [String], timeout: Double = 10) throws -> ToolResult {
    func tempFD() throws -> Int32 {
        var t = Array("/tmp/swtpmtests-out-XXXXXX".utf8CString)
        let fd = t.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw BackendError(.io, "mkstemp", errno: Glibc.errno) }
        t.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        return fd
    }
    let outFD = try tempFD(), errFD = try tempFD()
    defer { close(outFD); close(errFD) }
    var fa = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&fa)
    defer { posix_spawn_file_actions_destroy(&fa) }
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&fa, outFD, 1)
    posix_spawn_file_actions_adddup2(&fa, errFD, 2)
    let cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
    defer { cargs.forEach { free($0) } }
    var pid: pid_t = 0
    let path = args[0].hasPrefix("/") ? args[0] : "/usr/bin/" + args[0]
    let rc = posix_spawn(&pid, path, &fa, nil, cargs, environ)
    guard rc == 0 else { throw BackendError(.process, "cannot run \(path)", errno: rc) }
    let deadline = monotonicNow() + timeout
    var status: Int32 = 0
    while waitpid(pid, &status, WNOHANG) == 0 {
        if monotonicNow() > deadline { kill(pid, SIGKILL); waitpid(pid, &status, 0); break }
        usleep(1000)
    }
    func slurp(_ fd: Int32) -> String {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        var off: off_t = 0
        while true {
            let n = pread(fd, &buf, buf.count, off)
            if n <= 0 { break }
            out += buf[0..<n]
            off += off_t(n)
        }
        return String(decoding: out, as: UTF8.self)
    }
    let exited = status & 0x7F == 0
    return ToolResult(status: exited ? (status >> 8) & 0xFF : 128 + (status & 0x7F), stdout: slurp(outFD), stderr: slurp(errFD))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
func freeTCPPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard ok == 0 else { throw BackendError(.io, "bind", errno: Glibc.errno) }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return UInt16(bigEndian: addr.sin_port)
}

func readWholeFile(_ path: String) throws -> [UInt8] {
    try SwtpmIoctl.readFile(path, limit: 1 << 24)
}

func fileExists(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0
}

/// A completion's bytes and error, set from another thread.
final class ResultBox: @unchecked Sendable {
    private let lock = NSLockish()
    private var _bytes: [UInt8] = []
    private var _error: BackendError? = nil
    func set(_ b: [UInt8], _ e: BackendError?) { lock.locked { _bytes = b; _error = e } }
    var bytes: [UInt8] { lock.locked { _bytes } }
    var error: BackendError? { lock.locked { _error } }
}

final class Collector<T: Sendable>: @unchecked Sendable {
    private let lock = NSLockish()
    private var _values: [T] = []
    func append(_ v: T) { lock.locked { _values.append(v) } }
    var values: [T] { lock.locked { _values } }
}

final class NSLockish: @unchecked Sendable {
    private var m = pthread_mutex_t()
    init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    func locked<T>(_ f: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&m); defer { pthread_mutex_unlock(&m) }
        return try f()
    }
}
