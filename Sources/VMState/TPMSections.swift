import EmulatorBackend
import TIS

/// The `tpm-tis` section: QEMU's `vmstate_tpm_tis_isa` (hw/tpm/tpm_tis_isa.c; the sysbus
/// `tpm-tis-device` uses the same name and fields), version 0, unchanged since QEMU 3.0.
/// Its body is 4206 bytes: buffer, rw_offset, three locality bytes, five 21-byte localities.
public enum TISSection {
    /// The section idstr (no qdev path: the ISA bus gives none).
    public static let idstr = "tpm-tis"
    /// Body size between the section header and the footer.
    public static let payloadSize = 4206

    /// `vmstate_locty`: note the wire order (state, inte, ints, access, sts, iface_id) differs
    /// from the C struct order.
    public static let localityDescription = VMStateDescription(name: "tpm-tis/locty", versionID: 0, fields: [
        VMStateField("state", .uint32),
        VMStateField("inte", .uint32),
        VMStateField("ints", .uint32),
        VMStateField("access", .uint8),
        VMStateField("sts", .uint32),
        VMStateField("iface_id", .uint32),
    ])

    /// `vmstate_tpm_tis_isa`.
    public static let description = VMStateDescription(name: "tpm-tis", versionID: 0, fields: [
        VMStateField("state.buffer", .buffer(size: TISGeometry.bufferSize)),
        VMStateField("state.rw_offset", .uint16),
        VMStateField("state.active_locty", .uint8),
        VMStateField("state.aborting_locty", .uint8),
        VMStateField("state.next_locty", .uint8),
        VMStateField("state.loc", .array(count: TISGeometry.localityCount,
                                         of: .structure(localityDescription, structVersion: 0))),
    ])

    /// The value tree of a state (what `vmstate_save_state` walks).
    public static func object(_ s: TISState) -> VMStateObject {
        let locs: [VMStateValue] = s.localities.map { l in
            .structure(VMStateObject(name: localityDescription.name, versionID: 0, fields: [
                VMStateFieldValue(name: "state", value: .unsigned(UInt64(l.state.rawValue))),
                VMStateFieldValue(name: "inte", value: .unsigned(UInt64(l.inte))),
                VMStateFieldValue(name: "ints", value: .unsigned(UInt64(l.ints))),
                VMStateFieldValue(name: "access", value: .unsigned(UInt64(l.access))),
                VMStateFieldValue(name: "sts", value: .unsigned(UInt64(l.sts))),
                VMStateFieldValue(name: "iface_id", value: .unsigned(UInt64(l.ifaceID))),
            ]))
        }
        return VMStateObject(name: description.name, versionID: 0, fields: [
            VMStateFieldValue(name: "state.buffer", value: .bytes(s.buffer)),
            VMStateFieldValue(name: "state.rw_offset", value: .unsigned(UInt64(s.rwOffset))),
            VMStateFieldValue(name: "state.active_locty", value: .unsigned(UInt64(s.activeLocality))),
            VMStateFieldValue(name: "state.aborting_locty", value: .unsigned(UInt64(s.abortingLocality))),
            VMStateFieldValue(name: "state.next_locty", value: .unsigned(UInt64(s.nextLocality))),
            VMStateFieldValue(name: "state.loc", value: .array(locs)),
        ])
    }

    /// The section body for a state. The state is validated first (`TISState.validate`): a
    /// stream QEMU would load into out-of-range indices is never written.
    public static func encode(_ s: TISState, baseOffset: Int = 0) throws(StreamError) -> [UInt8] {
        do {
            try s.validate()
        } catch {
            throw StreamError(.invalidField, section: idstr, field: error.field, offset: baseOffset, detail: error.message)
        }
        return try description.encode(object(s), baseOffset: baseOffset, section: idstr)
    }

    /// Decodes and validates a section body that starts at stream offset `baseOffset`.
    public static func decode(_ bytes: [UInt8], version: UInt32 = 0, baseOffset: Int = 0) throws(StreamError) -> TISState {
        try state(from: description.decode(bytes, version: version, baseOffset: baseOffset, section: idstr))
    }

