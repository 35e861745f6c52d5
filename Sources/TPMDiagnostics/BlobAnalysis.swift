import EmulatorBackend
import WireFormat

/// The 10-byte header of an swtpm state blob (`struct nvram_header`, swtpm_nvstore.c),
/// network byte order.
public struct SwtpmBlobHeader: Sendable, Equatable {
    /// `version` (2 = `BLOB_HEADER_VERSION`; 1 is the legacy format).
    public var version: UInt8
    /// `min_version`: the oldest header version a reader must understand (swtpm refuses > 2
    /// with 0x2E).
    public var minVersion: UInt8
    /// `hdrsize`: must be 10 (else 0x2B).
    public var headerSize: UInt16
    /// `flags` (`BLOB_FLAG_*`).
    public var flags: SwtpmBlob.Flags
    /// `totlen`: header + payload; must equal the blob length (else 0x03).
    public var totalLength: UInt32
}

/// One TLV of an swtpm blob: `u16 tag` + `u32 length` + value.
public struct BlobTLVInfo: Sendable, Equatable {
    /// The tag (`TAG_*`).
    public var tag: UInt16
    /// The length of the value.
    public var length: Int
    /// Offset of the tag within the blob (nil inside decrypted data).
    public var offset: Int?

    /// swtpm's name for the tag.
    public var name: String {
        switch SwtpmBlob.Tag(rawValue: tag) {
        case .data: "DATA"
        case .encryptedData: "ENCRYPTED_DATA"
        case .hmac: "HMAC"
        case .migrationData: "MIGRATION_DATA"
        case .encryptedMigrationData: "ENCRYPTED_MIGRATION_DATA"
        case .ivecEncryptedData: "IVEC_ENCRYPTED_DATA"
        case .ivecEncryptedMigrationData: "IVEC_ENCRYPTED_MIGRATION_DATA"
        case nil: "unknown(\(tag))"
        }
    }
}

/// What the first bytes of a plain libtpms blob say (swtpm-libtpms-peers.md §3.4).
public enum LibtpmsStateKind: String, Sendable, Equatable {
    /// TPM 2 `PERSISTENT_ALL`: NV_HEADER magic 0xAB364723.
    case tpm2Permanent = "TPM 2.0 permanent state (PERSISTENT_ALL)"
    /// TPM 2 volatile state: NV_HEADER magic 0x45637889, trailing SHA-1.
    case tpm2Volatile = "TPM 2.0 volatile state"
    /// TPM 1.2 permanent state: TPM_TAG_NVSTATE_V1 (0x0001) + TPM_TAG_PERMANENT_DATA (0x0022).
    case tpm12Permanent = "TPM 1.2 permanent state (TPM_PERMANENT_DATA)"
    /// TPM 1.2 volatile or save state: TPM_TAG_NVSTATE_V1-style tag, no TPM 2 magic.
    case tpm12State = "TPM 1.2 state"
    /// Nothing this tool recognises.
    case unknown = "unrecognised state"

    /// The TPM family the blob belongs to.
    public var family: TPMVersion {
        switch self {
        case .tpm2Permanent, .tpm2Volatile: .tpm20
        case .tpm12Permanent, .tpm12State: .tpm12
        case .unknown: .unspecified
        }
    }
}

/// The decoded headers of a plain libtpms state blob: the NV_HEADER (`u16 version, u32 magic`,
/// `u16 min_version` from version 2), the profile of a v4 PERSISTENT_ALL, the
/// PA_COMPILE_CONSTANTS and PERSISTENT_DATA versions, and the volatile blob's trailing SHA-1.
public struct LibtpmsStateInfo: Sendable, Equatable {
    /// NV_HEADER magic: TPM 2 `PERSISTENT_ALL` (libtpms `NVMarshal.c`).
    public static let persistentAllMagic: UInt32 = 0xAB36_4723
    /// NV_HEADER magic of the TPM 2 volatile state.
    public static let volatileMagic: UInt32 = 0x4563_7889
    /// NV_HEADER magic of PA_COMPILE_CONSTANTS.
    public static let compileConstantsMagic: UInt32 = 0xC9EA_6431
    /// NV_HEADER magic of PERSISTENT_DATA.
    public static let persistentDataMagic: UInt32 = 0x1221_3443
    /// The PERSISTENT_ALL version libtpms ≤ 0.9 implements (0.10 with a profile writes 4).
    public static let libtpms09PersistentAllVersion: UInt16 = 3

