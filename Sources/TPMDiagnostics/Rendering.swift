import EmulatorBackend
import TIS
import VMState
import WireFormat

/// Pretty JSON text of a `JSONValue` (4-space indent, members in order), deterministic.
public enum JSONText {
    /// The text, with a trailing newline.
    public static func pretty(_ v: JSONValue) -> String {
        var out = ""
        write(v, indent: 0, into: &out)
        return out + "\n"
    }

    private static func write(_ v: JSONValue, indent: Int, into out: inout String) {
        let pad = String(repeating: " ", count: indent + 4)
        switch v {
        case .object(let members):
            guard !members.isEmpty else { out += "{}"; return }
            out += "{\n"
            for (i, (k, m)) in members.enumerated() {
                out += pad + JSONString.quote(k) + ": "
                write(m, indent: indent + 4, into: &out)
                out += i + 1 < members.count ? ",\n" : "\n"
            }
            out += String(repeating: " ", count: indent) + "}"
        case .array(let items):
            guard !items.isEmpty else { out += "[]"; return }
            out += "[\n"
            for (i, m) in items.enumerated() {
                out += pad
                write(m, indent: indent + 4, into: &out)
                out += i + 1 < items.count ? ",\n" : "\n"
            }
            out += String(repeating: " ", count: indent) + "]"
        case .string(let s): out += JSONString.quote(s)
        case .integer(let i): out += String(i)
        case .number(let d): out += d.isFinite ? String(d) : "null"
        case .bool(let b): out += b ? "true" : "false"
        case .null: out += "null"
        }
    }

}

/// Field values as analyze-migration.py prints them: integers as `0x` + 2 hex digits per byte,
/// buffers as space-separated hex bytes, structures as objects, arrays as lists.
enum AnalyzeFormat {
    static func hex(_ v: UInt64, bytes: Int) -> String {
        let h = String(v, radix: 16)
        return "0x" + String(repeating: "0", count: max(0, bytes * 2 - h.count)) + h
    }

    static func hexBytes(_ b: [UInt8]) -> String {
        var s = ""
        s.reserveCapacity(b.count * 3)
        for (i, x) in b.enumerated() {
            if i > 0 { s += " " }
            if x < 16 { s += "0" }
            s += String(x, radix: 16)
        }
        return s
    }

    static func object(_ d: VMStateDescription, _ o: VMStateObject) -> JSONValue {
        var members: [(String, JSONValue)] = []
        for f in o.fields {
            let kind = d.field(f.name)?.kind
            members.append((f.name, value(f.value, kind)))
        }
        for sub in o.subsections {
            if let sd = d.subsections.first(where: { $0.name == sub.name }) { members.append((sub.name, object(sd, sub))) }
        }
        return .object(members)
    }

    static func value(_ v: VMStateValue, _ kind: VMStateFieldKind?) -> JSONValue {
        switch v {
        case .unsigned(let u):
            if case .bool = kind { return .bool(u != 0) }
            return .string(hex(u, bytes: width(kind)))
        case .signed(let i):
            let w = width(kind)
            let u = w >= 8 ? UInt64(bitPattern: i) : UInt64(bitPattern: i) & ((1 << UInt64(w * 8)) - 1)
            return .string(i < 0 ? "\(hex(u, bytes: w)) (\(i))" : hex(u, bytes: w))
        case .bytes(let b): return .string(hexBytes(b))
        case .string(let s): return .string(s)
        case .skipped(let n): return .string("(\(n) bytes not kept)")
        case .structure(let o):
            if case .structure(let d, _) = kind { return object(d, o) }
            return object(VMStateDescription(name: o.name, versionID: o.versionID, fields: []), o)
        case .array(let items):
            var element: VMStateFieldKind?
            switch kind {
            case .array(_, let k), .varray(_, _, let k): element = k
            default: element = kind
            }
            let out = items.map { value($0, element) }
            return out.count == 1 ? out[0] : .array(out)
        }
    }

