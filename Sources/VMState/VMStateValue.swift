/// A decoded field value: the generic tree produced by loading a `VMStateDescription`, for
/// inspection, for re-encoding, and for producing the vmdesc JSON.
public indirect enum VMStateValue: Sendable, Equatable {
    /// uint8…uint64 and bool (the raw byte, so re-encoding is exact).
    case unsigned(UInt64)
    /// int8…int64 and int32 le.
    case signed(Int64)
    /// buffer, vbuffer, opaque types, and arrays of uint8.
    case bytes([UInt8])
    /// A nested structure.
    case structure(VMStateObject)
    /// Array elements in wire order.
    case array([VMStateValue])
    /// A capability name.
    case string(String)
    /// A field larger than the retention limit: skipped on the wire, not kept.
    case skipped(byteCount: Int)

    /// The value of an unsigned field.
    public var unsignedValue: UInt64? { if case .unsigned(let v) = self { v } else { nil } }
    /// The bytes of a buffer field.
    public var bytesValue: [UInt8]? { if case .bytes(let b) = self { b } else { nil } }
    /// The tree of a structure field.
    public var objectValue: VMStateObject? { if case .structure(let o) = self { o } else { nil } }
    /// The elements of an array field.
    public var arrayValue: [VMStateValue]? { if case .array(let a) = self { a } else { nil } }
}

/// A decoded field: name, value, and where it sat in the stream.
public struct VMStateFieldValue: Sendable, Equatable {
    /// The C member expression, as in the description (`state.rw_offset`).
    public var name: String
    /// The decoded value.
    public var value: VMStateValue
    /// Absolute stream offset of the field's first byte; -1 for a value built in memory.
    public var offset: Int

    /// A field value; `offset` -1 when built in memory.
    public init(name: String, value: VMStateValue, offset: Int = -1) {
        self.name = name
        self.value = value
        self.offset = offset
    }
}

/// The decoded content of one vmstate (a section body, a nested structure or a subsection).
public struct VMStateObject: Sendable, Equatable {
    /// The description's name (`tpm-tis`, `tpm-tis/locty`, `configuration/capabilities`).
    public var name: String
    /// The version it was loaded at (or is to be saved at).
    public var versionID: UInt32
    /// The fields present at that version, in wire order.
    public var fields: [VMStateFieldValue]
    /// The subsections present, in wire order.
    public var subsections: [VMStateObject]

    /// A tree to save, or as loaded.
    public init(name: String, versionID: UInt32, fields: [VMStateFieldValue], subsections: [VMStateObject] = []) {
        self.name = name
        self.versionID = versionID
        self.fields = fields
        self.subsections = subsections
    }

    /// The first field named `name`.
    public subscript(name: String) -> VMStateFieldValue? { fields.first { $0.name == name } }

    /// The subsection named `name`.
    public func subsection(_ name: String) -> VMStateObject? { subsections.first { $0.name == name } }
}
