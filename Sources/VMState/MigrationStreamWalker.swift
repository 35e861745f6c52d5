import EmulatorBackend
import TIS

/// What a section that is not RAM and not a TPM section turns into when nothing describes it.
public enum UnknownSectionPolicy: Sendable, Equatable {
    /// Refuse it with `StreamError.Code.unknownSection`, as QEMU's `find_se` does.
    case fail
    /// Skip forward to its footer: the first `0x7E + be32 section_id` followed by something
    /// that can only be the next record (EOF then nothing or a vmdesc; a START/FULL header with
    /// a printable idstr and small instance and version; PART/END of an open section; a known
    /// command). Device sections carry no length, so this is the only way through a stream
    /// without a description when it cannot be read from its end (a pipe or a socket). The
    /// skipped bytes are kept (up to `retainedUnknownSectionBytes`) so a caller that gets the
    /// vmdesc at the end can still decode them.
    case scanForFooter
}

/// One top-level record of a migration stream, in stream order.
public enum MigrationStreamEvent: Sendable {
    /// The file header (magic checked; version 3).
    case header(version: UInt32)
    /// The CONFIGURATION record.
    case configuration(MigrationConfiguration)
    /// A device or RAM section with its footer.
    case section(MigrationSection)
    /// A QEMU_VM_COMMAND record. After `packaged`, the packaged sections follow inline.
    case command(MigrationCommand)
    /// The EOF byte (0x00).
    case endOfStream(offset: Int)
    /// The vmdesc trailer after EOF.
    case vmDescription(VMDescription, offset: Int)
}

/// A QEMU_VM_COMMAND record (`loadvm_process_command`).
public struct MigrationCommand: Sendable, Equatable {
    /// The command (`MIG_CMD_*`).
    public var id: MigrationCommandID
    /// Its argument bytes (`len` of them).
    public var data: [UInt8]
    /// Stream offset of the 0x08 byte.
    public var offset: Int
}

/// A section as read: header (START/FULL carry idstr, instance and version; PART/END take them
/// from their START), where its body lies, and what the body turned into.
public struct MigrationSection: Sendable {
    /// START, PART, END or FULL.
    public var type: SectionType
    /// The stream-local id the footer repeats (assigned at registration; not stable across machines).
    public var sectionID: UInt32
    /// The section name (`tpm-tis`, `ram`, `0000:00:01.3/piix4_pm`).
    public var idstr: String
    /// `instance_id`: 0 for the first registration of an idstr.
    public var instanceID: UInt32
    /// `version_id` of the saved vmstate.
    public var versionID: UInt32
    /// Stream offset of the type byte.
    public var offset: Int
    /// Stream offset of the first body byte, and the body length (footer excluded).
    public var bodyOffset: Int
    /// Body length (footer excluded).
    public var bodyLength: Int
    /// What the body turned into.
    public var content: Content

    /// What a section body became.
    public enum Content: Sendable {
        case ram(RAMSectionSummary)
        case tpmTIS(TISState)
        case tpmCRB(registers: [UInt32])
        case tpmEmulator(TPMStateBlobs)
        /// Decoded with a vmdesc or caller-supplied description.
        case decoded(VMStateObject)
        /// Skipped to its footer (`UnknownSectionPolicy.scanForFooter`); `retained` holds the
        /// body when it was no longer than the retention limit.
        case skipped(retained: [UInt8]?)
    }
}

/// Counters of a walk.
public struct MigrationWalkStatistics: Sendable, Equatable {
    /// Stream bytes consumed so far.
    public var bytesRead = 0
    /// Sections read, footers included.
    public var sections = 0
    /// `ram` sections walked.
    public var ramSections = 0
    /// Device sections decoded with a vmdesc or caller-supplied description.
    public var decodedSections = 0
    /// Sections crossed by the footer scan.
    public var skippedSections = 0
    /// RAM_SAVE_FLAG_ZERO records in all RAM sections.
    public var zeroPages = 0
    /// RAM_SAVE_FLAG_PAGE records.
    public var pages = 0
    /// RAM_SAVE_FLAG_XBZRLE records.
    public var xbzrlePages = 0
    /// RAM_SAVE_FLAG_COMPRESS_PAGE records (skipped).
    public var compressedPages = 0
    /// A byte other than 0x06 after EOF (QEMU: "Expected vmdescription section, but got N").
    public var unexpectedTrailer: UInt8?
    /// The input buffer size: the walk's memory for stream bytes, whatever the stream size.
    public var bufferCapacity = 0
}

