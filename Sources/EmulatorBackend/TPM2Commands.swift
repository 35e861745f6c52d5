import WireFormat

/// Builders for the TPM 2.0 commands the demo, the tests and the benchmarks send, and readers
/// for their responses (TPM 2.0 Library spec, Part 3). Password sessions only
/// (TPM_RS_PW, empty password).
public enum TPM2 {
    public static let tagNoSessions: UInt16 = 0x8001
    public static let tagSessions: UInt16 = 0x8002

    public enum CommandCode: UInt32, Sendable {
        case nvUndefineSpace = 0x0000_0122
        case nvDefineSpace = 0x0000_012A
        case selfTest = 0x0000_0143
        case startup = 0x0000_0144
        case shutdown = 0x0000_0145
        case nvRead = 0x0000_014E
        case getCapability = 0x0000_017A
        case getRandom = 0x0000_017B
        case nvWrite = 0x0000_0137
        case pcrRead = 0x0000_017E
        case readClock = 0x0000_0181
        case pcrExtend = 0x0000_0182
    }

    public static let suClear: UInt16 = 0x0000
    public static let suState: UInt16 = 0x0001
    public static let algSHA256: UInt16 = 0x000B
    public static let rhOwner: UInt32 = 0x4000_0001
    public static let rsPW: UInt32 = 0x4000_0009