    static func width(_ k: VMStateFieldKind?) -> Int {
        switch k {
        case .uint8, .int8, .bool: 1
        case .uint16, .int16: 2
        case .uint32, .int32, .int32LittleEndian: 4
        case .uint64, .int64: 8
        case .array(_, let e), .varray(_, _, let e): width(e)
        case .opaque(_, let n): n
        default: 4
        }
    }
}

/// `tis-sim inspect`: text for people, JSON with QEMU's names for programs.
public enum InspectRenderer {
    /// Whether `section` passes the `--section` filter (idstr, idstr with its id, or the
    /// `tpm` shorthand for the TPM sections).
    static func selected(_ idstr: String, _ key: String, _ only: String?) -> Bool {
        guard let only else { return true }
        if only == "tpm" { return idstr.hasPrefix("tpm-") }
        return only == idstr || only == key
    }

    /// The JSON document: `stream`, `ram`, `sections` (analyze-migration.py's dump, keyed
    /// `"idstr (section_id)"`, fields named and formatted as it does) and `tpm` (the TPM
    /// sections field by field with QEMU's names, what they mean, and the blobs' layers).
    public static func json(_ s: StreamInspection, only: String? = nil, key: MigrationKey? = nil) -> JSONValue {
        var doc: [(String, JSONValue)] = [("stream", streamJSON(s))]
        if selected("ram", "ram (\(s.ram.sectionID ?? 0))", only) {
            var sizes: [(String, JSONValue)] = []
            for b in s.ram.blocks { sizes.append((b.name, .string(AnalyzeFormat.hex(b.length, bytes: 8)))) }
            doc.append(("ram", .object([
                ("section sizes", .object(sizes)),
                ("total_size", .integer(Int64(clamping: s.ram.totalSize))),
                ("pages", .integer(Int64(s.ram.pages))),
                ("zero_pages", .integer(Int64(s.ram.zeroPages))),
                ("xbzrle_pages", .integer(Int64(s.ram.xbzrlePages))),
                ("compressed_pages", .integer(Int64(s.ram.compressedPages))),
                ("sections", .integer(Int64(s.ram.sections))),
                ("bytes", .integer(Int64(s.ram.bytes))),
            ])))
        }
        var secs: [(String, JSONValue)] = []
        if let id = s.ram.sectionID, selected("ram", "ram (\(id))", only) {
            var sizes: [(String, JSONValue)] = []
            for b in s.ram.blocks { sizes.append((b.name, .string(AnalyzeFormat.hex(b.length, bytes: 8)))) }
            secs.append(("ram (\(id))", .object([("section sizes", .object(sizes))])))
        }
        for sec in s.sections where selected(sec.idstr, sec.key, only) {
            if let (d, o) = sec.decoded {
                secs.append((sec.key, AnalyzeFormat.object(d, o)))
            } else {
                secs.append((sec.key, .object([("undecoded_bytes", .integer(Int64(sec.bodyLength)))])))
            }
        }
        doc.append(("sections", .object(secs)))
        var tpm: [(String, JSONValue)] = []
        if let t = s.tis, selected(TISSection.idstr, "", only) { tpm.append((TISSection.idstr, .array(tisFields(t, s.frontendBodyOffset).map(fieldJSON)))) }
        if let r = s.crbRegisters, selected(CRBSection.idstr, "", only) {
            tpm.append((CRBSection.idstr, .array(r.enumerated().map { i, v in
                fieldJSON(NamedField(name: "regs[\(i)]", offset: s.frontendBodyOffset.map { $0 + 4 * i }, value: AnalyzeFormat.hex(UInt64(v), bytes: 4), meaning: crbRegisterName(i)))
            })))
        }
        if let b = s.emulatorBlobs, selected(EmulatorSection.idstr, "", only) {
            tpm.append((EmulatorSection.idstr, .array(TPMStateBlobType.allCases.map { t in
                blobJSON(BlobAnalysis.analyze(t, b[t], streamOffset: s.blobOffset(t) ?? -1, key: key), s)
            })))
        }
        doc.append(("tpm", .object(tpm)))
        return .object(doc)
    }