/// Walks a whole QEMU migration stream, record by record, from a file, pipe, socket or memory:
/// QEMU's `qemu_loadvm_state` → `qemu_loadvm_state_header` → `qemu_loadvm_state_main`
/// (`qemu_loadvm_section_start_full`, `qemu_loadvm_section_part_end`, `check_section_footer`,
/// `loadvm_process_command`), then the vmdesc read. RAM is walked as `ram_load_precopy` does,
/// the TPM sections are decoded to `TISState` / `TPMStateBlobs` / CRB registers, every other
/// section with the vmdesc (read first from the end of a regular file, as analyze-migration.py
/// does) or a caller-supplied description, else per `UnknownSectionPolicy`.
///
/// Memory stays bounded for any stream size: one input buffer, RAM pages never kept (captured
/// small blocks aside), every length checked against a named limit before allocation.
public final class MigrationStreamWalker {
    /// How a walk treats what it meets.
    public struct Options: Sendable {
        /// What to do with sections nothing describes.
        public var unknownSections: UnknownSectionPolicy = .scanForFooter
        /// Descriptions by section idstr, used when the stream's vmdesc is not available (a pipe).
        public var descriptions: [String: VMStateDescription] = [:]
        /// A vmdesc to use instead of the stream's (for example one from an earlier file of the
        /// same machine configuration, for walking a pipe).
        public var vmDescription: VMDescription?
        /// For a regular file, read the vmdesc from its end before walking.
        public var readTrailingVMDescription = true
        /// Decode device sections with the vmdesc / descriptions (else they are skipped).
        public var decodeDevices = true
        /// RAM blocks whose pages are kept (each at most `maximumCapturedBlockSize`).
        public var captureRAMBlocks: Set<String> = [PPIBlock.name, CRBSection.commandBufferBlock]
        /// Blocks larger than this are never captured.
        public var maximumCapturedBlockSize = 64 * 1024
        /// More RAM blocks than this in a START section are refused.
        public var maximumRAMBlocks = 4096
        /// RAM_SAVE_FLAG_COMPRESS_PAGE records: skipped (default) or refused.
        public var compressedPages: CompressedPagePolicy = .skip
        /// Bodies of skipped sections are kept up to this size.
        public var retainedUnknownSectionBytes = 64 * 1024
        /// What decoding device sections keeps in memory.
        public var limits = VMStateLimits()
        /// Target page size when neither the vmdesc nor the configuration gives it.
        public var defaultPageSize = MigrationFormat.defaultPageSize
        /// Size of the one input buffer.
        public var chunkSize = MigrationInput.defaultChunkSize

        /// The defaults: scan for footers, capture `tpm-ppi` and `tpm-crb-cmd`.
        public init() {}
    }

    private struct OpenSection {
        var idstr: String
        var instanceID: UInt32
        var versionID: UInt32
    }

    private enum Phase { case header, afterHeader, sections, trailer, done }

    /// Distinct section ids remembered for PART/END (QEMU machines register a few hundred).
    public static let maximumSections = 1 << 16

    private let input: MigrationInput
    /// The options the walk runs with.
    public let options: Options
    private var phase = Phase.header
    private var open: [UInt32: OpenSection] = [:]
    private var ram: RAMWalker
    private var pageSizeKnown = false
    /// The vmdesc in use (from the options, the end of the file, or the trailer once read).
    public private(set) var vmDescription: VMDescription?
    private var vmDescriptionOffset: Int?
    /// The CONFIGURATION record, once read.
    public private(set) var configuration: MigrationConfiguration?
    /// Counters so far.
    public private(set) var statistics = MigrationWalkStatistics()

