/// A RAM block declared in the `ram` START section.
public struct RAMBlockInfo: Sendable, Equatable {
    /// The block idstr (`pc.ram`, `tpm-ppi`, `/rom@etc/acpi/tables`).
    public var name: String
    /// `used_length`.
    public var length: UInt64
    /// The block's page size, present when postcopy was advised and it differs from the host's.
    public var pageSize: UInt64?
    /// The memory region address, present with `x-ignore-shared`.
    public var regionAddress: UInt64?

    /// A block as declared.
    public init(name: String, length: UInt64, pageSize: UInt64? = nil, regionAddress: UInt64? = nil) {
        self.name = name
        self.length = length
        self.pageSize = pageSize
        self.regionAddress = regionAddress
    }
}

/// What one `ram` section (START, PART or END) carried. Pages are counted, never kept, except
/// for captured blocks.
public struct RAMSectionSummary: Sendable, Equatable {
    /// The MEM_SIZE total (START only).
    public var totalSize: UInt64?
    /// The blocks declared (START only).
    public var blocks: [RAMBlockInfo] = []
    /// RAM_SAVE_FLAG_ZERO records.
    public var zeroPages = 0
    /// RAM_SAVE_FLAG_PAGE records.
    public var pages = 0
    /// RAM_SAVE_FLAG_XBZRLE records.
    public var xbzrlePages = 0
    /// RAM_SAVE_FLAG_COMPRESS_PAGE records (skipped: zlib is not decoded here).
    public var compressedPages = 0
    /// RAM_SAVE_FLAG_HOOK records (RDMA; no payload in the byte stream).
    public var hooks = 0
    /// RAM_SAVE_FLAG_MULTIFD_FLUSH records (QEMU 8.1+).
    public var multifdFlushes = 0
    /// All records including the final EOS.
    public var records = 0

    /// An empty summary.
    public init() {}
}

/// What to do with RAM_SAVE_FLAG_COMPRESS_PAGE records.
public enum CompressedPagePolicy: Sendable, Equatable {
    /// Skip them (length-checked); a captured block receiving one is marked incomplete.
    case skip
    /// Refuse them, as QEMU 7.2 does when the `compress` capability is off on the destination
    /// ("Received an unexpected compressed page").
    case reject
}

/// A small RAM block whose pages were kept (the PPI page, the CRB command buffer).
public struct CapturedRAMBlock: Sendable, Equatable {
    /// The block name.
    public var name: String
    /// The block contents (its whole `used_length`).
    public var bytes: [UInt8]
    /// Pages received at least once, by page index.
    public var received: [Bool]
    /// A page arrived compressed and was not decoded.
    public var hasUndecodedPages = false

    /// Every page arrived and could be decoded.
    public var isComplete: Bool { !hasUndecodedPages && received.allSatisfy { $0 } }
}

/// Walks the records of `ram` sections as `ram_load_precopy` (migration/ram.c, QEMU 7.2) reads
/// them, in constant memory: page data is skipped in the input buffer unless the block is
/// captured. State that QEMU keeps across sections (the block list, the last block for
/// RAM_SAVE_FLAG_CONTINUE) is kept here across sections too.
struct RAMWalker {
    /// `compressBound(TARGET_PAGE_SIZE)` of zlib for the largest page: the bound QEMU checks.
    static func compressBound(_ n: Int) -> Int { n + (n >> 12) + (n >> 14) + (n >> 25) + 13 }

    var pageSize: Int
    var captureNames: Set<String>
    var maximumCapturedBlockSize: Int
    var maximumBlocks: Int
    var compressedPages: CompressedPagePolicy
    /// MIG_CMD_POSTCOPY_ADVISE was seen, with the source's page-size summary if it sent one.
    var postcopyAdvised = false
    var postcopyPageSizeSummary: UInt64?
    /// `x-ignore-shared` is among the configuration's capabilities.
    var ignoreShared = false

