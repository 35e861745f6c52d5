#if canImport(Glibc)
import Glibc
#endif
import EmulatorBackend
import WireFormat

/// The swtpm-reply fuzz target: any byte string as what swtpm answers.
/// - Every ctrl response decoder (`SwtpmCtrl.*Response.decode`) over the bytes: a value or a
///   `WireError`, never a trap, payloads within their named limits.
/// - The ctrl client's two-stage framing (`SwtpmCtrlClient.transact`, QEMU
///   `tpm_emulator_ctrlcmd`) over a socketpair whose peer has written the bytes and shut its
///   side: a sequence of ctrl commands chosen by the input, each a value or a `BackendError`;
///   after a failure the client refuses at once.
/// - The data channel's response reader (`SwtpmDataChannel`, QEMU `tpm_emulator_unix_tx_bufs`)
///   the same way: every response returned is 10...maxResponseSize bytes and holds exactly the
///   size its header says.
public enum CtrlReplyFuzz {
    public static let target = "ctrl"

    /// What one input did.
    public struct Outcome: Sendable, Equatable {
        public var decoded = 0
        public var refusedDecodes = 0
        public var ctrlSucceeded = 0
        public var ctrlFailed = 0
        public var dataSucceeded = 0
        public var dataFailed = 0
        public init() {}
        public static func += (a: inout Outcome, b: Outcome) {
            a.decoded += b.decoded; a.refusedDecodes += b.refusedDecodes
            a.ctrlSucceeded += b.ctrlSucceeded; a.ctrlFailed += b.ctrlFailed
            a.dataSucceeded += b.dataSucceeded; a.dataFailed += b.dataFailed
        }
    }

    /// The first byte picks what to exercise: bits 0-1: 0 = decoders only, 1 = ctrl client,
    /// 2 = data channel, 3 = all three; the rest of the input is the reply.
    @discardableResult
    public static func run(_ data: [UInt8], step: Int = 0) throws(FuzzViolation) -> Outcome {
        var input = FuzzInput(data)
        let mode = input.u8()
        var out = Outcome()
        let reply = Array(data.dropFirst(min(1, data.count)))
        if mode & 3 == 0 || mode & 3 == 3 { try decoders(reply, step: step, &out) }
        if mode & 3 == 1 || mode & 3 == 3 { try ctrlClient(mode, reply, step: step, &out) }
        if mode & 3 >= 2 { try dataChannel(mode, reply, step: step, &out) }
        return out
    }

    // MARK: Pure decoders

    static func decoders(_ reply: [UInt8], step: Int, _ out: inout Outcome) throws(FuzzViolation) {
        func fail(_ m: String) -> FuzzViolation { FuzzViolation(target: target, step: step, operation: "decode", m) }
        func attempt<R: SwtpmCtrlResponse>(_ type: R.Type, _ check: (R) throws(FuzzViolation) -> Void = { _ in }) throws(FuzzViolation) {
            do {
                let r = try R.decode(reply)
                out.decoded += 1
                try check(r)
            } catch let e as FuzzViolation {
                throw e
            } catch {
                out.refusedDecodes += 1
            }
        }
        try attempt(SwtpmCtrl.ResultResponse.self)
        try attempt(SwtpmCtrl.CapabilityResponse.self)
        try attempt(SwtpmCtrl.EstablishedResponse.self)
        try attempt(SwtpmCtrl.GetConfigResponse.self)
        try attempt(SwtpmCtrl.SetBufferSizeResponse.self)
        try attempt(SwtpmCtrl.GetStateBlobResponse.self) { (r: SwtpmCtrl.GetStateBlobResponse) throws(FuzzViolation) in
            guard r.data.count <= SwtpmBlob.maximumSize else { throw fail("GET_STATEBLOB kept \(r.data.count) bytes") }
            guard r.data.count <= reply.count else { throw fail("GET_STATEBLOB data longer than the reply") }
        }
        try attempt(SwtpmCtrl.GetInfoResponse.self) { (r: SwtpmCtrl.GetInfoResponse) throws(FuzzViolation) in
            guard r.chunk.count <= SwtpmCtrl.getInfoChunkLimit else { throw fail("GET_INFO kept \(r.chunk.count) bytes") }
        }
        // The blob container swtpm's blobs travel in (SwtpmBlob, CVE-2022-23645's header sizes).
        do {
            let b = try SwtpmBlob.decode(reply)
            let total = b.tlvs.reduce(0) { $0 + $1.value.count }
            guard total <= reply.count else { throw fail("blob TLVs longer than the blob") }
            _ = try? b.plainState()
            out.decoded += 1
        } catch let e as FuzzViolation {
            throw e
        } catch {
            out.refusedDecodes += 1
        }
    }

    // MARK: Over a socket