    /// What the blob is.
    public var kind: LibtpmsStateKind
    /// Blob length.
    public var size: Int
    /// NV_HEADER `version` (TPM 2), or the leading tag (TPM 1.2).
    public var version: UInt16?
    /// NV_HEADER `magic` (TPM 2).
    public var magic: UInt32?
    /// NV_HEADER `min_version`: the oldest libtpms format able to read the blob.
    public var minVersion: UInt16?
    /// The profile JSON of a v4 PERSISTENT_ALL (libtpms ≥ 0.10).
    public var profile: String?
    /// PA_COMPILE_CONSTANTS NV_HEADER version (3 = libtpms 0.9, 120 constants).
    public var compileConstantsVersion: UInt16?
    /// Number of compile-time constants recorded (88 for v1/v2, 120 for v3).
    public var compileConstantsCount: UInt32?
    /// PERSISTENT_DATA version (4 for libtpms 0.8–0.9; 5 needs 0.10).
    public var persistentDataVersion: UInt16?
    /// Offset of the stored compile-time constants (the u32 count) within the blob.
    public var compileConstantsOffset: Int?
    /// Whether the trailing 20-byte SHA-1 matches the bytes before it (TPM 2 volatile).
    public var integrityValid: Bool?

    /// Decodes what is recognisable; never fails (an unknown blob is `.unknown`).
    public static func parse(_ b: [UInt8]) -> LibtpmsStateInfo {
        var info = LibtpmsStateInfo(kind: .unknown, size: b.count)
        func be16(_ i: Int) -> UInt16? { i >= 0 && i + 2 <= b.count ? UInt16(b[i]) << 8 | UInt16(b[i + 1]) : nil }
        func be32(_ i: Int) -> UInt32? {
            guard i >= 0, i + 4 <= b.count else { return nil }
            return UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
        }
        func find(_ magic: UInt32, from: Int, within: Int) -> Int? {
            let end = min(b.count - 4, from + within)
            guard from <= end else { return nil }
            for i in from...end where be32(i) == magic { return i }
            return nil
        }
        guard let v = be16(0), let m = be32(2) else { return info }
        switch m {
        case persistentAllMagic:
            info.kind = .tpm2Permanent
            info.version = v
            info.magic = m
            var at = 6
            if v >= 2 { info.minVersion = be16(6); at = 8 }
            if v >= 4, let len = be16(at), at + 2 + Int(len) <= b.count {
                let json = b[(at + 2)..<(at + 2 + Int(len))].prefix { $0 != 0 }
                if json.first == UInt8(ascii: "{"), json.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) {
                    info.profile = String(decoding: json, as: UTF8.self)
                }
                at += 2 + Int(len)
            }
            if let cc = find(compileConstantsMagic, from: at, within: 64) {
                info.compileConstantsVersion = be16(cc - 2)
                let countAt = (info.compileConstantsVersion ?? 0) >= 2 ? cc + 6 : cc + 4
                info.compileConstantsCount = be32(countAt)
                info.compileConstantsOffset = countAt
                let skip = Int(min(info.compileConstantsCount ?? 0, 4096)) * 4
                if let pd = find(persistentDataMagic, from: countAt + 4 + skip, within: 64) {
                    info.persistentDataVersion = be16(pd - 2)
                }
            }
        case volatileMagic:
            info.kind = .tpm2Volatile
            info.version = v
            info.magic = m
            if v >= 2 { info.minVersion = be16(6) }
            if b.count > 20 {
                info.integrityValid = MigrationKey.sha1(b[..<(b.count - 20)]) == Array(b.suffix(20))
            }
        default:
            if v == 0x0001, be16(2) == 0x0022 {
                info.kind = .tpm12Permanent
                info.version = v
            } else if v == 0x0001 || (v >> 8 == 0 && v != 0 && be16(2).map({ $0 >> 8 == 0 }) == true) {
                info.kind = .tpm12State
                info.version = v
            }
        }
        return info
    }
}

