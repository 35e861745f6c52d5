import EmulatorBackend
import Testing
import WireFormat
@testable import VMState

/// `VMStateDescription` loading and saving as `vmstate_load_state` / `vmstate_save_state_v`.
@Suite("VMStateDescription schema")
struct SchemaTests {
    /// A description with the features the TPM ones lack: versioned fields, a minimum version,
    /// subsections, a variable array.
    static let device = VMStateDescription(name: "dev", versionID: 3, minimumVersionID: 2, fields: [
        VMStateField("a", .uint16),
        VMStateField("n", .uint32),
        VMStateField("items", .varray(countField: "n", limit: 8, of: .int16)),
        VMStateField("since3", .uint8, versionID: 3),
    ], subsections: [
        VMStateDescription(name: "dev/extra", versionID: 1, minimumVersionID: 1, fields: [VMStateField("x", .uint64)]),
    ])

    struct VersionCase: Sendable, CustomStringConvertible {
        var stream: UInt32
        var ok: Bool
        var description: String { "stream version \(stream)" }
    }

    /// Stream version above `version_id` or below `minimum_version_id`: refused.
    @Test("version checks as vmstate_load_state", arguments: [
        VersionCase(stream: 1, ok: false), VersionCase(stream: 2, ok: true),
        VersionCase(stream: 3, ok: true), VersionCase(stream: 4, ok: false),
    ])
    func versions(_ c: VersionCase) throws {
        var body: [UInt8] = [0x12, 0x34, 0, 0, 0, 1, 0xFF, 0xFE]
        if c.stream >= 3 { body.append(0x77) }
        if c.ok {
            let o = try Self.device.decode(body, version: c.stream, baseOffset: 40)
            #expect(o["a"]?.value == .unsigned(0x1234))
            #expect(o["items"]?.value == .array([.signed(-2)]))
            #expect(o["since3"]?.value == (c.stream >= 3 ? .unsigned(0x77) : nil))
            #expect(o["since3"]?.offset == (c.stream >= 3 ? 48 : nil))
        } else {
            let e = #expect(throws: StreamError.self) { _ = try Self.device.decode(body, version: c.stream, baseOffset: 40) }
            #expect(e?.code == .versionOutOfRange)
            #expect(e?.offset == 40)
        }
    }

    @Test("subsections: loaded by name, unknown with the prefix refused, foreign prefix ends them")
    func subsections() throws {
        let fields: [UInt8] = [0, 1, 0, 0, 0, 0, 5]
        let sub = [0x05, 9] + Array("dev/extra".utf8) + [0, 0, 0, 1] + [0, 0, 0, 0, 0, 0, 0, 42]
        let o = try Self.device.decode(fields + sub, version: 3)
        #expect(o.subsection("dev/extra")?["x"]?.value == .unsigned(42))
        // Re-encoding gives the same bytes.
        #expect(try Self.device.encode(o) == fields + sub)

        let unknown = [0x05, 9] + Array("dev/bogus".utf8) + [0, 0, 0, 1]
        let e = #expect(throws: StreamError.self) { _ = try Self.device.decode(fields + unknown, version: 3, baseOffset: 100) }
        #expect(e?.code == .unknownSubsection)
        #expect(e?.field == "dev/bogus")
        #expect(e?.offset == 107)

        // "other/x" lacks the "dev" prefix: QEMU stops reading subsections, the caller then
        // trips over the 0x05 (here: bytes left after the body).
        let foreign = [0x05, 7] + Array("other/x".utf8) + [0, 0, 0, 1]
        let f = #expect(throws: StreamError.self) { _ = try Self.device.decode(fields + foreign, version: 3) }
        #expect(f?.code == .invalidField)
        #expect(f?.offset == 7)

        let badVersion = [0x05, 9] + Array("dev/extra".utf8) + [0, 0, 0, 2] + [UInt8](repeating: 0, count: 8)
        let g = #expect(throws: StreamError.self) { _ = try Self.device.decode(fields + badVersion, version: 3) }
        #expect(g?.code == .versionOutOfRange)
        #expect(g?.offset == 7 + 11)
    }

