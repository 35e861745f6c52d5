import EmulatorBackend
import Foundation
import TIS
import Testing
import WireFormat
@testable import VMState

/// Whole real QEMU 7.2 streams (Fixtures/README.md): pc and q35, tpm-tis on swtpm, after
/// TPM2_Startup and PCR_Extend(16).
@Suite("Real QEMU 7.2 streams")
struct QEMUStreamTests {
    static let pcrExtend16 = [UInt8](hexString: """
        80020000004100000182000000100000000940000009000000000000000001000b\
        07dc469d845e32ba45abb5d87ad760a8cbde13c8dfc7196d19d8d8bb497a5ab2
        """) ?? []
    static let pcrExtendResponse = [UInt8](hexString: "80020000001300000000000000000000010000") ?? []

    @Test("walk: header, configuration, RAM, TPM sections, every device decoded by the vmdesc", arguments: Fixture.allCases)
    func walk(_ f: Fixture) throws {
        let (walker, events) = try walkAll(.path(f.path))
        let size = try f.bytes.count
        guard case .header(3) = events.first else { Issue.record("no header"); return }
        guard case .configuration(let c) = events[1] else { Issue.record("no configuration"); return }
        #expect(c.machineType == f.machineType)
        #expect(c.targetPageBits == nil && c.capabilities == nil && c.uuid == nil)

        let all = sections(events)
        // RAM: one START with the block list, PART/END sections with ZERO and PAGE records.
        let ram = all.filter { $0.idstr == "ram" }
        #expect(ram.first?.type == .start)
        #expect(ram.first?.sectionID == 2)
        #expect(ram.first?.versionID == 4)
        #expect(ram.last?.type == .end)
        guard case .ram(let setup)? = ram.first?.content else { Issue.record("no ram setup"); return }
        #expect(setup.totalSize == 0x105_3000)
        #expect(setup.blocks.map(\.name) == ["pc.ram", "/rom@etc/acpi/tables", "pc.rom", "pc.bios",
                                             "/rom@etc/table-loader", "tpm-ppi", "/rom@etc/acpi/rsdp"])
        #expect(setup.blocks.first { $0.name == "tpm-ppi" }?.length == 0x1000)
        #expect(walker.statistics.zeroPages + walker.statistics.pages == Int(0x105_3000 / 4096))
        #expect(walker.statistics.pages >= 16)  // pc.bios: 64 KiB of 0xF4

        // The TPM sections.
        let emu = try #require(all.first { $0.idstr == "tpm-emulator" })
        #expect(emu.type == .full && emu.sectionID == 4 && emu.instanceID == 0 && emu.versionID == 0)
        #expect(emu.bodyLength == 10337)
        guard case .tpmEmulator(let blobs) = emu.content else { Issue.record("tpm-emulator not decoded"); return }
        #expect(blobs.permanent.data.count == 1321 && blobs.permanent.flags == 0)
        #expect(blobs.volatile.data.count == 8992 && blobs.volatile.flags == 0)
        #expect(blobs.savestate == .empty)
        // The blobs are swtpm containers: header v2, MIGRATION_DATA, libtpms state inside.
        let perm = try SwtpmBlob.decode(blobs.permanent.data)
        let vol = try SwtpmBlob.decode(blobs.volatile.data)
        #expect(perm.version == 2 && perm.flags == .migrationData && !perm.isEncrypted)
        #expect(vol.version == 2 && vol.flags == .migrationData)
        #expect(try perm.plainState()?.prefix(6).elementsEqual([0x00, 0x03, 0xAB, 0x36, 0x47, 0x23]) == true)
        #expect(try vol.plainState()?.prefix(6).elementsEqual([0x00, 0x04, 0x45, 0x63, 0x78, 0x89]) == true)

        let tisSection = try #require(all.first { $0.idstr == "tpm-tis" })
        #expect(tisSection.type == .full && tisSection.sectionID == f.tisSectionID)
        #expect(tisSection.bodyLength == 4206)
        guard case .tpmTIS(let tis) = tisSection.content else { Issue.record("tpm-tis not decoded"); return }
        #expect(tis.rwOffset == 0)
        #expect(tis.activeLocality == 0 && tis.abortingLocality == 0xFF && tis.nextLocality == 0xFF)
        #expect(tis.localities[0] == TISLocality(state: .ready, inte: 8, ints: 0, access: 0xA0, sts: 0x0400_0040, ifaceID: 0x2100))
        for l in 1..<5 {
            #expect(tis.localities[l] == TISLocality(state: .idle, inte: 8, ints: 0, access: 0x80, sts: 0x0400_0000, ifaceID: 0x2100))
        }
        // The buffer is never cleared: the PCR_Extend response over the head of its command.
        #expect(Array(tis.buffer[0..<19]) == Self.pcrExtendResponse)
        #expect(Array(tis.buffer[19..<65]) == Array(Self.pcrExtend16[19..<65]))

        // Everything else through the vmdesc; nothing skipped.
        let desc = try #require(walker.vmDescription)
        #expect(desc.pageSize == 4096)
        #expect(walker.statistics.skippedSections == 0)
        #expect(walker.statistics.decodedSections == desc.devices.count - 2)
        #expect(all.filter { if case .decoded = $0.content { true } else { false } }.count == desc.devices.count - 2)
        guard case .vmDescription(_, let at) = events.last else { Issue.record("no vmdesc event"); return }
        guard case .endOfStream(let eof) = events[events.count - 2] else { Issue.record("no EOF"); return }
        #expect(at == eof + 1)
        #expect(walker.statistics.bytesRead == size)
        #expect(walker.statistics.unexpectedTrailer == nil)
        // The PPI page (a ZERO record) was captured.
        #expect(walker.capturedRAMBlocks["tpm-ppi"]?.isComplete == true)
        #expect(walker.capturedRAMBlocks["tpm-ppi"]?.bytes == [UInt8](repeating: 0, count: 4096))
    }

    @Test("re-encoding every decoded section gives QEMU's bytes", arguments: Fixture.allCases)
    func reencode(_ f: Fixture) throws {
        let bytes = try f.bytes
        let (walker, events) = try walkAll(.path(f.path))
        let desc = try #require(walker.vmDescription)
        var checked = 0
        for s in sections(events) {
            let body = Array(bytes[s.bodyOffset..<(s.bodyOffset + s.bodyLength)])
            switch s.content {
            case .tpmTIS(let t):
                #expect(try TISSection.encode(t) == body)
            case .tpmEmulator(let b):
                #expect(try EmulatorSection.encode(b) == body)
            case .decoded(let o):
                let d = try #require(desc.device(idstr: s.idstr, instanceID: s.instanceID)?.description)
                #expect(try d.encode(o) == body, "\(s.idstr)")
            default:
                continue
            }
            // Footer right after the body.
            #expect(Array(bytes[(s.bodyOffset + s.bodyLength)..<(s.bodyOffset + s.bodyLength + 5)])
                == [0x7E] + patched([0, 0, 0, 0], at: 0, be: UInt64(s.sectionID), width: 4))
            checked += 1
        }
        #expect(checked == desc.devices.count)
    }

    /// Our vmdesc emitter against QEMU's JSON: the whole trailer re-serialised by our writer is
    /// byte-identical, and the entries we produce for the TPM devices equal QEMU's.
    @Test("vmdesc JSON: QEMU's writer format and the TPM entries", arguments: Fixture.allCases)
    func vmdesc(_ f: Fixture) throws {
        let bytes = try f.bytes
        let p = try #require(VMDescription.locate(inTail: bytes))
        let original = Array(bytes[(p + 5)...])
        let d = try VMDescription.parse(original)
        var w = QEMUJSONWriter()
        w.value(nil, d.json)
        #expect(w.text == original)

        let state = try TPMMigrationState(source: .path(f.path))
        let tis = try #require(state.tis)
        let blobs = try #require(state.emulatorBlobs)
        func entry(_ name: String) -> String {
            var w = QEMUJSONWriter()
            if let e = d.devices.first(where: { $0.name == name }) { w.value(nil, e.json) }
            return String(decoding: w.text, as: UTF8.self)
        }
        #expect(try TISSection.description.vmdescJSON(idstr: "tpm-tis", TISSection.object(tis)) == entry("tpm-tis"))
        #expect(try TISSection.description.vmdescJSON(idstr: "tpm-tis", TISSection.object(tis)) == TISSectionTests.qemuTISJSON)
        #expect(try EmulatorSection.description.vmdescJSON(idstr: "tpm-emulator", EmulatorSection.object(blobs))
            == entry("tpm-emulator"))
    }

    @Test("TPMMigrationState from a whole stream", arguments: Fixture.allCases)
    func extract(_ f: Fixture) throws {
        let s = try TPMMigrationState(source: .path(f.path))
        #expect(s.machineType == f.machineType)
        #expect(s.tis?.localities[0].state == .ready)
        #expect(s.emulatorBlobs?.permanent.data.count == 1321)
        #expect(s.ppi == [UInt8](repeating: 0, count: 4096))
        #expect(s.crbRegisters == nil && s.crbCommandBuffer == nil)
    }

    /// A TPM-only stream written from the extracted state carries the TPM sections byte for
    /// byte as QEMU wrote them, and reads back to the same state.
    @Test("TPM-only stream: same section bytes as QEMU's, same state back", arguments: Fixture.allCases)
    func tpmOnly(_ f: Fixture) throws {
        let original = try f.bytes
        let state = try TPMMigrationState(source: .bytes(original))
        var o = TPMMigrationState.StreamOptions()
        o.deviceSectionID = f.tisSectionID
        let stream = try state.encodedStream(o)
        #expect(stream.count < 20_000)
        #expect(try TPMMigrationState(source: .bytes(stream)) == state)

        let (_, theirs) = try walkAll(.bytes(original))
        let (w, ours) = try walkAll(.bytes(stream))
        for name in ["tpm-emulator", "tpm-tis"] {
            let a = try #require(sections(theirs).first { $0.idstr == name })
            let b = try #require(sections(ours).first { $0.idstr == name })
            // Header (type, id, idstr, instance, version), body and footer identical.
            #expect(original[a.offset..<(a.bodyOffset + a.bodyLength + 5)].elementsEqual(stream[b.offset..<(b.bodyOffset + b.bodyLength + 5)]))
        }
        // Structure: header, configuration, ram START + END (tpm-ppi only), emulator, tis, EOF, vmdesc.
        #expect(sections(ours).map(\.idstr) == ["ram", "ram", "tpm-emulator", "tpm-tis"])
        #expect(sections(ours).map(\.type) == [.start, .end, .full, .full])
        #expect(w.ramBlocks == ["tpm-ppi": 4096])
        #expect(w.vmDescription?.devices.map(\.name) == ["tpm-emulator", "tpm-tis"])
    }

    /// Without the vmdesc (a pipe: it comes last), unknown device sections are crossed by
    /// finding their footer. The boundaries found equal the vmdesc-driven walk's, and the kept
    /// bodies decode afterwards with the vmdesc to the same trees.
    @Test("through a pipe without vmdesc: footer scan finds the same boundaries", arguments: Fixture.allCases)
    func throughPipe(_ f: Fixture) throws {
        let bytes = try f.bytes
        let (_, reference) = try walkAll(.path(f.path))
        let fd = pipeFeeding { out in writeAll(out, bytes) }
        defer { close(fd) }
        let (walker, events) = try walkAll(.fileDescriptor(fd))
        let ref = sections(reference), got = sections(events)
        #expect(got.count == ref.count)
        for (a, b) in zip(ref, got) {
            #expect(a.offset == b.offset && a.bodyOffset == b.bodyOffset && a.bodyLength == b.bodyLength, "\(a.idstr)")
            #expect(a.sectionID == b.sectionID && a.idstr == b.idstr && a.instanceID == b.instanceID)
        }
        let desc = try #require(walker.vmDescription)  // read from the trailer at the end
        #expect(walker.statistics.skippedSections == desc.devices.count - 2)
        for (a, b) in zip(ref, got) {
            guard case .decoded(let expected) = a.content, case .skipped(let kept?) = b.content,
                  let d = desc.device(idstr: b.idstr, instanceID: b.instanceID)?.description else { continue }
            #expect(try d.decode(kept, version: b.versionID, baseOffset: b.bodyOffset) == expected)
        }
    }

    @Test("through a socket: the TPM state of a whole stream", arguments: Fixture.allCases)
    func throughSocket(_ f: Fixture) throws {
        let bytes = try f.bytes
        var sv: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0)
        let (mine, theirs) = (sv[0], sv[1])
        defer { close(mine) }
        let t = Thread {
            writeAll(theirs, bytes)
            close(theirs)
        }
        t.start()
        let s = try TPMMigrationState(source: .fileDescriptor(mine))
        #expect(s == (try TPMMigrationState(source: .path(f.path))))
    }

    @Test("unknown sections refused with .fail when no vmdesc is used")
    func failPolicy() throws {
        var o = MigrationStreamWalker.Options()
        o.readTrailingVMDescription = false
        o.unknownSections = .fail
        let bytes = try Fixture.pc.bytes
        let e = walkError(bytes, options: o)
        #expect(e?.code == .unknownSection)
        #expect(e?.section == "timer")
        // The timer section follows the ram START section: find its header.
        let (_, events) = try walkAll(.path(Fixture.pc.path))
        #expect(e?.offset == sections(events).first { $0.idstr == "timer" }?.offset)
    }
}