    private(set) var blocks: [String: UInt64] = [:]
    private(set) var captured: [String: CapturedRAMBlock] = [:]
    private var lastBlock: String?
    private var lastCaptured = false

    init(pageSize: Int, captureNames: Set<String>, maximumCapturedBlockSize: Int, maximumBlocks: Int,
         compressedPages: CompressedPagePolicy) {
        self.pageSize = pageSize
        self.captureNames = captureNames
        self.maximumCapturedBlockSize = maximumCapturedBlockSize
        self.maximumBlocks = maximumBlocks
        self.compressedPages = compressedPages
    }

    /// Reads records up to and including RAM_SAVE_FLAG_EOS.
    mutating func walkSection(_ input: MigrationInput) throws(StreamError) -> RAMSectionSummary {
        var summary = RAMSectionSummary()
        let mask = UInt64(pageSize - 1)
        let pageFlags: RAMSaveFlags = [.zero, .page, .compressPage, .xbzrle]
        while true {
            let recordOffset = input.offset
            let raw = try input.readBigEndianUInt64("ram.addr_and_flags")
            let flags = RAMSaveFlags(rawValue: raw & mask)
            let addr = raw & ~mask
            summary.records += 1

            if flags.contains(.compressPage), compressedPages == .reject {
                throw StreamError(.unsupported, section: "ram", field: "ram.addr_and_flags", offset: recordOffset,
                                  detail: "compressed page (RAM_SAVE_FLAG_COMPRESS_PAGE) refused by the options")
            }
            var block = ""
            if !flags.isDisjoint(with: pageFlags) {
                block = try blockFromStream(input, flags: flags, recordOffset: recordOffset)
                guard let length = blocks[block], addr < length else {
                    throw StreamError(.unknownRAMBlock, section: "ram", field: "ram.addr_and_flags", offset: recordOffset,
                                      detail: blocks[block] == nil ? "block \(block) was not declared"
                                        : "offset 0x\(String(addr, radix: 16)) is past block \(block)")
                }
            }

            // Only used for captured blocks, whose length (≤ maximumCapturedBlockSize) bounds addr.
            let at = Int(truncatingIfNeeded: addr)
            switch flags.subtracting(.continue) {
            case .memSize:
                summary.totalSize = addr
                try readBlockList(input, total: addr, into: &summary)
            case .zero:
                let fill = try input.readUInt8("ram.zero_fill")
                summary.zeroPages += 1
                if lastCaptured { fillCaptured(block, at: at, byte: fill) }
            case .page:
                summary.pages += 1
                if lastCaptured {
                    try copyCaptured(block, at: at, input)
                } else {
                    try input.skip(pageSize, "ram.page")
                }
            case .compressPage:
                let lenAt = input.offset
                let len = try input.readBigEndianUInt32("ram.compressed_length")
                guard Int(len) <= Self.compressBound(pageSize) else {
                    throw StreamError(.lengthOverLimit, section: "ram", field: "ram.compressed_length", offset: lenAt,
                                      detail: "Invalid compressed data length: \(len) (bound \(Self.compressBound(pageSize)))")
                }
                try input.skip(Int(len), "ram.compressed_data")
                summary.compressedPages += 1
                if lastCaptured { markUndecoded(block, at: at) }
            case .xbzrle:
                try loadXBZRLE(input, block: block, addr: at)
                summary.xbzrlePages += 1
            case .eos:
                return summary
            case .multifdFlush where pageSize > Int(RAMSaveFlags.multifdFlush.rawValue):
                // Not written by 7.2; QEMU 8.1+ with multifd. No payload.
                summary.multifdFlushes += 1
            default:
                if flags.contains(.hook) {
                    // RDMA: the page data travels outside the byte stream.
                    summary.hooks += 1
                } else {
                    throw StreamError(.invalidRAMFlags, section: "ram", field: "ram.addr_and_flags", offset: recordOffset,
                                      detail: "Unknown combination of migration flags: 0x\(String(flags.rawValue, radix: 16))")
                }
            }
        }
    }

