import Synchronization
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// A TPM backend that drives a swtpm process over its ctrl and data channels, exactly as
/// QEMU's `tpm-emulator` does (backends/tpm/tpm_emulator.c); qemu-tpm.md §5 has every sequence.
///
/// - Creation (`tpm_emulator_handle_device_opts`): connect the ctrl channel, CMD_SET_DATAFD with
///   one end of a socketpair (or connect to swtpm's `--server` data socket), probe the TPM
///   version on the data channel (`tpm_util_test_tpmdev`), CMD_GET_CAPABILITY and the minimum
///   capability check (`tpm_emulator_check_caps`).
/// - The ctrl and data channels are separate descriptors with separate locks, so
///   `cancelCommand()` (ctrl) works while `execute` blocks on the data channel.
/// - Every read is bounded by a timeout (at most 10 s); a swtpm that dies or stalls mid-command
///   gives a typed error (`.connectionClosed`, `.timeout`), and `BackendRunner` then answers the
///   guest with QEMU's fatal-error response. A failed backend stays failed; build a new
///   `SwtpmBackend` (over a new swtpm) to replace it.
///
/// Trust: swtpm is a separate process and its replies are input. A broken or hostile swtpm can
/// stall (→ `.timeout`), die (→ `.connectionClosed`), or send wrong lengths and garbage
/// (→ `.protocolViolation`; a length is checked against a named limit before anything is
/// allocated: state blobs ≤ `SwtpmBlob.maximumSize`, GET_INFO chunks ≤ 3 KiB, TPM responses
/// ≤ the frontend's buffer). It cannot make this process trap, hang, or hand the frontend more
/// bytes than its buffer holds; after a reply that leaves a channel out of step, that channel
/// is closed rather than guessed at.
public final class SwtpmBackend: TPMBackend, @unchecked Sendable {
    /// Where swtpm listens and how long to wait for it.
    public struct Configuration: Sendable {
        /// The ctrl channel (UnixIO for CMD_SET_DATAFD; TCP needs `data`).
        public var ctrl: SwtpmEndpoint
        /// swtpm's `--server` data socket; nil: a socketpair handed over with CMD_SET_DATAFD.
        public var data: SwtpmEndpoint?
        /// Seconds a TPM command may take on the data channel (clamped to 0.001...10).
        public var dataTimeout: Double = 5
        /// Seconds a ctrl reply may take (clamped to 0.001...10).
        public var ctrlTimeout: Double = 5
        /// The version probe's wait (QEMU `tpm_util_test`: 1 s).
        public var probeTimeout: Double = 1

        public init(ctrl: SwtpmEndpoint, data: SwtpmEndpoint? = nil) {
            self.ctrl = ctrl
            self.data = data
        }

        /// The channels of a launched swtpm: its ctrl endpoint, and its `--server` socket if it has one.
        public init(process: SwtpmProcess) {
            self.init(ctrl: process.ctrlEndpoint, data: process.dataEndpoint)
        }
    }

    public let configuration: Configuration
    public let tpmVersion: TPMVersion
    /// What swtpm reported on CMD_GET_CAPABILITY.
    public let capabilities: SwtpmCtrl.Capabilities
    /// The ctrl channel, for every ctrl operation (the CLI, tests). Calls through it bypass the
    /// backend's caches (locality, established flag).
    public let ctrl: SwtpmCtrlClient
    private let data: SwtpmDataChannel

    /// QEMU `cur_locty_number`: the locality last set with CMD_SET_LOCALITY, 0xFF before the
    /// first command. Written under the data lock; read by `resetEstablishedFlag`.
    private let currentLocality = Atomic<UInt8>(0xFF)
    /// QEMU `established_flag_cached` / `established_flag`.
    private let establishedCache = Mutex<Bool?>(nil)
    /// QEMU `relock_storage`: set by a successful save.
    private let relockStorage = Atomic<Bool>(false)
    private let isShutDown = Atomic<Bool>(false)

    /// Commands longer than this are answered locally: swtpm reads a command with one `read`
    /// into a buffer of its TPM_BUFFER_MAX (4096) plus the 9-byte mssim prefix; the excess
    /// would be taken for the next command.
    public static let maximumCommandSize = 4096

