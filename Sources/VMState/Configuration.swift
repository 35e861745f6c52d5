/// The CONFIGURATION record (type 0x07) that follows the file header: QEMU's
/// `vmstate_configuration` (migration/savevm.c), loaded by `qemu_loadvm_state_header` at
/// version 0, with no section header and no footer.
public struct MigrationConfiguration: Sendable, Equatable {
    /// The machine type name (`pc-i440fx-7.2`); no NUL on the wire.
    public var machineType: String
    /// `configuration/target-page-bits`, sent only when the target's page bits exceed its legacy
    /// minimum (never on x86).
    public var targetPageBits: UInt32?
    /// `configuration/capabilities`: the validated migration capabilities that were on
    /// (7.2: only `x-ignore-shared` is validated).
    public var capabilities: [String]?
    /// `configuration/uuid`: 16 bytes, with `-uuid` and `validate-uuid`.
    public var uuid: [UInt8]?
    /// Stream offset of the 0x07 byte.
    public var offset: Int

    /// Builds a configuration; only `machineType` is needed for a QEMU 7.2 x86 stream.
    public init(machineType: String, targetPageBits: UInt32? = nil, capabilities: [String]? = nil,
                uuid: [UInt8]? = nil, offset: Int = -1) {
        self.machineType = machineType
        self.targetPageBits = targetPageBits
        self.capabilities = capabilities
        self.uuid = uuid
        self.offset = offset
    }

    /// `vmstate_target_page_bits`.
    public static let targetPageBitsDescription = VMStateDescription(
        name: "configuration/target-page-bits", versionID: 1, minimumVersionID: 1,
        fields: [VMStateField("target_page_bits", .uint32)])

    /// `vmstate_capabilites` (sic).
    public static let capabilitiesDescription = VMStateDescription(
        name: "configuration/capabilities", versionID: 1, minimumVersionID: 1,
        fields: [
            VMStateField("caps_count", .uint32, versionID: 1),
            VMStateField("capabilities", .varray(countField: "caps_count", limit: 256, of: .capability), versionID: 1),
        ])

    /// `vmstate_uuid`.
    public static let uuidDescription = VMStateDescription(
        name: "configuration/uuid", versionID: 1, minimumVersionID: 1,
        fields: [VMStateField("uuid.data", .array(count: 16, of: .uint8), versionID: 1)])

    /// `vmstate_configuration`: be32 `len`, then `len` bytes of name.
    public static let description = VMStateDescription(
        name: "configuration", versionID: 1,
        fields: [
            VMStateField("len", .uint32),
            VMStateField("name", .vbuffer(sizeField: "len", limit: MigrationFormat.maximumMachineNameLength)),
        ],
        subsections: [targetPageBitsDescription, capabilitiesDescription, uuidDescription])

    /// The value tree QEMU saves for this configuration.
    public var object: VMStateObject {
        let name = Array(machineType.utf8)
        var o = VMStateObject(name: Self.description.name, versionID: 0, fields: [
            VMStateFieldValue(name: "len", value: .unsigned(UInt64(name.count))),
            VMStateFieldValue(name: "name", value: .bytes(name)),
        ])
        if let targetPageBits {
            o.subsections.append(VMStateObject(name: Self.targetPageBitsDescription.name, versionID: 1, fields: [
                VMStateFieldValue(name: "target_page_bits", value: .unsigned(UInt64(targetPageBits))),
            ]))
        }
        if let capabilities, !capabilities.isEmpty {
            o.subsections.append(VMStateObject(name: Self.capabilitiesDescription.name, versionID: 1, fields: [
                VMStateFieldValue(name: "caps_count", value: .unsigned(UInt64(capabilities.count))),
                VMStateFieldValue(name: "capabilities", value: .array(capabilities.map { .string($0) })),
            ]))
        }
        if let uuid {
            o.subsections.append(VMStateObject(name: Self.uuidDescription.name, versionID: 1, fields: [
                VMStateFieldValue(name: "uuid.data", value: .bytes(uuid)),
            ]))
        }
        return o
    }

    /// Builds the configuration from its decoded tree.
    init(_ o: VMStateObject, offset: Int) {
        self.offset = offset
        machineType = String(decoding: o["name"]?.value.bytesValue ?? [], as: UTF8.self)
        if let s = o.subsection(Self.targetPageBitsDescription.name), let v = s["target_page_bits"]?.value.unsignedValue {
            targetPageBits = UInt32(truncatingIfNeeded: v)
        }
        if let s = o.subsection(Self.capabilitiesDescription.name), let items = s["capabilities"]?.value.arrayValue {
            capabilities = items.compactMap { if case .string(let c) = $0 { c } else { nil } }
        }
        if let s = o.subsection(Self.uuidDescription.name) {
            uuid = s["uuid.data"]?.value.bytesValue
        }
    }

    /// The target page size this configuration implies, if it says.
    public var pageSize: Int? {
        guard let bits = targetPageBits, (9...16).contains(bits) else { return nil }
        return 1 << Int(bits)
    }
}
