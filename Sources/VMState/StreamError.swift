import WireFormat

/// Why reading or writing a QEMU migration stream failed.
///
/// Every error names where it happened: the section (`idstr`, or `header`, `configuration`,
/// `vmdesc`), the field (vmstate field name or framing element such as `section_id`,
/// `footer`, `ram.addr_and_flags`) and the **absolute byte offset from the start of the stream**
/// of the element being read. The codes follow the failures of QEMU's loader
/// (`qemu_loadvm_state`, `qemu_loadvm_state_main`, `vmstate_load_state`, `ram_load_precopy`).
public struct StreamError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What went wrong; callers switch on it.
    public enum Code: String, Sendable, Equatable {
        /// The stream ended inside an element.
        case truncated
        /// The first four bytes are not `QEVM` (0x5145564D).
        case badMagic
        /// The stream version is not 3 (`QEMU_VM_FILE_VERSION`).
        case badVersion
        /// A length read from the stream exceeds the named limit; nothing was allocated.
        case lengthOverLimit
        /// A section type byte that `qemu_loadvm_state_main` does not know.
        case unknownSectionType
        /// A START/FULL section whose idstr has no description, or a PART/END section whose id
        /// was never opened by a START (`find_se` failed / "Unknown savevm section").
        case unknownSection
        /// A section's footer is not 0x7E ("Missing section footer for …").
        case missingFooter
        /// A footer names another section ("Mismatched section id in footer for …").
        case sectionIDMismatch
        /// A version_id newer than the description's `version_id` or older than its
        /// `minimum_version_id`.
        case versionOutOfRange
        /// A field value outside what the device allows (locality 5, state 9, rw_offset past
        /// the buffer, a vbuffer whose size field disagrees with it, ...).
        case invalidField
        /// A subsection with the parent's name prefix but no description (`-ENOENT` in
        /// `vmstate_subsection_load`).
        case unknownSubsection
        /// A RAM record names a block the START section did not declare, or an offset past it.
        case unknownRAMBlock
        /// A RAM record's flags are not a combination `ram_load_precopy` accepts.
        case invalidRAMFlags
        /// Something QEMU 7.2 can write but this library deliberately does not decode here
        /// (for example a compressed page when the options ask to reject it).
        case unsupported
        /// A `QEMU_VM_COMMAND` with an unknown command or a wrong length.
        case invalidCommand
        /// The vmdesc JSON trailer is malformed or does not fit its schema.
        case badVMDescription
        /// The configuration section is missing or malformed.
        case badConfiguration
        /// A read from, or a write to, the underlying file descriptor failed.
        case io
    }

    /// What went wrong.
    public var code: Code
    /// The section being read (`tpm-tis`, `ram`, `configuration`, `header`, `vmdesc`, ...), or
    /// empty between sections.
    public var section: String
    /// The field or framing element being read.
    public var field: String
    /// Absolute offset from the first byte of the stream of the element being read.
    public var offset: Int
    /// What was found, in words (QEMU's own message where it has one).
    public var detail: String

    /// An error at `offset` in `section`, reading `field`.
    public init(_ code: Code, section: String = "", field: String, offset: Int, detail: String = "") {
        self.code = code
        self.section = section
        self.field = field
        self.offset = offset
        self.detail = detail
    }

    public var description: String {
        var s = "\(code.rawValue) at stream offset \(offset)"
        if !section.isEmpty { s += " in section \(section)" }
        if !field.isEmpty { s += ", field \(field)" }
        if !detail.isEmpty { s += ": \(detail)" }
        return s
    }

    /// Lifts a `WireError` from an in-memory reader whose base offset is a stream offset.
    init(_ e: WireError, section: String) {
        let code: Code
        switch e.code {
        case .truncated: code = .truncated
        case .lengthOverLimit: code = .lengthOverLimit
        case .invalidValue: code = .invalidField
        }
        self.init(code, section: section, field: e.field, offset: e.offset, detail: e.detail)
    }
}