    static func streamJSON(_ s: StreamInspection) -> JSONValue {
        var m: [(String, JSONValue)] = [("name", .string(s.name)), ("bytes_read", .integer(Int64(s.bytesRead)))]
        if let l = s.streamLength { m.append(("length", .integer(Int64(l)))) }
        m.append(("complete", .bool(s.error == nil && s.sawEOF)))
        if let c = s.configuration { m.append(("machine_type", .string(c.machineType))) }
        if let v = s.vmDescription { m.append(("page_size", .integer(Int64(v.pageSize)))) }
        m.append(("vmdesc", .bool(s.vmDescription != nil)))
        m.append(("device_sections", .integer(Int64(s.sections.count))))
        if s.droppedRecords > 0 { m.append(("records_not_kept", .integer(Int64(s.droppedRecords)))) }
        if s.droppedDecodedSections > 0 { m.append(("sections_not_decoded_over_limit", .integer(Int64(s.droppedDecodedSections)))) }
        if let e = s.error {
            m.append(("error", .object([("code", .string(e.code.rawValue)), ("section", .string(e.section)),
                                        ("field", .string(e.field)), ("offset", .integer(Int64(e.offset))),
                                        ("detail", .string(e.detail))])))
        }
        return .object(m)
    }

    struct NamedField {
        var name: String
        var offset: Int?
        var value: String
        var meaning: String
    }

    static func fieldJSON(_ f: NamedField) -> JSONValue {
        var m: [(String, JSONValue)] = [("field", .string(f.name))]
        if let o = f.offset { m.append(("offset", .integer(Int64(o)))) }
        m.append(("value", .string(f.value)))
        m.append(("meaning", .string(f.meaning)))
        return .object(m)
    }

    /// The `tpm-tis` fields in wire order with QEMU's names (`state.loc[2].sts`) and offsets.
    static func tisFields(_ t: TISState, _ base: Int?) -> [NamedField] {
        func at(_ d: Int) -> Int? { base.map { $0 + d } }
        func locty(_ v: UInt8) -> String { v == TISGeometry.noLocality ? "none (0xff)" : "locality \(v)" }
        let nonZero = t.buffer.lastIndex { $0 != 0 }.map { $0 + 1 } ?? 0
        var out = [
            NamedField(name: "state.buffer", offset: at(0), value: "\(t.buffer.count) bytes",
                       meaning: "command/response buffer; first bytes " + AnalyzeFormat.hexBytes(Array(t.buffer.prefix(10))) + ", \(nonZero) bytes up to the last non-zero one"),
            NamedField(name: "state.rw_offset", offset: at(4096), value: AnalyzeFormat.hex(UInt64(t.rwOffset), bytes: 2),
                       meaning: "FIFO read/write position in the buffer: \(t.rwOffset)"),
            NamedField(name: "state.active_locty", offset: at(4098), value: AnalyzeFormat.hex(UInt64(t.activeLocality), bytes: 1),
                       meaning: "active locality: " + locty(t.activeLocality)),
            NamedField(name: "state.aborting_locty", offset: at(4099), value: AnalyzeFormat.hex(UInt64(t.abortingLocality), bytes: 1),
                       meaning: "locality being aborted: " + locty(t.abortingLocality)),
            NamedField(name: "state.next_locty", offset: at(4100), value: AnalyzeFormat.hex(UInt64(t.nextLocality), bytes: 1),
                       meaning: "locality to activate after the abort: " + locty(t.nextLocality)),
        ]
        for (i, l) in t.localities.enumerated() {
            let b = 4101 + 21 * i
            let p = "state.loc[\(i)]"
            out += [
                NamedField(name: "\(p).state", offset: at(b), value: AnalyzeFormat.hex(UInt64(l.state.rawValue), bytes: 4),
                           meaning: "locality \(i) state: TPM_TIS_STATE_\(l.state)"),
                NamedField(name: "\(p).inte", offset: at(b + 4), value: AnalyzeFormat.hex(UInt64(l.inte), bytes: 4),
                           meaning: "TPM_INT_ENABLE_\(i): " + bits(l.inte, interruptBits)),
                NamedField(name: "\(p).ints", offset: at(b + 8), value: AnalyzeFormat.hex(UInt64(l.ints), bytes: 4),
                           meaning: "TPM_INT_STATUS_\(i): " + bits(l.ints, interruptBits)),
                NamedField(name: "\(p).access", offset: at(b + 12), value: AnalyzeFormat.hex(UInt64(l.access), bytes: 1),
                           meaning: "TPM_ACCESS_\(i): " + bits(UInt32(l.access), accessBits)),
                NamedField(name: "\(p).sts", offset: at(b + 13), value: AnalyzeFormat.hex(UInt64(l.sts), bytes: 4),
                           meaning: "TPM_STS_\(i): " + bits(l.sts & 0xFF00_00FF, statusBits) + "; burst count \(l.sts >> 8 & 0xFFFF)"),
                NamedField(name: "\(p).iface_id", offset: at(b + 17), value: AnalyzeFormat.hex(UInt64(l.ifaceID), bytes: 4),
                           meaning: "TPM_INTERFACE_ID_\(i)" + (l.ifaceID == TISConstants.interfaceID12 ? " (TPM 1.2: no interface id)" : "")),
            ]
        }
        return out
    }