    @Test("varray count over its limit is refused before reading")
    func varrayLimit() {
        let e = #expect(throws: StreamError.self) {
            _ = try Self.device.decode([0, 1, 0, 0, 1, 0, 0, 0], version: 2, baseOffset: 10)
        }
        #expect(e?.code == .lengthOverLimit)
        #expect(e?.field == "n")
        #expect(e?.offset == 12)
    }

    @Test("saving checks the tree against the description")
    func saveChecks() {
        let good = VMStateObject(name: "dev", versionID: 2, fields: [
            VMStateFieldValue(name: "a", value: .unsigned(1)),
            VMStateFieldValue(name: "n", value: .unsigned(2)),
            VMStateFieldValue(name: "items", value: .array([.signed(1), .signed(-1)])),
        ])
        #expect((try? Self.device.encode(good)) == [0, 1, 0, 0, 0, 2, 0, 1, 0xFF, 0xFF])
        var wrongCount = good
        wrongCount.fields[1].value = .unsigned(3)
        #expect(throws: StreamError.self) { _ = try Self.device.encode(wrongCount) }
        var tooWide = good
        tooWide.fields[0].value = .unsigned(0x10000)
        #expect(throws: StreamError.self) { _ = try Self.device.encode(tooWide) }
        var missing = good
        missing.fields.remove(at: 0)
        #expect(throws: StreamError.self) { _ = try Self.device.encode(missing) }
        var tooNew = good
        tooNew.versionID = 4
        #expect(throws: StreamError.self) { _ = try Self.device.encode(tooNew) }
    }

    /// `vmsd_can_compress`: a struct array whose element has subsections is described per
    /// element with `index`; duplicate field names get `[k]` (`vmfield_name_num`).
    @Test("vmdesc: index for uncompressible arrays, [k] for repeated names")
    func vmdescShapes() throws {
        let elem = VMStateDescription(name: "e", versionID: 1, fields: [VMStateField("v", .uint8)],
                                      subsections: [VMStateDescription(name: "e/s", versionID: 1, fields: [VMStateField("w", .uint8)])])
        let d = VMStateDescription(name: "d", versionID: 1, fields: [
            VMStateField("r", .uint8),
            VMStateField("arr", .array(count: 2, of: .structure(elem, structVersion: 1))),
            VMStateField("r", .uint16),
        ])
        let e0 = VMStateObject(name: "e", versionID: 1, fields: [VMStateFieldValue(name: "v", value: .unsigned(1))])
        var e1 = VMStateObject(name: "e", versionID: 1, fields: [VMStateFieldValue(name: "v", value: .unsigned(2))])
        e1.subsections = [VMStateObject(name: "e/s", versionID: 1, fields: [VMStateFieldValue(name: "w", value: .unsigned(3))])]
        let o = VMStateObject(name: "d", versionID: 1, fields: [
            VMStateFieldValue(name: "r", value: .unsigned(9)),
            VMStateFieldValue(name: "arr", value: .array([.structure(e0), .structure(e1)])),
            VMStateFieldValue(name: "r", value: .unsigned(10)),
        ])
        let json = try d.vmdescJSON(idstr: "x", instanceID: 1, o)
        #expect(json == #"{"name": "x", "instance_id": 1, "vmsd_name": "d", "version": 1, "fields": [{"name": "r[0]", "type": "uint8", "size": 1}, {"name": "arr", "index": 0, "type": "struct", "struct": {"vmsd_name": "e", "version": 1, "fields": [{"name": "v", "type": "uint8", "size": 1}]}, "size": 1}, {"name": "arr", "index": 1, "type": "struct", "struct": {"vmsd_name": "e", "version": 1, "fields": [{"name": "v", "type": "uint8", "size": 1}], "subsections": [{"vmsd_name": "e/s", "version": 1, "fields": [{"name": "w", "type": "uint8", "size": 1}]}]}, "size": 11}, {"name": "r[1]", "type": "uint16", "size": 2}]}"#)
        let bytes = try d.encode(o)
        #expect(bytes == [9, 1, 2, 5, 3] + Array("e/s".utf8) + [0, 0, 0, 1, 3, 0, 10])
        #expect(try d.decode(bytes, version: 1) == VMStateObject(name: "d", versionID: 1, fields: [
            VMStateFieldValue(name: "r", value: .unsigned(9), offset: 0),
            VMStateFieldValue(name: "arr", value: .array([
                .structure(VMStateObject(name: "e", versionID: 1, fields: [VMStateFieldValue(name: "v", value: .unsigned(1), offset: 1)])),
                .structure(VMStateObject(name: "e", versionID: 1, fields: [VMStateFieldValue(name: "v", value: .unsigned(2), offset: 2)],
                                         subsections: [VMStateObject(name: "e/s", versionID: 1,
                                                                     fields: [VMStateFieldValue(name: "w", value: .unsigned(3), offset: 12)])])),
            ]), offset: 1),
            VMStateFieldValue(name: "r", value: .unsigned(10), offset: 13),
        ]))
    }

    @Test("fields above the retention limit are skipped, not kept")
    func retention() throws {
        let d = VMStateDescription(name: "big", versionID: 0, fields: [VMStateField("blob", .buffer(size: 5000)), VMStateField("z", .uint8)])
        let o = try d.decode([UInt8](repeating: 1, count: 5000) + [7], version: 0,
                             limits: VMStateLimits(maximumRetainedFieldSize: 4096))
        #expect(o["blob"]?.value == .skipped(byteCount: 5000))
        #expect(o["z"]?.value == .unsigned(7))
    }
}

