#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WireFormat

private func systemWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int { write(fd, p, n) }

/// Writes a migration stream as QEMU's savevm does (`qemu_savevm_state_header`,
/// `save_section_header`, `save_section_footer`, `ram_save_setup`, `save_page_header`,
/// `qemu_savevm_state_complete_precopy_non_iterable`), recording a vmdesc entry for each device
/// section so `writeVMDescription()` emits the trailer QEMU would.
public struct MigrationStreamWriter: Sendable {
    private var out = ByteWriter(capacity: 16 * 1024)
    private var vmdesc = QEMUJSONWriter()
    private var lastRAMBlock: String?
    /// TARGET_PAGE_SIZE of the stream (vmdesc `page_size`, RAM page records).
    public let pageSize: Int

    /// The bytes written so far.
    public var bytes: [UInt8] { out.bytes }
    /// The stream offset of the next byte.
    public var count: Int { out.count }

    /// Starts a stream with the header: magic `QEVM`, version 3.
    public init(pageSize: Int = MigrationFormat.defaultPageSize) {
        self.pageSize = pageSize
        out.writeBigEndianUInt32(MigrationFormat.magic)
        out.writeBigEndianUInt32(MigrationFormat.version)
        vmdesc.startObject()
        vmdesc.int("page_size", Int64(pageSize))
        vmdesc.startArray("devices")
    }

    /// The CONFIGURATION record: 0x07 then `vmstate_configuration` (no header, no footer).
    public mutating func writeConfiguration(_ c: MigrationConfiguration) throws(StreamError) {
        out.writeUInt8(SectionType.configuration.rawValue)
        var s = VMStateSaver(baseOffset: out.count, section: "configuration")
        try s.save(MigrationConfiguration.description, c.object)
        out.writeBytes(s.out.bytes)
    }

    /// `save_section_header` for START/FULL: type, be32 section_id, counted idstr, be32
    /// instance_id, be32 version_id.
    public mutating func writeSectionHeader(_ type: SectionType, sectionID: UInt32, idstr: String,
                                            instanceID: UInt32 = 0, versionID: UInt32) throws(StreamError) {
        guard type == .start || type == .full, !idstr.isEmpty, idstr.utf8.count <= 255 else {
            throw StreamError(.invalidField, section: idstr, field: "section header", offset: out.count,
                              detail: "a \(type) header needs START or FULL and an idstr of 1...255 bytes")
        }
        out.writeUInt8(type.rawValue)
        out.writeBigEndianUInt32(sectionID)
        out.writeUInt8PrefixedString(idstr)
        out.writeBigEndianUInt32(instanceID)
        out.writeBigEndianUInt32(versionID)
    }

    /// `save_section_header` for PART/END: type and be32 section_id only.
    public mutating func writeSectionHeader(_ type: SectionType, sectionID: UInt32) throws(StreamError) {
        guard type == .part || type == .end else {
            throw StreamError(.invalidField, field: "section header", offset: out.count, detail: "\(type) is not PART or END")
        }
        out.writeUInt8(type.rawValue)
        out.writeBigEndianUInt32(sectionID)
    }

    /// `save_section_footer`: 0x7E + be32 section_id.
    public mutating func writeFooter(sectionID: UInt32) {
        out.writeUInt8(SectionType.footer.rawValue)
        out.writeBigEndianUInt32(sectionID)
    }

    /// Raw bytes (a section body encoded elsewhere, or a deliberately broken stream in tests).
    public mutating func writeRaw(_ b: [UInt8]) { out.writeBytes(b) }

    /// A FULL device section: header, the body saved with `description`, footer; and its vmdesc
    /// entry.
    public mutating func writeDevice(sectionID: UInt32, idstr: String, instanceID: UInt32 = 0,
                                     description: VMStateDescription, object: VMStateObject) throws(StreamError) {
        try writeSectionHeader(.full, sectionID: sectionID, idstr: idstr, instanceID: instanceID, versionID: object.versionID)
        var s = VMStateSaver(baseOffset: out.count, section: idstr)
        try s.save(description, object)
        var entry = vmdesc
        try VMDescriptionEmitter.device(idstr: idstr, instanceID: instanceID, description, object, into: &entry)
        vmdesc = entry
        out.writeBytes(s.out.bytes)
        writeFooter(sectionID: sectionID)
    }