    static let accessBits: [(UInt32, String)] = [
        (0x01, "tpmEstablishment"), (0x02, "requestUse"), (0x04, "pendingRequest"), (0x08, "seize"),
        (0x10, "beenSeized"), (0x20, "activeLocality"), (0x80, "tpmRegValidSts"),
    ]
    static let statusBits: [(UInt32, String)] = [
        (0x02, "responseRetry"), (0x04, "selfTestDone"), (0x08, "expect"), (0x10, "dataAvail"), (0x20, "tpmGo"),
        (0x40, "commandReady"), (0x80, "stsValid"), (0x0100_0000, "commandCancel"), (0x0200_0000, "resetEstablishment"),
        (0x0400_0000, "tpmFamily2.0"),
    ]
    static let interruptBits: [(UInt32, String)] = [
        (0x01, "dataAvail"), (0x02, "stsValid"), (0x04, "localityChange"), (0x08, "typePolarity0"), (0x10, "typePolarity1"),
        (0x80, "commandReady"), (0x8000_0000, "globalIntEnable"),
    ]

    static func bits(_ v: UInt32, _ names: [(UInt32, String)]) -> String {
        let set = names.filter { v & $0.0 != 0 }.map(\.1)
        return set.isEmpty ? "none" : set.joined(separator: "|")
    }

    static func crbRegisterName(_ i: Int) -> String {
        switch i * 4 {
        case 0x00: "TPM_CRB_LOC_STATE"
        case 0x08: "TPM_CRB_LOC_CTRL"
        case 0x0C: "TPM_CRB_LOC_STS"
        case 0x30: "TPM_CRB_INTF_ID (low)"
        case 0x34: "TPM_CRB_INTF_ID (high)"
        case 0x38: "TPM_CRB_CTRL_EXT (low)"
        case 0x3C: "TPM_CRB_CTRL_EXT (high)"
        case 0x40: "TPM_CRB_CTRL_REQ"
        case 0x44: "TPM_CRB_CTRL_STS"
        case 0x48: "TPM_CRB_CTRL_CANCEL"
        case 0x4C: "TPM_CRB_CTRL_START"
        case 0x50: "TPM_CRB_INT_ENABLE"
        case 0x54: "TPM_CRB_INT_STS"
        case 0x58: "TPM_CRB_CTRL_CMD_SIZE"
        case 0x5C: "TPM_CRB_CTRL_CMD_LADDR"
        case 0x60: "TPM_CRB_CTRL_CMD_HADDR"
        case 0x64: "TPM_CRB_CTRL_RSP_SIZE"
        case 0x68: "TPM_CRB_CTRL_RSP_ADDR (low)"
        case 0x6C: "TPM_CRB_CTRL_RSP_ADDR (high)"
        default: "register 0x\(String(i * 4, radix: 16))"
        }
    }