    /// Opens a stream. For a regular file (and with `readTrailingVMDescription`), the vmdesc is
    /// located and parsed first; a file without one is walked like a pipe.
    public init(source: MigrationStreamSource, options: Options = Options()) throws(StreamError) {
        self.options = options
        input = try MigrationInput(source, chunkSize: options.chunkSize)
        ram = RAMWalker(pageSize: options.defaultPageSize, captureNames: options.captureRAMBlocks,
                        maximumCapturedBlockSize: options.maximumCapturedBlockSize,
                        maximumBlocks: options.maximumRAMBlocks, compressedPages: options.compressedPages)
        statistics.bufferCapacity = input.capacity
        if let d = options.vmDescription {
            use(d)
        } else if options.readTrailingVMDescription, let length = input.streamLength {
            // Most trailers are well under 256 KiB; read up to the limit only when the first
            // window holds nothing but JSON.
            for window in [256 * 1024, MigrationFormat.maximumVMDescriptionSize + 5] {
                guard let tail = try input.readTail(window) else { break }
                if let p = VMDescription.locate(inTail: tail) {
                    let at = length - tail.count + p
                    use(try VMDescription.parse(Array(tail[(p + 5)...]), baseOffset: at + 5))
                    vmDescriptionOffset = at
                    break
                }
                if tail.count < window || tail.contains(where: { $0 < 0x20 }) { break }
            }
        }
    }

    private func use(_ d: VMDescription) {
        vmDescription = d
        ram.pageSize = d.pageSize
        pageSizeKnown = true
    }

    /// Stream offset one past the stream's last byte, when known (a regular file, bytes, or a
    /// pipe whose end was reached): where a truncated stream ends.
    public var streamEndOffset: Int? { input.endOffset }

    /// Captured RAM blocks (by name) so far.
    public var capturedRAMBlocks: [String: CapturedRAMBlock] { ram.captured }
    /// RAM blocks declared so far, with their lengths.
    public var ramBlocks: [String: UInt64] { ram.blocks }

    /// The next record, or nil after the last one.
    public func next() throws(StreamError) -> MigrationStreamEvent? {
        defer { statistics.bytesRead = input.offset }
        switch phase {
        case .header:
            return try readHeader()
        case .afterHeader:
            phase = .sections
            if try input.peekUInt8() == SectionType.configuration.rawValue {
                return try readConfiguration()
            }
            return try readRecord()
        case .sections:
            return try readRecord()
        case .trailer:
            return try readTrailer()
        case .done:
            return nil
        }
    }

    /// Walks to the end, handing every record to `body`.
    public func walk(_ body: (MigrationStreamEvent) throws(StreamError) -> Void = { _ in }) throws(StreamError) {
        while let e = try next() { try body(e) }
    }

    // MARK: Header and configuration

    /// `qemu_loadvm_state_header`.
    private func readHeader() throws(StreamError) -> MigrationStreamEvent {
        input.section = "header"
        let magic = try input.readBigEndianUInt32("magic")
        guard magic == MigrationFormat.magic else {
            throw StreamError(.badMagic, section: "header", field: "magic", offset: 0,
                              detail: "Not a migration stream: 0x\(String(magic, radix: 16))")
        }
        let version = try input.readBigEndianUInt32("version")
        guard version == MigrationFormat.version else {
            throw StreamError(.badVersion, section: "header", field: "version", offset: 4,
                              detail: version == MigrationFormat.obsoleteVersion
                                ? "SaveVM v2 format is obsolete" : "Unsupported migration stream version \(version)")
        }
        phase = .afterHeader
        return .header(version: version)
    }

    private func readConfiguration() throws(StreamError) -> MigrationStreamEvent {
        let at = input.offset
        input.section = "configuration"
        _ = try input.readUInt8("type")
        let obj = try VMStateLoader(input: input, limits: options.limits)
            .load(MigrationConfiguration.description, version: 0, versionOffset: at)
        let c = MigrationConfiguration(obj, offset: at)
        configuration = c
        if !pageSizeKnown, let ps = c.pageSize { ram.pageSize = ps; pageSizeKnown = true }
        ram.ignoreShared = c.capabilities?.contains("x-ignore-shared") ?? false
        return .configuration(c)
    }

