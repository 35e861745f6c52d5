import Synchronization
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// One connection to a swtpm ctrl channel (UnixIO or TCP), with every ctrl operation.
///
/// Framing mirrors QEMU's `tpm_emulator_ctrlcmd` (the ≥ 9.2 two-stage form): one command in
/// flight at a time (a lock; swtpm reads greedily and would take a second command for trailing
/// bytes of the first), the request in one write, the 4-byte result read first and the payload
/// only when the result announces one, each read exact across short reads and bounded by a
/// timeout. After a transport failure (timeout, EOF, malformed reply) the connection can no
/// longer be trusted to be in step, so it is shut down and every later call fails at once
/// with `.connectionClosed`.
///
/// swtpm serves one ctrl client at a time: close this client before another tool (swtpm_ioctl)
/// connects.
public final class SwtpmCtrlClient: @unchecked Sendable {
    /// Where the client is connected (nil for an adopted socket).
    public let endpoint: SwtpmEndpoint?
    /// Seconds each reply may take (clamped to 0.001...10).
    public let timeout: Double

    private let socket: SwtpmSocket
    /// Held for the whole request/response exchange: never two ctrl commands in flight.
    private let channel = Mutex<BackendError?>(nil)

    /// The largest timeout any ctrl or data operation uses: a wedged swtpm surfaces as an error
    /// within this bound.
    public static let maximumTimeout: Double = 10

    static func clampTimeout(_ t: Double) -> Double { min(max(t, 0.001), maximumTimeout) }

    /// Connects to a swtpm ctrl socket.
    public init(connectingTo endpoint: SwtpmEndpoint, timeout: Double = 5) throws(BackendError) {
        self.endpoint = endpoint
        self.timeout = Self.clampTimeout(timeout)
        self.socket = try SwtpmSocket.connect(to: endpoint, timeout: self.timeout, label: "swtpm ctrl channel \(endpoint)")
    }

    /// Adopts a connected socket (tests use a socketpair with a fake peer).
    init(socket: SwtpmSocket, timeout: Double = 5) {
        self.endpoint = nil
        self.timeout = Self.clampTimeout(timeout)
        self.socket = socket
    }

    deinit { socket.close() }

    /// Closes the connection; later calls fail with `.connectionClosed`. Idempotent.
    public func close() {
        channel.withLock { state in
            if state == nil { state = BackendError(.connectionClosed, "the ctrl connection was closed") }
            socket.close()
        }
    }

    /// Makes a call blocked on the channel return at once with `.connectionClosed` (from any
    /// thread; does not wait for the lock).
    func abort() {
        socket.shutdownBoth()
    }

    /// True once the connection failed or was closed.
    public var isBroken: Bool { channel.withLock { $0 != nil } }

    // MARK: Framing

    /// Sends one request and reads its response (QEMU `tpm_emulator_ctrlcmd`). A non-zero
    /// result is returned, not thrown: the typed operations below decide what is an error.
    /// `descriptor` goes with the first write as SCM_RIGHTS (CMD_SET_DATAFD).
    public func transact<R: SwtpmCtrlRequest>(_ request: R, passing descriptor: Int32? = nil,
                                               timeout: Double? = nil) throws(BackendError) -> R.Response {
        let op = R.code.name
        let t = timeout.map { min(max($0, 0.001), 3600) } ?? self.timeout
        return try channel.withLock { broken throws(BackendError) -> R.Response in
            if let broken {
                throw BackendError(.connectionClosed, "ctrl channel unusable after an earlier failure: \(broken.message)",
                                   operation: op)
            }
            do throws(BackendError) {
                return try exchange(request, descriptor: descriptor, timeout: t, operation: op)
            } catch {
                var e = error
                if e.operation == nil { e.operation = op }
                broken = e
                socket.shutdownBoth()
                throw e
            }
        }
    }