    /// Maps a decoded `tpm-tis` tree to a `TISState`, refusing what QEMU would trust blindly: an
    /// unknown locality state, then everything `TISState.validate` checks (rw_offset past the
    /// buffer, locality bytes other than 0...4 or 0xFF, ...). Errors name the field and its
    /// stream offset.
    public static func state(from o: VMStateObject) throws(StreamError) -> TISState {
        let offsets = o.offsets()
        let first = o.fields.first?.offset ?? -1
        func fail(_ field: String, _ detail: String) -> StreamError {
            StreamError(.invalidField, section: idstr, field: field, offset: offsets[field] ?? first, detail: detail)
        }
        func value(_ obj: VMStateObject, _ name: String, _ path: String, max: UInt64) throws(StreamError) -> UInt64 {
            guard let v = obj[name]?.value.unsignedValue, v <= max else { throw fail(path, "missing or out of range") }
            return v
        }
        guard let buffer = o["state.buffer"]?.value.bytesValue else { throw fail("state.buffer", "missing") }
        guard let locs = o["state.loc"]?.value.arrayValue else { throw fail("state.loc", "missing") }
        var localities: [TISLocality] = []
        for (i, item) in locs.enumerated() {
            let p = "state.loc[\(i)]"
            guard let l = item.objectValue else { throw fail(p, "not a structure") }
            let raw = try value(l, "state", "\(p).state", max: UInt64(UInt32.max))
            guard let st = TISLocalityState(rawValue: UInt32(raw)) else {
                throw fail("\(p).state", "unknown TPM TIS state \(raw) (valid: 0...4)")
            }
            localities.append(TISLocality(
                state: st,
                inte: UInt32(try value(l, "inte", "\(p).inte", max: UInt64(UInt32.max))),
                ints: UInt32(try value(l, "ints", "\(p).ints", max: UInt64(UInt32.max))),
                access: UInt8(try value(l, "access", "\(p).access", max: 0xFF)),
                sts: UInt32(try value(l, "sts", "\(p).sts", max: UInt64(UInt32.max))),
                ifaceID: UInt32(try value(l, "iface_id", "\(p).iface_id", max: UInt64(UInt32.max)))))
        }
        let s = TISState(buffer: buffer,
                         rwOffset: UInt16(try value(o, "state.rw_offset", "state.rw_offset", max: 0xFFFF)),
                         activeLocality: UInt8(try value(o, "state.active_locty", "state.active_locty", max: 0xFF)),
                         abortingLocality: UInt8(try value(o, "state.aborting_locty", "state.aborting_locty", max: 0xFF)),
                         nextLocality: UInt8(try value(o, "state.next_locty", "state.next_locty", max: 0xFF)),
                         localities: localities)
        do {
            try s.validate()
        } catch {
            throw fail(error.field, error.message)
        }
        return s
    }
}

/// The `tpm-emulator` section: QEMU's `vmstate_tpm_emulator` (backends/tpm/tpm_emulator.c),
/// version 0: for each of permanent, volatile ("volatil"), savestate: be32 flags, be32 size,
/// `size` raw bytes. Sizes are checked against `SwtpmBlob.maximumSize` before allocation.
public enum EmulatorSection {
    /// The section idstr (the backend object has no qdev path).
    public static let idstr = "tpm-emulator"
    /// The largest blob accepted (swtpm refuses SET_STATEBLOB above it).
    public static let maximumBlobSize = SwtpmBlob.maximumSize

    private static let names: [(TPMStateBlobType, String)] = [
        (.permanent, "permanent"), (.volatile, "volatil"), (.savestate, "savestate"),
    ]

    /// `vmstate_tpm_emulator`.
    public static let description = VMStateDescription(name: "tpm-emulator", versionID: 0, fields: names.flatMap { _, n in
        [
            VMStateField("state_blobs.\(n)_flags", .uint32),
            VMStateField("state_blobs.\(n).size", .uint32),
            VMStateField("state_blobs.\(n).buffer", .vbuffer(sizeField: "state_blobs.\(n).size", limit: maximumBlobSize)),
        ]
    })

    /// The value tree of three blobs.
    public static func object(_ b: TPMStateBlobs) -> VMStateObject {
        VMStateObject(name: description.name, versionID: 0, fields: names.flatMap { t, n in
            [
                VMStateFieldValue(name: "state_blobs.\(n)_flags", value: .unsigned(UInt64(b[t].flags))),
                VMStateFieldValue(name: "state_blobs.\(n).size", value: .unsigned(UInt64(b[t].data.count))),
                VMStateFieldValue(name: "state_blobs.\(n).buffer", value: .bytes(b[t].data)),
            ]
        })
    }

