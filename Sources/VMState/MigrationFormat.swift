/// Constants of QEMU's migration stream (`migration/savevm.c`, `migration/savevm.h`,
/// `migration/ram.c`), as QEMU 7.2 writes them. Names follow QEMU's macros.
public enum MigrationFormat {
    /// `QEMU_VM_FILE_MAGIC`: "QEVM".
    public static let magic: UInt32 = 0x5145_564D
    /// `QEMU_VM_FILE_VERSION`.
    public static let version: UInt32 = 3
    /// `QEMU_VM_FILE_VERSION_COMPAT`: refused as obsolete.
    public static let obsoleteVersion: UInt32 = 2

    /// The largest machine type name accepted in the configuration section. QEMU allocates
    /// whatever `len` says; machine names are short (`pc-i440fx-7.2`).
    public static let maximumMachineNameLength = 256
    /// The largest vmdesc JSON accepted. analyze-migration.py looks at the last 10 MiB.
    public static let maximumVMDescriptionSize = 10 * 1024 * 1024
    /// TARGET_PAGE_SIZE on x86, the default when neither the vmdesc nor the configuration's
    /// `target-page-bits` subsection says otherwise.
    public static let defaultPageSize = 4096
    /// The machine types of the compatibility target.
    public static let i440fxMachineType = "pc-i440fx-7.2"
    /// The q35 machine type of the compatibility target.
    public static let q35MachineType = "pc-q35-7.2"
}

/// The type byte of a top-level stream record (`QEMU_VM_*`, migration/savevm.h). The values are
/// the real ones: EOF is 0, not 0x1F.
public enum SectionType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case eof = 0x00
    case start = 0x01
    case part = 0x02
    case end = 0x03
    case full = 0x04
    case subsection = 0x05
    case vmDescription = 0x06
    case configuration = 0x07
    case command = 0x08
    case footer = 0x7E

    public var description: String {
        switch self {
        case .eof: "EOF"
        case .start: "SECTION_START"
        case .part: "SECTION_PART"
        case .end: "SECTION_END"
        case .full: "SECTION_FULL"
        case .subsection: "SUBSECTION"
        case .vmDescription: "VMDESCRIPTION"
        case .configuration: "CONFIGURATION"
        case .command: "COMMAND"
        case .footer: "SECTION_FOOTER"
        }
    }
}

/// The flags in the low bits of a RAM record's `addr_and_flags` (`RAM_SAVE_FLAG_*`,
/// migration/ram.c). They live below the target page size.
public struct RAMSaveFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// `RAM_SAVE_FLAG_FULL`: obsolete since 2009, never written.
    public static let full = RAMSaveFlags(rawValue: 0x001)
    /// `RAM_SAVE_FLAG_ZERO`: a page filled with one byte (always 0); 1 fill byte follows.
    public static let zero = RAMSaveFlags(rawValue: 0x002)
    /// `RAM_SAVE_FLAG_MEM_SIZE`: the setup record; the address part is the total RAM size.
    public static let memSize = RAMSaveFlags(rawValue: 0x004)
    /// `RAM_SAVE_FLAG_PAGE`: a raw page follows.
    public static let page = RAMSaveFlags(rawValue: 0x008)
    /// `RAM_SAVE_FLAG_EOS`: end of this section's RAM records.
    public static let eos = RAMSaveFlags(rawValue: 0x010)
    /// `RAM_SAVE_FLAG_CONTINUE`: same block as the previous record; no idstr follows.
    public static let `continue` = RAMSaveFlags(rawValue: 0x020)
    /// `RAM_SAVE_FLAG_XBZRLE`: u8 encoding (1), be16 length, delta-encoded page.
    public static let xbzrle = RAMSaveFlags(rawValue: 0x040)
    /// `RAM_SAVE_FLAG_HOOK`: an RDMA hook; no payload in the byte stream.
    public static let hook = RAMSaveFlags(rawValue: 0x080)
    /// `RAM_SAVE_FLAG_COMPRESS_PAGE`: be32 length + zlib data (7.2; removed in 9.1).
    public static let compressPage = RAMSaveFlags(rawValue: 0x100)
    /// `RAM_SAVE_FLAG_MULTIFD_FLUSH`: QEMU 8.1+, no payload. Not in 7.2 (see `RAMWalker`).
    public static let multifdFlush = RAMSaveFlags(rawValue: 0x200)
}

/// `enum qemu_vm_cmd` (migration/savevm.c) with the argument lengths of `mig_cmd_args`.
public enum MigrationCommandID: UInt16, Sendable, CaseIterable {
    case openReturnPath = 1
    case ping = 2
    case postcopyAdvise = 3
    case postcopyListen = 4
    case postcopyRun = 5
    case postcopyRAMDiscard = 6
    case postcopyResume = 7
    case packaged = 8
    case receiveBitmap = 9
    case enableCOLO = 10
    /// `MIG_CMD_SWITCHOVER_START`: QEMU 10.0+ only; accepted so newer streams can be walked.
    case switchoverStart = 11

    /// The fixed argument length, or nil when variable (`mig_cmd_args[].len == -1`).
    public var fixedLength: Int? {
        switch self {
        case .openReturnPath, .postcopyListen, .postcopyRun, .postcopyResume, .enableCOLO, .switchoverStart: 0
        case .ping, .packaged: 4
        case .postcopyAdvise, .postcopyRAMDiscard, .receiveBitmap: nil
        }
    }
}