    private func exchange<R: SwtpmCtrlRequest>(_ request: R, descriptor: Int32?, timeout: Double,
                                                operation op: String) throws(BackendError) -> R.Response {
        let first = request.encoded()
        if let descriptor {
            try socket.sendWithDescriptor(first, descriptor: descriptor, timeout: timeout, operation: op)
        } else {
            try socket.sendAll(first, timeout: timeout, operation: op)
        }
        let trailing = request.trailingData
        if !trailing.isEmpty {
            try socket.sendAll(trailing, timeout: timeout, operation: op)
        }
        let resultBytes = try socket.readExactly(4, timeout: timeout, operation: op, field: "\(op) result")
        let result = UInt32(resultBytes[0]) << 24 | UInt32(resultBytes[1]) << 16 | UInt32(resultBytes[2]) << 8 | UInt32(resultBytes[3])
        var head: [UInt8] = []
        var tail: [UInt8] = []
        if R.Response.readsPayload(result: result) {
            head = try socket.readExactly(R.Response.headLength, timeout: timeout, operation: op, field: "\(op) response")
            let n: Int
            do { n = try R.Response.tailLength(result: result, head: head) } catch {
                throw BackendError(wire: error, operation: op)
            }
            tail = try socket.readExactly(n, timeout: timeout, operation: op, field: "\(op) data")
        } else if result != 0 {
            // swtpm 0.7.1 still sends the full fixed-size reply for some errors
            // (GET_TPMESTABLISHED when libtpms fails, GET_STATEBLOB after its early checks),
            // in the same write as the result: drop what is queued to stay in step.
            socket.drainPending(limit: 64)
        }
        do {
            return try R.Response(result: result, head: head, tail: tail)
        } catch {
            throw BackendError(wire: error, operation: op)
        }
    }

    /// `transact`, throwing `.ctrlCommandFailed` (with `tpmResult`) on a non-zero result.
    @discardableResult
    public func command<R: SwtpmCtrlRequest>(_ request: R, passing descriptor: Int32? = nil,
                                              timeout: Double? = nil, blobType: TPMStateBlobType? = nil) throws(BackendError) -> R.Response {
        let response = try transact(request, passing: descriptor, timeout: timeout)
        guard response.result == 0 else {
            throw Self.failure(R.code, response.result, blobType: blobType)
        }
        return response
    }

    static func failure(_ code: SwtpmCtrl.CommandCode, _ result: UInt32, blobType: TPMStateBlobType? = nil) -> BackendError {
        BackendError(.ctrlCommandFailed, "\(code.name) failed with TPM result 0x\(String(result, radix: 16))",
                     operation: code.name, tpmResult: result, blobType: blobType)
    }

    // MARK: Operations (one per ctrl command)

    /// CMD_GET_CAPABILITY.
    public func capabilities() throws(BackendError) -> SwtpmCtrl.Capabilities {
        try command(SwtpmCtrl.GetCapability()).capabilities
    }

    /// CMD_INIT. `deleteVolatile` resumes from the volatile state and deletes it.
    public func initialize(flags: SwtpmCtrl.InitFlags = []) throws(BackendError) {
        try command(SwtpmCtrl.Initialize(flags: flags))
    }

    /// CMD_SHUTDOWN: swtpm stops the TPM and exits after answering.
    public func shutdownTPM() throws(BackendError) {
        try command(SwtpmCtrl.Shutdown())
    }

    /// CMD_GET_TPMESTABLISHED (needs a running TPM).
    public func isEstablished() throws(BackendError) -> Bool {
        try command(SwtpmCtrl.GetTPMEstablished()).isEstablished
    }

    /// CMD_SET_LOCALITY.
    public func setLocality(_ locality: UInt8) throws(BackendError) {
        try command(SwtpmCtrl.SetLocality(locality: locality))
    }

    /// CMD_HASH_START.
    public func hashStart() throws(BackendError) { try command(SwtpmCtrl.HashStart()) }

    /// CMD_HASH_DATA, split into `SwtpmCtrl.hashDataChunk` pieces as swtpm_ioctl does.
    public func hashData(_ data: [UInt8]) throws(BackendError) {
        var i = 0
        repeat {
            let end = min(i + SwtpmCtrl.hashDataChunk, data.count)
            try command(SwtpmCtrl.HashData(data: Array(data[i..<end])))
            i = end
        } while i < data.count
    }

    /// CMD_HASH_END.
    public func hashEnd() throws(BackendError) { try command(SwtpmCtrl.HashEnd()) }

    /// The H-CRTM sequence: HASH_START, HASH_DATA…, HASH_END.
    public func hash(_ data: [UInt8]) throws(BackendError) {
        try hashStart()
        try hashData(data)
        try hashEnd()
    }

    /// CMD_CANCEL_TPM_CMD.
    public func cancelTPMCommand() throws(BackendError) { try command(SwtpmCtrl.CancelTPMCommand()) }