    // MARK: Creation

    /// Connects to swtpm and runs QEMU's creation sequence. Throws if swtpm cannot be reached,
    /// the version probe fails, or swtpm lacks QEMU's minimum capabilities.
    public init(_ configuration: Configuration) throws(BackendError) {
        var config = configuration
        config.dataTimeout = SwtpmCtrlClient.clampTimeout(config.dataTimeout)
        config.ctrlTimeout = SwtpmCtrlClient.clampTimeout(config.ctrlTimeout)
        config.probeTimeout = SwtpmCtrlClient.clampTimeout(config.probeTimeout)
        self.configuration = config

        let ctrl = try SwtpmCtrlClient(connectingTo: config.ctrl, timeout: config.ctrlTimeout)
        let data: SwtpmDataChannel
        do throws(BackendError) {
            data = try Self.openDataChannel(config, ctrl)
        } catch {
            ctrl.close()
            throw error
        }
        let version: TPMVersion
        let caps: SwtpmCtrl.Capabilities
        do throws(BackendError) {
            version = try Self.probeVersion(data, timeout: config.probeTimeout)
            caps = try ctrl.capabilities()
            try Self.checkCapabilities(caps, version: version)
        } catch {
            data.close()
            ctrl.close()
            throw error
        }
        self.ctrl = ctrl
        self.data = data
        self.tpmVersion = version
        self.capabilities = caps
    }

    /// Connects to a swtpm started by `SwtpmProcess`.
    public convenience init(process: SwtpmProcess, dataTimeout: Double = 5, ctrlTimeout: Double = 5) throws(BackendError) {
        var c = Configuration(process: process)
        c.dataTimeout = dataTimeout
        c.ctrlTimeout = ctrlTimeout
        try self.init(c)
    }

    /// Closes the channels without CMD_SHUTDOWN (swtpm keeps running); call `shutdown()` for
    /// QEMU's finalize behaviour.
    deinit {
        data.close()
        ctrl.close()
    }

    /// QEMU `tpm_emulator_prepare_data_fd`: socketpair, CMD_SET_DATAFD with one end as
    /// SCM_RIGHTS, keep the other end, close the passed one. Or connect to `--server`.
    private static func openDataChannel(_ config: Configuration, _ ctrl: SwtpmCtrlClient) throws(BackendError) -> SwtpmDataChannel {
        if let endpoint = config.data {
            let s = try SwtpmSocket.connect(to: endpoint, timeout: config.ctrlTimeout, label: "swtpm data channel \(endpoint)")
            return SwtpmDataChannel(socket: s)
        }
        guard case .unix = config.ctrl else {
            throw BackendError(.unsupported, "CMD_SET_DATAFD needs a UnixIO ctrl channel; with a TCP ctrl channel give the data endpoint (--server)",
                               operation: SwtpmCtrl.CommandCode.setDataFD.name)
        }
        let (mine, theirs) = try SwtpmSocket.pair(labels: ("swtpm data channel (socketpair)", "socketpair peer"))
        defer { theirs.close() }   // swtpm holds its own copy now; ours must go for EOF to work
        try ctrl.setDataFD(theirs.rawValue)
        return SwtpmDataChannel(socket: mine)
    }

