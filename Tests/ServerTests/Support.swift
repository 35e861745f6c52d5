import EmulatorBackend
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The package root, from this file's path (Tests/ServerTests/…).
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

struct SetupError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// A fresh directory under /tmp, removed on deinit.
final class TempDir: @unchecked Sendable {
    let path: String
    init(_ tag: String) throws {
        var template = Array("/tmp/servertests-\(tag)-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw SetupError("mkdtemp failed")
        }
        path = String(cString: p)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

func monotonic() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// A tool's exit status and output.
struct ToolRun: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    var description: String { "status \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }
}

/// Finds a program on PATH; a missing tool is a failure, never a skip.
func requireTool(_ name: String) throws -> String {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let p = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: p) { return p }
    }
    throw SetupError("\(name) is not installed: run scripts/install-deps.sh")
}

/// Runs a program to completion with output in files (no pipe can fill up), killed after
/// `timeout` seconds.
func runTool(_ args: [String], cwd: String? = nil, timeout: Double = 30) throws -> ToolRun {
    let exe = args[0].hasPrefix("/") ? args[0] : try requireTool(args[0])
    let out = FileManager.default.temporaryDirectory.appendingPathComponent("servertests-out-\(UUID().uuidString)")
    let err = FileManager.default.temporaryDirectory.appendingPathComponent("servertests-err-\(UUID().uuidString)")
    _ = FileManager.default.createFile(atPath: out.path, contents: nil)
    _ = FileManager.default.createFile(atPath: err.path, contents: nil)
    defer {
        try? FileManager.default.removeItem(at: out)
        try? FileManager.default.removeItem(at: err)
    }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: exe)
    p.arguments = Array(args.dropFirst())
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    let oh = try FileHandle(forWritingTo: out), eh = try FileHandle(forWritingTo: err)
    p.standardOutput = oh
    p.standardError = eh
    p.standardInput = FileHandle.nullDevice
    try p.run()
    let deadline = monotonic() + timeout
    while p.isRunning {
        if monotonic() > deadline { p.terminate(); usleep(100_000); if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        usleep(2_000)
    }
    p.waitUntilExit()
    try? oh.close()
    try? eh.close()
    return ToolRun(status: p.terminationStatus,
                   stdout: (try? String(contentsOf: out, encoding: .utf8)) ?? "",
                   stderr: (try? String(contentsOf: err, encoding: .utf8)) ?? "")
}

/// `tpm2_<name> -T <tcti> args…`; a non-zero status fails the test with the tool's output.
@discardableResult
func tpm2(_ name: String, _ tcti: String, _ args: [String], cwd: String, expect status: Int32 = 0,
          sourceLocation: SourceLocation = #_sourceLocation) throws -> ToolRun {
    let r = try runTool(["tpm2_" + name, "-T", tcti] + args, cwd: cwd)
    #expect(r.status == status, "tpm2_\(name) \(args.joined(separator: " ")): \(r)", sourceLocation: sourceLocation)
    return r
}

/// `tis-sim serve` as a child process: the built binary, ports from `--port-file`.
final class ServeProcess: @unchecked Sendable {
    let process: Process
    let ports: [String: Int]
    let log: String

    var dataPort: Int { ports["data"] ?? 0 }
    var ctrlPort: Int { ports["ctrl"] ?? 0 }
    var tcti: String { "swtpm:host=127.0.0.1,port=\(dataPort)" }

    static var binary: String { packageRoot + "/.build/debug/tis-sim" }

    init(backend: String, stateDir: String, extra: [String] = []) throws {
        guard FileManager.default.isExecutableFile(atPath: Self.binary) else {
            throw SetupError("\(Self.binary) is missing: build it first (swift build, or make test)")
        }
        let portFile = stateDir + "-ports-\(UUID().uuidString.prefix(8)).json"
        log = portFile + ".log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = ["serve", "--backend", backend, "--state-dir", stateDir, "--port", "0", "--port-file", portFile] + extra
        let lh = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        p.standardOutput = lh
        p.standardError = lh
        p.standardInput = FileHandle.nullDevice
        try p.run()
        process = p
        let deadline = monotonic() + 20
        while true {
            if let d = FileManager.default.contents(atPath: portFile),
               let obj = try? JSONSerialization.jsonObject(with: d) as? [String: Int] {
                ports = obj
                break
            }
            if !p.isRunning || monotonic() > deadline {
                if p.isRunning { p.terminate() }
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                throw SetupError("tis-sim serve did not start: \(text)")
            }
            usleep(10_000)
        }
        try? FileManager.default.removeItem(atPath: portFile)
    }

