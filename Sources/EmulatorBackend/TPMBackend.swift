/// The TPM version a backend implements (QEMU `enum TPMVersion`, include/sysemu/tpm.h).
public enum TPMVersion: UInt8, Sendable, Equatable, CustomStringConvertible {
    case unspecified = 0
    case tpm12 = 1
    case tpm20 = 2

    public var description: String {
        switch self {
        case .unspecified: "unspecified"
        case .tpm12: "1.2"
        case .tpm20: "2.0"
        }
    }
}

/// The three state blobs of a TPM, as swtpm's ctrl protocol numbers them (`PTM_BLOB_TYPE_*`).
public enum TPMStateBlobType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case permanent = 1
    case volatile = 2
    case savestate = 3

    public var description: String {
        switch self {
        case .permanent: "permanent"
        case .volatile: "volatile"
        case .savestate: "savestate"
        }
    }

    /// The name libtpms passes to its NVRAM callbacks and swtpm uses in file names
    /// (`TPM_PERMANENT_ALL_NAME`, `TPM_VOLATILESTATE_NAME`, `TPM_SAVESTATE_NAME`).
    public var nvName: String {
        switch self {
        case .permanent: "permall"
        case .volatile: "volatilestate"
        case .savestate: "savestate"
        }
    }
}

/// One state blob with the flags swtpm reported for it (QEMU `TPMSizedBuffer` + `*_flags` in
/// `TPMBlobBuffers`). `flags` is 0 for plain blobs and 2 (`PTM_STATE_FLAG_ENCRYPTED`) for blobs
/// still encrypted with swtpm's `--migration-key`.
public struct TPMStateBlob: Equatable, Sendable {
    public var flags: UInt32
    public var data: [UInt8]

    public init(flags: UInt32 = 0, data: [UInt8] = []) {
        self.flags = flags
        self.data = data
    }

    public static let empty = TPMStateBlob()
}

/// The three blobs that make up a TPM's migratable state; the content of QEMU's `tpm-emulator`
/// vmstate section.
public struct TPMStateBlobs: Equatable, Sendable {
    public var permanent: TPMStateBlob
    public var volatile: TPMStateBlob
    public var savestate: TPMStateBlob

    public init(permanent: TPMStateBlob = .empty, volatile: TPMStateBlob = .empty, savestate: TPMStateBlob = .empty) {
        self.permanent = permanent
        self.volatile = volatile
        self.savestate = savestate
    }

    public subscript(type: TPMStateBlobType) -> TPMStateBlob {
        get {
            switch type {
            case .permanent: permanent
            case .volatile: volatile
            case .savestate: savestate
            }
        }
        set {
            switch type {
            case .permanent: permanent = newValue
            case .volatile: volatile = newValue
            case .savestate: savestate = newValue
            }
        }
    }
}

/// A command handed to a backend (QEMU `TPMBackendCmd`, include/sysemu/tpm_backend.h).
public struct TPMBackendCommand: Sendable {
    /// The locality the command was issued from (0...4).
    public var locality: UInt8
    /// The command bytes exactly as the frontend collected them (`in`, `in_len`).
    public var bytes: [UInt8]
    /// The largest response the frontend can take (`out_len`).
    public var maxResponseSize: Int

    public init(locality: UInt8, bytes: [UInt8], maxResponseSize: Int) {
        self.locality = locality
        self.bytes = bytes
        self.maxResponseSize = maxResponseSize
    }
}

/// A backend's answer to a command.
public struct TPMBackendResponse: Sendable, Equatable {
    public var bytes: [UInt8]
    /// The command was TPM 1.2 `TPM_ORD_ContinueSelfTest` and succeeded (QEMU `selftest_done`).
    public var selftestDone: Bool

    public init(bytes: [UInt8], selftestDone: Bool = false) {
        self.bytes = bytes
        self.selftestDone = selftestDone
    }
}

/// What executes TPM commands for a frontend: the equivalent of QEMU's `TPMBackendClass`
/// (include/sysemu/tpm_backend.h). Conformers are `LibtpmsBackend` (in process) and
/// `SwtpmBackend` (swtpm's ctrl and data channels, as QEMU's tpm-emulator).
///
/// All calls but `cancelCommand()` are serialized by the caller (`BackendRunner`);
/// `cancelCommand()` may arrive from another thread while `execute(_:)` runs, as QEMU's
/// `tpm_backend_cancel_cmd` does from the vCPU thread.
public protocol TPMBackend: AnyObject, Sendable {
    /// `get_tpm_version`.
    var tpmVersion: TPMVersion { get }

    /// `get_buffer_size`: the largest command or response the TPM takes. The tpm-emulator
    /// implementation sends STOP and SET_BUFFERSIZE(0) to learn it; a failure falls back to 4096.
    func bufferSize() -> Int

    /// `startup_tpm`: bring the TPM up with the given buffer size (STOP, SET_BUFFERSIZE, INIT(0)
    /// for swtpm). `incoming` is QEMU's INMIGRATE case: only STOP and SET_BUFFERSIZE, the INIT
    /// comes with `restore(_:)`.
    func startup(bufferSize: Int, incoming: Bool) throws(BackendError)

    /// `handle_request`: run one command to completion. Runs on the runner's worker thread.
    func execute(_ command: TPMBackendCommand) throws(BackendError) -> TPMBackendResponse

    /// `cancel_cmd`: ask the TPM to abort the running command; a no-op if unsupported.
    func cancelCommand()

    /// `get_tpm_established_flag`.
    func establishedFlag() throws(BackendError) -> Bool

    /// `reset_tpm_established_flag`.
    func resetEstablishedFlag(locality: UInt8) throws(BackendError)

    /// QEMU `tpm_emulator_pre_save`: the three blobs of the running TPM, without stopping it.
    func saveState() throws(BackendError) -> TPMStateBlobs

    /// QEMU `tpm_emulator_post_load`: stop, set the non-empty blobs (permanent, volatile,
    /// savestate), start again resuming from them (INIT with DELETE_VOLATILE).
    func restoreState(_ blobs: TPMStateBlobs) throws(BackendError)

    /// Stop the TPM and release what the backend holds (QEMU sends CMD_SHUTDOWN at finalize).
    func shutdown()
}

extension TPMBackend {
    public func cancelCommand() {}
}
