import EmulatorBackend
import Foundation
import QEMUHarness
import TPMDiagnostics
import Testing
import VMState

/// `tis-sim inspect` on real QEMU 7.2 streams: QEMU's names, QEMU's values.
@Suite("Inspection of real QEMU 7.2 streams")
struct InspectTests {
    /// The `tpm-tis` values QEMU 7.2 saved after ACCESS_0 requestUse + STS_0 commandReady (the
    /// same as in the VMState fixtures and runs-on-this-machine.md §3).
    static let expectedTIS: [String: String] = [
        "state.rw_offset": "0x0000", "state.active_locty": "0x00", "state.aborting_locty": "0xff", "state.next_locty": "0xff",
    ]
    static let expectedLocality0 = ["state": "0x00000001", "inte": "0x00000008", "ints": "0x00000000", "access": "0xa0",
                                    "sts": "0x04000040", "iface_id": "0x00002100"]
    static let expectedIdleLocality = ["state": "0x00000000", "inte": "0x00000008", "ints": "0x00000000", "access": "0x80",
                                       "sts": "0x04000000", "iface_id": "0x00002100"]

    @Test("--json: every TPM field under QEMU's vmdesc names, with QEMU's values", arguments: [QEMUMachineType.pc, .q35])
    func jsonNamesAndValues(_ machine: QEMUMachineType) throws {
        let p = try RealStreams.path(StreamSpec(machine: machine))
        let s = try StreamInspection.walk(.path(p), name: p)
        let doc = InspectRenderer.json(s)
        let vmdesc = try #require(s.vmDescription)
        let tisSection = try #require(s.sections.first { $0.idstr == "tpm-tis" })
        let sections = try #require(doc["sections"])
        let tis = try #require(sections[tisSection.key], "no \(tisSection.key) in \(sections)")
        // Field names as QEMU's own vmdesc names them, in its order.
        let desc = try #require(vmdesc.device(idstr: "tpm-tis", instanceID: 0)?.json)
        let names = (desc["fields"]?.arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        #expect(names == ["state.buffer", "state.rw_offset", "state.active_locty", "state.aborting_locty", "state.next_locty", "state.loc"])
        guard case .object(let members) = tis else { Issue.record("tpm-tis is not an object"); return }
        #expect(members.map(\.0) == names)
        let locNames = (desc["fields"]?.arrayValue?.last?["struct"]?["fields"]?.arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        #expect(locNames == ["state", "inte", "ints", "access", "sts", "iface_id"])
        for (k, v) in Self.expectedTIS { #expect(tis[k]?.stringValue == v, "\(k)") }
        #expect(tis["state.buffer"]?.stringValue?.count == 4096 * 3 - 1)
        let locs = try #require(tis["state.loc"]?.arrayValue)
        #expect(locs.count == 5)
        for (i, l) in locs.enumerated() {
            guard case .object(let m) = l else { Issue.record("loc[\(i)]"); continue }
            #expect(m.map(\.0) == locNames)
            for (k, v) in i == 0 ? Self.expectedLocality0 : Self.expectedIdleLocality { #expect(l[k]?.stringValue == v, "loc[\(i)].\(k)") }
        }
        // tpm-emulator: QEMU's nine field names; sizes as the blobs have them.
        let emuSection = try #require(s.sections.first { $0.idstr == "tpm-emulator" })
        let emu = try #require(sections[emuSection.key])
        let emuNames = (vmdesc.device(idstr: "tpm-emulator", instanceID: 0)?.json["fields"]?.arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        #expect(emuNames.count == 9)
        guard case .object(let em) = emu else { Issue.record("tpm-emulator"); return }
        #expect(em.map(\.0) == emuNames)
        let blobs = try #require(s.emulatorBlobs)
        #expect(emu["state_blobs.permanent.size"]?.stringValue == String(format: "0x%08x", blobs.permanent.data.count))
        #expect(emu["state_blobs.permanent_flags"]?.stringValue == "0x00000000")
        // Every device section is decoded through the vmdesc, as analyze-migration.py does.
        #expect(s.sections.allSatisfy { $0.decoded != nil })
        #expect(s.sections.count == vmdesc.devices.count)
        // The tpm block: the 35 TIS fields with offsets and meanings.
        let fields = try #require(doc["tpm"]?["tpm-tis"]?.arrayValue)
        #expect(fields.count == 5 + 5 * 6)
        let fieldNames = fields.compactMap { $0["field"]?.stringValue }
        #expect(fieldNames.contains("state.loc[4].iface_id"))
        let sts0 = try #require(fields.first { $0["field"]?.stringValue == "state.loc[0].sts" })
        #expect(sts0["meaning"]?.stringValue?.contains("commandReady") == true)
        #expect(sts0["offset"]?.intValue == Int64(tisSection.bodyOffset + 4101 + 13))
        // RAM: analyze-migration.py's "section sizes" and the page counts.
        #expect(doc["ram"]?["section sizes"]?["tpm-ppi"]?.stringValue == "0x0000000000001000")
        #expect((doc["ram"]?["pages"]?.intValue ?? 0) + (doc["ram"]?["zero_pages"]?.intValue ?? 0) >= (16 << 20) / 4096)
    }

    @Test("text: the TIS fields by name, the blobs layer by layer; --section filters")
    func text() throws {
        let p = try RealStreams.path(StreamSpec())
        let s = try StreamInspection.walk(.path(p), name: p)
        let t = InspectRenderer.text(s)
        for name in ["state.rw_offset", "state.active_locty", "state.aborting_locty", "state.next_locty"]
            + (0..<5).flatMap({ i in ["state", "inte", "ints", "access", "sts", "iface_id"].map { "state.loc[\(i)].\($0)" } }) {
            #expect(t.contains(name), "\(name)")
        }
        #expect(t.contains("TPM_TIS_STATE_READY") && t.contains("activeLocality|tpmRegValidSts"))
        #expect(t.contains("swtpm header: version 2, min_version 1, hdrsize 10, flags 0x4 (MIGRATION_DATA)"))
        #expect(t.contains("libtpms: TPM 2.0 permanent state (PERSISTENT_ALL), magic 0xab364723, version 3, min_version 3"))
        #expect(t.contains("TPM 2.0 volatile state") && t.contains("SHA-1 valid"))
        let only = InspectRenderer.text(s, only: "tpm-emulator")
        #expect(only.contains("tpm-emulator (") && !only.contains("state.loc[0]") && !only.contains("pc.ram"))
        let apic = InspectRenderer.text(s, only: "apic")
        #expect(apic.contains("apic (") && apic.contains("      "))
    }
}
