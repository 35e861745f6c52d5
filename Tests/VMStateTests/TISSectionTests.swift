import TIS
import Testing
import WireFormat
@testable import VMState

/// The `tpm-tis` section: layout (qemu-tpm.md §7.1), round trip, validation on load.
@Suite("tpm-tis section")
struct TISSectionTests {
    @Test("TISState → 4206 section bytes → the same TISState")
    func roundTrip() throws {
        let s = sampleTISState()
        let bytes = try TISSection.encode(s)
        #expect(bytes.count == 4206)
        #expect(bytes.count == TISSection.payloadSize)
        #expect(try TISSection.decode(bytes) == s)
        // The reset state too.
        #expect(try TISSection.decode(try TISSection.encode(TISState())) == TISState())
    }

    /// Field offsets of the body (qemu-tpm.md §7.1): buffer 0, rw_offset 4096, the three
    /// locality bytes 4098-4100, then five 21-byte localities in wire order
    /// state, inte, ints, access, sts, iface_id.
    @Test("golden layout: every field at its §7.1 offset, big-endian")
    func goldenLayout() throws {
        let s = sampleTISState()
        let b = try TISSection.encode(s)
        #expect(Array(b[0..<4096]) == s.buffer)
        #expect(Array(b[4096..<4098]) == [0x00, 0x06])             // rw_offset
        #expect(b[4098] == 0x02)                                     // active_locty
        #expect(b[4099] == 0xFF)                                     // aborting_locty
        #expect(b[4100] == 0xFF)                                     // next_locty
        let loc0 = 4101, loc2 = 4101 + 2 * 21
        #expect(Array(b[loc0..<(loc0 + 21)]) == [
            0x00, 0x00, 0x00, 0x01,  // state READY
            0x00, 0x00, 0x00, 0x08,  // inte
            0x00, 0x00, 0x00, 0x00,  // ints
            0x80,                    // access
            0x04, 0x00, 0x00, 0x00,  // sts
            0x00, 0x00, 0x21, 0x00,  // iface_id
        ])
        #expect(Array(b[loc2..<(loc2 + 21)]) == [
            0x00, 0x00, 0x00, 0x02,  // state COMPLETION
            0x80, 0x00, 0x00, 0x08,
            0x00, 0x00, 0x00, 0x01,
            0xA0,
            0x04, 0x00, 0x00, 0x90,
            0x00, 0x00, 0x21, 0x00,
        ])
        #expect(4101 + 5 * 21 == 4206)
    }

    /// The decoded tree names each field with its offset (what errors report).
    @Test("decoded tree: field names and offsets")
    func treeOffsets() throws {
        let b = try TISSection.encode(sampleTISState())
        let o = try TISSection.description.decode(b, version: 0, baseOffset: 1000)
        #expect(o.fields.map(\.name) == ["state.buffer", "state.rw_offset", "state.active_locty", "state.aborting_locty",
                                         "state.next_locty", "state.loc"])
        #expect(o.fields.map(\.offset) == [1000, 5096, 5098, 5099, 5100, 5101])
        let offsets = o.offsets()
        #expect(offsets["state.loc[3].sts"] == 1000 + 4101 + 3 * 21 + 13)
        #expect(offsets["state.loc[4].iface_id"] == 1000 + 4101 + 4 * 21 + 17)
    }

    struct Corruption: CustomStringConvertible, Sendable {
        var name: String
        var offset: Int
        var value: UInt64
        var width: Int
        var field: String
        var description: String { name }
    }

    /// Values QEMU would load unchecked and then index arrays with; refused here with the
    /// field and its stream offset.
    static let corruptions: [Corruption] = [
        Corruption(name: "active locality 5", offset: 4098, value: 5, width: 1, field: "state.active_locty"),
        Corruption(name: "next locality 7", offset: 4100, value: 7, width: 1, field: "state.next_locty"),
        Corruption(name: "unknown state 9", offset: 4101 + 21 + 0, value: 9, width: 4, field: "state.loc[1].state"),
        Corruption(name: "rw_offset 5000", offset: 4096, value: 5000, width: 2, field: "state.rw_offset"),
        Corruption(name: "aborting locality 6", offset: 4099, value: 6, width: 1, field: "state.aborting_locty"),
        Corruption(name: "unknown state 0xFFFFFFFF", offset: 4101 + 4 * 21, value: 0xFFFF_FFFF, width: 4,
                   field: "state.loc[4].state"),
    ]

    @Test("invalid values are refused with field and offset", arguments: corruptions)
    func invalid(_ c: Corruption) throws {
        let b = patched(try TISSection.encode(sampleTISState()), at: c.offset, be: c.value, width: c.width)
        let base = 777
        let e = #expect(throws: StreamError.self) { _ = try TISSection.decode(b, baseOffset: base) }
        #expect(e?.code == .invalidField)
        #expect(e?.section == "tpm-tis")
        #expect(e?.field == c.field)
        #expect(e?.offset == base + c.offset)
    }

    @Test("an invalid TISState is not written")
    func invalidStateNotWritten() {
        var s = sampleTISState()
        s.activeLocality = 5
        #expect(throws: StreamError.self) { _ = try TISSection.encode(s) }
        s = sampleTISState()
        s.buffer = [1, 2, 3]
        #expect(throws: StreamError.self) { _ = try TISSection.encode(s) }
    }

    @Test("a short body is truncated at the field that runs out; a long one is refused")
    func wrongLength() throws {
        let b = try TISSection.encode(sampleTISState())
        let e = #expect(throws: StreamError.self) { _ = try TISSection.decode(Array(b.prefix(4100)), baseOffset: 50) }
        #expect(e?.code == .truncated)
        #expect(e?.field == "state.next_locty")
        #expect(e?.offset == 50 + 4100)
        let f = #expect(throws: StreamError.self) { _ = try TISSection.decode(b + [0]) }
        #expect(f?.offset == 4206)
    }

    @Test("version_id above the description's is refused (vmstate_load_state)")
    func versionTooNew() throws {
        let b = try TISSection.encode(sampleTISState())
        let e = #expect(throws: StreamError.self) { _ = try TISSection.decode(b, version: 1) }
        #expect(e?.code == .versionOutOfRange)
    }

    /// The vmdesc entry, byte for byte as QEMU 7.2 wrote it in the pc fixture.
    @Test("vmdesc JSON of tpm-tis equals QEMU's")
    func vmdesc() throws {
        let json = try TISSection.description.vmdescJSON(idstr: "tpm-tis", TISSection.object(sampleTISState()))
        #expect(json == Self.qemuTISJSON)
    }

    static let qemuTISJSON = #"{"name": "tpm-tis", "instance_id": 0, "vmsd_name": "tpm-tis", "version": 0, "fields": [{"name": "state.buffer", "type": "buffer", "size": 4096}, {"name": "state.rw_offset", "type": "uint16", "size": 2}, {"name": "state.active_locty", "type": "uint8", "size": 1}, {"name": "state.aborting_locty", "type": "uint8", "size": 1}, {"name": "state.next_locty", "type": "uint8", "size": 1}, {"name": "state.loc", "array_len": 5, "type": "struct", "struct": {"vmsd_name": "tpm-tis/locty", "version": 0, "fields": [{"name": "state", "type": "uint32", "size": 4}, {"name": "inte", "type": "uint32", "size": 4}, {"name": "ints", "type": "uint32", "size": 4}, {"name": "access", "type": "uint8", "size": 1}, {"name": "sts", "type": "uint32", "size": 4}, {"name": "iface_id", "type": "uint32", "size": 4}]}, "size": 21}]}"#
}
