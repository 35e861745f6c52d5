import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The POSIX plumbing the machine needs: UNIX and TCP sockets (client and listening), whole
/// writes, `/bin/sh -c` children with a pipe, the way QEMU's `qio_channel_socket` and
/// `qio_channel_command` provide them. Every failure is a `MachineError` worded as QEMU words it.
enum Posix {
    static func errnoText(_ e: Int32 = errno) -> String { String(cString: strerror(e)) }

    /// QEMU `unix_connect`: "Failed to connect to 'PATH': REASON".
    static func connectUnix(_ path: String) throws(MachineError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MachineError(.io, "socket: \(errnoText())") }
        var addr = try unixAddress(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 {
            let e = errno
            close(fd)
            throw MachineError(.io, "Failed to connect to '\(path)': \(errnoText(e))")
        }
        return fd
    }

    /// QEMU `unix_listen_saddr`: removes a stale socket file first, as QEMU does.
    static func listenUnix(_ path: String) throws(MachineError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MachineError(.io, "socket: \(errnoText())") }
        var addr = try unixAddress(path)
        unlink(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(fd, 1) == 0 else {
            let e = errno
            close(fd)
            throw MachineError(.io, "Failed to bind socket to \(path): \(errnoText(e))")
        }
        return fd
    }

    private static func unixAddress(_ path: String) throws(MachineError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else {
            throw MachineError(.io, "UNIX socket path '\(path)' is too long (\(bytes.count) bytes, at most \(capacity - 1))")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return addr
    }

    /// `host:port` of a `tcp:` URI; IPv4 literals, `localhost`, names resolved to IPv4.
    static func inetAddress(_ hostPort: String) throws(MachineError) -> (sockaddr_in, host: String, port: UInt16) {
        guard let colon = hostPort.lastIndex(of: ":") else {
            throw MachineError(.invalidOption, "error parsing address '\(hostPort)'")
        }
        var host = String(hostPort[..<colon])
        let portText = String(hostPort[hostPort.index(after: colon)...]).split(separator: ",").first.map(String.init) ?? ""
        guard let port = UInt16(portText) else {
            throw MachineError(.invalidOption, "error parsing address '\(hostPort)'")
        }
        if host.isEmpty || host == "localhost" { host = host.isEmpty ? "0.0.0.0" : "127.0.0.1" }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        if inet_pton(AF_INET, host, &addr.sin_addr) != 1 {
            var hints = addrinfo()
            hints.ai_family = AF_INET
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var res: UnsafeMutablePointer<addrinfo>?
            guard getaddrinfo(host, nil, &hints, &res) == 0, let r = res, let sa = r.pointee.ai_addr else {
                throw MachineError(.io, "address resolution failed for \(host):\(port)")
            }
            defer { freeaddrinfo(res) }
            sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { addr.sin_addr = $0.pointee.sin_addr }
        }
        return (addr, host, port)
    }

    /// QEMU `inet_connect`: "Failed to connect to 'HOST:PORT': REASON".
    static func connectTCP(_ hostPort: String) throws(MachineError) -> Int32 {
        var (addr, _, _) = try inetAddress(hostPort)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MachineError(.io, "socket: \(errnoText())") }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if rc != 0 {
            let e = errno
            close(fd)
            throw MachineError(.io, "Failed to connect to '\(hostPort)': \(errnoText(e))")
        }
        return fd
    }

    /// A listening TCP socket (SO_REUSEADDR, as QEMU's `inet_listen_saddr`); returns the port
    /// actually bound (for port 0).
    static func listenTCP(_ hostPort: String) throws(MachineError) -> (fd: Int32, host: String, port: UInt16) {
        var (addr, host, _) = try inetAddress(hostPort)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MachineError(.io, "socket: \(errnoText())") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0, listen(fd, 1) == 0 else {
            let e = errno
            close(fd)
            throw MachineError(.io, "Failed to bind socket: \(errnoText(e))")
        }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return (fd, host, UInt16(bigEndian: bound.sin_port))
    }

    /// Accepts one connection, retrying on EINTR.
    static func accept(_ listener: Int32) throws(MachineError) -> Int32 {
        while true {
            let fd = Glibc.accept(listener, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                return fd
            }
            if errno == EINTR { continue }
            throw MachineError(.io, "accept: \(errnoText())")
        }
    }

    /// Writes all of `bytes` (MSG_NOSIGNAL on sockets, plain write on pipes and files).
    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
        guard var p = bytes.baseAddress else { return nil }
        var left = bytes.count
        while left > 0 {
            var n = send(fd, p, left, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == ENOTSOCK { n = write(fd, p, left) }
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            p += n
            left -= n
        }
        return nil
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Int32? {
        bytes.withUnsafeBytes { writeAll(fd, $0) }
    }

    /// QEMU `qio_channel_command_new_spawn`: `/bin/sh -c COMMAND` with its stdin (outgoing) or
    /// stdout (incoming) on a pipe whose other end is returned.
    static func spawnShell(_ command: String, writingToChild: Bool) throws(MachineError) -> (pid: pid_t, fd: Int32) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw MachineError(.io, "pipe: \(errnoText())") }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        let (childEnd, ourEnd) = writingToChild ? (fds[0], fds[1]) : (fds[1], fds[0])
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, childEnd, writingToChild ? 0 : 1)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // The child must not inherit an ignored SIGPIPE: `cat` into a closed pipe should die.
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF))
        var pid: pid_t = 0
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/sh"), strdup("-c"), strdup(command), nil]
        defer { for p in argv { free(p) } }
        let rc = posix_spawn(&pid, "/bin/sh", &actions, &attr, argv, environ)
        close(childEnd)
        guard rc == 0 else {
            close(ourEnd)
            throw MachineError(.io, "Unable to spawn '/bin/sh -c \(command)': \(errnoText(rc))")
        }
        return (pid, ourEnd)
    }

    /// Waits for a child up to `timeout` seconds, then SIGTERM, then SIGKILL (QEMU
    /// `qio_channel_command_abort`); returns its wait status.
    @discardableResult
    static func reap(_ pid: pid_t, timeout: Double) -> Int32 {
        var status: Int32 = 0
        let end = Date().addingTimeInterval(timeout)
        var step = 0
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid || (r < 0 && errno != EINTR) { return status }
            if Date() > end {
                if step == 0 { kill(pid, SIGTERM) } else if step >= 1 { kill(pid, SIGKILL) }
                step += 1
            }
            usleep(200)
        }
    }
}
