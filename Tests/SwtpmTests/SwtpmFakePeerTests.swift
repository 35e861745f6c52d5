import CFdPass
import Dispatch
import Testing
#if canImport(Glibc)
import Glibc
#endif
import WireFormat
@testable import EmulatorBackend

/// The peer end of a socketpair, scripted by a test: what a broken, hostile or slow swtpm does.
final class FakePeer: @unchecked Sendable {
    let fd: Int32
    private let done = DispatchSemaphore(value: 0)
    /// Descriptors received with SCM_RIGHTS.
    private(set) var receivedDescriptors: [Int32] = []
    /// Every byte the peer read.
    private(set) var received: [UInt8] = []

    /// Runs `script` on its own thread against the peer end; returns the client end.
    static func start(_ script: @escaping @Sendable (FakePeer) -> Void) throws -> (SwtpmSocket, FakePeer) {
        let (mine, theirs) = try SwtpmSocket.pair(labels: ("client", "peer"))
        let peerFD = dup(theirs.rawValue)
        theirs.close()
        let peer = FakePeer(fd: peerFD)
        startThread {
            script(peer)
            peer.done.signal()
        }
        return (mine, peer)
    }

    private init(fd: Int32) { self.fd = fd }

    deinit { _ = Glibc.close(fd) }

    /// Waits for the script to end.
    func finish() { done.wait() }

    /// Reads exactly n bytes (recvmsg, collecting passed descriptors); nil on EOF.
    @discardableResult
    func read(_ n: Int) -> [UInt8]? {
        var out: [UInt8] = []
        while out.count < n {
            var buf = [UInt8](repeating: 0, count: n - out.count)
            let space = cfdpass_cmsg_space(MemoryLayout<Int32>.size)
            let got: Int = buf.withUnsafeMutableBytes { b in
                withUnsafeTemporaryAllocation(byteCount: space, alignment: MemoryLayout<cmsghdr>.alignment) { control in
                    control.initializeMemory(as: UInt8.self, repeating: 0)
                    var iov = iovec(iov_base: b.baseAddress, iov_len: b.count)
                    return withUnsafeMutablePointer(to: &iov) { iovp in
                        var msg = msghdr()
                        msg.msg_iov = iovp
                        msg.msg_iovlen = 1
                        msg.msg_control = control.baseAddress
                        msg.msg_controllen = space
                        let r = recvmsg(fd, &msg, Int32(MSG_CMSG_CLOEXEC))
                        if r > 0, let h = cfdpass_cmsg_firsthdr(&msg), h.pointee.cmsg_type == Int32(SCM_RIGHTS),
                           let d = cfdpass_cmsg_data(h) {
                            receivedDescriptors.append(UnsafeRawPointer(d).loadUnaligned(as: Int32.self))
                        }
                        return r
                    }
                }
            }
            if got <= 0 { return nil }
            out += buf[0..<got]
        }
        received += out
        return out
    }

    func write(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    func write(hex: String) { write([UInt8](hexString: hex) ?? []) }

    func close() { _ = shutdown(fd, Int32(SHUT_RDWR)) }

    /// Stalls: sends nothing more until the client side goes away (EOF), at most 5 s.
    func stallUntilClientCloses() {
        let deadline = monotonicNow() + 5
        var b = [UInt8](repeating: 0, count: 256)
        while monotonicNow() < deadline {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 50) >= 0 else { return }
            if p.revents != 0 && recv(fd, &b, b.count, Int32(MSG_DONTWAIT)) == 0 { return }
        }
    }
}

func elapsed(_ body: () throws -> Void) rethrows -> Double {
    let t0 = monotonicNow()
    try body()
    return monotonicNow() - t0
}

func expectBackendError(_ code: BackendError.Code, operation: String? = nil, _ body: () throws -> Void,
                        sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        try body()
        Issue.record("expected \(code), got success", sourceLocation: sourceLocation)
    } catch let e as BackendError {
        #expect(e.code == code, "\(e)", sourceLocation: sourceLocation)
        if let operation { #expect(e.operation == operation, "\(e)", sourceLocation: sourceLocation) }
    } catch {
        Issue.record("unexpected \(error)", sourceLocation: sourceLocation)
    }
}

