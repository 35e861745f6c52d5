/// An append-only byte writer; every multi-byte write names its endianness.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public var count: Int { bytes.count }

    public mutating func writeUInt8(_ v: UInt8) { bytes.append(v) }

    public mutating func writeBigEndianUInt16(_ v: UInt16) {
        bytes.append(UInt8(truncatingIfNeeded: v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v))
    }

    public mutating func writeBigEndianUInt32(_ v: UInt32) {
        bytes.append(UInt8(truncatingIfNeeded: v >> 24))
        bytes.append(UInt8(truncatingIfNeeded: v >> 16))
        bytes.append(UInt8(truncatingIfNeeded: v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v))
    }

    public mutating func writeBigEndianUInt64(_ v: UInt64) {
        writeBigEndianUInt32(UInt32(truncatingIfNeeded: v >> 32))
        writeBigEndianUInt32(UInt32(truncatingIfNeeded: v))
    }

    public mutating func writeLittleEndianUInt32(_ v: UInt32) {
        bytes.append(UInt8(truncatingIfNeeded: v))
        bytes.append(UInt8(truncatingIfNeeded: v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v >> 16))
        bytes.append(UInt8(truncatingIfNeeded: v >> 24))
    }

    public mutating func writeBytes<C: Collection>(_ b: C) where C.Element == UInt8 {
        bytes.append(contentsOf: b)
    }

    /// Writes a u8-length-prefixed string (QEMU's idstr encoding). Names longer than 255 bytes
    /// cannot be encoded; they are truncated to 255 bytes, which QEMU also cannot produce.
    public mutating func writeUInt8PrefixedString(_ s: String) {
        let u = Array(s.utf8.prefix(255))
        writeUInt8(UInt8(u.count))
        writeBytes(u)
    }

    /// Reserves a big-endian u32 length to be filled in later by `patchBigEndianUInt32(at:)`.
    public mutating func reserveBigEndianUInt32() -> Int {
        let at = bytes.count
        writeBigEndianUInt32(0)
        return at
    }

    /// Back-patches a big-endian u32 previously reserved with `reserveBigEndianUInt32()`.
    public mutating func patchBigEndianUInt32(at position: Int, _ v: UInt32) {
        precondition(position >= 0 && position + 4 <= bytes.count, "patch outside written bytes")
        bytes[position] = UInt8(truncatingIfNeeded: v >> 24)
        bytes[position + 1] = UInt8(truncatingIfNeeded: v >> 16)
        bytes[position + 2] = UInt8(truncatingIfNeeded: v >> 8)
        bytes[position + 3] = UInt8(truncatingIfNeeded: v)
    }
}

extension Array where Element == UInt8 {
    /// Lowercase hex, no separators.
    public var hexString: String {
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(count * 2)
        for b in self {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Parses hex digits (whitespace ignored); nil if a non-hex character or an odd count.
    public init?(hexString: String) {
        var out = [UInt8]()
        var hi: UInt8? = nil
        for c in hexString.utf8 {
            let v: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): v = c - UInt8(ascii: "A") + 10
            case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\t"): continue
            default: return nil
            }
            if let h = hi { out.append(h << 4 | v); hi = nil } else { hi = v }
        }
        guard hi == nil else { return nil }
        self = out
    }
}
