/// Why a read from wire bytes failed.
///
/// Every length that comes from outside (a ctrl reply, a migration stream, a TPM header) is
/// checked against what remains and against a named maximum before anything is allocated; the
/// error says which field and where.
public struct WireError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Equatable {
        /// Fewer bytes remain than the field needs.
        case truncated
        /// A length field exceeds the limit the caller named.
        case lengthOverLimit
        /// A value is outside the set the format allows.
        case invalidValue
    }

    public var code: Code
    /// The field being read, as the format names it (`state.rw_offset`, `CMD_GET_STATEBLOB.length`).
    public var field: String
    /// Offset of the field from the start of the reader's bytes (plus the reader's base offset).
    public var offset: Int
    public var detail: String

    public init(_ code: Code, field: String, offset: Int, detail: String = "") {
        self.code = code
        self.field = field
        self.offset = offset
        self.detail = detail
    }

    public var description: String {
        "\(code.rawValue) at offset \(offset) reading \(field)" + (detail.isEmpty ? "" : ": \(detail)")
    }
}

/// A bounds-checked cursor over bytes; every multi-byte read names its endianness.
///
/// There is no public absolute-index read: the cursor only moves forward, so a field can never be
/// read from a place the format does not put it.
public struct ByteReader: Sendable {
    @usableFromInline let bytes: [UInt8]
    @usableFromInline var position: Int
    @usableFromInline let end: Int
    /// Added to every offset reported in errors, so a reader over a slice of a stream reports
    /// stream offsets.
    public let baseOffset: Int

    public init(_ bytes: [UInt8], baseOffset: Int = 0) {
        self.bytes = bytes
        self.position = 0
        self.end = bytes.count
        self.baseOffset = baseOffset
    }

    public init<S: Sequence>(bytes: S, baseOffset: Int = 0) where S.Element == UInt8 {
        self.init(Array(bytes), baseOffset: baseOffset)
    }

    /// Bytes not yet read.
    @inlinable public var remaining: Int { end - position }
    /// Offset of the next byte, including the base offset.
    @inlinable public var offset: Int { baseOffset + position }
    @inlinable public var isAtEnd: Bool { position >= end }

    @inlinable
    mutating func take(_ count: Int, _ field: String) throws(WireError) -> Range<Int> {
        guard count >= 0, count <= remaining else {
            throw WireError(.truncated, field: field, offset: offset,
                            detail: "needs \(count) bytes, \(remaining) remain")
        }
        let r = position..<(position + count)
        position += count
        return r
    }

    @inlinable
    public mutating func readUInt8(_ field: String = "u8") throws(WireError) -> UInt8 {
        let r = try take(1, field)
        return bytes[r.lowerBound]
    }

    @inlinable
    public mutating func readBigEndianUInt16(_ field: String = "be16") throws(WireError) -> UInt16 {
        let r = try take(2, field)
        return UInt16(bytes[r.lowerBound]) << 8 | UInt16(bytes[r.lowerBound + 1])
    }

    @inlinable
    public mutating func readBigEndianUInt32(_ field: String = "be32") throws(WireError) -> UInt32 {
        let r = try take(4, field)
        var v: UInt32 = 0
        for i in r { v = v << 8 | UInt32(bytes[i]) }
        return v
    }

    @inlinable
    public mutating func readBigEndianUInt64(_ field: String = "be64") throws(WireError) -> UInt64 {
        let r = try take(8, field)
        var v: UInt64 = 0
        for i in r { v = v << 8 | UInt64(bytes[i]) }
        return v
    }

    @inlinable
    public mutating func readLittleEndianUInt32(_ field: String = "le32") throws(WireError) -> UInt32 {
        let r = try take(4, field)
        var v: UInt32 = 0
        for i in r.reversed() { v = v << 8 | UInt32(bytes[i]) }
        return v
    }

    /// Reads `count` raw bytes. `limit` is the largest count the format allows for this field;
    /// a larger count is refused before anything is allocated.
    @inlinable
    public mutating func readBytes(_ count: Int, _ field: String = "bytes", limit: Int = .max) throws(WireError) -> [UInt8] {
        guard count <= limit else {
            throw WireError(.lengthOverLimit, field: field, offset: offset,
                            detail: "length \(count) exceeds the limit \(limit)")
        }
        let r = try take(count, field)
        return Array(bytes[r])
    }

    /// Reads a length-prefixed string (u8 length), as QEMU writes idstr and subsection names.
    public mutating func readUInt8PrefixedString(_ field: String = "string") throws(WireError) -> String {
        let n = try readUInt8(field + ".len")
        let b = try readBytes(Int(n), field)
        return String(decoding: b, as: UTF8.self)
    }

    /// Skips `count` bytes.
    @inlinable
    public mutating func skip(_ count: Int, _ field: String = "skip") throws(WireError) {
        _ = try take(count, field)
    }

    /// The next byte without consuming it, or nil at the end.
    @inlinable
    public func peekUInt8() -> UInt8? {
        position < end ? bytes[position] : nil
    }

    /// All bytes not yet read, consuming them.
    public mutating func readRemaining() -> [UInt8] {
        let r = position..<end
        position = end
        return Array(bytes[r])
    }
}