/// The ctrl and data framing against a scripted peer: every malformed reply gives a typed error
/// naming the command, nothing hangs, nothing traps.
@Suite("swtpm framing against a fake peer")
struct SwtpmFakePeerTests {
    @Test func successReadsExactlyAcrossShortWrites() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(8)   // SET_BUFFERSIZE
            for b in [UInt8]([0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x0A, 0xF8, 0, 0, 0x10, 0]) {
                p.write([b])
                usleep(500)
            }
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        let r = try client.setBufferSize(0)
        #expect(r.bufferSize == 4096 && r.minimumSize == 2808 && r.maximumSize == 4096)
        peer.finish()
        #expect(peer.received.hexString == "0000001100000000")
    }

    @Test func fourByteErrorReplyLeavesChannelInStep() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(16); p.write(hex: "0000000a")                      // GET_STATEBLOB while stopped
            p.read(4); p.write(hex: "0000000a")                       // GET_TPMESTABLISHED: 4 bytes
            p.read(4); p.write(hex: "00000009 01000000")              // 0.7.1: full struct on a libtpms error
            p.read(4); p.write(hex: "00000000 0000ffff")              // GET_CAPABILITY still in step
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        expectBackendError(.ctrlCommandFailed, operation: "CMD_GET_STATEBLOB") { _ = try client.stateBlob(.volatile) }
        expectBackendError(.ctrlCommandFailed, operation: "CMD_GET_TPMESTABLISHED") { _ = try client.isEstablished() }
        do { _ = try client.isEstablished() } catch { #expect(error.tpmResult == 9) }
        #expect(try client.capabilities().rawValue == 0xFFFF)
        #expect(!client.isBroken)
        peer.finish()
    }

    @Test func stateBlobRetryIsAnEmptyBlob() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(16); p.write(hex: "00000800 00000000 00000000 00000000")
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        #expect(try client.stateBlob(.savestate) == TPMStateBlob())
        peer.finish()
    }

    @Test func eofIsConnectionClosedNamingTheCommand() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(4)
            p.close()
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        expectBackendError(.connectionClosed, operation: "CMD_GET_CONFIG") { _ = try client.configuration() }
        // The channel is not trusted any more: the next call fails at once.
        let t = elapsed { expectBackendError(.connectionClosed, operation: "CMD_STOP") { try client.stop() } }
        #expect(t < 0.5)
        peer.finish()
    }

    @Test func eofInsideThePayload() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(16)
            p.write(hex: "00000000 00000000 00000100 00000100 0102")   // announces 256, sends 2
            p.close()
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        expectBackendError(.connectionClosed, operation: "CMD_GET_STATEBLOB") { _ = try client.stateBlob(.permanent) }
        peer.finish()
    }

    @Test func lengthBeyondTheLimitIsRefusedBeforeReading() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(16)
            p.write(hex: "00000000 00000000 7fffffff 7fffffff")
            p.stallUntilClientCloses()
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        let t = elapsed { expectBackendError(.protocolViolation, operation: "CMD_GET_STATEBLOB") { _ = try client.stateBlob(.permanent) } }
        #expect(t < 1.0)   // refused from the header, not after waiting for 2 GiB
        #expect(client.isBroken)
        peer.finish()
    }

    @Test func garbageLengthsAreProtocolViolations() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(16); p.write(hex: "00000000 00000000 00000010 00000008")   // totlength != length
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        expectBackendError(.protocolViolation, operation: "CMD_GET_STATEBLOB") { _ = try client.stateBlob(.permanent) }
        peer.finish()
    }

    @Test func getInfoChunkBeyondTheBuffer() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(20); p.write(hex: "00000000 00100000 00100000")
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        expectBackendError(.protocolViolation, operation: "CMD_GET_INFO") { _ = try client.info(.tpmSpecification) }
        peer.finish()
    }

    @Test func shortReplyThenStallTimesOut() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(4)
            p.write(hex: "000000")   // 3 of the 4 result bytes, then nothing
            p.stallUntilClientCloses()
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 0.3)
        let t = elapsed { expectBackendError(.timeout, operation: "CMD_GET_CAPABILITY") { _ = try client.capabilities() } }
        #expect(t >= 0.29 && t < 1.5)
        peer.finish()
    }

    @Test func stalledPeerTimesOut() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(8)
            p.stallUntilClientCloses()
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 0.25)
        let t = elapsed { expectBackendError(.timeout, operation: "CMD_INIT") { try client.initialize() } }
        #expect(t >= 0.24 && t < 1.5)
        peer.finish()
    }

    @Test func timeoutsAreCappedAtTenSeconds() throws {
        let (sock, _) = try FakePeer.start { _ in }
        #expect(SwtpmCtrlClient(socket: sock, timeout: 3600).timeout == 10)
    }

    /// QEMU `tpm_emulator_set_state_blob`: header, then the blob as a separate write, then the result.
    @Test func setStateBlobSendsHeaderThenData() throws {
        let blob = (0..<5000).map { UInt8(truncatingIfNeeded: $0) }
        let (sock, peer) = try FakePeer.start { p in
            p.read(16)
            p.read(5000)
            p.write(hex: "00000000")
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        try client.setStateBlob(.volatile, TPMStateBlob(flags: 0, data: blob))
        peer.finish()
        #expect(Array(peer.received.prefix(16)).hexString == "0000000d" + "00000000" + "00000002" + "00001388")
        #expect(Array(peer.received.dropFirst(16)) == blob)
    }

    @Test func oversizedBlobIsNotSent() throws {
        let (sock, peer) = try FakePeer.start { p in p.read(4) }
        let client = SwtpmCtrlClient(socket: sock, timeout: 0.5)
        expectBackendError(.stateBlob) {
            try client.setStateBlob(.permanent, TPMStateBlob(data: [UInt8](repeating: 0, count: SwtpmBlob.maximumSize + 1)))
        }
        sock.close()
        peer.finish()
        #expect(peer.received.isEmpty)
    }

    /// CMD_SET_DATAFD: the descriptor arrives as SCM_RIGHTS with the command code.
    @Test func setDataFDPassesTheDescriptor() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(4)
            p.write(hex: "00000000")
        }
        let (a, b) = try SwtpmSocket.pair(labels: ("a", "b"))
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        try client.setDataFD(b.rawValue)
        peer.finish()
        #expect(peer.received.hexString == "00000010")
        let passed = try #require(peer.receivedDescriptors.first)
        defer { _ = Glibc.close(passed) }
        #expect(fcntl(passed, F_GETFD) & FD_CLOEXEC != 0)
        b.close()
        // Bytes written on the passed descriptor arrive at our end.
        _ = [UInt8]([0x42]).withUnsafeBytes { send(passed, $0.baseAddress, 1, Int32(MSG_NOSIGNAL)) }
        #expect(try a.readExactly(1, timeout: 1, operation: nil, field: "x") == [0x42])
    }

    /// A second caller waits for the first exchange to complete (never two commands in flight).
    @Test func commandsAreSerialized() throws {
        let (sock, peer) = try FakePeer.start { p in
            for _ in 0..<2 {
                p.read(4)
                usleep(100_000)
                p.write(hex: "00000000 00000003")
            }
        }
        let client = SwtpmCtrlClient(socket: sock, timeout: 2)
        let group = DispatchGroup()
        let results = Collector<SwtpmCtrl.ConfigFlags>()
        for _ in 0..<2 {
            group.enter()
            startThread {
                results.append((try? client.configuration()) ?? [])
                group.leave()
            }
        }
        group.wait()
        peer.finish()
        #expect(results.values == [[.fileKey, .migrationKey], [.fileKey, .migrationKey]])
        #expect(peer.received.hexString == "0000000f0000000f")
    }
}