@Suite("tpm-emulator, tpm-crb and configuration sections")
struct OtherSectionTests {
    @Test("tpm-emulator: blobs and flags round trip; layout as QEMU writes it")
    func emulatorRoundTrip() throws {
        let blobs = sampleBlobs()
        let b = try EmulatorSection.encode(blobs)
        let p = blobs.permanent.data.count, v = blobs.volatile.data.count
        #expect(b.count == 24 + p + v)
        #expect(Array(b[0..<8]) == [0, 0, 0, 0] + [0, 0, UInt8(p >> 8), UInt8(p & 0xFF)])
        #expect(Array(b[8..<(8 + p)]) == blobs.permanent.data)
        #expect(Array(b[(8 + p)..<(16 + p)]) == [0, 0, 0, 2, 0, 0, UInt8(v >> 8), UInt8(v & 0xFF)])
        #expect(Array(b[(16 + p + v)...]) == [0, 0, 0, 0, 0, 0, 0, 0])
        #expect(try EmulatorSection.decode(b) == blobs)
    }

    @Test("tpm-emulator: a size over SwtpmBlob.maximumSize is refused at the size field, before reading")
    func emulatorOverLimit() throws {
        let b = patched(try EmulatorSection.encode(sampleBlobs()), at: 4, be: 0xFFFF_FFFF, width: 4)
        let e = #expect(throws: StreamError.self) { _ = try EmulatorSection.decode(b, baseOffset: 500) }
        #expect(e?.code == .lengthOverLimit)
        #expect(e?.section == "tpm-emulator")
        #expect(e?.field == "state_blobs.permanent.size")
        #expect(e?.offset == 504)
        #expect(EmulatorSection.maximumBlobSize == SwtpmBlob.maximumSize)
    }

    @Test("tpm-emulator: a size within the limit but past the end is truncated at the buffer")
    func emulatorPastEnd() throws {
        let b = patched(try EmulatorSection.encode(sampleBlobs()), at: 4, be: 400_000, width: 4)
        let e = #expect(throws: StreamError.self) { _ = try EmulatorSection.decode(b, baseOffset: 500) }
        #expect(e?.code == .truncated)
        #expect(e?.field == "state_blobs.permanent.buffer")
        #expect(e?.offset == 508)
    }

    @Test("tpm-emulator: a blob over the limit is not written")
    func emulatorWriteLimit() {
        let big = TPMStateBlobs(permanent: TPMStateBlob(data: [UInt8](repeating: 0, count: SwtpmBlob.maximumSize + 1)))
        #expect(throws: StreamError.self) { _ = try EmulatorSection.encode(big) }
    }