    /// `ram_block_from_stream`: an idstr unless RAM_SAVE_FLAG_CONTINUE; CONTINUE with no
    /// earlier block is refused ("Ack, bad migration stream!").
    private mutating func blockFromStream(_ input: MigrationInput, flags: RAMSaveFlags, recordOffset: Int) throws(StreamError) -> String {
        if flags.contains(.continue) {
            guard let b = lastBlock else {
                throw StreamError(.invalidRAMFlags, section: "ram", field: "ram.addr_and_flags", offset: recordOffset,
                                  detail: "RAM_SAVE_FLAG_CONTINUE with no previous block")
            }
            return b
        }
        let name = try input.readCountedString("ram.block_idstr")
        lastBlock = name
        lastCaptured = captured[name] != nil
        return name
    }

    /// The MEM_SIZE block list: (u8 len, idstr, be64 used_length, [be64 page size], [be64
    /// region address]) until the lengths add up to the total.
    private mutating func readBlockList(_ input: MigrationInput, total: UInt64, into summary: inout RAMSectionSummary) throws(StreamError) {
        var left = total
        while left > 0 {
            let at = input.offset
            let name = try input.readCountedString("ram.block_idstr")
            let length = try input.readBigEndianUInt64("ram.block_length")
            var info = RAMBlockInfo(name: name, length: length)
            if postcopyAdvised, try hasPostcopyPageSize(input) {
                info.pageSize = try input.readBigEndianUInt64("ram.block_page_size")
            }
            if ignoreShared {
                info.regionAddress = try input.readBigEndianUInt64("ram.block_mr_addr")
            }
            guard length <= left else {
                throw StreamError(.invalidField, section: "ram", field: "ram.block_length", offset: at + 1 + name.utf8.count,
                                  detail: "block \(name) of 0x\(String(length, radix: 16)) bytes exceeds the 0x\(String(left, radix: 16)) left of MEM_SIZE")
            }
            left -= length
            if blocks[name] == nil, blocks.count >= maximumBlocks {
                throw StreamError(.lengthOverLimit, section: "ram", field: "ram.block_idstr", offset: at,
                                  detail: "more than \(maximumBlocks) RAM blocks")
            }
            blocks[name] = length
            if captureNames.contains(name), length <= UInt64(maximumCapturedBlockSize) {
                let pages = (Int(length) + pageSize - 1) / pageSize
                captured[name] = CapturedRAMBlock(name: name, bytes: [UInt8](repeating: 0, count: Int(length)),
                                                  received: [Bool](repeating: false, count: pages))
            }
            summary.blocks.append(info)
        }
        lastCaptured = lastBlock.map { captured[$0] != nil } ?? false
    }

    /// Postcopy page sizes are sent only for blocks whose page size differs from the host's, which
    /// the stream does not say. A summary equal to the target page size means none are sent.
    /// Otherwise the next bytes decide: a page size is a be64 power of two above the target page
    /// size (its first byte is 0), where the next block starts with a non-zero idstr length and
    /// the record after the list has flags below the page size.
    private func hasPostcopyPageSize(_ input: MigrationInput) throws(StreamError) -> Bool {
        if let summary = postcopyPageSizeSummary, summary == UInt64(pageSize) { return false }
        let next = try input.peek(8)
        guard next.count == 8 else { return false }
        let v = next.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return v > UInt64(pageSize) && v & (v - 1) == 0
    }

