#if canImport(Glibc)
import Glibc
#endif

/// Why the server could not start or a socket operation failed.
public struct TPMServerError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Equatable {
        /// A listening socket could not be created or bound (port in use).
        case listen
        /// The backend or the TIS device could not be started.
        case backend
        /// An argument is out of range.
        case configuration
    }
    /// What failed.
    public var code: Code
    /// What was being done, with the address or value involved.
    public var message: String
    /// The system error, if one caused it.
    public var errno: Int32?

    /// An error with its code, message and optional errno.
    public init(_ code: Code, _ message: String, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
    }

    /// "code: message (strerror)".
    public var description: String {
        "\(code.rawValue): \(message)" + (errno.map { " (\(String(cString: strerror($0))))" } ?? "")
    }
}

/// Monotonic seconds.
func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Non-blocking TCP sockets on loopback, close-on-exec, MSG_NOSIGNAL on every send.
enum ServerSocket {
    /// `socket` + `SO_REUSEADDR` + `bind(host:port)` + `listen`; non-blocking. Port 0 picks a
    /// free port; the bound port is returned.
    static func listen(host: String, port: UInt16, backlog: Int32 = 128) throws(TPMServerError) -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(bitPattern: SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw TPMServerError(.listen, "socket failed", errno: Glibc.errno) }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else {
            _ = Glibc.close(fd) as Int32
            throw TPMServerError(.configuration, "not an IPv4 address: \(host)")
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else {
            let e = Glibc.errno
            _ = Glibc.close(fd) as Int32
            throw TPMServerError(.listen, "cannot bind \(host):\(port)", errno: e)
        }
        guard Glibc.listen(fd, backlog) == 0 else {
            let e = Glibc.errno
            _ = Glibc.close(fd) as Int32
            throw TPMServerError(.listen, "cannot listen on \(host):\(port)", errno: e)
        }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return (fd, UInt16(bigEndian: addr.sin_port))
    }

    /// One pending connection, non-blocking and close-on-exec, or nil when none is queued.
    static func accept(_ listener: Int32) -> Int32? {
        while true {
            let fd = Glibc.accept(listener, nil, nil)
            if fd >= 0 {
                makeNonBlocking(fd)
                var one: Int32 = 1
                _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return fd
            }
            if Glibc.errno == EINTR { continue }
            // EAGAIN: none queued. ECONNABORTED, EMFILE, ENFILE…: nothing to accept now.
            return nil
        }
    }

    enum ReadResult { case data(Int), wouldBlock, eof, failed }

    /// Appends up to `max` bytes that are ready to `buffer`.
    static func read(_ fd: Int32, into buffer: inout [UInt8], max: Int) -> ReadResult {
        guard max > 0 else { return .wouldBlock }
        var chunk = [UInt8](repeating: 0, count: min(max, 16 * 1024))
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 {
                buffer.append(contentsOf: chunk[0..<n])
                return .data(n)
            }
            if n == 0 { return .eof }
            let e = Glibc.errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return .wouldBlock }
            return .failed
        }
    }

    enum WriteResult { case wrote(Int), wouldBlock, failed }

    /// Sends what the socket takes now of `bytes[offset...]`.
    static func write(_ fd: Int32, _ bytes: [UInt8], from offset: Int) -> WriteResult {
        while true {
            let n = bytes.withUnsafeBytes { buf -> Int in
                guard let base = buf.baseAddress else { return 0 }
                return send(fd, base + offset, buf.count - offset, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            }
            if n >= 0 { return .wrote(n) }
            let e = Glibc.errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return .wouldBlock }
            return .failed
        }
    }

    static func close(_ fd: Int32) {
        _ = Glibc.close(fd) as Int32
    }

    /// Sets O_NONBLOCK and FD_CLOEXEC.
    static func makeNonBlocking(_ fd: Int32) {
        let fl = fcntl(fd, F_GETFL)
        if fl >= 0 { _ = fcntl(fd, F_SETFL, fl | O_NONBLOCK) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
    }
}

/// Runs `body` on a detached thread of its own (not Dispatch's pool, whose few threads a
/// blocked server loop would take from everyone else).
func startThread(name: String, _ body: @escaping @Sendable () -> Void) throws(TPMServerError) {
    final class Box { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
    let arg = Unmanaged.passRetained(Box(body)).toOpaque()
    var attr = pthread_attr_t()
    pthread_attr_init(&attr)
    pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
    var tid = pthread_t()
    let rc = pthread_create(&tid, &attr, { raw in
        if let raw { Unmanaged<Box>.fromOpaque(raw).takeRetainedValue().body() }
        return nil
    }, arg)
    pthread_attr_destroy(&attr)
    guard rc == 0 else {
        Unmanaged<Box>.fromOpaque(arg).release()
        throw TPMServerError(.configuration, "cannot start the \(name) thread", errno: rc)
    }
}