/// The data channel (QEMU `tpm_emulator_unix_tx_bufs`) with the size check QEMU lacks.
@Suite("swtpm data channel against a fake peer")
struct SwtpmDataChannelTests {
    static let getRandom = TPM2.getRandom(8)

    @Test func responseIsReadAcrossShortWrites() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(12)
            let resp = [UInt8](hexString: "8001 00000014 00000000 0008 0102030405060708") ?? []
            for b in resp { p.write([b]); usleep(200) }
        }
        let ch = SwtpmDataChannel(socket: sock)
        let r = try ch.exchange(Self.getRandom, maxResponseSize: 4096, timeout: 2, operation: "TPM command")
        #expect(r.count == 20)
        #expect(try TPM2.randomBytes(r) == [1, 2, 3, 4, 5, 6, 7, 8])
        peer.finish()
    }

    struct BadReply: CustomTestStringConvertible, Sendable {
        let name: String
        let reply: String
        let closeAfter: Bool
        let code: BackendError.Code
        var testDescription: String { name }
    }

    static let badReplies: [BadReply] = [
        BadReply(name: "size below the header", reply: "8001 00000004 00000000", closeAfter: false, code: .protocolViolation),
        BadReply(name: "size zero", reply: "8001 00000000 00000000", closeAfter: false, code: .protocolViolation),
        BadReply(name: "size above any TPM response", reply: "8001 00010001 00000000", closeAfter: false, code: .protocolViolation),
        BadReply(name: "size 4 GiB", reply: "8001 ffffffff 00000000", closeAfter: false, code: .protocolViolation),
        BadReply(name: "EOF inside the header", reply: "8001 0000", closeAfter: true, code: .connectionClosed),
        BadReply(name: "EOF inside the body", reply: "8001 00000020 00000000 0102", closeAfter: true, code: .connectionClosed),
        BadReply(name: "stall inside the body", reply: "8001 00000020 00000000 0102", closeAfter: false, code: .timeout),
        BadReply(name: "no reply at all", reply: "", closeAfter: false, code: .timeout),
    ]

    @Test("bad data-channel replies give typed errors", arguments: badReplies)
    func badReply(_ b: BadReply) throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(12)
            p.write(hex: b.reply)
            if b.closeAfter { p.close() } else { p.stallUntilClientCloses() }
        }
        let ch = SwtpmDataChannel(socket: sock)
        let t = elapsed {
            expectBackendError(b.code, operation: "TPM command 0x0000017b") {
                _ = try ch.exchange(Self.getRandom, maxResponseSize: 4096, timeout: 0.3, operation: "TPM command 0x0000017b")
            }
        }
        #expect(t < 1.5)   // the 0.3 s timeout, or at once; never the peer's 2 s
        // Out of step now: refuse at once.
        expectBackendError(.connectionClosed) { _ = try ch.exchange(Self.getRandom, maxResponseSize: 4096, timeout: 0.3, operation: "x") }
        peer.finish()
    }

    /// QEMU hazard §9.20: a response larger than the frontend's buffer is never copied; it is
    /// read and dropped, so the channel stays in step for the next command.
    @Test func responseBeyondTheFrontendBufferIsDroppedInStep() throws {
        let (sock, peer) = try FakePeer.start { p in
            p.read(12)
            p.write([0x80, 0x01, 0, 0, 0, 0x40, 0, 0, 0, 0] + [UInt8](repeating: 7, count: 0x40 - 10))
            p.read(12)
            p.write(hex: "8001 0000000c 00000000 0000")
        }
        let ch = SwtpmDataChannel(socket: sock)
        expectBackendError(.protocolViolation, operation: "TPM command") {
            _ = try ch.exchange(Self.getRandom, maxResponseSize: 32, timeout: 1, operation: "TPM command")
        }
        #expect(try ch.exchange(Self.getRandom, maxResponseSize: 32, timeout: 1, operation: "TPM command").hexString
                == "80010000000c000000000000")
        peer.finish()
    }
}