    /// CMD_STORE_VOLATILE.
    public func storeVolatile() throws(BackendError) { try command(SwtpmCtrl.StoreVolatile()) }

    /// CMD_RESET_TPMESTABLISHED from `locality`.
    public func resetEstablished(locality: UInt8) throws(BackendError) {
        try command(SwtpmCtrl.ResetTPMEstablished(locality: locality))
    }

    /// CMD_GET_STATEBLOB at offset 0 (QEMU `tpm_emulator_get_state_blob`): a result with the
    /// TPM_NON_FATAL bit (0x800, no such state) gives an empty blob, as in QEMU.
    public func stateBlob(_ type: TPMStateBlobType, flags: SwtpmCtrl.StateFlags = .decrypted) throws(BackendError) -> TPMStateBlob {
        let r = try transact(SwtpmCtrl.GetStateBlob(type: type, flags: flags))
        if r.result != 0 && r.result & SwtpmCtrl.Result.nonFatal == 0 {
            throw Self.failure(.getStateBlob, r.result, blobType: type)
        }
        return TPMStateBlob(flags: r.stateFlags.rawValue, data: r.result == 0 ? r.data : [])
    }

    /// CMD_SET_STATEBLOB (QEMU `tpm_emulator_set_state_blob`): header, then the blob as a
    /// separate write, then the result. The TPM must be stopped.
    public func setStateBlob(_ type: TPMStateBlobType, _ blob: TPMStateBlob) throws(BackendError) {
        guard blob.data.count <= SwtpmBlob.maximumSize else {
            throw BackendError(.stateBlob, "\(blob.data.count) bytes exceed the blob limit \(SwtpmBlob.maximumSize)",
                               operation: SwtpmCtrl.CommandCode.setStateBlob.name, blobType: type)
        }
        try command(SwtpmCtrl.SetStateBlob(type: type, flags: SwtpmCtrl.StateFlags(rawValue: blob.flags), data: blob.data),
                    blobType: type)
    }

    /// CMD_STOP.
    public func stop() throws(BackendError) { try command(SwtpmCtrl.Stop()) }

    /// CMD_GET_CONFIG.
    public func configuration() throws(BackendError) -> SwtpmCtrl.ConfigFlags {
        try command(SwtpmCtrl.GetConfig()).flags
    }

    /// CMD_SET_DATAFD: hands `descriptor` (one end of a socketpair) to swtpm as its data
    /// channel. The caller keeps ownership of its copy and should close it afterwards.
    public func setDataFD(_ descriptor: Int32) throws(BackendError) {
        try command(SwtpmCtrl.SetDataFD(), passing: descriptor)
    }

    /// CMD_SET_BUFFERSIZE: 0 queries. Returns the size in use and the bounds.
    @discardableResult
    public func setBufferSize(_ size: UInt32) throws(BackendError) -> SwtpmCtrl.SetBufferSizeResponse {
        try command(SwtpmCtrl.SetBufferSize(size: size))
    }

    /// CMD_GET_INFO, following `offset` until the whole string is in (swtpm_ioctl ≥ 0.9).
    /// Returns the JSON text without its NUL.
    public func info(_ flags: SwtpmCtrl.InfoFlags) throws(BackendError) -> String {
        var bytes: [UInt8] = []
        var total = Int.max
        while bytes.count < total {
            let r = try command(SwtpmCtrl.GetInfo(flags: flags, offset: UInt32(bytes.count)))
            total = Int(r.totalLength)
            guard total <= SwtpmCtrl.getInfoTotalLimit else {
                throw BackendError(.protocolViolation, "GET_INFO announces \(total) bytes", operation: SwtpmCtrl.CommandCode.getInfo.name)
            }
            if r.chunk.isEmpty { break }
            bytes += r.chunk
            if r.chunk.last == 0 { break }
        }
        if let nul = bytes.firstIndex(of: 0) { bytes.removeSubrange(nul...) }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// CMD_LOCK_STORAGE (swtpm 0.8+; 0.7.1 answers TPM_BAD_ORDINAL). swtpm may spend
    /// `retries` × 10 ms, which is added to the timeout.
    public func lockStorage(retries: UInt32) throws(BackendError) {
        try command(SwtpmCtrl.LockStorage(retries: retries), timeout: timeout + Double(retries) * 0.01)
    }
}