    /// SIGTERM, then wait for a clean exit (status 0).
    @discardableResult
    func stop() -> Int32 {
        if process.isRunning { process.terminate() }
        let deadline = monotonic() + 15
        while process.isRunning && monotonic() < deadline { usleep(5_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return process.terminationStatus
    }

    var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: log)
    }
}

/// Two adjacent TCP ports on 127.0.0.1 that were free a moment ago.
func freePortPair() throws -> UInt16 {
    for _ in 0..<50 {
        let a = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(a) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        guard withUnsafePointer(to: &addr, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(a, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }) == 0 else { continue }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(a, $0, &len) } }
        let port = UInt16(bigEndian: addr.sin_port)
        guard port < 65000 else { continue }
        let b = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(b) }
        var addr2 = addr
        addr2.sin_port = (port + 1).bigEndian
        if withUnsafePointer(to: &addr2, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(b, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }) == 0 {
            return port
        }
    }
    throw SetupError("no free port pair")
}

/// A plain swtpm on TCP, the reference the outputs are compared with: `swtpm socket --tpm2
/// --server type=tcp,port=P --ctrl type=tcp,port=P+1 --flags not-need-init,startup-clear`.
final class DirectSwtpm: @unchecked Sendable {
    let process: SwtpmProcess
    let port: UInt16
    var tcti: String { "swtpm:host=127.0.0.1,port=\(port)" }

    init(stateDir: String) throws {
        _ = try requireTool("swtpm")
        var last: Error = SetupError("swtpm did not start")
        for _ in 0..<5 {
            let port = try freePortPair()
            var o = SwtpmProcess.Options(stateDirectory: stateDir)
            o.tcpDataPort = port
            o.flags = ["not-need-init", "startup-clear"]
            do {
                process = try SwtpmProcess.launch(o)
                self.port = port
                return
            } catch {
                last = error
            }
        }
        throw last
    }

    deinit { process.terminate() }
}

/// A raw TCP client of the server's ports, as a test drives bad input with it.
final class RawClient {
    private(set) var fd: Int32

    init(port: Int, timeout: Double = 10) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard r == 0 else { close(fd); throw SetupError("connect to \(port) failed: errno \(errno)") }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int(timeout.truncatingRemainder(dividingBy: 1) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { if fd >= 0 { close(fd) } }

    /// Closes with a TCP reset (SO_LINGER 0) instead of a FIN.
    func reset() {
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        close(fd)
        fd = -1
    }

    func send(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + off, $0.count - off, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw SetupError("send failed: errno \(errno)") }
            off += n
        }
    }

    /// Exactly `count` bytes, or what arrived before EOF / the receive timeout.
    func read(_ count: Int) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: max(count, 1))
        while out.count < count {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, count - out.count, 0) }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    /// True when the server closed the connection (EOF within the timeout).
    func readsEOF() -> Bool {
        var b: UInt8 = 0
        return recv(fd, &b, 1, 0) == 0
    }

    /// One raw TPM command, its whole response.
    func transact(_ command: [UInt8]) throws -> [UInt8] {
        try send(command)
        let head = read(10)
        guard head.count == 10 else { throw SetupError("short response header: \(head)") }
        let size = Int(head[2]) << 24 | Int(head[3]) << 16 | Int(head[4]) << 8 | Int(head[5])
        return head + read(max(0, size - 10))
    }

    /// One ctrl request; reads `responseLength` bytes.
    func ctrl(_ request: [UInt8], responseLength: Int = 4) throws -> [UInt8] {
        try send(request)
        return read(responseLength)
    }

    /// One command on a fresh connection, as tcti-swtpm sends it.
    static func command(port: Int, _ command: [UInt8]) throws -> [UInt8] {
        try RawClient(port: port).transact(command)
    }
}

func be32(_ b: [UInt8], _ i: Int) -> UInt32 {
    guard b.count >= i + 4 else { return 0xFFFF_FFFF }
    return UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
}

/// TPM2_PCR_Read(sha256, pcr) response → the digest.
func pcrValue(port: Int, _ pcr: UInt32) throws -> [UInt8] {
    try TPM2.pcrDigest(try RawClient.command(port: port, TPM2.pcrReadSHA256(pcr: pcr)))
}

extension Array where Element == UInt8 {
    var hex: String { map { String(format: "%02x", $0) }.joined() }
}
