import WireFormat

/// swtpm's state-blob container (swtpm `swtpm_nvstore.c`): a 10-byte header followed by TLVs.
/// The same container holds the on-disk state files (`tpm2-00.permall`: header + TLV 1) and the
/// blobs of CMD_GET_STATEBLOB / the `tpm-emulator` migration section (header with
/// MIGRATION_DATA + TLV 4 wrapping the inner TLVs).
public struct SwtpmBlob: Equatable, Sendable {
    /// `BLOB_HEADER_VERSION`.
    public static let headerVersion: UInt8 = 2
    public static let headerSize = 10
    /// Larger blobs are refused before allocation. libtpms' NV is at most 128 KiB; swtpm master
    /// refuses SET_STATEBLOB above 512 KiB.
    public static let maximumSize = 512 * 1024

    /// Header flags (`BLOB_FLAG_*`).
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        /// Payload encrypted with the state key (`--key`).
        public static let encrypted = Flags(rawValue: 0x01)
        /// Payload encrypted with the migration key (`--migration-key`).
        public static let migrationEncrypted = Flags(rawValue: 0x02)
        /// Payload wrapped for migration (TLV 4 or 5). GET_STATEBLOB always sets it.
        public static let migrationData = Flags(rawValue: 0x04)
        /// The state key is AES-256.
        public static let encrypted256BitKey = Flags(rawValue: 0x08)
        /// The migration key is AES-256.
        public static let migration256BitKey = Flags(rawValue: 0x10)
    }

    /// TLV tags (`TAG_*`).
    public enum Tag: UInt16, Sendable, CaseIterable {
        case data = 1
        case encryptedData = 2
        case hmac = 3
        case migrationData = 4
        case encryptedMigrationData = 5
        case ivecEncryptedData = 6
        case ivecEncryptedMigrationData = 7
    }

    public struct TLV: Equatable, Sendable {
        public var tag: UInt16
        public var value: [UInt8]
        public init(tag: UInt16, value: [UInt8]) { self.tag = tag; self.value = value }
    }

    public var version: UInt8
    public var minVersion: UInt8
    public var flags: Flags
    public var tlvs: [TLV]

    public init(version: UInt8 = headerVersion, minVersion: UInt8 = 1, flags: Flags, tlvs: [TLV]) {
        self.version = version
        self.minVersion = minVersion
        self.flags = flags
        self.tlvs = tlvs
    }

    /// The on-disk form of a plain libtpms state: header (no flags) + TLV(DATA).
    public static func file(wrapping state: [UInt8]) -> SwtpmBlob {
        SwtpmBlob(flags: [], tlvs: [TLV(tag: Tag.data.rawValue, value: state)])
    }

    /// The migration form swtpm returns for a DECRYPTED GET_STATEBLOB without a migration key:
    /// header (MIGRATION_DATA) + TLV(MIGRATION_DATA, TLV(DATA, state)).
    public static func migration(wrapping state: [UInt8]) -> SwtpmBlob {
        let inner = encodeTLVs([TLV(tag: Tag.data.rawValue, value: state)])
        return SwtpmBlob(flags: .migrationData, tlvs: [TLV(tag: Tag.migrationData.rawValue, value: inner)])
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        w.writeUInt8(version)
        w.writeUInt8(minVersion)
        w.writeBigEndianUInt16(UInt16(Self.headerSize))
        w.writeBigEndianUInt16(flags.rawValue)
        let totAt = w.reserveBigEndianUInt32()
        w.writeBytes(Self.encodeTLVs(tlvs))
        w.patchBigEndianUInt32(at: totAt, UInt32(w.count))
        return w.bytes
    }

    static func encodeTLVs(_ tlvs: [TLV]) -> [UInt8] {
        var w = ByteWriter(capacity: tlvs.reduce(0) { $0 + 6 + $1.value.count })
        for t in tlvs {
            w.writeBigEndianUInt16(t.tag)
            w.writeBigEndianUInt32(UInt32(t.value.count))
            w.writeBytes(t.value)
        }
        return w.bytes
    }

    /// Decodes the container with swtpm's own checks (`SWTPM_NVRAM_CheckHeader`): at least a
    /// header, totlen equal to the length, min_version not above 2, hdrsize 10; then the TLVs.
    public static func decode(_ bytes: [UInt8], field: String = "blob") throws(WireError) -> SwtpmBlob {
        guard bytes.count <= maximumSize else {
            throw WireError(.lengthOverLimit, field: field, offset: 0, detail: "\(bytes.count) bytes")
        }
        var r = ByteReader(bytes)
        let version = try r.readUInt8(field + ".version")
        let minVersion = try r.readUInt8(field + ".min_version")
        let hdrsize = try r.readBigEndianUInt16(field + ".hdrsize")
        let flags = Flags(rawValue: try r.readBigEndianUInt16(field + ".flags"))
        let totlen = try r.readBigEndianUInt32(field + ".totlen")
        guard Int(totlen) == bytes.count else {
            throw WireError(.invalidValue, field: field + ".totlen", offset: 6,
                            detail: "totlen \(totlen) but the blob has \(bytes.count) bytes")
        }
        guard minVersion <= headerVersion else {
            throw WireError(.invalidValue, field: field + ".min_version", offset: 1,
                            detail: "min_version \(minVersion) is newer than \(headerVersion)")
        }
        guard Int(hdrsize) == headerSize else {
            throw WireError(.invalidValue, field: field + ".hdrsize", offset: 2, detail: "hdrsize \(hdrsize)")
        }
        let tlvs = try decodeTLVs(r.readRemaining(), field: field, baseOffset: headerSize)
        return SwtpmBlob(version: version, minVersion: minVersion, flags: flags, tlvs: tlvs)
    }

    public static func decodeTLVs(_ bytes: [UInt8], field: String, baseOffset: Int) throws(WireError) -> [TLV] {
        var r = ByteReader(bytes, baseOffset: baseOffset)
        var out: [TLV] = []
        while !r.isAtEnd {
            let tag = try r.readBigEndianUInt16(field + ".tlv.tag")
            let len = try r.readBigEndianUInt32(field + ".tlv.length")
            let value = try r.readBytes(Int(len), field + ".tlv(\(tag)).value", limit: maximumSize)
            out.append(TLV(tag: tag, value: value))
        }
        return out
    }

    public func value(of tag: Tag) -> [UInt8]? {
        tlvs.first { $0.tag == tag.rawValue }?.value
    }

    /// The plain libtpms state inside, unwrapping TLV(MIGRATION_DATA) if present. Nil if the
    /// state is encrypted (by `--key` or `--migration-key`).
    public func plainState() throws(WireError) -> [UInt8]? {
        if let data = value(of: .data) { return data }
        if let inner = value(of: .migrationData) {
            let tlvs = try Self.decodeTLVs(inner, field: "blob.migration_data", baseOffset: Self.headerSize + 6)
            return tlvs.first { $0.tag == Tag.data.rawValue }?.value
        }
        return nil
    }

    /// True if some layer of the blob is encrypted.
    public var isEncrypted: Bool {
        flags.contains(.encrypted) || flags.contains(.migrationEncrypted)
            || value(of: .encryptedMigrationData) != nil || value(of: .encryptedData) != nil
    }
}