    /// The section body for three blobs (each at most `maximumBlobSize`).
    public static func encode(_ b: TPMStateBlobs, baseOffset: Int = 0) throws(StreamError) -> [UInt8] {
        try description.encode(object(b), baseOffset: baseOffset, section: idstr)
    }

    /// Decodes a section body that starts at stream offset `baseOffset`.
    public static func decode(_ bytes: [UInt8], version: UInt32 = 0, baseOffset: Int = 0) throws(StreamError) -> TPMStateBlobs {
        try blobs(from: description.decode(bytes, version: version, baseOffset: baseOffset, section: idstr))
    }

    /// The blobs of a decoded `tpm-emulator` tree.
    public static func blobs(from o: VMStateObject) throws(StreamError) -> TPMStateBlobs {
        var out = TPMStateBlobs()
        for (t, n) in names {
            guard let flags = o["state_blobs.\(n)_flags"]?.value.unsignedValue,
                  let data = o["state_blobs.\(n).buffer"]?.value.bytesValue else {
                throw StreamError(.invalidField, section: idstr, field: "state_blobs.\(n)", offset: o.fields.first?.offset ?? -1,
                                  detail: "missing")
            }
            out[t] = TPMStateBlob(flags: UInt32(truncatingIfNeeded: flags), data: data)
        }
        return out
    }
}

/// The `tpm-crb` section: QEMU's `vmstate_tpm_crb` (hw/tpm/tpm_crb.c), version 0: the 32
/// registers 0x00–0x7C as be32. The command buffer travels as the RAM block `tpm-crb-cmd`.
public enum CRBSection {
    /// The section idstr.
    public static let idstr = "tpm-crb"
    /// `TPM_CRB_R_MAX`.
    public static let registerCount = 32
    /// Body size: 32 × be32.
    public static let payloadSize = 128
    /// The RAM block holding the command/response buffer.
    public static let commandBufferBlock = "tpm-crb-cmd"

    /// `vmstate_tpm_crb`.
    public static let description = VMStateDescription(name: "tpm-crb", versionID: 0, fields: [
        VMStateField("regs", .array(count: registerCount, of: .uint32)),
    ])

    /// The value tree of the register file.
    public static func object(_ regs: [UInt32]) -> VMStateObject {
        VMStateObject(name: description.name, versionID: 0, fields: [
            VMStateFieldValue(name: "regs", value: .array(regs.map { .unsigned(UInt64($0)) })),
        ])
    }

    /// The section body for 32 registers.
    public static func encode(_ regs: [UInt32], baseOffset: Int = 0) throws(StreamError) -> [UInt8] {
        try description.encode(object(regs), baseOffset: baseOffset, section: idstr)
    }

    /// Decodes a section body that starts at stream offset `baseOffset`.
    public static func decode(_ bytes: [UInt8], version: UInt32 = 0, baseOffset: Int = 0) throws(StreamError) -> [UInt32] {
        try registers(from: description.decode(bytes, version: version, baseOffset: baseOffset, section: idstr))
    }

    /// The registers of a decoded `tpm-crb` tree.
    public static func registers(from o: VMStateObject) throws(StreamError) -> [UInt32] {
        guard let items = o["regs"]?.value.arrayValue, items.count == registerCount else {
            throw StreamError(.invalidField, section: idstr, field: "regs", offset: o.fields.first?.offset ?? -1, detail: "missing")
        }
        return items.map { UInt32(truncatingIfNeeded: $0.unsignedValue ?? 0) }
    }
}

/// The PPI RAM block (`tpm-ppi`, hw/tpm/tpm_ppi.c): 0x400 bytes used, page-rounded, migrated in
/// the `ram` section.
public enum PPIBlock {
    /// The RAM block name.
    public static let name = "tpm-ppi"
    /// `TPM_PPI_ADDR_SIZE`.
    public static let usedSize = 0x400
    /// The block length on x86 hosts (page-rounded).
    public static let blockLength = 0x1000
}
