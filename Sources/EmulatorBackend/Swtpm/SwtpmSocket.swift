import CFdPass
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where a swtpm channel listens: a UnixIO socket path or a TCP host and port.
public enum SwtpmEndpoint: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: UInt16)

    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): "tcp:\(host):\(port)"
        }
    }
}

/// Monotonic seconds, for deadlines.
func monotonicNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// The current errno (Glibc's `errno` is shadowed by `BackendError.errno` in some scopes).
@inline(__always) func lastErrno() -> Int32 { Glibc.errno }

func errnoString(_ e: Int32) -> String { String(cString: strerror(e)) }

/// A connected stream socket owned by this process (close-on-exec, closed exactly once).
///
/// Every write goes through `send`/`sendmsg` with `MSG_NOSIGNAL` (a dead peer is `EPIPE`, never
/// `SIGPIPE`); every read waits in `poll` with a deadline, so no read can block forever; EOF is
/// the typed `.connectionClosed` error. `shutdownBoth()` may be called from another thread to
/// make a blocked operation return; the fd itself is only closed by `close()` or deinit, so a
/// concurrent reader never sees a recycled fd number.
final class SwtpmSocket: @unchecked Sendable {
    // The fd is immutable after init; only `closed` changes, under its own atomic.
    private let fd: Int32
    private let closed = Atomic<Bool>(false)
    private let shutDown = Atomic<Bool>(false)
    /// What the socket is, for error messages ("ctrl channel unix:/x/ctrl.sock").
    let label: String

    init(adopting fd: Int32, label: String) {
        self.fd = fd
        self.label = label
    }

    deinit { close() }

    /// The raw descriptor (for fd passing and tests). Valid until `close()`.
    var rawValue: Int32 { fd }

    var isClosed: Bool { closed.load(ordering: .acquiring) }

