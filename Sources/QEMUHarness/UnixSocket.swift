import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Unix-domain stream sockets for qtest and QMP: close-on-exec, no SIGPIPE, every wait bounded.
enum UnixSocket {
    /// `sun_path` capacity minus the terminating NUL.
    static let maxPathLength = MemoryLayout<sockaddr_un>.size - MemoryLayout<sa_family_t>.size - 1

    static func makeAddress(_ path: String) throws(HarnessError) -> sockaddr_un {
        let bytes = Array(path.utf8)
        guard bytes.count <= maxPathLength, !bytes.isEmpty else {
            throw HarnessError(.invalidArgument, "unix socket path too long or empty (\(bytes.count) > \(maxPathLength)): \(path)")
        }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        return addr
    }

    static func newSocket() throws(HarnessError) -> Int32 {
        #if canImport(Glibc)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #else
        let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw HarnessError(.socket, "socket(AF_UNIX) failed", operation: "socket", errno: errno) }
        return fd
    }

    /// Binds and listens on `path` (removing a stale file first).
    static func listen(path: String) throws(HarnessError) -> Int32 {
        var addr = try makeAddress(path)
        unlink(path)
        let fd = try newSocket()
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw HarnessError(.socket, "bind \(path) failed", operation: "bind", errno: e)
        }
        guard Glibc.listen(fd, 1) == 0 else {
            let e = errno
            close(fd)
            throw HarnessError(.socket, "listen \(path) failed", operation: "listen", errno: e)
        }
        return fd
    }

    /// Waits up to the deadline for a connection; `stillWaiting` is consulted between polls
    /// (it throws when the peer process died, so a failed QEMU start is reported at once).
    static func accept(listener: Int32, deadline: Deadline,
                       stillWaiting: () throws(HarnessError) -> Void) throws(HarnessError) -> Int32 {
        while true {
            var pfd = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            let slice = min(deadline.remainingMilliseconds, 20)
            let r = poll(&pfd, 1, slice)
            if r < 0 {
                if errno == EINTR { continue }
                throw HarnessError(.socket, "poll on listener failed", operation: "accept", errno: errno)
            }
            if r > 0 {
                // accept4 needs _GNU_SOURCE, which the Glibc module lacks; children close every
                // descriptor from 3 up anyway, so the window before FD_CLOEXEC is harmless.
                let fd = Glibc.accept(listener, nil, nil)
                if fd >= 0 {
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                    return fd
                }
                if errno == EINTR || errno == EAGAIN || errno == ECONNABORTED { continue }
                throw HarnessError(.socket, "accept failed", operation: "accept", errno: errno)
            }
            try stillWaiting()
            if deadline.expired {
                throw HarnessError(.timeout, "no connection before the deadline", operation: "accept")
            }
        }
    }

    /// One connect attempt; returns nil when nobody listens yet (ENOENT, ECONNREFUSED).
    static func tryConnect(path: String) throws(HarnessError) -> Int32? {
        var addr = try makeAddress(path)
        let fd = try newSocket()
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc == 0 { return fd }
        let e = errno
        close(fd)
        if e == ENOENT || e == ECONNREFUSED || e == EAGAIN { return nil }
        throw HarnessError(.socket, "connect \(path) failed", operation: "connect", errno: e)
    }
}

/// A line-oriented connection over a stream socket (qtest, QMP): exact writes, reads that
/// never assume one `read()` is one message, and a cap on a line's length.
final class LineConnection {
    private(set) var fd: Int32
    private var buffer: [UInt8] = []
    private var scanned = 0
    private var chunk = [UInt8](repeating: 0, count: 65536)
    /// The longest line accepted before the peer is declared broken.
    let maxLineLength: Int
    /// Name used in errors: "qtest", "QMP".
    let name: String

    init(fd: Int32, name: String, maxLineLength: Int) {
        self.fd = fd
        self.name = name
        self.maxLineLength = maxLineLength
    }

    var isOpen: Bool { fd >= 0 }

    func close() {
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
    }

    deinit { close() }

    /// Writes every byte, or throws.
    func write(_ text: String, deadline: Deadline) throws(HarnessError) {
        guard fd >= 0 else { throw HarnessError(.connectionClosed, "\(name) connection is closed") }
        let bytes = Array(text.utf8)
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                #if canImport(Glibc)
                return send(fd, base + off, bytes.count - off, Int32(MSG_NOSIGNAL))
                #else
                return send(fd, base + off, bytes.count - off, 0)
                #endif
            }
            if n > 0 { off += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                if poll(&pfd, 1, deadline.remainingMilliseconds) == 0 && deadline.expired {
                    throw HarnessError(.timeout, "\(name) write timed out", operation: "send")
                }
                continue
            }
            if n < 0 && (errno == EPIPE || errno == ECONNRESET) {
                throw HarnessError(.connectionClosed, "\(name) peer closed the connection", operation: "send", errno: errno)
            }
            throw HarnessError(.socket, "\(name) send failed", operation: "send", errno: errno)
        }
    }

    /// Returns a complete line already buffered, without the newline, if there is one.
    func bufferedLine() throws(HarnessError) -> String? {
        if let nl = buffer[scanned...].firstIndex(of: 0x0A) {
            let line = Array(buffer[..<nl])
            buffer.removeSubrange(...nl)
            scanned = 0
            var text = String(decoding: line, as: UTF8.self)
            if text.hasSuffix("\r") { text.removeLast() }
            return text
        }
        scanned = buffer.count
        if buffer.count > maxLineLength {
            throw HarnessError(.protocolViolation, "\(name) line longer than \(maxLineLength) bytes")
        }
        return nil
    }

    /// Reads until a line is complete or the deadline passes.
    func readLine(deadline: Deadline) throws(HarnessError) -> String {
        while true {
            if let line = try bufferedLine() { return line }
            guard try fill(deadline: deadline) else {
                throw HarnessError(.timeout, "\(name) did not answer in time", operation: "read")
            }
        }
    }

    /// Like `readLine` but returns nil at the deadline instead of throwing.
    func readLineIfAvailable(deadline: Deadline) throws(HarnessError) -> String? {
        while true {
            if let line = try bufferedLine() { return line }
            guard try fill(deadline: deadline) else { return nil }
        }
    }

    /// One poll + read; false when the deadline passed with nothing to read.
    private func fill(deadline: Deadline) throws(HarnessError) -> Bool {
        guard fd >= 0 else { throw HarnessError(.connectionClosed, "\(name) connection is closed") }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let r = poll(&pfd, 1, deadline.remainingMilliseconds)
        if r < 0 {
            if errno == EINTR { return true }
            throw HarnessError(.socket, "\(name) poll failed", operation: "poll", errno: errno)
        }
        if r == 0 { return false }
        let n = chunk.withUnsafeMutableBytes { raw -> Int in
            guard let base = raw.baseAddress else { return 0 }
            return recv(fd, base, raw.count, 0)
        }
        if n > 0 {
            buffer.append(contentsOf: chunk[..<n])
            return true
        }
        if n == 0 {
            throw HarnessError(.connectionClosed, "\(name) peer closed the connection", operation: "recv")
        }
        if errno == EINTR || errno == EAGAIN { return true }
        if errno == ECONNRESET {
            throw HarnessError(.connectionClosed, "\(name) connection reset", operation: "recv", errno: errno)
        }
        throw HarnessError(.socket, "\(name) recv failed", operation: "recv", errno: errno)
    }
}