    /// TPM2_ReadClock, answered by an uninitialised swtpm with its fatal-error response.
    static let probeTPM2: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x01, 0x81]
    /// TPM 1.2 TPM_GetTicks.
    static let probeTPM12: [UInt8] = [0x00, 0xC1, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0xF1]

    /// QEMU `tpm_util_test_tpmdev`: a TPM2 command first (response tag 0x8001 = TPM 2.0), then
    /// a TPM 1.2 one (tag 0x00C4 = TPM 1.2).
    static func probeVersion(_ data: SwtpmDataChannel, timeout: Double) throws(BackendError) -> TPMVersion {
        let r2 = try data.exchange(probeTPM2, maxResponseSize: 4096, timeout: timeout, operation: "version probe (TPM2_ReadClock)")
        if r2[0] == 0x80 && r2[1] == 0x01 { return .tpm20 }
        let r1 = try data.exchange(probeTPM12, maxResponseSize: 4096, timeout: timeout, operation: "version probe (TPM_GetTicks)")
        if r1[0] == 0x00 && r1[1] == 0xC4 { return .tpm12 }
        throw BackendError(.protocolViolation, "the TPM answered neither the TPM 2.0 nor the TPM 1.2 probe (tags 0x\(Array(r2.prefix(2)).hexString), 0x\(Array(r1.prefix(2)).hexString))",
                           operation: "version probe")
    }

    /// QEMU `tpm_emulator_check_caps`.
    static func checkCapabilities(_ caps: SwtpmCtrl.Capabilities, version: TPMVersion) throws(BackendError) {
        let needed: SwtpmCtrl.Capabilities = version == .tpm12 ? .qemuMinimumTPM12 : .qemuMinimumTPM20
        let missing = needed.subtracting(caps)
        guard missing.isEmpty else {
            throw BackendError(.unsupported, "swtpm lacks capabilities QEMU requires for TPM \(version): \(missing.names.joined(separator: ", ")) (has \(caps))",
                               operation: SwtpmCtrl.CommandCode.getCapability.name)
        }
    }

    /// False when swtpm lacks GET_STATEBLOB, SET_STATEBLOB or STOP: QEMU then installs a
    /// migration blocker ("TPM emulator does not support migration").
    public var supportsMigration: Bool { capabilities.isSuperset(of: .migration) }

    private func ensureRunning(_ op: String) throws(BackendError) {
        if isShutDown.load(ordering: .acquiring) {
            throw BackendError(.notRunning, "the swtpm backend was shut down", operation: op)
        }
    }

    // MARK: TPMBackend

    /// QEMU `tpm_emulator_get_buffer_size`: STOP, SET_BUFFERSIZE(0); 4096 if either fails.
    public func bufferSize() -> Int {
        do {
            try ensureRunning("CMD_SET_BUFFERSIZE")
            return Int(try stopAndSetBufferSize(0).bufferSize)
        } catch {
            return 4096
        }
    }

    /// QEMU `tpm_emulator_set_buffer_size`: STOP, then SET_BUFFERSIZE(size).
    private func stopAndSetBufferSize(_ size: UInt32) throws(BackendError) -> SwtpmCtrl.SetBufferSizeResponse {
        try ctrl.stop()
        return try ctrl.setBufferSize(size)
    }

    /// QEMU `tpm_emulator_startup_tpm` / `tpm_emulator_startup_tpm_resume(…, false)`:
    /// STOP + SET_BUFFERSIZE(n) when n ≠ 0, then INIT(0); `incoming` (INMIGRATE) stops after
    /// the buffer size, the INIT comes with `restoreState`.
    public func startup(bufferSize: Int, incoming: Bool) throws(BackendError) {
        try ensureRunning("CMD_INIT")
        if bufferSize != 0 {
            _ = try stopAndSetBufferSize(UInt32(clamping: bufferSize))
        }
        if incoming { return }
        try ctrl.initialize(flags: [])
    }

    /// QEMU `tpm_emulator_handle_request` + `tpm_emulator_set_locality` +
    /// `tpm_emulator_unix_tx_bufs`: CMD_SET_LOCALITY only when the locality differs from the
    /// last one set, then the command on the data channel.
    ///
    /// Commands shorter than the 10-byte header, or longer than `maximumCommandSize`, are not
    /// sent, nor are commands whose header size differs from their length: swtpm would wait for
    /// the rest of a short header (QEMU hangs there,
    /// runs-on-this-machine.md §8) or take the excess of a long one for the next command. They
    /// are answered here with the TPM's own "wrong command size" error: TPM 2.0
    /// `80 01 00 00 00 0a 00 00 01 42` (TPM_ST_NO_SESSIONS, TPM_RC_COMMAND_SIZE); TPM 1.2
    /// `00 c4 00 00 00 0a 00 00 00 19` (TPM_TAG_RSP_COMMAND, TPM_BAD_PARAM_SIZE), cut to
    /// `maxResponseSize`.
    ///
    /// A response is checked before it is read: `10 ≤ size ≤ command.maxResponseSize` (QEMU
    /// copies whatever swtpm announces: hazard §9.20). One that does not fit is dropped with
    /// `.protocolViolation` (see `SwtpmDataChannel`).
    public func execute(_ command: TPMBackendCommand) throws(BackendError) -> TPMBackendResponse {
        let bytes = command.bytes
        let op = Self.operationName(bytes)
        try ensureRunning(op)
        // swtpm reads a command by its header's size field: a size that differs from the bytes
        // sent makes it wait for more (a hang, as QEMU hangs) or take the excess for the next
        // command (a desynchronised channel). The TIS can produce both (its completion check
        // holds the size in 16 bits, as QEMU's does); answer them here instead.
        guard bytes.count >= SwtpmDataChannel.headerSize, bytes.count <= Self.maximumCommandSize,
              Self.be32(bytes, at: 2) == UInt32(bytes.count) else {
            return TPMBackendResponse(bytes: Array(localCommandSizeError.prefix(max(0, command.maxResponseSize))))
        }
        let response = try data_withLocality(command, operation: op)
        // QEMU tpm_util_is_selftest: TPM 1.2 TPM_ORD_ContinueSelfTest (0x53) with result 0.
        let isSelftest = Self.be32(bytes, at: 6) == 0x53
        let selftestDone = isSelftest && Self.be32(response, at: 6) == 0
        return TPMBackendResponse(bytes: response, selftestDone: selftestDone)
    }

    /// The response to a command that is never sent to swtpm (see `execute`).
    public var localCommandSizeError: [UInt8] {
        tpmVersion == .tpm12
            ? [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x19]
            : [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x01, 0x42]
    }

    private let dataLock = Mutex<Void>(())

    private func data_withLocality(_ command: TPMBackendCommand, operation: String) throws(BackendError) -> [UInt8] {
        try dataLock.withLock { _ throws(BackendError) -> [UInt8] in
            if currentLocality.load(ordering: .acquiring) != command.locality {
                try ctrl.setLocality(command.locality)
                currentLocality.store(command.locality, ordering: .releasing)
            }
            return try data.exchange(command.bytes, maxResponseSize: command.maxResponseSize,
                                     timeout: configuration.dataTimeout, operation: operation)
        }
    }

    static func be32(_ b: [UInt8], at i: Int) -> UInt32? {
        guard b.count >= i + 4 else { return nil }
        return UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }

    /// "TPM command 0x0000017b", naming the ordinal in data-channel errors.
    static func operationName(_ bytes: [UInt8]) -> String {
        guard let cc = be32(bytes, at: 6) else { return "TPM command (short)" }
        let hex = String(cc, radix: 16)
        return "TPM command 0x" + String(repeating: "0", count: max(0, 8 - hex.count)) + hex
    }

    /// QEMU `tpm_emulator_cancel_cmd`: CMD_CANCEL_TPM_CMD over the ctrl channel, only if swtpm
    /// has the capability; errors are only reported in QEMU, so they are dropped here. Safe
    /// while `execute` blocks on the data channel (separate descriptor and lock); swtpm answers
    /// once it is free to read its ctrl socket.
    public func cancelCommand() {
        guard capabilities.contains(.cancelTPMCommand), !isShutDown.load(ordering: .acquiring) else { return }
        _ = try? ctrl.transact(SwtpmCtrl.CancelTPMCommand())
    }

    /// QEMU `tpm_emulator_get_tpm_established_flag`: the cached value if there is one, else
    /// CMD_GET_TPMESTABLISHED, cached. Unlike QEMU (which ignores the result word and returns
    /// false on a channel error), a failure throws and leaves the cache empty.
    public func establishedFlag() throws(BackendError) -> Bool {
        try ensureRunning("CMD_GET_TPMESTABLISHED")
        return try establishedCache.withLock { cached throws(BackendError) -> Bool in
            if let cached { return cached }
            let bit = try ctrl.isEstablished()
            cached = bit
            return bit
        }
    }

    /// QEMU `tpm_emulator_reset_tpm_established_flag`: TPM 2.0 only (a no-op for 1.2). As in
    /// QEMU the `locality` argument is ignored: the reset is sent from the locality of the
    /// last command (`cur_locty_number`; 0xFF before any command, which swtpm refuses with
    /// TPM_BAD_LOCALITY). Success clears the cached flag — the only thing that does.
    public func resetEstablishedFlag(locality: UInt8) throws(BackendError) {
        guard tpmVersion == .tpm20 else { return }
        try ensureRunning("CMD_RESET_TPMESTABLISHED")
        try ctrl.resetEstablished(locality: currentLocality.load(ordering: .acquiring))
        establishedCache.withLock { $0 = nil }
    }

    /// The locality QEMU's `cur_locty_number` would hold (0xFF before the first command).
    public var lastCommandLocality: UInt8 { currentLocality.load(ordering: .acquiring) }

    /// QEMU `tpm_emulator_pre_save` / `tpm_emulator_get_state_blobs`: GET_STATEBLOB permanent,
    /// volatile, savestate with DECRYPTED, no STOP before. Results with 0x800 give empty blobs;
    /// totlength must equal length; a blob above `SwtpmBlob.maximumSize` is refused. Callers
    /// wait for the in-flight command first (`BackendRunner.finishSync`).
    public func saveState() throws(BackendError) -> TPMStateBlobs {
        try ensureRunning("CMD_GET_STATEBLOB")
        guard supportsMigration else {
            throw BackendError(.unsupported, "TPM emulator does not support migration (capabilities \(capabilities))",
                               operation: SwtpmCtrl.CommandCode.getStateBlob.name)
        }
        var blobs = TPMStateBlobs()
        for type in TPMStateBlobType.allCases {
            do throws(BackendError) {
                blobs[type] = try ctrl.stateBlob(type, flags: .decrypted)
            } catch {
                var e = error
                e.blobType = type
                throw e
            }
        }
        relockStorage.store(true, ordering: .releasing)
        return blobs
    }

    /// QEMU `tpm_emulator_post_load` / `tpm_emulator_set_state_blobs`: STOP, SET_STATEBLOB for
    /// each non-empty blob (permanent, volatile, savestate) with its migrated flags, then
    /// `startup_tpm_resume(0, true)`: INIT(DELETE_VOLATILE).
    public func restoreState(_ blobs: TPMStateBlobs) throws(BackendError) {
        try ensureRunning("CMD_SET_STATEBLOB")
        // Blobs come from a stream: refuse what would crash swtpm 0.7.1, before STOP.
        for type in TPMStateBlobType.allCases where !blobs[type].data.isEmpty {
            try SwtpmBlob.checkBeforeSetStateBlob(blobs[type].data, type: type)
        }
        try ctrl.stop()
        for type in TPMStateBlobType.allCases where !blobs[type].data.isEmpty {
            try ctrl.setStateBlob(type, blobs[type])
        }
        try ctrl.initialize(flags: .deleteVolatile)
    }

    /// QEMU `tpm_emulator_vm_state_change`: when the VM runs again after a save (a failed
    /// outgoing migration), take swtpm's storage lock back with LOCK_STORAGE(300), if swtpm
    /// has the capability. Returns whether it was sent.
    @discardableResult
    public func vmResumed() throws(BackendError) -> Bool {
        guard relockStorage.load(ordering: .acquiring), capabilities.contains(.lockStorage) else { return false }
        try lockStorage(retries: 300)
        return true
    }

    /// CMD_LOCK_STORAGE (swtpm 0.8+): take the NVRAM lock, retrying `retries` × 10 ms.
    public func lockStorage(retries: UInt32) throws(BackendError) {
        try ensureRunning("CMD_LOCK_STORAGE")
        guard capabilities.contains(.lockStorage) else {
            throw BackendError(.unsupported, "swtpm lacks CMD_LOCK_STORAGE (needs swtpm 0.8+; capabilities \(capabilities))",
                               operation: SwtpmCtrl.CommandCode.lockStorage.name)
        }
        try ctrl.lockStorage(retries: retries)
    }

    /// QEMU `tpm_emulator_inst_finalize`: CMD_SHUTDOWN (swtpm exits; errors ignored), then
    /// both channels closed. Idempotent; later calls throw `.notRunning`.
    public func shutdown() {
        let (first, _) = isShutDown.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing)
        guard first else { return }
        _ = try? ctrl.transact(SwtpmCtrl.Shutdown())
        data.close()
        ctrl.close()
    }
}