    @Test("tpm-crb: 32 big-endian registers, vmdesc as QEMU's")
    func crb() throws {
        var regs = [UInt32](repeating: 0, count: 32)
        regs[0] = 0x82; regs[3] = 1; regs[12] = 0x0002_5811; regs[13] = 0x1014
        regs[22] = 0xF80; regs[23] = 0xFED4_0080; regs[25] = 0xF80; regs[26] = 0xFED4_0080
        let b = try CRBSection.encode(regs)
        #expect(b.count == CRBSection.payloadSize)
        #expect(Array(b[48..<52]) == [0x00, 0x02, 0x58, 0x11])
        #expect(try CRBSection.decode(b) == regs)
        #expect(try CRBSection.description.vmdescJSON(idstr: "tpm-crb", CRBSection.object(regs))
            == #"{"name": "tpm-crb", "instance_id": 0, "vmsd_name": "tpm-crb", "version": 0, "fields": [{"name": "regs", "array_len": 32, "type": "uint32", "size": 4}]}"#)
        #expect(throws: StreamError.self) { _ = try CRBSection.encode([1, 2, 3]) }
    }

    @Test("configuration: machine name, subsections round trip")
    func configuration() throws {
        var w = MigrationStreamWriter()
        try w.writeConfiguration(MigrationConfiguration(machineType: "pc-q35-7.2"))
        #expect(Array(w.bytes[8...]) == [0x07, 0, 0, 0, 10] + Array("pc-q35-7.2".utf8))

        let full = MigrationConfiguration(machineType: "virt-7.2", targetPageBits: 16, capabilities: ["x-ignore-shared"],
                                          uuid: Array(0..<16))
        var w2 = MigrationStreamWriter()
        try w2.writeConfiguration(full)
        w2.writeEOF()
        let (walker, events) = try walkAll(.bytes(w2.bytes))
        guard case .configuration(let c) = events[1] else { Issue.record("no configuration"); return }
        #expect(c.machineType == "virt-7.2")
        #expect(c.targetPageBits == 16)
        #expect(c.pageSize == 65536)
        #expect(c.capabilities == ["x-ignore-shared"])
        #expect(c.uuid == Array(0..<16))
        #expect(c.offset == 8)
        #expect(walker.configuration == c)
    }

    @Test("configuration: a name longer than the limit is refused at len")
    func configurationLimit() {
        var b: [UInt8] = [0x51, 0x45, 0x56, 0x4D, 0, 0, 0, 3, 0x07, 0x7F, 0xFF, 0xFF, 0xFF]
        b += [UInt8](repeating: 0x41, count: 100)
        let e = walkError(b)
        #expect(e?.code == .lengthOverLimit)
        #expect(e?.section == "configuration")
        #expect(e?.field == "len")
        #expect(e?.offset == 9)
    }
}

@Suite("JSON")
struct JSONTests {
    @Test("QEMU's quoted_str escaping and spacing")
    func writer() {
        var w = QEMUJSONWriter()
        w.startObject()
        w.string("s", "a\"b\\c\n\u{1}é😀")
        w.int("n", -5)
        w.startArray("l")
        w.bool(nil, true)
        w.int(nil, 1)
        w.endArray()
        w.endObject()
        #expect(String(decoding: w.text, as: UTF8.self)
            == #"{"s": "a\"b\\c\n\u0001\u00E9\uD83D\uDE00", "n": -5, "l": [true, 1]}"#)
    }

    @Test("parser round trip, and refusals")
    func parser() throws {
        let text = #"{"a": [1, -2, {"b": "x\u00e9\n"}], "c": true, "d": null, "e": 1.5}"#
        let v = try JSONParser.parse(Array(text.utf8), baseOffset: 0)
        #expect(v["a"]?.arrayValue?.count == 3)
        #expect(v["a"]?.arrayValue?[2]["b"]?.stringValue == "xé\n")
        var w = QEMUJSONWriter()
        w.value(nil, v)
        #expect(try JSONParser.parse(w.text, baseOffset: 0) == v)

        for bad in ["{", "[1,", #"{"a" 1}"#, "{\"a\": \"\u{1}\"}", "[1] x", String(repeating: "[", count: 100) + String(repeating: "]", count: 100)] {
            let e = #expect(throws: StreamError.self) { _ = try JSONParser.parse(Array(bad.utf8), baseOffset: 10) }
            #expect(e?.code == .badVMDescription)
        }
    }
}
