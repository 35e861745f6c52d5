import Testing
import WireFormat
@testable import VMState

/// The `ram` section as `ram_load_precopy` (QEMU 7.2 migration/ram.c) reads it: every record
/// kind QEMU 7.2 writes, and the refusals.
@Suite("RAM section")
struct RAMTests {
    static let blocks = [RAMBlockInfo(name: "pc.ram", length: 0x10000), RAMBlockInfo(name: "tpm-ppi", length: 0x1000)]

    /// One record: be64 addr|flags, the counted idstr unless CONTINUE, the payload.
    static func record(_ addr: UInt64, _ flags: RAMSaveFlags, block: String? = nil, _ payload: [UInt8] = []) -> [UInt8] {
        var w = ByteWriter()
        w.writeBigEndianUInt64(addr | flags.rawValue)
        if let block { w.writeUInt8PrefixedString(block) }
        w.writeBytes(payload)
        return w.bytes
    }

    /// Header, configuration (optionally with capabilities), a `ram` START with `blocks` unless
    /// `setup` replaces it, then one PART section with `records` + EOS, then EOF.
    static func stream(_ records: [UInt8], capabilities: [String]? = nil, setup: [UInt8]? = nil,
                       version: UInt32 = 4) throws -> (bytes: [UInt8], partBody: Int) {
        var w = MigrationStreamWriter()
        try w.writeConfiguration(MigrationConfiguration(machineType: "pc-i440fx-7.2", capabilities: capabilities))
        if let setup {
            w.writeRaw(setup)
        } else if version == 4 {
            try w.writeRAMSetup(sectionID: 2, blocks: blocks)
        } else {
            try w.writeSectionHeader(.start, sectionID: 2, idstr: "ram", versionID: version)
        }
        try w.writeSectionHeader(.part, sectionID: 2)
        let body = w.count
        w.writeRaw(records + record(0, .eos))
        w.writeFooter(sectionID: 2)
        w.writeEOF()
        return (w.bytes, body)
    }