/// How a blob's migration-key encryption went.
public enum BlobDecryption: Sendable, Equatable {
    /// Not encrypted with a migration key.
    case notEncrypted
    /// Encrypted, and the given key's HMAC verified and it decrypted.
    case decrypted(bits: Int)
    /// Encrypted, and no key was given.
    case noKey(bits: Int)
    /// The key given has the other size (swtpm 0x28).
    case keySizeMismatch(blobBits: Int, keyBits: Int)
    /// The HMAC did not verify with the key given (swtpm 0x21).
    case hmacMismatch(bits: Int)
    /// Ciphertext, IV or padding malformed.
    case malformed(String)
}

/// One `tpm-emulator` state blob taken apart, layer by layer (swtpm-libtpms-peers.md §3.1):
/// QEMU's record (flags, size), swtpm's header and TLVs, the migration-key layer, the inner
/// TLVs, and the plain libtpms blob's headers.
public struct BlobAnalysis: Sendable, Equatable {
    /// permanent, volatile or savestate.
    public var type: TPMStateBlobType
    /// QEMU's `state_blobs.*_flags` (what swtpm returned: 0, or 2 = still `--key` encrypted).
    public var recordFlags: UInt32
    /// `state_blobs.*.size`.
    public var size: Int
    /// Stream offset of the blob's first byte (`state_blobs.*.buffer`).
    public var streamOffset: Int
    /// swtpm's header, when the blob has one.
    public var header: SwtpmBlobHeader?
    /// The outer TLVs.
    public var tlvs: [BlobTLVInfo] = []
    /// The TLVs inside MIGRATION_DATA (or inside the decrypted ENCRYPTED_MIGRATION_DATA).
    public var innerTLVs: [BlobTLVInfo]?
    /// Why the swtpm container is unusable, with the field and its offset within the blob, and
    /// the TPM result swtpm's SET_STATEBLOB would give.
    public var containerProblem: (field: String, offset: Int, message: String, tpmResult: UInt32)?
    /// The migration-key layer.
    public var decryption: BlobDecryption = .notEncrypted
    /// The inner data is still encrypted with swtpm's state key (`--key`): header flag 0x01,
    /// TLV ENCRYPTED_DATA, or QEMU's record flag 2.
    public var stateKeyEncrypted = false
    /// The plain libtpms blob, when it could be reached.
    public var plain: [UInt8]?
    /// Its headers.
    public var libtpms: LibtpmsStateInfo?

    /// Equal layers (the container problem compared by field).
    public static func == (a: BlobAnalysis, b: BlobAnalysis) -> Bool {
        a.type == b.type && a.recordFlags == b.recordFlags && a.size == b.size && a.streamOffset == b.streamOffset
            && a.header == b.header && a.tlvs == b.tlvs && a.innerTLVs == b.innerTLVs
            && a.containerProblem?.field == b.containerProblem?.field && a.decryption == b.decryption
            && a.stateKeyEncrypted == b.stateKeyEncrypted && a.plain == b.plain && a.libtpms == b.libtpms
    }

