import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A Unix-socket proxy between `SwtpmBackend`'s data channel and swtpm's `--server` socket
/// that can cut a reply: once armed, it forwards only the first `cutAfter` bytes of the next
/// reply from swtpm, then closes the client's connection (a swtpm that dies mid-write, or a
/// network peer that goes away). Everything else passes through unchanged.
final class CuttingProxy: @unchecked Sendable {
    let path: String
    let upstream: String
    private let listenFD: Int32
    private struct State { var cutAfter: Int? = nil; var cuts = 0; var stop = false }
    private let state = Mutex(State())
    /// Sees every chunk the client sends, before it is forwarded (a test may kill swtpm here).
    let onRequest: (@Sendable ([UInt8]) -> Void)?

    init(path: String, upstream: String, onRequest: (@Sendable ([UInt8]) -> Void)? = nil) throws {
        self.path = path
        self.upstream = upstream
        self.onRequest = onRequest
        unlink(path)
        listenFD = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard listenFD >= 0, Self.withAddress(path, { bind(listenFD, $0, $1) }) == 0, listen(listenFD, 4) == 0 else {
            throw POSIXError(.EIO)
        }
        let me = self
        Thread { me.serve() }.start()
    }

    deinit {
        state.withLock { $0.stop = true }
        shutdown(listenFD, Int32(SHUT_RDWR))
        close(listenFD)
        unlink(path)
    }

    /// Cut the next reply after `bytes` bytes.
    func arm(cutAfter bytes: Int) { state.withLock { $0.cutAfter = bytes } }
    var cuts: Int { state.withLock { $0.cuts } }

    static func withAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.prefix(raw.count - 1).enumerated() { raw[i] = b }
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    private func serve() {
        while !state.withLock({ $0.stop }) {
            let client = accept(listenFD, nil, nil)
            if client < 0 { return }
            let up = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            if Self.withAddress(upstream, { connect(up, $0, $1) }) != 0 {
                close(client); close(up); continue
            }
            relay(client, up)
            close(client)
            close(up)
        }
    }

    private func relay(_ client: Int32, _ up: Int32) {
        var buf = [UInt8](repeating: 0, count: 65536)
        var fds = [pollfd(fd: client, events: Int16(POLLIN), revents: 0), pollfd(fd: up, events: Int16(POLLIN), revents: 0)]
        while !state.withLock({ $0.stop }) {
            fds[0].revents = 0; fds[1].revents = 0
            if poll(&fds, 2, 100) < 0 { if errno == EINTR { continue }; return }
            if fds[0].revents != 0 {
                let n = buf.withUnsafeMutableBytes { read(client, $0.baseAddress, $0.count) }
                if n <= 0 { return }
                onRequest?(Array(buf[0..<n]))
                if !writeAll(up, Array(buf[0..<n])) { return }
            }
            if fds[1].revents != 0 {
                let n = buf.withUnsafeMutableBytes { read(up, $0.baseAddress, $0.count) }
                if n <= 0 { return }
                let cut = state.withLock { s -> Int? in
                    defer { if s.cutAfter != nil { s.cuts += 1; s.cutAfter = nil } }
                    return s.cutAfter
                }
                if let cut {
                    _ = writeAll(client, Array(buf[0..<min(cut, n)]))
                    shutdown(client, Int32(SHUT_RDWR))
                    return
                }
                if !writeAll(client, Array(buf[0..<n])) { return }
            }
        }
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { if n < 0 && errno == EINTR { continue }; return false }
            done += n
        }
        return true
    }
}