    // MARK: Records

    /// One iteration of `qemu_loadvm_state_main`.
    private func readRecord() throws(StreamError) -> MigrationStreamEvent {
        input.section = ""
        let at = input.offset
        let byte = try input.readUInt8("section_type")
        switch SectionType(rawValue: byte) {
        case .start, .full:
            return .section(try readStartFull(SectionType(rawValue: byte) ?? .full, at: at))
        case .part, .end:
            return .section(try readPartEnd(SectionType(rawValue: byte) ?? .end, at: at))
        case .command:
            return .command(try readCommand(at: at))
        case .eof:
            phase = .trailer
            return .endOfStream(offset: at)
        default:
            throw StreamError(.unknownSectionType, field: "section_type", offset: at,
                              detail: "Unknown savevm section type \(byte)")
        }
    }

    /// `qemu_loadvm_section_start_full`.
    private func readStartFull(_ type: SectionType, at: Int) throws(StreamError) -> MigrationSection {
        let sectionID = try input.readBigEndianUInt32("section_id")
        let idAt = input.offset
        let idstr = try input.readCountedString("idstr")
        guard !idstr.isEmpty else {
            throw StreamError(.invalidField, field: "idstr", offset: idAt, detail: "Unable to read ID string for section \(sectionID)")
        }
        input.section = idstr
        let instanceID = try input.readBigEndianUInt32("instance_id")
        let versionAt = input.offset
        let versionID = try input.readBigEndianUInt32("version_id")
        if open[sectionID] == nil, open.count >= Self.maximumSections {
            throw StreamError(.lengthOverLimit, section: idstr, field: "section_id", offset: at + 1,
                              detail: "more than \(Self.maximumSections) sections")
        }
        open[sectionID] = OpenSection(idstr: idstr, instanceID: instanceID, versionID: versionID)
        let bodyAt = input.offset
        let content = try readBody(idstr: idstr, instanceID: instanceID, version: versionID, versionAt: versionAt,
                                   sectionID: sectionID, headerAt: at, first: true)
        let bodyLength = input.offset - bodyAt
        try readFooter(sectionID: sectionID, content: content)
        return MigrationSection(type: type, sectionID: sectionID, idstr: idstr, instanceID: instanceID, versionID: versionID,
                                offset: at, bodyOffset: bodyAt, bodyLength: bodyLength - footerAdjust(content),
                                content: content)
    }

    /// `qemu_loadvm_section_part_end`.
    private func readPartEnd(_ type: SectionType, at: Int) throws(StreamError) -> MigrationSection {
        let idAt = input.offset
        let sectionID = try input.readBigEndianUInt32("section_id")
        guard let s = open[sectionID] else {
            throw StreamError(.unknownSection, field: "section_id", offset: idAt, detail: "Unknown savevm section \(sectionID)")
        }
        input.section = s.idstr
        let bodyAt = input.offset
        let content = try readBody(idstr: s.idstr, instanceID: s.instanceID, version: s.versionID, versionAt: idAt,
                                   sectionID: sectionID, headerAt: at, first: false)
        let bodyLength = input.offset - bodyAt
        try readFooter(sectionID: sectionID, content: content)
        return MigrationSection(type: type, sectionID: sectionID, idstr: s.idstr, instanceID: s.instanceID,
                                versionID: s.versionID, offset: at, bodyOffset: bodyAt,
                                bodyLength: bodyLength - footerAdjust(content), content: content)
    }

    /// A footer-scanned body already consumed its footer (5 bytes).
    private func footerAdjust(_ c: MigrationSection.Content) -> Int {
        if case .skipped = c { return 5 }
        return 0
    }

    /// `check_section_footer`.
    private func readFooter(sectionID: UInt32, content: MigrationSection.Content) throws(StreamError) {
        if case .skipped = content { return }
        let at = input.offset
        let mark = try input.readUInt8("footer")
        guard mark == SectionType.footer.rawValue else {
            throw StreamError(.missingFooter, section: input.section, field: "footer", offset: at,
                              detail: "Missing section footer for \(input.section): 0x\(String(mark, radix: 16))")
        }
        let id = try input.readBigEndianUInt32("footer.section_id")
        guard id == sectionID else {
            throw StreamError(.sectionIDMismatch, section: input.section, field: "footer.section_id", offset: at + 1,
                              detail: "Mismatched section id in footer for \(input.section) - read 0x\(String(id, radix: 16)) expected 0x\(String(sectionID, radix: 16))")
        }
        statistics.sections += 1
    }

