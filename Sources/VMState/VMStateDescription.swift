/// A device's migration schema, mirroring QEMU's `VMStateDescription` (include/migration/vmstate.h):
/// a name, a version, the oldest version it can load, the fields in **wire order** and the
/// subsections. No versioning scheme of our own: loading applies exactly the checks of
/// `vmstate_load_state` (migration/vmstate.c).
public struct VMStateDescription: Sendable, Equatable {
    /// `name`: also the vmdesc `vmsd_name`, and the prefix of every subsection name.
    public var name: String
    /// `version_id`: a stream version above it is refused.
    public var versionID: UInt32
    /// `minimum_version_id`: a stream version below it is refused (0 when QEMU leaves it unset).
    public var minimumVersionID: UInt32
    /// `fields`, in the order they are on the wire.
    public var fields: [VMStateField]
    /// `subsections`: each loaded when the stream carries it (0x05 + name + be32 version).
    public var subsections: [VMStateDescription]

    /// A description; `minimumVersionID` 0 as when QEMU leaves it unset.
    public init(name: String, versionID: UInt32, minimumVersionID: UInt32 = 0,
                fields: [VMStateField], subsections: [VMStateDescription] = []) {
        self.name = name
        self.versionID = versionID
        self.minimumVersionID = minimumVersionID
        self.fields = fields
        self.subsections = subsections
    }

    /// The field named `name`, if any.
    public func field(_ name: String) -> VMStateField? { fields.first { $0.name == name } }
}

/// One `VMStateField`: a name (the C member expression QEMU prints in vmdesc), how it is
/// encoded, and the first stream version that carries it (`version_id`).
public struct VMStateField: Sendable, Equatable {
    /// The C member expression (`state.rw_offset`).
    public var name: String
    /// How it is encoded.
    public var kind: VMStateFieldKind
    /// The field is on the wire only when the stream version is at least this
    /// (`field->version_id <= version_id` in `vmstate_load_state`).
    public var versionID: UInt32

    /// A field present from stream version `versionID` on.
    public init(_ name: String, _ kind: VMStateFieldKind, versionID: UInt32 = 0) {
        self.name = name
        self.kind = kind
        self.versionID = versionID
    }
}

/// How a field is encoded (the `VMStateInfo` plus the `VMS_*` flags of QEMU's field macros).
/// Integers are big-endian except `int32LittleEndian`.
public indirect enum VMStateFieldKind: Sendable, Equatable {
    /// `VMSTATE_UINT8` … `VMSTATE_UINT64`.
    case uint8, uint16, uint32, uint64
    /// `VMSTATE_INT8` … `VMSTATE_INT64`.
    case int8, int16, int32, int64
    /// `VMSTATE_BOOL`: one byte.
    case bool
    /// `vmstate_info_int32_le` ("int32 le").
    case int32LittleEndian
    /// `VMSTATE_BUFFER`: `size` raw bytes, no length prefix.
    case buffer(size: Int)
    /// `VMSTATE_VBUFFER_ALLOC_UINT32`: raw bytes whose length is the value of the **earlier**
    /// field `sizeField`; a length above `limit` is refused before allocation.
    case vbuffer(sizeField: String, limit: Int)
    /// `VMSTATE_STRUCT`: the nested description's fields (and subsections) in place, loaded with
    /// `structVersion` (`struct_version_id`), which the nested description checks.
    case structure(VMStateDescription, structVersion: UInt32)
    /// A fixed-count array (`VMSTATE_*_ARRAY`, `VMSTATE_STRUCT_ARRAY`): `count` consecutive
    /// elements, no count on the wire.
    case array(count: Int, of: VMStateFieldKind)
    /// A variable array (`VMSTATE_VARRAY_UINT32_ALLOC`): the count is the value of the earlier
    /// field `countField`, at most `limit`.
    case varray(countField: String, limit: Int, of: VMStateFieldKind)
    /// `vmstate_info_capability`: u8 length + name, as in `configuration/capabilities`.
    case capability
    /// Any other `VMStateInfo` (`timer`, `pci config`, `uint8 equal`, `unused_buffer`, ...):
    /// `size` bytes kept raw, as analyze-migration.py reads them from a vmdesc.
    case opaque(type: String, size: Int)

    /// The `VMStateInfo` name QEMU prints as the vmdesc `"type"`.
    public var typeName: String {
        switch self {
        case .uint8: "uint8"
        case .uint16: "uint16"
        case .uint32: "uint32"
        case .uint64: "uint64"
        case .int8: "int8"
        case .int16: "int16"
        case .int32: "int32"
        case .int64: "int64"
        case .bool: "bool"
        case .int32LittleEndian: "int32 le"
        case .buffer, .vbuffer: "buffer"
        case .structure: "struct"
        case .array(_, let k), .varray(_, _, let k): k.typeName
        case .capability: "capability"
        case .opaque(let t, _): t
        }
    }
}

extension VMStateDescription {
    /// `vmsd_can_compress` (migration/vmstate.c): an array is described once with `array_len`
    /// unless its element is a structure with subsections (or whose own fields cannot compress).
    func canCompress(_ kind: VMStateFieldKind) -> Bool {
        switch kind {
        case .structure(let d, _):
            d.subsections.isEmpty && d.fields.allSatisfy { d.canCompress($0.kind) }
        case .array(_, let k), .varray(_, _, let k):
            canCompress(k)
        default:
            true
        }
    }

    /// `vmfield_name_is_unique` / `vmfield_name_num`: the vmdesc name of field `index`, with a
    /// `[k]` suffix when several fields share the C name.
    func vmdescName(ofFieldAt index: Int) -> String {
        let name = fields[index].name
        let same = fields.indices.filter { fields[$0].name == name }
        guard same.count > 1, let k = same.firstIndex(of: index) else { return name }
        return "\(name)[\(k)]"
    }
}