    /// Takes a blob apart with swtpm's reader checks (`SWTPM_NVRAM_CheckHeader`,
    /// `SWTPM_NVRAM_GetPlainData`, `SWTPM_NVRAM_DecryptData`), decrypting with `key` when the
    /// blob is migration-key encrypted. Never throws: what cannot be read is recorded.
    public static func analyze(_ type: TPMStateBlobType, _ blob: TPMStateBlob, streamOffset: Int,
                               key: MigrationKey?) -> BlobAnalysis {
        let d = blob.data
        var a = BlobAnalysis(type: type, recordFlags: blob.flags, size: d.count, streamOffset: streamOffset)
        a.stateKeyEncrypted = blob.flags & 2 != 0
        guard !d.isEmpty else { return a }
        var r = ByteReader(d)
        do throws(WireError) {
            let h = SwtpmBlobHeader(version: try r.readUInt8("version"), minVersion: try r.readUInt8("min_version"),
                                    headerSize: try r.readBigEndianUInt16("hdrsize"),
                                    flags: SwtpmBlob.Flags(rawValue: try r.readBigEndianUInt16("flags")),
                                    totalLength: try r.readBigEndianUInt32("totlen"))
            a.header = h
        } catch {
            a.containerProblem = ("header", 0, "\(d.count) bytes: shorter than swtpm's 10-byte blob header", 0x03)
            return a
        }
        guard let h = a.header else { return a }
        if Int(h.totalLength) != d.count {
            a.containerProblem = ("totlen", 6, "the header says \(h.totalLength) bytes, the blob has \(d.count)", 0x03)
            return a
        }
        if h.minVersion > SwtpmBlob.headerVersion {
            a.containerProblem = ("min_version", 1, "header min_version \(h.minVersion): written by a newer swtpm than this tool knows", 0x2E)
            return a
        }
        if Int(h.headerSize) != SwtpmBlob.headerSize {
            a.containerProblem = ("hdrsize", 2, "hdrsize \(h.headerSize), not 10", 0x2B)
            return a
        }
        if h.flags.contains(.encrypted) { a.stateKeyEncrypted = true }
        var values: [UInt16: [UInt8]] = [:]
        do throws(WireError) {
            (a.tlvs, values) = try tlvs(r.readRemaining(), baseOffset: SwtpmBlob.headerSize)
        } catch {
            a.containerProblem = ("tlv", error.offset, "malformed TLV: \(error.detail.isEmpty ? error.field : error.detail)", 0x03)
            return a
        }
        var inner: [UInt8]?
        let bits = h.flags.contains(.migration256BitKey) ? 256 : 128
        if let ct = values[SwtpmBlob.Tag.encryptedMigrationData.rawValue] {
            guard let key else {
                a.decryption = .noKey(bits: bits)
                return a
            }
            guard key.mode.bits == bits else {
                a.decryption = .keySizeMismatch(blobBits: bits, keyBits: key.mode.bits)
                return a
            }
            guard let hmac = values[SwtpmBlob.Tag.hmac.rawValue], let iv = values[SwtpmBlob.Tag.ivecEncryptedMigrationData.rawValue] else {
                a.decryption = .malformed("ENCRYPTED_MIGRATION_DATA without HMAC or IVEC_ENCRYPTED_MIGRATION_DATA")
                return a
            }
            do throws(KeyError) {
                inner = try key.decrypt(ciphertext: ct, iv: iv, hmac: hmac)
                a.decryption = .decrypted(bits: bits)
            } catch {
                a.decryption = error.code == .hmacMismatch ? .hmacMismatch(bits: bits) : .malformed(error.message)
                return a
            }
        } else if let m = values[SwtpmBlob.Tag.migrationData.rawValue] {
            inner = m
        } else {
            // The on-disk form (TLV DATA, or the --key triple) straight in the container.
            inner = nil
            if let p = values[SwtpmBlob.Tag.data.rawValue] { a.plain = p }
            if values[SwtpmBlob.Tag.encryptedData.rawValue] != nil { a.stateKeyEncrypted = true }
        }
        if let inner {
            do throws(WireError) {
                let (list, v) = try tlvs(inner, baseOffset: nil)
                a.innerTLVs = list
                if let p = v[SwtpmBlob.Tag.data.rawValue] { a.plain = p }
                if v[SwtpmBlob.Tag.encryptedData.rawValue] != nil { a.stateKeyEncrypted = true }
            } catch {
                a.containerProblem = ("migration_data", error.offset, "malformed inner TLV: \(error.field)", 0x03)
                return a
            }
        }
        if a.plain == nil && !a.stateKeyEncrypted && a.containerProblem == nil {
            a.containerProblem = ("tlv", SwtpmBlob.headerSize, "no DATA TLV holding libtpms state", 0x03)
        }
        if let p = a.plain { a.libtpms = LibtpmsStateInfo.parse(p) }
        return a
    }

    /// Lists TLVs and keeps the first value of each tag (swtpm searches by tag).
    static func tlvs(_ bytes: [UInt8], baseOffset: Int?) throws(WireError) -> ([BlobTLVInfo], [UInt16: [UInt8]]) {
        var r = ByteReader(bytes, baseOffset: baseOffset ?? 0)
        var list: [BlobTLVInfo] = []
        var values: [UInt16: [UInt8]] = [:]
        while !r.isAtEnd {
            let at = r.offset
            let tag = try r.readBigEndianUInt16("tlv.tag")
            let len = try r.readBigEndianUInt32("tlv.length")
            let value = try r.readBytes(Int(len), "tlv(\(tag)).value", limit: SwtpmBlob.maximumSize)
            list.append(BlobTLVInfo(tag: tag, length: value.count, offset: baseOffset == nil ? nil : at))
            if values[tag] == nil { values[tag] = value }
        }
        return (list, values)
    }
}