    private func readBody(idstr: String, instanceID: UInt32, version: UInt32, versionAt: Int, sectionID: UInt32,
                          headerAt: Int, first: Bool) throws(StreamError) -> MigrationSection.Content {
        let loader = VMStateLoader(input: input, limits: options.limits)
        switch idstr {
        case "ram":
            // ram_load: only version 4 exists.
            guard version == 4 else {
                throw StreamError(.versionOutOfRange, section: "ram", field: "version_id", offset: versionAt,
                                  detail: "ram version \(version), only 4 is known")
            }
            let s = try ram.walkSection(input)
            statistics.ramSections += 1
            statistics.zeroPages += s.zeroPages
            statistics.pages += s.pages
            statistics.xbzrlePages += s.xbzrlePages
            statistics.compressedPages += s.compressedPages
            return .ram(s)
        case TISSection.idstr where first:
            let o = try loader.load(TISSection.description, version: version, versionOffset: versionAt)
            return .tpmTIS(try TISSection.state(from: o))
        case EmulatorSection.idstr where first:
            let o = try loader.load(EmulatorSection.description, version: version, versionOffset: versionAt)
            return .tpmEmulator(try EmulatorSection.blobs(from: o))
        case CRBSection.idstr where first:
            let o = try loader.load(CRBSection.description, version: version, versionOffset: versionAt)
            return .tpmCRB(registers: try CRBSection.registers(from: o))
        default:
            break
        }
        if first, options.decodeDevices {
            var d = options.descriptions[idstr]
            if d == nil, let dev = vmDescription?.device(idstr: idstr, instanceID: instanceID) { d = dev.description }
            if let d {
                statistics.decodedSections += 1
                return .decoded(try loader.load(d, version: version, versionOffset: versionAt))
            }
        }
        guard options.unknownSections == .scanForFooter else {
            throw StreamError(.unknownSection, section: idstr, field: "idstr", offset: headerAt,
                              detail: "Unknown savevm section or instance '\(idstr)' \(instanceID)")
        }
        statistics.skippedSections += 1
        return .skipped(retained: try scanToFooter(sectionID: sectionID))
    }

    /// `UnknownSectionPolicy.scanForFooter`; consumes the footer too.
    private func scanToFooter(sectionID: UInt32) throws(StreamError) -> [UInt8]? {
        let start = input.offset
        var kept: [UInt8]? = options.retainedUnknownSectionBytes > 0 ? [] : nil
        let id = [UInt8(truncatingIfNeeded: sectionID >> 24), UInt8(truncatingIfNeeded: sectionID >> 16),
                  UInt8(truncatingIfNeeded: sectionID >> 8), UInt8(truncatingIfNeeded: sectionID)]
        while true {
            if kept != nil {
                // Keep bytes only while under the limit; the scan itself needs none.
                let ahead = try input.peek(4096)
                guard !ahead.isEmpty else { break }
                let n = ahead.firstIndex(of: SectionType.footer.rawValue) ?? ahead.count
                if n > 0 {
                    if (kept?.count ?? 0) + n > options.retainedUnknownSectionBytes { kept = nil } else { kept?.append(contentsOf: ahead[..<n]) }
                    try input.skip(n, "body")
                    continue
                }
            } else {
                let (_, found) = try input.skip(until: SectionType.footer.rawValue)
                guard found else { break }
            }
            let window = try input.peek(5 + 1 + 4 + 1 + 255 + 8 + 6)
            if window.count >= 5, Array(window[1..<5]) == id, plausibleNext(window[5...]) {
                try input.skip(5, "footer")
                statistics.sections += 1
                return kept
            }
            if (kept?.count ?? 0) + 1 > options.retainedUnknownSectionBytes { kept = nil } else { kept?.append(SectionType.footer.rawValue) }
            try input.skip(1, "body")
        }
        throw StreamError(.truncated, section: input.section, field: "footer", offset: start,
                          detail: "no footer for section \(sectionID) before the end of the stream")
    }