    static func blobJSON(_ a: BlobAnalysis, _ s: StreamInspection) -> JSONValue {
        let n = "state_blobs.\(StreamInspection.qemuBlobName(a.type))"
        var m: [(String, JSONValue)] = [
            ("blob", .string(a.type.description)),
            ("\(n)_flags", .string(AnalyzeFormat.hex(UInt64(a.recordFlags), bytes: 4))),
            ("\(n).size", .string(AnalyzeFormat.hex(UInt64(a.size), bytes: 4))),
            ("offset", .integer(Int64(a.streamOffset))),
        ]
        if let h = a.header {
            m.append(("swtpm", .object([
                ("version", .integer(Int64(h.version))), ("min_version", .integer(Int64(h.minVersion))),
                ("hdrsize", .integer(Int64(h.headerSize))), ("flags", .string(Troubleshooter.flagText(h.flags))),
                ("totlen", .integer(Int64(h.totalLength))),
                ("tlvs", .array(a.tlvs.map(tlvJSON))),
            ] + (a.innerTLVs.map { [("inner_tlvs", JSONValue.array($0.map(tlvJSON)))] } ?? []))))
        }
        m.append(("encryption", .string(encryptionText(a))))
        if let p = a.containerProblem { m.append(("problem", .string("\(p.field): \(p.message)"))) }
        if let i = a.libtpms { m.append(("libtpms", libtpmsJSON(i))) }
        return .object(m)
    }

    static func tlvJSON(_ t: BlobTLVInfo) -> JSONValue {
        var m: [(String, JSONValue)] = [("tag", .integer(Int64(t.tag))), ("name", .string(t.name)), ("length", .integer(Int64(t.length)))]
        if let o = t.offset { m.append(("offset", .integer(Int64(o)))) }
        return .object(m)
    }

    static func libtpmsJSON(_ i: LibtpmsStateInfo) -> JSONValue {
        var m: [(String, JSONValue)] = [("kind", .string(i.kind.rawValue)), ("family", .string(i.kind.family.description)),
                                        ("size", .integer(Int64(i.size)))]
        if let v = i.magic { m.append(("magic", .string(AnalyzeFormat.hex(UInt64(v), bytes: 4)))) }
        if let v = i.version { m.append(("version", .integer(Int64(v)))) }
        if let v = i.minVersion { m.append(("min_version", .integer(Int64(v)))) }
        if let v = i.profile { m.append(("profile", .string(v))) }
        if let v = i.compileConstantsVersion { m.append(("compile_constants_version", .integer(Int64(v)))) }
        if let v = i.compileConstantsCount { m.append(("compile_constants_count", .integer(Int64(v)))) }
        if let v = i.persistentDataVersion { m.append(("persistent_data_version", .integer(Int64(v)))) }
        if let v = i.integrityValid { m.append(("sha1_valid", .bool(v))) }
        return .object(m)
    }

    static func encryptionText(_ a: BlobAnalysis) -> String {
        var s: String
        switch a.decryption {
        case .notEncrypted: s = "none"
        case .decrypted(let b): s = "migration key AES-\(b)-CBC, decrypted, HMAC verified"
        case .noKey(let b): s = "migration key AES-\(b)-CBC (no key given)"
        case .keySizeMismatch(let b, let k): s = "migration key AES-\(b)-CBC (the key given is \(k)-bit)"
        case .hmacMismatch(let b): s = "migration key AES-\(b)-CBC (HMAC does not verify with the key given)"
        case .malformed(let w): s = "migration key (malformed: \(w))"
        }
        if a.stateKeyEncrypted { s += "; state key (--key)" }
        return s
    }