    /// `load_xbzrle`: u8 encoding (ENCODING_FLAG_XBZRLE = 1), be16 length ≤ page size, data.
    /// Captured blocks are decoded (`xbzrle_decode_buffer`); others skipped.
    private mutating func loadXBZRLE(_ input: MigrationInput, block: String, addr: Int) throws(StreamError) {
        let at = input.offset
        let encoding = try input.readUInt8("ram.xbzrle_flags")
        guard encoding == 1 else {
            throw StreamError(.invalidField, section: "ram", field: "ram.xbzrle_flags", offset: at,
                              detail: "Failed to load XBZRLE page - wrong compression!")
        }
        let lenAt = input.offset
        let len = Int(try input.readBigEndianUInt16("ram.xbzrle_length"))
        guard len <= pageSize else {
            throw StreamError(.lengthOverLimit, section: "ram", field: "ram.xbzrle_length", offset: lenAt,
                              detail: "Failed to load XBZRLE page - len overflow! (\(len) > \(pageSize))")
        }
        guard lastCaptured else { return try input.skip(len, "ram.xbzrle_data") }
        let dataAt = input.offset
        let data = try input.readBytes(len, "ram.xbzrle_data", limit: pageSize)
        guard var c = captured[block] else { return }
        captured[block] = nil
        let ok = c.bytes.withUnsafeMutableBufferPointer { dst in
            Self.xbzrleDecode(data, into: dst, at: addr, length: min(pageSize, dst.count - addr))
        }
        if ok { c.received[addr / pageSize] = true }
        captured[block] = c
        guard ok else {
            throw StreamError(.invalidField, section: "ram", field: "ram.xbzrle_data", offset: dataAt,
                              detail: "Failed to load XBZRLE page - decode error!")
        }
    }

    /// `xbzrle_decode_buffer` (migration/xbzrle.c): alternating ULEB128 zero-run (unchanged
    /// bytes) and non-zero-run lengths, each non-zero run followed by its bytes.
    static func xbzrleDecode(_ src: [UInt8], into dst: UnsafeMutableBufferPointer<UInt8>, at base: Int, length dlen: Int) -> Bool {
        func uleb(_ i: Int) -> (UInt32, Int)? {
            guard i < src.count else { return nil }
            if src[i] & 0x80 == 0 { return (UInt32(src[i]), 1) }
            guard i + 1 < src.count, src[i + 1] & 0x80 == 0 else { return nil }
            return (UInt32(src[i] & 0x7F) | UInt32(src[i + 1]) << 7, 2)
        }
        var i = 0, d = 0
        while i < src.count {
            guard src.count - i >= 2, let (zrun, a) = uleb(i), i == 0 || zrun != 0 else { return false }
            i += a
            d += Int(zrun)
            guard d <= dlen else { return false }
            guard src.count - i >= 2, let (nzrun, b) = uleb(i), nzrun != 0 else { return false }
            i += b
            let n = Int(nzrun)
            guard d + n <= dlen, i + n <= src.count else { return false }
            for k in 0..<n { dst[base + d + k] = src[i + k] }
            d += n
            i += n
        }
        return true
    }

    private mutating func fillCaptured(_ block: String, at addr: Int, byte: UInt8) {
        guard var c = captured[block] else { return }
        captured[block] = nil
        let end = min(addr + pageSize, c.bytes.count)
        if addr < end {
            for i in addr..<end { c.bytes[i] = byte }
            c.received[addr / pageSize] = true
        }
        captured[block] = c
    }

    private mutating func copyCaptured(_ block: String, at addr: Int, _ input: MigrationInput) throws(StreamError) {
        guard var c = captured[block] else { return try input.skip(pageSize, "ram.page") }
        captured[block] = nil
        let n = min(pageSize, c.bytes.count - addr)
        try c.bytes.withUnsafeMutableBufferPointer { (dst: inout UnsafeMutableBufferPointer<UInt8>) throws(StreamError) in
            guard let p = dst.baseAddress, n > 0 else { return }
            try input.copy(n, into: p + addr, "ram.page")
        }
        if n < pageSize { try input.skip(pageSize - n, "ram.page") }
        c.received[addr / pageSize] = true
        captured[block] = c
    }

    private mutating func markUndecoded(_ block: String, at addr: Int) {
        captured[block]?.hasUndecodedPages = true
    }
}