    /// A command with the header's size field filled in.
    static func command(tag: UInt16, code: CommandCode, _ body: (inout ByteWriter) -> Void) -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        w.writeBigEndianUInt16(tag)
        let sizeAt = w.reserveBigEndianUInt32()
        w.writeBigEndianUInt32(code.rawValue)
        body(&w)
        w.patchBigEndianUInt32(at: sizeAt, UInt32(w.count))
        return w.bytes
    }

    /// An authorization area with one empty-password TPM_RS_PW session.
    static func writePasswordSession(_ w: inout ByteWriter) {
        w.writeBigEndianUInt32(9)          // authorizationSize
        w.writeBigEndianUInt32(rsPW)       // sessionHandle
        w.writeBigEndianUInt16(0)          // nonce (empty)
        w.writeUInt8(0)                    // sessionAttributes
        w.writeBigEndianUInt16(0)          // hmac/password (empty)
    }

    public static func startup(_ type: UInt16 = suClear) -> [UInt8] {
        command(tag: tagNoSessions, code: .startup) { $0.writeBigEndianUInt16(type) }
    }

    public static func shutdown(_ type: UInt16 = suState) -> [UInt8] {
        command(tag: tagNoSessions, code: .shutdown) { $0.writeBigEndianUInt16(type) }
    }

    public static func selfTest(full: Bool = true) -> [UInt8] {
        command(tag: tagNoSessions, code: .selfTest) { $0.writeUInt8(full ? 1 : 0) }
    }

    public static func getRandom(_ count: UInt16) -> [UInt8] {
        command(tag: tagNoSessions, code: .getRandom) { $0.writeBigEndianUInt16(count) }
    }

    public static func readClock() -> [UInt8] {
        command(tag: tagNoSessions, code: .readClock) { _ in }
    }

    /// TPM2_PCR_Extend of one SHA-256 digest into `pcr`.
    public static func pcrExtendSHA256(pcr: UInt32, digest: [UInt8]) -> [UInt8] {
        command(tag: tagSessions, code: .pcrExtend) { w in
            w.writeBigEndianUInt32(pcr)
            writePasswordSession(&w)
            w.writeBigEndianUInt32(1)      // TPML_DIGEST_VALUES.count
            w.writeBigEndianUInt16(algSHA256)
            w.writeBytes(digest.prefix(32))
            if digest.count < 32 { w.writeBytes([UInt8](repeating: 0, count: 32 - digest.count)) }
        }
    }

    /// TPM2_PCR_Read of one SHA-256 PCR.
    public static func pcrReadSHA256(pcr: UInt32) -> [UInt8] {
        command(tag: tagNoSessions, code: .pcrRead) { w in
            w.writeBigEndianUInt32(1)      // TPML_PCR_SELECTION.count
            w.writeBigEndianUInt16(algSHA256)
            w.writeUInt8(3)                // sizeofSelect
            var select = [UInt8](repeating: 0, count: 3)
            if pcr < 24 { select[Int(pcr / 8)] = 1 << (pcr % 8) }
            w.writeBytes(select)
        }
    }

    /// TPM2_NV_DefineSpace under the owner hierarchy: an ordinary index of `size` bytes,
    /// authorized by owner and by its (empty) auth value.
    public static func nvDefineSpace(index: UInt32, size: UInt16) -> [UInt8] {
        command(tag: tagSessions, code: .nvDefineSpace) { w in
            w.writeBigEndianUInt32(rhOwner)
            writePasswordSession(&w)
            w.writeBigEndianUInt16(0)                   // auth (empty)
            w.writeBigEndianUInt16(14)                  // TPM2B_NV_PUBLIC.size
            w.writeBigEndianUInt32(index)
            w.writeBigEndianUInt16(algSHA256)           // nameAlg
            // TPMA_NV: OWNERWRITE | AUTHWRITE | OWNERREAD | AUTHREAD | NO_DA
            w.writeBigEndianUInt32(0x0006_0006 | 0x0200_0000)
            w.writeBigEndianUInt16(0)                   // authPolicy (empty)
            w.writeBigEndianUInt16(size)
        }
    }

    public static func nvWrite(index: UInt32, data: [UInt8], offset: UInt16 = 0) -> [UInt8] {
        command(tag: tagSessions, code: .nvWrite) { w in
            w.writeBigEndianUInt32(rhOwner)             // authHandle
            w.writeBigEndianUInt32(index)               // nvIndex
            writePasswordSession(&w)
            w.writeBigEndianUInt16(UInt16(truncatingIfNeeded: data.count))
            w.writeBytes(data)
            w.writeBigEndianUInt16(offset)
        }
    }

    public static func nvRead(index: UInt32, size: UInt16, offset: UInt16 = 0) -> [UInt8] {
        command(tag: tagSessions, code: .nvRead) { w in
            w.writeBigEndianUInt32(rhOwner)
            w.writeBigEndianUInt32(index)
            writePasswordSession(&w)
            w.writeBigEndianUInt16(size)
            w.writeBigEndianUInt16(offset)
        }
    }

    public static func nvUndefineSpace(index: UInt32) -> [UInt8] {
        command(tag: tagSessions, code: .nvUndefineSpace) { w in
            w.writeBigEndianUInt32(rhOwner)
            w.writeBigEndianUInt32(index)
            writePasswordSession(&w)
        }
    }

    // MARK: Responses

    /// The header of a response: tag, size, response code.
    public struct ResponseHeader: Equatable, Sendable {
        public var tag: UInt16
        public var size: UInt32
        public var code: UInt32
    }

    public static func header(_ response: [UInt8]) throws(WireError) -> ResponseHeader {
        var r = ByteReader(response)
        return ResponseHeader(tag: try r.readBigEndianUInt16("tag"),
                              size: try r.readBigEndianUInt32("responseSize"),
                              code: try r.readBigEndianUInt32("responseCode"))
    }

    /// The response code, or nil if the response is shorter than a header.
    public static func responseCode(_ response: [UInt8]) -> UInt32? {
        try? header(response).code
    }

    /// The random bytes of a TPM2_GetRandom response.
    public static func randomBytes(_ response: [UInt8]) throws(WireError) -> [UInt8] {
        var r = ByteReader(response)
        try r.skip(10, "header")
        let n = try r.readBigEndianUInt16("randomBytes.size")
        return try r.readBytes(Int(n), "randomBytes.buffer")
    }

    /// The first digest of a TPM2_PCR_Read response.
    public static func pcrDigest(_ response: [UInt8]) throws(WireError) -> [UInt8] {
        var r = ByteReader(response)
        try r.skip(10, "header")
        _ = try r.readBigEndianUInt32("pcrUpdateCounter")
        let selections = try r.readBigEndianUInt32("pcrSelectionOut.count")
        for _ in 0..<min(selections, 16) {
            _ = try r.readBigEndianUInt16("hash")
            let n = try r.readUInt8("sizeofSelect")
            try r.skip(Int(n), "pcrSelect")
        }
        let digests = try r.readBigEndianUInt32("pcrValues.count")
        guard digests >= 1 else {
            throw WireError(.invalidValue, field: "pcrValues.count", offset: r.offset, detail: "no digest")
        }
        let n = try r.readBigEndianUInt16("digest.size")
        return try r.readBytes(Int(n), "digest.buffer")
    }

    /// The data of a TPM2_NV_Read response (a sessions-tagged response with a parameterSize).
    public static func nvReadData(_ response: [UInt8]) throws(WireError) -> [UInt8] {
        var r = ByteReader(response)
        try r.skip(10, "header")
        _ = try r.readBigEndianUInt32("parameterSize")
        let n = try r.readBigEndianUInt16("data.size")
        return try r.readBytes(Int(n), "data.buffer")
    }
}