    /// The text report.
    public static func text(_ s: StreamInspection, only: String? = nil, key: MigrationKey? = nil) -> String {
        var o = ""
        let length = s.streamLength.map { "\($0) bytes" } ?? "\(s.bytesRead) bytes read"
        o += "Stream \(s.name): \(length), QEMU migration stream version 3"
        if let c = s.configuration { o += ", machine \(c.machineType)" }
        o += s.vmDescription.map { ", page size \($0.pageSize), vmdesc present" } ?? ", no vmdesc"
        o += "\n"
        if let e = s.error { o += "Walk stopped: \(e)\n" }
        if selected("ram", "ram (\(s.ram.sectionID ?? 0))", only), s.ram.sectionID != nil {
            let r = s.ram
            o += "\nRAM (section ram \(r.sectionID ?? 0)): \(r.totalSize >> 20) MiB in \(r.blocks.count) blocks; \(r.pages) pages, \(r.zeroPages) zero pages"
            if r.xbzrlePages > 0 { o += ", \(r.xbzrlePages) XBZRLE pages" }
            if r.compressedPages > 0 { o += ", \(r.compressedPages) compressed pages" }
            o += "; \(r.sections) sections, \(r.bytes) bytes\n"
            for b in r.blocks { o += "  \(pad(b.name, 32)) \(AnalyzeFormat.hex(b.length, bytes: 8))  (\(b.length >> 10) KiB)\n" }
        }
        let shown = s.sections.filter { selected($0.idstr, $0.key, only) }
        if !shown.isEmpty {
            o += "\nDevice sections (\(shown.count)):\n"
            for sec in shown {
                o += "  \(pad(sec.key, 40)) v\(sec.versionID) instance \(sec.instanceID) at \(sec.offset), \(sec.bodyLength) bytes"
                o += sec.decoded == nil ? " (not decoded: no vmdesc entry)\n" : "\n"
                let tpmSection = sec.idstr.hasPrefix("tpm-")
                if only != nil, !tpmSection, let (d, obj) = sec.decoded {
                    flatten(AnalyzeFormat.object(d, obj), prefix: "", into: &o)
                }
            }
        }
        if let t = s.tis, selected(TISSection.idstr, "", only) {
            o += "\ntpm-tis (TIS registers as migrated, body at \(s.frontendBodyOffset ?? -1)):\n"
            for f in tisFields(t, s.frontendBodyOffset) { o += "  \(pad(f.name, 26)) \(pad(f.value, 10)) \(f.meaning)\n" }
        }
        if let r = s.crbRegisters, selected(CRBSection.idstr, "", only) {
            o += "\ntpm-crb (registers, body at \(s.frontendBodyOffset ?? -1)):\n"
            for (i, v) in r.enumerated() where v != 0 || i * 4 <= 0x6C {
                o += "  \(pad("regs[\(i)]", 10)) \(AnalyzeFormat.hex(UInt64(v), bytes: 4))  \(crbRegisterName(i))\n"
            }
        }
        if let b = s.emulatorBlobs, selected(EmulatorSection.idstr, "", only) {
            o += "\ntpm-emulator (swtpm state blobs, body at \(s.emulatorBodyOffset ?? -1)):\n"
            for t in TPMStateBlobType.allCases {
                let a = BlobAnalysis.analyze(t, b[t], streamOffset: s.blobOffset(t) ?? -1, key: key)
                let n = "state_blobs.\(StreamInspection.qemuBlobName(t))"
                o += "  \(t): \(n)_flags \(AnalyzeFormat.hex(UInt64(a.recordFlags), bytes: 4)), \(n).size \(a.size)"
                o += a.size == 0 ? " (empty)\n" : ", at \(a.streamOffset)\n"
                if let h = a.header {
                    o += "    swtpm header: version \(h.version), min_version \(h.minVersion), hdrsize \(h.headerSize), flags \(Troubleshooter.flagText(h.flags)), totlen \(h.totalLength)\n"
                    for tlv in a.tlvs { o += "    TLV \(tlv.name) (\(tlv.tag)): \(tlv.length) bytes at +\(tlv.offset ?? 0)\n" }
                    for tlv in a.innerTLVs ?? [] { o += "      inner TLV \(tlv.name) (\(tlv.tag)): \(tlv.length) bytes\n" }
                }
                if a.size > 0 { o += "    encryption: \(encryptionText(a))\n" }
                if let p = a.containerProblem { o += "    problem: \(p.field): \(p.message)\n" }
                if let i = a.libtpms {
                    o += "    libtpms: \(Troubleshooter.describe(i))"
                    if let p = i.profile { o += ", profile \(p)" }
                    if let v = i.compileConstantsVersion { o += "; PA_COMPILE_CONSTANTS v\(v) (\(i.compileConstantsCount ?? 0) constants)" }
                    if let v = i.persistentDataVersion { o += "; PERSISTENT_DATA v\(v)" }
                    if let v = i.integrityValid { o += "; SHA-1 \(v ? "valid" : "MISMATCH")" }
                    o += "\n"
                }
            }
        }
        return o
    }