    /// Whether `b` (the bytes after a candidate footer) can only be the start of the next record.
    /// The window asked for is longer than any check, so a short `b` means the stream ends in it:
    /// a record cut short there is accepted, and reading it then reports the truncation where it
    /// is.
    private func plausibleNext(_ b: ArraySlice<UInt8>) -> Bool {
        guard let t = b.first else { return true }
        let s = b.startIndex
        func be32(_ i: Int) -> UInt32? {
            guard i + 4 <= b.endIndex else { return nil }
            return UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
        }
        switch SectionType(rawValue: t) {
        case .eof:
            guard b.count > 1 else { return true }
            return b[s + 1] == SectionType.vmDescription.rawValue && (b.count < 7 || b[s + 6] == UInt8(ascii: "{"))
        case .start, .full:
            guard b.count >= 6 else { return true }
            let len = Int(b[s + 5])
            let name = b[(s + 6)..<min(b.endIndex, s + 6 + len)]
            guard len > 0, name.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else { return false }
            if let inst = be32(s + 6 + len), inst >= 1 << 24 { return false }
            if let ver = be32(s + 10 + len), ver >= 1 << 16 { return false }
            return true
        case .part, .end:
            guard let id = be32(s + 1) else { return true }
            return open[id] != nil
        case .command:
            guard b.count >= 3 else { return true }
            return MigrationCommandID(rawValue: UInt16(b[s + 1]) << 8 | UInt16(b[s + 2])) != nil
        default:
            return false
        }
    }

    /// `loadvm_process_command`: be16 command, be16 length, data; fixed lengths checked.
    private func readCommand(at: Int) throws(StreamError) -> MigrationCommand {
        input.section = "command"
        let raw = try input.readBigEndianUInt16("command")
        let len = try input.readBigEndianUInt16("command.len")
        guard let id = MigrationCommandID(rawValue: raw) else {
            throw StreamError(.invalidCommand, section: "command", field: "command", offset: at + 1,
                              detail: "unknown command \(raw)")
        }
        if let fixed = id.fixedLength, Int(len) != fixed {
            throw StreamError(.invalidCommand, section: "command", field: "command.len", offset: at + 3,
                              detail: "\(id) takes \(fixed) bytes, the stream says \(len)")
        }
        let data = try input.readBytes(Int(len), "command.data", limit: Int(UInt16.max))
        if id == .postcopyAdvise {
            ram.postcopyAdvised = true
            if data.count == 16 { ram.postcopyPageSizeSummary = data[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        }
        return MigrationCommand(id: id, data: data, offset: at)
    }

    // MARK: Trailer

    /// After EOF: QEMU reads one byte, expects 0x06, then skips be32 length bytes.
    private func readTrailer() throws(StreamError) -> MigrationStreamEvent? {
        phase = .done
        input.section = "vmdesc"
        let at = input.offset
        guard let byte = try input.peekUInt8() else { return nil }
        guard byte == SectionType.vmDescription.rawValue else {
            statistics.unexpectedTrailer = byte
            return nil
        }
        _ = try input.readUInt8("type")
        let len = Int(try input.readBigEndianUInt32("length"))
        guard len <= MigrationFormat.maximumVMDescriptionSize else {
            throw StreamError(.lengthOverLimit, section: "vmdesc", field: "length", offset: at + 1,
                              detail: "\(len) bytes; the limit is \(MigrationFormat.maximumVMDescriptionSize)")
        }
        if vmDescriptionOffset == at, let d = vmDescription {
            try input.skip(len, "json")
            return .vmDescription(d, offset: at)
        }
        let json = try input.readBytes(len, "json", limit: MigrationFormat.maximumVMDescriptionSize)
        let d = try VMDescription.parse(json, baseOffset: at + 5)
        if vmDescription == nil { vmDescription = d }
        vmDescriptionOffset = at
        return .vmDescription(d, offset: at)
    }
}
