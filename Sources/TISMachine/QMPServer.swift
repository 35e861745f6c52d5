import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The QMP monitor (`-qmp unix:PATH,server=on,wait=off`): QEMU's monitor/qmp.c over one
/// listening socket, one client at a time, each greeted and put in capabilities-negotiation
/// mode. Messages are split as QEMU's JSON streamer splits them; replies and events are one
/// line each, ending in `\r\n` as QEMU's monitor writes them.
final class QMPServer: @unchecked Sendable {
    /// The listening socket; -1 for a monitor that connected out (`-mon` on a client chardev).
    private let listener: Int32
    private let path: String
    private unowned let machine: Machine
    private let writeLock = NSLock()
    /// The connected client and whether it finished negotiation (events go only to it then).
    private var client: Int32 = -1
    private var negotiated = false
    private var firstClient: Int32?
    private let isClosed = Atomic<Bool>(false)

    init(path: String, machine: Machine) throws(MachineError) {
        do throws(MachineError) {
            listener = try Posix.listenUnix(path)
        } catch {
            throw MachineError(.io, error.message, option: "-qmp unix:\(path)")
        }
        self.path = path
        self.machine = machine
    }

    /// `-mon chardev=ID,mode=control` on a client chardev: connects to `path` and serves QMP
    /// on that one connection (libqtest listens there, as it does for the qtest socket).
    init(connectingTo path: String, machine: Machine) throws(MachineError) {
        do throws(MachineError) {
            firstClient = try Posix.connectUnix(path)
        } catch {
            throw MachineError(.io, error.message, option: "-chardev socket,path=\(path)")
        }
        listener = -1
        self.path = path
        self.machine = machine
    }

    /// `wait=on`: block until the first client connects.
    func acceptFirstClient() throws(MachineError) {
        firstClient = try Posix.accept(listener)
    }

    func run() {
        let t = Thread { [self] in
            while !isClosed.load(ordering: .acquiring) {
                let fd: Int32
                if let f = firstClient {
                    fd = f
                    firstClient = nil
                } else {
                    guard listener >= 0, let f = try? Posix.accept(listener) else { return }
                    fd = f
                }
                serve(fd)
            }
        }
        t.name = "qmp"
        t.start()
    }

    /// The greeting QEMU 7.2 sends (`{"QMP": {"version": …, "capabilities": ["oob"]}}`).
    static let greeting: QMPValue = .object([("QMP", .object([
        ("version", .object([("qemu", .object([("micro", .int(0)), ("minor", .int(2)), ("major", .int(7))])),
                             ("package", .string("tis-sim (swift-tpm-frontend)"))])),
        ("capabilities", .array([.string("oob")])),
    ]))])

    private func serve(_ fd: Int32) {
        writeLock.lock()
        client = fd
        negotiated = false
        writeLocked(Self.greeting)
        writeLock.unlock()
        var splitter = QMPMessageSplitter()
        var buf = [UInt8](repeating: 0, count: 65536)
        readLoop: while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            for piece in splitter.feed(buf[0..<n]) {
                let reply: QMPValue
                switch piece {
                case .tooLarge:
                    reply = QMPCommands.error("GenericError", "JSON parse error, token too large", id: nil)
                case .message(let bytes):
                    var isNegotiated: Bool {
                        writeLock.lock()
                        defer { writeLock.unlock() }
                        return negotiated
                    }
                    let (r, nowNegotiated, isQuit) = QMPCommands.handle(bytes, negotiated: isNegotiated, machine: machine)
                    writeLock.lock()
                    negotiated = nowNegotiated
                    writeLocked(r)
                    writeLock.unlock()
                    if isQuit {
                        // QEMU: the answer, then the SHUTDOWN event (vm_shutdown stops without
                        // a STOP event), then exit.
                        machine.lock.lock()
                        machine._runState = .shutdown
                        machine.lock.unlock()
                        emit("SHUTDOWN", .object([("guest", .bool(false)), ("reason", .string("host-qmp-quit"))]))
                        machine.requestExit(0)
                        break readLoop
                    }
                    continue
                }
                writeLock.lock()
                writeLocked(reply)
                writeLock.unlock()
            }
        }
        writeLock.lock()
        Glibc.close(fd)
        client = -1
        negotiated = false
        writeLock.unlock()
    }

    /// `{"timestamp": {"seconds": S, "microseconds": US}, "event": NAME[, "data": DATA]}`.
    func emit(_ name: String, _ data: QMPValue?) {
        var tv = timeval()
        gettimeofday(&tv, nil)
        var members: [(String, QMPValue)] = [
            ("timestamp", .object([("seconds", .int(Int64(tv.tv_sec))), ("microseconds", .int(Int64(tv.tv_usec)))])),
            ("event", .string(name)),
        ]
        if let data { members.append(("data", data)) }
        writeLock.lock()
        defer { writeLock.unlock() }
        guard negotiated else { return }
        writeLocked(.object(members))
    }

    private func writeLocked(_ v: QMPValue) {
        guard client >= 0 else { return }
        _ = Posix.writeAll(client, Array((v.qmpText + "\r\n").utf8))
    }

    func close() {
        guard !isClosed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if listener >= 0 {
            shutdown(listener, Int32(SHUT_RDWR))
            Glibc.close(listener)
            unlink(path)
        }
        writeLock.lock()
        if client >= 0 { shutdown(client, Int32(SHUT_RDWR)) }
        writeLock.unlock()
    }
}