    static func flatten(_ v: JSONValue, prefix: String, into o: inout String) {
        switch v {
        case .object(let m):
            for (k, x) in m { flatten(x, prefix: prefix.isEmpty ? k : "\(prefix).\(k)", into: &o) }
        case .array(let items):
            for (i, x) in items.enumerated() { flatten(x, prefix: "\(prefix)[\(i)]", into: &o) }
        case .string(let s):
            o += "      \(pad(prefix, 32)) \(s.count > 96 ? String(s.prefix(96)) + "…" : s)\n"
        case .bool(let b): o += "      \(pad(prefix, 32)) \(b)\n"
        default: o += "      \(pad(prefix, 32)) \(v)\n"
        }
    }

    static func pad(_ s: String, _ n: Int) -> String {
        s.count >= n ? s : s + String(repeating: " ", count: n - s.count)
    }
}

/// `tis-sim validate` output.
public enum ReportRenderer {
    /// The JSON document: `stream`, `source`, `destination`, `findings`, `exit_status`.
    public static func json(_ r: TroubleshootReport, _ s: StreamInspection) -> JSONValue {
        .object([
            ("stream", InspectRenderer.streamJSON(s)),
            ("libtpms_version", .string(r.libtpmsVersion)),
            ("source_tpm", r.sourceFamily.map { .string($0.description) } ?? .null),
            ("destination_tpm", r.destinationFamily.map { .string($0.description) } ?? .null),
            ("libtpms_result", r.libtpmsResult.map { .string(AnalyzeFormat.hex(UInt64($0), bytes: 4)) } ?? .null),
            ("findings", .array(r.findings.map { f in
                .object([
                    ("code", .string(f.code.rawValue)), ("severity", .string(f.severity.rawValue)),
                    ("message", .string(f.message)),
                    ("evidence", .object([("section", .string(f.evidence.section)), ("field", .string(f.evidence.field)),
                                          ("offset", f.evidence.offset.map { .integer(Int64($0)) } ?? .null),
                                          ("detail", .string(f.evidence.detail))])),
                    ("fix", .string(f.fix)),
                ])
            })),
            ("exit_status", .integer(Int64(r.exitStatus))),
        ])
    }

    /// The text report.
    public static func text(_ r: TroubleshootReport, _ s: StreamInspection) -> String {
        var o = "Stream \(s.name)"
        if let c = s.configuration { o += ", machine \(c.machineType)" }
        if let f = s.frontend { o += ", \(f)" }
        if let src = r.sourceFamily { o += ", TPM \(src) state" }
        o += "; this host's libtpms \(r.libtpmsVersion)"
        if let d = r.destinationFamily { o += ", checked for a TPM \(d) destination" }
        o += "\n"
        if r.findings.isEmpty {
            o += "No findings: nothing in this stream stops a migration to such a destination.\n"
            return o
        }
        for f in r.findings {
            o += "\n\(f.severity.rawValue.uppercased()) \(f.code.rawValue): \(f.message)\n"
            o += "  evidence: section \(f.evidence.section), field \(f.evidence.field)"
            if let off = f.evidence.offset { o += ", stream offset \(off)" }
            if !f.evidence.detail.isEmpty { o += ": \(f.evidence.detail)" }
            o += "\n  fix: \(f.fix)\n"
        }
        return o
    }
}