    /// Closes the descriptor; idempotent.
    func close() {
        let (exchanged, _) = closed.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing)
        if exchanged { _ = Glibc.close(fd) }
    }

    /// Makes blocked and future reads and writes on this socket fail at once (EOF / EPIPE),
    /// without releasing the fd number. Safe from any thread.
    func shutdownBoth() {
        shutDown.store(true, ordering: .releasing)
        if !isClosed { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private func closedError(_ operation: String?) -> BackendError {
        BackendError(.connectionClosed, "\(label) is closed", operation: operation)
    }

    // MARK: Writing

    /// Writes all bytes (one `send` normally; loops over partial sends), MSG_NOSIGNAL, EINTR
    /// retried, bounded by `timeout` when the peer does not drain its buffer.
    func sendAll(_ bytes: [UInt8], timeout: Double, operation: String?) throws(BackendError) {
        guard !isClosed else { throw closedError(operation) }
        let deadline = monotonicNow() + timeout
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { buf -> Int in
                guard let base = buf.baseAddress else { return 0 }
                return Glibc.send(fd, base + sent, buf.count - sent, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            }
            if n > 0 { sent += n; continue }
            let e = lastErrno()
            if n < 0 && e == EINTR { continue }
            if n < 0 && (e == EAGAIN || e == EWOULDBLOCK) {
                try waitFor(Int16(POLLOUT), deadline: deadline, operation: operation, what: "writable")
                continue
            }
            if n < 0 && (e == EPIPE || e == ECONNRESET || e == ENOTCONN) {
                throw BackendError(.connectionClosed, "\(label): the peer closed the connection (\(errnoString(e)))",
                                   operation: operation, errno: e)
            }
            throw BackendError(.io, "\(label): send failed: \(errnoString(e))", operation: operation, errno: e)
        }
    }

    /// Sends `bytes` with one descriptor attached as SCM_RIGHTS ancillary data in the same
    /// `sendmsg` (swtpm reads the fd with the command code: `ctrlchannel_recv_cmd`). Mirrors
    /// QEMU's `qemu_chr_fe_set_msgfds` + write in `tpm_emulator_prepare_data_fd`.
    func sendWithDescriptor(_ bytes: [UInt8], descriptor: Int32, timeout: Double, operation: String?) throws(BackendError) {
        guard !isClosed else { throw closedError(operation) }
        let space = cfdpass_cmsg_space(MemoryLayout<Int32>.size)
        let deadline = monotonicNow() + timeout
        while true {
            var payload = bytes
            let (n, e): (Int, Int32) = payload.withUnsafeMutableBytes { pbuf in
                withUnsafeTemporaryAllocation(byteCount: space, alignment: MemoryLayout<cmsghdr>.alignment) { control in
                    control.initializeMemory(as: UInt8.self, repeating: 0)
                    var iov = iovec(iov_base: pbuf.baseAddress, iov_len: pbuf.count)
                    return withUnsafeMutablePointer(to: &iov) { iovp -> (Int, Int32) in
                        var msg = msghdr()
                        msg.msg_iov = iovp
                        msg.msg_iovlen = 1
                        msg.msg_control = control.baseAddress
                        msg.msg_controllen = space
                        guard let hdr = cfdpass_cmsg_firsthdr(&msg), let data = cfdpass_cmsg_data(hdr) else {
                            return (-1, EINVAL)
                        }
                        hdr.pointee.cmsg_len = cfdpass_cmsg_len(MemoryLayout<Int32>.size)
                        hdr.pointee.cmsg_level = SOL_SOCKET
                        hdr.pointee.cmsg_type = Int32(SCM_RIGHTS)
                        UnsafeMutableRawPointer(data).storeBytes(of: descriptor, as: Int32.self)
                        let r = Glibc.sendmsg(fd, &msg, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                        return (r, r < 0 ? lastErrno() : 0)
                    }
                }
            }
            if n == bytes.count { return }
            if n >= 0 {
                // The fd went with the first byte; a short send of the rest cannot carry it again.
                try sendAll(Array(bytes[n...]), timeout: max(0, deadline - monotonicNow()), operation: operation)
                return
            }
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK {
                try waitFor(Int16(POLLOUT), deadline: deadline, operation: operation, what: "writable")
                continue
            }
            if e == EPIPE || e == ECONNRESET || e == ENOTCONN {
                throw BackendError(.connectionClosed, "\(label): the peer closed the connection (\(errnoString(e)))",
                                   operation: operation, errno: e)
            }
            throw BackendError(.io, "\(label): sendmsg(SCM_RIGHTS) failed: \(errnoString(e))", operation: operation, errno: e)
        }
    }

    // MARK: Reading

    /// Waits until the socket is readable (or writable) or the deadline passes.
    private func waitFor(_ events: Int16, deadline: Double, operation: String?, what: String) throws(BackendError) {
        while true {
            if shutDown.load(ordering: .acquiring) {
                throw BackendError(.connectionClosed, "\(label) was shut down", operation: operation)
            }
            let left = deadline - monotonicNow()
            if left <= 0 {
                throw BackendError(.timeout, "\(label) did not become \(what) in time", operation: operation)
            }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let ms = Int32(min(max(left * 1000, 1), 1_000_000).rounded(.up))
            let r = Glibc.poll(&p, 1, ms)
            if r > 0 { return }      // readable, or HUP/ERR: the read/write reports which
            if r == 0 { continue }   // loop re-checks the deadline
            let e = lastErrno()
            if e == EINTR { continue }
            throw BackendError(.io, "\(label): poll failed: \(errnoString(e))", operation: operation, errno: e)
        }
    }

    /// Reads exactly `count` bytes across short reads, or throws: `.timeout` when the deadline
    /// passes, `.connectionClosed` on EOF, `.io` on another error.
    func readExactly(_ count: Int, timeout: Double, operation: String?, field: String) throws(BackendError) -> [UInt8] {
        guard count > 0 else { return [] }
        guard !isClosed else { throw closedError(operation) }
        let deadline = monotonicNow() + timeout
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        var mustWait = false
        while got < count {
            // recv first, poll only when nothing is queued: a reply's body is usually there
            // already, and each avoided poll is a syscall per command.
            if mustWait {
                try waitFor(Int16(POLLIN), deadline: deadline, operation: operation, what: "readable (\(field), \(got) of \(count) bytes)")
            }
            let n = out.withUnsafeMutableBytes { buf -> Int in
                guard let base = buf.baseAddress else { return 0 }
                return Glibc.recv(fd, base + got, count - got, Int32(MSG_DONTWAIT))
            }
            if n > 0 { got += n; continue }
            if n == 0 {
                throw BackendError(.connectionClosed,
                                   "\(label): the peer closed the connection while \(field) was read (\(got) of \(count) bytes)",
                                   operation: operation)
            }
            let e = lastErrno()
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { mustWait = true; continue }
            if e == ECONNRESET {
                throw BackendError(.connectionClosed, "\(label): connection reset while \(field) was read",
                                   operation: operation, errno: e)
            }
            throw BackendError(.io, "\(label): recv failed: \(errnoString(e))", operation: operation, errno: e)
        }
        return out
    }

    /// Discards bytes that are already queued, without waiting. Returns how many were dropped.
    @discardableResult
    func drainPending(limit: Int = 1 << 20) -> Int {
        var dropped = 0
        var buf = [UInt8](repeating: 0, count: 4096)
        while dropped < limit, !isClosed {
            let n = buf.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 { dropped += n; continue }
            if n < 0 && lastErrno() == EINTR { continue }
            break
        }
        return dropped
    }

    /// True if the peer has closed its end (EOF queued, or HUP), without consuming data.
    func peerHasClosed() -> Bool {
        guard !isClosed else { return true }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard Glibc.poll(&p, 1, 0) > 0 else { return false }
        if p.revents & Int16(POLLHUP | POLLERR) != 0 { return true }
        var b: UInt8 = 0
        let n = Glibc.recv(fd, &b, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT))
        return n == 0
    }

    // MARK: Creating

    /// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`: QEMU's data channel in
    /// `tpm_emulator_prepare_data_fd`.
    static func pair(labels: (String, String)) throws(BackendError) -> (SwtpmSocket, SwtpmSocket) {
        var fds: [Int32] = [-1, -1]
        let r = fds.withUnsafeMutableBufferPointer {
            socketpair(AF_UNIX, Int32(bitPattern: SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, $0.baseAddress)
        }
        guard r == 0 else {
            let e = lastErrno()
            throw BackendError(.io, "socketpair failed: \(errnoString(e))", operation: "CMD_SET_DATAFD", errno: e)
        }
        return (SwtpmSocket(adopting: fds[0], label: labels.0), SwtpmSocket(adopting: fds[1], label: labels.1))
    }

    /// Connects to `endpoint` within `timeout` (non-blocking connect + poll), close-on-exec.
    static func connect(to endpoint: SwtpmEndpoint, timeout: Double, label: String) throws(BackendError) -> SwtpmSocket {
        switch endpoint {
        case .unix(let path):
            return try connectUnix(path: path, timeout: timeout, label: label)
        case .tcp(let host, let port):
            return try connectTCP(host: host, port: port, timeout: timeout, label: label)
        }
    }

    static func connectUnix(path: String, timeout: Double, label: String) throws(BackendError) -> SwtpmSocket {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !pathBytes.isEmpty, pathBytes.count < capacity else {
            throw BackendError(.io, "UnixIO socket path is empty or longer than \(capacity - 1) bytes: \(path)", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: pathBytes) }
        let len = socklen_t(MemoryLayout<sockaddr_un>.size)
        return try withUnsafePointer(to: &addr) { p throws(BackendError) -> SwtpmSocket in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sp throws(BackendError) -> SwtpmSocket in
                try connectAddress(family: AF_UNIX, sp, len, timeout: timeout, label: label, what: path)
            }
        }
    }

    static func connectTCP(host: String, port: UInt16, timeout: Double, label: String) throws(BackendError) -> SwtpmSocket {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>? = nil
        let rc = getaddrinfo(host, String(port), &hints, &res)
        guard rc == 0, let first = res else {
            throw BackendError(.io, "cannot resolve host '\(host)': \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(first) }
        var lastError = BackendError(.io, "no address for \(host):\(port)")
        var ai: UnsafeMutablePointer<addrinfo>? = first
        let deadline = monotonicNow() + timeout
        while let a = ai {
            if let sa = a.pointee.ai_addr {
                do {
                    let s = try connectAddress(family: a.pointee.ai_family, sa, a.pointee.ai_addrlen,
                                               timeout: max(0.001, deadline - monotonicNow()),
                                               label: label, what: "\(host):\(port)")
                    var one: Int32 = 1
                    _ = setsockopt(s.rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                    return s
                } catch {
                    lastError = error
                }
            }
            ai = a.pointee.ai_next
        }
        throw lastError
    }

    private static func connectAddress(family: Int32, _ sa: UnsafePointer<sockaddr>, _ len: socklen_t,
                                       timeout: Double, label: String, what: String) throws(BackendError) -> SwtpmSocket {
        let fd = socket(family, Int32(bitPattern: SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else {
            let e = lastErrno()
            throw BackendError(.io, "socket failed: \(errnoString(e))", errno: e)
        }
        let sock = SwtpmSocket(adopting: fd, label: label)
        let deadline = monotonicNow() + timeout
        var r = Glibc.connect(fd, sa, len)
        while r != 0 {
            let e = lastErrno()
            if e == EINTR || e == EINPROGRESS || e == EALREADY {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                let left = deadline - monotonicNow()
                guard left > 0 else {
                    throw BackendError(.timeout, "connecting to \(what) timed out", errno: ETIMEDOUT)
                }
                let pr = Glibc.poll(&p, 1, Int32(max(1, left * 1000)))
                if pr < 0 && lastErrno() == EINTR { continue }
                if pr == 0 { continue }
                var soError: Int32 = 0
                var sl = socklen_t(MemoryLayout<Int32>.size)
                _ = getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &sl)
                if soError == 0 { r = 0; break }
                throw BackendError(.io, "cannot connect to \(what): \(errnoString(soError))", errno: soError)
            }
            if e == EAGAIN, monotonicNow() < deadline {
                // UnixIO listener backlog full: retry shortly.
                usleep(1000)
                r = Glibc.connect(fd, sa, len)
                continue
            }
            throw BackendError(.io, "cannot connect to \(what): \(errnoString(e))", errno: e)
        }
        // Back to blocking mode; every read and write uses MSG_DONTWAIT + poll anyway.
        let flags = fcntl(fd, F_GETFL)
        if flags >= 0 { _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) }
        return sock
    }
}