    /// The `ram` START section as `ram_save_setup` writes it (no postcopy, no x-ignore-shared):
    /// MEM_SIZE with the total, each block's counted idstr and be64 length, EOS, footer.
    public mutating func writeRAMSetup(sectionID: UInt32, blocks: [RAMBlockInfo]) throws(StreamError) {
        try writeSectionHeader(.start, sectionID: sectionID, idstr: "ram", versionID: 4)
        let total = blocks.reduce(UInt64(0)) { $0 &+ $1.length }
        out.writeBigEndianUInt64(total | RAMSaveFlags.memSize.rawValue)
        for b in blocks {
            out.writeUInt8PrefixedString(b.name)
            out.writeBigEndianUInt64(b.length)
        }
        out.writeBigEndianUInt64(RAMSaveFlags.eos.rawValue)
        writeFooter(sectionID: sectionID)
    }

    /// A `ram` PART or END section with the pages of `blocks` (each `data` a whole number of
    /// pages): an all-zero page as RAM_SAVE_FLAG_ZERO + fill byte 0, any other as
    /// RAM_SAVE_FLAG_PAGE + the page; CONTINUE when the block is the last one sent
    /// (`save_page_header`); then EOS and the footer.
    public mutating func writeRAMPages(_ type: SectionType, sectionID: UInt32,
                                       blocks: [(name: String, data: [UInt8])]) throws(StreamError) {
        try writeSectionHeader(type, sectionID: sectionID)
        for b in blocks {
            guard b.data.count % pageSize == 0 else {
                throw StreamError(.invalidField, section: "ram", field: b.name, offset: out.count,
                                  detail: "\(b.data.count) bytes is not a whole number of \(pageSize)-byte pages")
            }
            for start in stride(from: 0, to: b.data.count, by: pageSize) {
                let page = b.data[start..<(start + pageSize)]
                let isZero = page.allSatisfy { $0 == 0 }
                var flags: RAMSaveFlags = isZero ? .zero : .page
                if lastRAMBlock == b.name { flags.insert(.continue) }
                out.writeBigEndianUInt64(UInt64(start) | flags.rawValue)
                if !flags.contains(.continue) {
                    out.writeUInt8PrefixedString(b.name)
                    lastRAMBlock = b.name
                }
                if isZero { out.writeUInt8(0) } else { out.writeBytes(page) }
            }
        }
        out.writeBigEndianUInt64(RAMSaveFlags.eos.rawValue)
        writeFooter(sectionID: sectionID)
    }

    /// The EOF byte (0x00).
    public mutating func writeEOF() { out.writeUInt8(SectionType.eof.rawValue) }

    /// The vmdesc trailer: 0x06, be32 length, `{"page_size": N, "devices": [...]}` with one
    /// entry per `writeDevice`.
    public mutating func writeVMDescription() {
        var w = vmdesc
        w.endArray()
        w.endObject()
        out.writeUInt8(SectionType.vmDescription.rawValue)
        out.writeBigEndianUInt32(UInt32(w.text.count))
        out.writeBytes(w.text)
    }

    /// The vmdesc JSON that `writeVMDescription()` would write now.
    public var vmDescriptionJSON: String {
        var w = vmdesc
        w.endArray()
        w.endObject()
        return String(decoding: w.text, as: UTF8.self)
    }

    /// Writes all bytes to a file descriptor, across short writes.
    public func write(to fd: Int32) throws(StreamError) {
        let b = out.bytes
        var done = 0
        while done < b.count {
            let r = b.withUnsafeBytes { p -> Int in
                guard let base = p.baseAddress else { return 0 }
                return systemWrite(fd, base + done, b.count - done)
            }
            if r < 0 {
                if errno == EINTR { continue }
                throw StreamError(.io, field: "write", offset: done, detail: MigrationInput.errnoString())
            }
            done += r
        }
    }
}