    static let page = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31) }

    @Test("ZERO, PAGE, CONTINUE, XBZRLE, COMPRESS_PAGE, HOOK, MULTIFD_FLUSH, EOS; PPI captured")
    func allRecords() throws {
        let records = Self.record(0, .zero, block: "pc.ram", [0])
            + Self.record(0x1000, [.page, .continue], Self.page)
            + Self.record(0x2000, [.xbzrle, .continue], [1, 0, 5, 0x00, 0x03, 0x61, 0x62, 0x63])
            + Self.record(0x3000, [.compressPage, .continue], [0, 0, 0, 10] + [UInt8](repeating: 0x78, count: 10))
            + Self.record(0, .hook)
            + Self.record(0, .multifdFlush)
            + Self.record(0, .page, block: "tpm-ppi", Self.page)
            + Self.record(0, [.xbzrle, .continue], [1, 0, 4, 0x10, 0x02, 0xAA, 0xBB])
        let (bytes, _) = try Self.stream(records)
        let (walker, events) = try walkAll(.bytes(bytes))
        let ram = sections(events).filter { $0.idstr == "ram" }
        #expect(ram.map(\.type) == [.start, .part])
        guard case .ram(let setup) = ram[0].content, case .ram(let s) = ram[1].content else { Issue.record("no ram"); return }
        #expect(setup.totalSize == 0x11000)
        #expect(setup.blocks == Self.blocks)
        #expect(s.zeroPages == 1 && s.pages == 2 && s.xbzrlePages == 2 && s.compressedPages == 1)
        #expect(s.hooks == 1 && s.multifdFlushes == 1 && s.records == 9)
        var ppi = Self.page
        ppi[0x10] = 0xAA
        ppi[0x11] = 0xBB
        let captured = try #require(walker.capturedRAMBlocks["tpm-ppi"])
        #expect(captured.bytes == ppi)
        #expect(captured.isComplete)
        #expect(walker.capturedRAMBlocks["pc.ram"] == nil)  // too large to capture: counted only
    }

    @Test("a ZERO record fills the page with its byte (ram_handle_compressed)")
    func zeroFill() throws {
        let (bytes, _) = try Self.stream(Self.record(0, .zero, block: "tpm-ppi", [0x5A]))
        let s = try TPMMigrationState(source: .bytes(bytes))
        #expect(s.ppi == [UInt8](repeating: 0x5A, count: 4096))
    }

    struct Bad: CustomStringConvertible, Sendable {
        var name: String
        var records: [UInt8]
        var code: StreamError.Code
        var field: String
        /// Offset of the failing element from the start of the PART body.
        var at: Int
        var description: String { name }
    }

    static let bad: [Bad] = [
        Bad(name: "ZERO|PAGE", records: record(0, [.zero, .page], block: "pc.ram", page),
            code: .invalidRAMFlags, field: "ram.addr_and_flags", at: 0),
        Bad(name: "unknown flag 0x400", records: record(0, RAMSaveFlags(rawValue: 0x400)),
            code: .invalidRAMFlags, field: "ram.addr_and_flags", at: 0),
        Bad(name: "obsolete FULL", records: record(0, .full),
            code: .invalidRAMFlags, field: "ram.addr_and_flags", at: 0),
        Bad(name: "CONTINUE with no previous block", records: record(0, [.zero, .continue], [0]),
            code: .invalidRAMFlags, field: "ram.addr_and_flags", at: 0),
        Bad(name: "undeclared block", records: record(0, .zero, block: "nope", [0]) ,
            code: .unknownRAMBlock, field: "ram.addr_and_flags", at: 0),
        Bad(name: "offset past the block", records: record(0x1000, .zero, block: "tpm-ppi", [0]),
            code: .unknownRAMBlock, field: "ram.addr_and_flags", at: 0),
        Bad(name: "compressed length over compressBound", records: record(0, .compressPage, block: "pc.ram", [0, 0, 0x13, 0x88]),
            code: .lengthOverLimit, field: "ram.compressed_length", at: 15),
        Bad(name: "XBZRLE encoding 2", records: record(0, .xbzrle, block: "pc.ram", [2, 0, 1, 0]),
            code: .invalidField, field: "ram.xbzrle_flags", at: 15),
        Bad(name: "XBZRLE longer than a page", records: record(0, .xbzrle, block: "pc.ram", [1, 0x13, 0x88]),
            code: .lengthOverLimit, field: "ram.xbzrle_length", at: 16),
        Bad(name: "XBZRLE that does not decode (captured block)", records: record(0, .xbzrle, block: "tpm-ppi", [1, 0, 2, 0, 0]),
            code: .invalidField, field: "ram.xbzrle_data", at: 19),
        Bad(name: "page cut by the end of the stream", records: record(0, .page, block: "pc.ram", [1, 2, 3]),
            code: .truncated, field: "ram.page", at: 15),
    ]

    @Test("refused records", arguments: bad)
    func refused(_ b: Bad) throws {
        let records = b.records
        if b.code == .truncated {
            // Cut the stream inside the page itself.
            let (bytes, body) = try Self.stream(records)
            let e = walkError(Array(bytes[..<(body + records.count)]))
            #expect(e?.code == .truncated)
            #expect(e?.field == b.field)
            #expect(e?.offset == body + b.at)
            return
        }
        let (bytes, body) = try Self.stream(records)
        let e = walkError(bytes)
        #expect(e?.code == b.code)
        #expect(e?.section == "ram")
        #expect(e?.field == b.field)
        #expect(e?.offset == body + b.at)
    }

    @Test("compressed pages refused on request; a compressed PPI page is reported, not guessed")
    func compressed() throws {
        let rec = Self.record(0, .compressPage, block: "tpm-ppi", [0, 0, 0, 4, 1, 2, 3, 4])
        let (bytes, body) = try Self.stream(rec)
        var o = MigrationStreamWalker.Options()
        o.compressedPages = .reject
        let e = walkError(bytes, options: o)
        #expect(e?.code == .unsupported)
        #expect(e?.offset == body)
        #expect(walkError(bytes) == nil)
        let f = #expect(throws: StreamError.self) { _ = try TPMMigrationState(source: .bytes(bytes)) }
        #expect(f?.code == .unsupported)
        #expect(f?.field == "tpm-ppi")
    }

    @Test("ram version other than 4")
    func version() throws {
        let (bytes, _) = try Self.stream([], version: 3)
        let e = walkError(bytes)
        #expect(e?.code == .versionOutOfRange)
        #expect(e?.section == "ram")
    }

    @Test("MEM_SIZE block list longer than its total")
    func blockListOverrun() throws {
        var w = ByteWriter()
        w.writeUInt8(SectionType.start.rawValue)
        w.writeBigEndianUInt32(2)
        w.writeUInt8PrefixedString("ram")
        w.writeBigEndianUInt32(0)
        w.writeBigEndianUInt32(4)
        w.writeBigEndianUInt64(0x1000 | RAMSaveFlags.memSize.rawValue)
        w.writeUInt8PrefixedString("big")
        w.writeBigEndianUInt64(0x2000)
        let (bytes, _) = try Self.stream([], setup: w.bytes + Self.record(0, .eos) + [0x7E, 0, 0, 0, 2])
        let e = walkError(bytes)
        #expect(e?.code == .invalidField)
        #expect(e?.field == "ram.block_length")
    }

    /// With `x-ignore-shared` each block carries its region address; after
    /// MIG_CMD_POSTCOPY_ADVISE, blocks whose page size differs from the host's carry it.
    @Test("block list with x-ignore-shared and after POSTCOPY_ADVISE")
    func blockListExtras() throws {
        var w = ByteWriter()
        // POSTCOPY_ADVISE: page-size summary 2 MiB | 4 KiB, target page size 4 KiB.
        w.writeUInt8(SectionType.command.rawValue)
        w.writeBigEndianUInt16(3)
        w.writeBigEndianUInt16(16)
        w.writeBigEndianUInt64(0x20_1000)
        w.writeBigEndianUInt64(0x1000)
        w.writeUInt8(SectionType.start.rawValue)
        w.writeBigEndianUInt32(2)
        w.writeUInt8PrefixedString("ram")
        w.writeBigEndianUInt32(0)
        w.writeBigEndianUInt32(4)
        w.writeBigEndianUInt64(0x40_1000 | RAMSaveFlags.memSize.rawValue)
        w.writeUInt8PrefixedString("huge.ram")
        w.writeBigEndianUInt64(0x40_0000)
        w.writeBigEndianUInt64(0x20_0000)       // its page size
        w.writeBigEndianUInt64(0x1_0000_0000)   // its region address
        w.writeUInt8PrefixedString("tpm-ppi")
        w.writeBigEndianUInt64(0x1000)
        w.writeBigEndianUInt64(0xFED4_5000)     // region address only
        w.writeBigEndianUInt64(RAMSaveFlags.eos.rawValue)
        w.writeUInt8(0x7E)
        w.writeBigEndianUInt32(2)
        var s = MigrationStreamWriter()
        try s.writeConfiguration(MigrationConfiguration(machineType: "pc-i440fx-7.2", capabilities: ["x-ignore-shared"]))
        s.writeRaw(w.bytes)
        s.writeEOF()
        let (_, events) = try walkAll(.bytes(s.bytes))
        guard case .ram(let setup)? = sections(events).first?.content else { Issue.record("no ram"); return }
        #expect(setup.blocks == [
            RAMBlockInfo(name: "huge.ram", length: 0x40_0000, pageSize: 0x20_0000, regionAddress: 0x1_0000_0000),
            RAMBlockInfo(name: "tpm-ppi", length: 0x1000, pageSize: nil, regionAddress: 0xFED4_5000),
        ])
    }

    /// Regression: a block as large as the stream says and a record address above Int.max must
    /// neither trap nor allocate; uncaptured pages are only skipped.
    @Test("a 2^64-sized block and a record at 2^63: walked, nothing allocated")
    func hugeAddresses() throws {
        var w = ByteWriter()
        w.writeUInt8(SectionType.start.rawValue)
        w.writeBigEndianUInt32(2)
        w.writeUInt8PrefixedString("ram")
        w.writeBigEndianUInt32(0)
        w.writeBigEndianUInt32(4)
        w.writeBigEndianUInt64(0xFFFF_FFFF_FFFF_F000 | RAMSaveFlags.memSize.rawValue)
        w.writeUInt8PrefixedString("tpm-ppi")
        w.writeBigEndianUInt64(0xFFFF_FFFF_FFFF_F000)
        w.writeBigEndianUInt64(RAMSaveFlags.eos.rawValue)
        w.writeUInt8(0x7E)
        w.writeBigEndianUInt32(2)
        let records = Self.record(0x8000_0000_0000_0000, .xbzrle, block: "tpm-ppi", [1, 0, 2, 0, 1])
            + Self.record(0xFFFF_FFFF_FFFF_E000, [.page, .continue], Self.page)
            + Self.record(0xFFFF_FFFF_FFFF_E000, [.zero, .continue], [0])
        let (bytes, _) = try Self.stream(records, setup: w.bytes)
        let (walker, _) = try walkAll(.bytes(bytes))
        #expect(walker.capturedRAMBlocks.isEmpty)
        #expect(walker.ramBlocks["tpm-ppi"] == 0xFFFF_FFFF_FFFF_F000)
        #expect(walker.statistics.pages == 1 && walker.statistics.zeroPages == 1 && walker.statistics.xbzrlePages == 1)
    }

    @Test("xbzrle_decode_buffer: runs, overflow, bad encodings")
    func xbzrle() {
        var dst = [UInt8](repeating: 0xEE, count: 16)
        let ok = dst.withUnsafeMutableBufferPointer { RAMWalker.xbzrleDecode([0x02, 0x02, 1, 2, 0x03, 0x01, 9], into: $0, at: 0, length: 16) }
        #expect(ok)
        #expect(dst == [0xEE, 0xEE, 1, 2, 0xEE, 0xEE, 0xEE, 9] + [UInt8](repeating: 0xEE, count: 8))
        for bad: [UInt8] in [[0x20, 0x01, 1], [0x00, 0x00], [0x00, 0x05, 1, 2], [0x80, 0x80, 1], [0x01]] {
            let r = dst.withUnsafeMutableBufferPointer { RAMWalker.xbzrleDecode(bad, into: $0, at: 0, length: 16) }
            #expect(!r, "\(bad)")
        }
    }
}
