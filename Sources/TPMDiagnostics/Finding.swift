/// One reason a TPM migration will fail (or may fail), as the troubleshooter reports it: a
/// stable code, how bad it is, one sentence a user understands, the evidence in the stream,
/// and the fix in the words of QEMU's "Troubleshooting migration" list (docs/specs/tpm,
/// "Migration with the TPM emulator").
public struct Finding: Sendable, Equatable {
    /// Stable codes; scripts switch on the raw value.
    public enum Code: String, Sendable, Equatable, CaseIterable {
        /// TPM 1.2 state for a TPM 2.0 destination or the reverse (SET_STATEBLOB 0x1E / 0x43).
        case tpmFamilyMismatch = "TPM-FAMILY-MISMATCH"
        /// State written by a newer libtpms than this one accepts (TPM_RC_BAD_VERSION 0x2E).
        case blobNewerThanLibtpms = "BLOB-NEWER-THAN-LIBTPMS"
        /// libtpms refuses the state's compile-time constants (0x03, "Unexpected value for …").
        case compileOptions = "COMPILE-OPTIONS"
        /// libtpms refuses the state for another reason.
        case stateRefused = "STATE-REFUSED"
        /// The migration key given does not verify the blob's HMAC (0x21).
        case wrongMigrationKey = "WRONG-MIGRATION-KEY"
        /// The migration key given has the other size (0x28).
        case migrationKeySize = "MIGRATION-KEY-SIZE"
        /// The blobs are migration-key encrypted and no key was given (0x0D without one).
        case needsMigrationKey = "NEEDS-MIGRATION-KEY"
        /// The blobs are still encrypted with swtpm's state key (`--key`).
        case needsStateKey = "NEEDS-STATE-KEY"
        /// The permanent blob is empty: the source had no TPM state.
        case emptyPermanentBlob = "EMPTY-PERMANENT-BLOB"
        /// The stream has no `tpm-emulator` section.
        case noTPMState = "NO-TPM-STATE"
        /// The stream has TPM state but no `tpm-tis` / `tpm-crb` section.
        case noTPMFrontend = "NO-TPM-FRONTEND"
        /// The stream ends early.
        case truncatedStream = "TRUNCATED-STREAM"
        /// The stream's framing or a section is corrupt.
        case corruptStream = "CORRUPT-STREAM"
        /// An swtpm blob container is corrupt or from a newer swtpm.
        case corruptBlob = "CORRUPT-BLOB"
        /// The volatile blob's SHA-1 does not match (TPM_RC_HASH 0x83).
        case volatileCorrupt = "VOLATILE-CORRUPT"
        /// tpm-tis in the stream, tpm-crb on the destination, or the reverse.
        case frontendMismatch = "FRONTEND-MISMATCH"
        /// The stream's machine type is not the destination's.
        case machineType = "MACHINE-TYPE"
        /// The stream has no vmdesc trailer (QEMU only warns).
        case noVMDescription = "NO-VMDESC"
        /// libtpms could not be claimed for validation (a LibtpmsBackend is live).
        case libtpmsBusy = "LIBTPMS-BUSY"
    }

    /// How bad a finding is. `error`: the destination will refuse the migration; `warning`: it
    /// will unless the destination is set up as said; `info`: worth knowing, not a failure.
    public enum Severity: String, Sendable, Equatable, Comparable {
        case error, warning, info

        private var rank: Int { self == .error ? 0 : self == .warning ? 1 : 2 }
        /// `error` sorts first.
        public static func < (a: Severity, b: Severity) -> Bool { a.rank < b.rank }
    }

    /// Where in the stream the evidence is.
    public struct Evidence: Sendable, Equatable {
        /// The section (`tpm-emulator`, `tpm-tis`, `configuration`, `ram`, `header`).
        public var section: String
        /// QEMU's field name (`state_blobs.permanent.buffer`), or a blob layer's field
        /// (`state_blobs.permanent.buffer:swtpm.flags`).
        public var field: String
        /// Absolute stream offset, when known.
        public var offset: Int?
        /// The value found, in words.
        public var detail: String

        /// Evidence at `offset` in `section.field`.
        public init(section: String, field: String, offset: Int?, detail: String) {
            self.section = section
            self.field = field
            self.offset = offset
            self.detail = detail
        }
    }

    /// The stable code.
    public var code: Code
    /// How bad.
    public var severity: Severity
    /// One sentence a user understands.
    public var message: String
    /// What in the stream shows it.
    public var evidence: Evidence
    /// What to do, in the words of QEMU's troubleshooting list.
    public var fix: String

    /// A finding.
    public init(_ code: Code, _ severity: Severity, _ message: String, evidence: Evidence, fix: String) {
        self.code = code
        self.severity = severity
        self.message = message
        self.evidence = evidence
        self.fix = fix
    }
}

/// The fixes, phrased as QEMU's "Troubleshooting migration" list phrases them.
enum QEMUAdvice {
    static let identicalQEMU = "QEMU command line parameters should be identical apart from the '-incoming' option on the destination side"
    static let identicalSwtpm = "swtpm command line parameters should be identical"
    static let sameVersions = "if possible, identical versions of QEMU and swtpm should be used at all times"
    static let downgrade = "the versions of the swtpm on the source and destination sides are incompatible: downgrading of TPM state may not be supported"
    static let compileOptions = "the source and destination libtpms were compiled with different compile-time options and the destination side refuses to accept the state"
    static let keys = "different migration keys are used on the source and destination side and the destination side cannot decrypt the migrated state (swtpm ... --migration-key ... )"
    static let directories = "swtpm command line parameters should point to two different directories on the source and destination swtpm (--tpmstate dir=...)"
}