    /// A connected socketpair whose peer end has `reply` queued and its write side shut: the
    /// reader sees the bytes, then EOF; the peer end stays open so our writes succeed.
    static func peer(_ reply: [UInt8]) -> (mine: Int32, theirs: Int32)? {
        var fds: [Int32] = [-1, -1]
        let r = fds.withUnsafeMutableBufferPointer {
            socketpair(AF_UNIX, Int32(bitPattern: SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0, $0.baseAddress)
        }
        guard r == 0 else { return nil }
        var sndbuf: Int32 = 1 << 20
        _ = setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &sndbuf, socklen_t(MemoryLayout<Int32>.size))
        var done = 0
        while done < reply.count {
            let n = reply.withUnsafeBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                return send(fds[1], base + done, raw.count - done, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            }
            if n <= 0 { break }      // buffer full: the rest is cut (the reader sees EOF earlier)
            done += n
        }
        shutdown(fds[1], Int32(SHUT_WR))
        return (fds[0], fds[1])
    }

    static let timeout = 0.05

    static func ctrlClient(_ mode: UInt8, _ reply: [UInt8], step: Int, _ out: inout Outcome) throws(FuzzViolation) {
        guard let (mine, theirs) = peer(Array(reply.dropFirst(min(4, reply.count)))) else { return }
        defer { close(theirs) }
        let client = SwtpmReplyHarness.ctrlClient(adopting: mine, timeout: timeout)
        defer { client.close() }
        let picks = reply.prefix(4)
        var broken = false
        for (i, pick) in picks.enumerated() {
            let op = "ctrl #\(i) pick \(pick)"
            func fail(_ m: String) -> FuzzViolation { FuzzViolation(target: target, step: step, operation: op, m) }
            let t0 = monotonicSeconds()
            do throws(BackendError) {
                switch pick % 10 {
                case 0: _ = try client.capabilities()
                case 1: try client.initialize(flags: .deleteVolatile)
                case 2: _ = try client.isEstablished()
                case 3:
                    let b = try client.stateBlob([.permanent, .volatile, .savestate][Int(pick / 10) % 3])
                    guard b.data.count <= SwtpmBlob.maximumSize else { throw BackendError(.io, "fuzz: blob kept \(b.data.count) bytes") }
                case 4: _ = try client.configuration()
                case 5: _ = try client.setBufferSize(UInt32(pick) * 16)
                case 6:
                    let s = try client.info(.tpmSpecification)
                    guard s.utf8.count <= SwtpmCtrl.getInfoTotalLimit else { throw BackendError(.io, "fuzz: info kept \(s.utf8.count) bytes") }
                case 7: try client.setStateBlob(.volatile, TPMStateBlob(data: [UInt8](repeating: pick, count: Int(pick))))
                case 8: try client.resetEstablished(locality: pick % 6)
                default: try client.stop()
                }
                if broken { throw BackendError(.io, "fuzz: a broken client answered") }
                out.ctrlSucceeded += 1
            } catch {
                if error.message.hasPrefix("fuzz:") { throw fail(error.message) }
                out.ctrlFailed += 1
                if broken && error.code != .connectionClosed {
                    throw fail("after a failure the client answered \(error.code), not connectionClosed")
                }
                if client.isBroken { broken = true }
            }
            // EOF is queued: nothing may wait for a timeout (a GET_INFO may loop over chunks).
            if monotonicSeconds() - t0 > 2 { throw fail("a ctrl command over a closed peer took \(monotonicSeconds() - t0) s") }
        }
    }

    static func dataChannel(_ mode: UInt8, _ reply: [UInt8], step: Int, _ out: inout Outcome) throws(FuzzViolation) {
        guard let (mine, theirs) = peer(reply) else { return }
        defer { close(theirs) }
        let limits = [4096, 4096, 3968, 1024, 10, 64]
        let maxResponse = limits[Int(mode >> 2) % limits.count]
        let command: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x01, 0x7B, 0x00, 0x08]
        let count = Int(mode >> 5) + 1
        let results = SwtpmReplyHarness.dataExchanges(adopting: mine, commands: Array(repeating: command, count: count),
                                                       maxResponseSize: maxResponse, timeout: timeout)
        var failedBefore = false
        for (i, r) in results.enumerated() {
            func fail(_ m: String) -> FuzzViolation { FuzzViolation(target: target, step: step, operation: "data #\(i)", m) }
            switch r {
            case .success(let bytes):
                guard bytes.count >= 10, bytes.count <= maxResponse else { throw fail("a \(bytes.count)-byte response was returned") }
                let size = Int(bytes[2]) << 24 | Int(bytes[3]) << 16 | Int(bytes[4]) << 8 | Int(bytes[5])
                guard size == bytes.count else { throw fail("header says \(size), returned \(bytes.count)") }
                if failedBefore { throw fail("a response after a channel failure") }
                out.dataSucceeded += 1
            case .failure(let e):
                out.dataFailed += 1
                // An oversized response is dropped in step; anything else breaks the channel.
                if e.code != .protocolViolation || !e.message.contains("exceeds the frontend's buffer") { failedBefore = true }
            }
        }
    }

    static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
