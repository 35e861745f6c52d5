import EmulatorBackend
import TIS
import Testing
@testable import VMState

/// Broken streams: each must fail with its `StreamError.Code`, naming the section, the field
/// and the absolute stream offset (qemu_loadvm_state_main, check_section_footer,
/// vmstate_load_state, vmstate_subsection_load).
@Suite("Stream framing and corrupt streams")
struct FramingTests {
    /// Which stream a corruption is applied to.
    enum Base: String, CaseIterable, Sendable, CustomStringConvertible {
        /// A TPM-only stream this library wrote (from the pc fixture's state).
        case tpmOnly
        /// The real QEMU 7.2 pc stream.
        case qemu
        var description: String { rawValue }

        func bytes() throws -> [UInt8] {
            switch self {
            case .qemu: try Fixture.pc.bytes
            case .tpmOnly: try TPMMigrationState(source: .path(Fixture.pc.path)).encodedStream()
            }
        }
    }

    /// The sections of a good stream, for finding offsets.
    static func layout(_ b: [UInt8]) throws -> (sections: [MigrationSection], events: [MigrationStreamEvent]) {
        let (_, events) = try walkAll(.bytes(b))
        return (sections(events), events)
    }

    static func section(_ name: String, in b: [UInt8]) throws -> MigrationSection {
        try #require(try layout(b).sections.first { $0.idstr == name })
    }

    @Test("wrong magic", arguments: Base.allCases)
    func badMagic(_ base: Base) throws {
        let e = walkError(patched(try base.bytes(), at: 0, be: 0x5145_564E, width: 4))
        #expect(e?.code == .badMagic)
        #expect(e?.offset == 0)
    }

    @Test("wrong version: 2 (obsolete) and 4", arguments: Base.allCases)
    func badVersion(_ base: Base) throws {
        for v: UInt64 in [2, 4] {
            let e = walkError(patched(try base.bytes(), at: 4, be: v, width: 4))
            #expect(e?.code == .badVersion)
            #expect(e?.offset == 4)
            #expect(e?.field == "version")
        }
    }

    struct TISCorruption: CustomStringConvertible, Sendable {
        var name: String
        var bodyOffset: Int
        var value: UInt64
        var width: Int
        var field: String
        var description: String { name }
    }

    static let tisCorruptions: [TISCorruption] = [
        TISCorruption(name: "locality 5", bodyOffset: 4098, value: 5, width: 1, field: "state.active_locty"),
        TISCorruption(name: "unknown state 9", bodyOffset: 4101 + 21, value: 9, width: 4, field: "state.loc[1].state"),
        TISCorruption(name: "rw_offset 5000", bodyOffset: 4096, value: 5000, width: 2, field: "state.rw_offset"),
    ]

    @Test("tpm-tis values out of range, in a whole stream", arguments: Base.allCases, tisCorruptions)
    func tisValues(_ base: Base, _ c: TISCorruption) throws {
        let b = try base.bytes()
        let s = try Self.section("tpm-tis", in: b)
        let e = walkError(patched(b, at: s.bodyOffset + c.bodyOffset, be: c.value, width: c.width))
        #expect(e?.code == .invalidField)
        #expect(e?.section == "tpm-tis")
        #expect(e?.field == c.field)
        #expect(e?.offset == s.bodyOffset + c.bodyOffset)
    }

    @Test("footer naming another section", arguments: Base.allCases)
    func footerMismatch(_ base: Base) throws {
        let b = try base.bytes()
        let s = try Self.section("tpm-tis", in: b)
        let footer = s.bodyOffset + s.bodyLength
        let e = walkError(patched(b, at: footer + 1, be: UInt64(s.sectionID + 1), width: 4))
        #expect(e?.code == .sectionIDMismatch)
        #expect(e?.section == "tpm-tis")
        #expect(e?.offset == footer + 1)
        let m = walkError(patched(b, at: footer, be: 0x7F, width: 1))
        #expect(m?.code == .missingFooter)
        #expect(m?.offset == footer)
    }

    @Test("a subsection tpm-tis does not have", arguments: Base.allCases)
    func unknownSubsection(_ base: Base) throws {
        var b = try base.bytes()
        let s = try Self.section("tpm-tis", in: b)
        let at = s.bodyOffset + s.bodyLength
        b.insert(contentsOf: [0x05, 13] + Array("tpm-tis/bogus".utf8) + [0, 0, 0, 1], at: at)
        let e = walkError(b)
        #expect(e?.code == .unknownSubsection)
        #expect(e?.section == "tpm-tis")
        #expect(e?.field == "tpm-tis/bogus")
        #expect(e?.offset == at)
    }

    @Test("section version above the description's", arguments: Base.allCases, ["tpm-tis", "tpm-emulator"])
    func versionOutOfRange(_ base: Base, _ name: String) throws {
        let b = try base.bytes()
        let s = try Self.section(name, in: b)
        let e = walkError(patched(b, at: s.bodyOffset - 4, be: 1, width: 4))
        #expect(e?.code == .versionOutOfRange)
        #expect(e?.section == name)
        #expect(e?.offset == s.bodyOffset - 4)
    }

    @Test("tpm-emulator blob size: over the limit, or past the end", arguments: Base.allCases)
    func emulatorLengths(_ base: Base) throws {
        let b = try base.bytes()
        let s = try Self.section("tpm-emulator", in: b)
        let over = walkError(patched(b, at: s.bodyOffset + 4, be: 0x8000_0000, width: 4))
        #expect(over?.code == .lengthOverLimit)
        #expect(over?.field == "state_blobs.permanent.size")
        #expect(over?.offset == s.bodyOffset + 4)
        // A savestate size within the limit that runs past the end of the stream.
        let savestateSize = s.bodyOffset + s.bodyLength - 4
        let past = walkError(patched(b, at: savestateSize, be: UInt64(SwtpmBlob.maximumSize), width: 4))
        #expect(past?.code == .truncated)
        #expect(past?.field == "state_blobs.savestate.buffer")
        #expect(past?.offset == savestateSize + 4)
    }

    /// The stream cut at many offsets: always `truncated`, at an offset inside the record that
    /// was cut and not after the cut; except right after EOF (the vmdesc is optional).
    @Test("truncated at many offsets", arguments: Base.allCases)
    func truncation(_ base: Base) throws {
        let b = try base.bytes()
        let (secs, events) = try Self.layout(b)
        var starts = [0, 8] + secs.map(\.offset)
        var eof = -1
        for e in events {
            if case .endOfStream(let at) = e { eof = at; starts.append(at) }
            if case .vmDescription(_, let at) = e { starts.append(at) }
        }
        starts.sort()
        var cuts = Set<Int>()
        let around = base == .qemu ? [-1, 0, 1, 6, 14] : Array(-2...30)
        for s in starts { for d in around where s + d > 0 && s + d < b.count { cuts.insert(s + d) } }
        for s in secs {
            for d in [-6, -5, -4, -1, 1] where s.bodyOffset + s.bodyLength + d > 0 { cuts.insert(s.bodyOffset + s.bodyLength + d) }
        }
        let stride = base == .qemu ? 4999 : 97
        for c in Swift.stride(from: 1, to: b.count, by: stride) { cuts.insert(c) }
        for cut in cuts.sorted() {
            let e = walkError(Array(b[..<cut]))
            if cut == eof + 1 {
                #expect(e == nil, "cut \(cut) after EOF")
                continue
            }
            let record = starts.last { $0 <= cut } ?? 0
            #expect(e?.code == .truncated, "cut \(cut): \(e.map(String.init(describing:)) ?? "no error")")
            #expect((e?.offset ?? -1) <= cut && (e?.offset ?? -1) >= min(record, cut - 1),
                    "cut \(cut) in the record at \(record): \(e.map(String.init(describing:)) ?? "")")
        }
    }

    @Test("unknown section type, PART of an unopened section, empty idstr")
    func badRecords() throws {
        let b = try Base.tpmOnly.bytes()
        let (_, events) = try Self.layout(b)
        var eof = 0
        for e in events { if case .endOfStream(let at) = e { eof = at } }
        let t = walkError(patched(b, at: eof, be: 0x09, width: 1))
        #expect(t?.code == .unknownSectionType)
        #expect(t?.offset == eof)

        var part = Array(b[..<eof])
        part += [0x02, 0, 0, 0, 99]
        let p = walkError(part)
        #expect(p?.code == .unknownSection)
        #expect(p?.offset == eof + 1)

        var empty = Array(b[..<eof])
        empty += [0x04, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        let i = walkError(empty)
        #expect(i?.code == .invalidField)
        #expect(i?.field == "idstr")
        #expect(i?.offset == eof + 5)
    }

    @Test("commands: known ones walked, unknown or mis-sized refused")
    func commands() throws {
        var w = MigrationStreamWriter()
        try w.writeConfiguration(MigrationConfiguration(machineType: "pc-i440fx-7.2"))
        let at = w.count
        w.writeRaw([0x08, 0x00, 0x02, 0x00, 0x04, 0xDE, 0xAD, 0xBE, 0xEF])  // MIG_CMD_PING
        w.writeEOF()
        let (_, events) = try walkAll(.bytes(w.bytes))
        let cmds = events.compactMap { if case .command(let c) = $0 { c } else { nil } }
        #expect(cmds == [MigrationCommand(id: .ping, data: [0xDE, 0xAD, 0xBE, 0xEF], offset: at)])

        var bad = Array(w.bytes)
        bad[at + 2] = 0x30
        #expect(walkError(bad)?.code == .invalidCommand)
        bad = Array(w.bytes)
        bad[at + 4] = 0x03
        let e = walkError(bad)
        #expect(e?.code == .invalidCommand)
        #expect(e?.field == "command.len")
    }

    @Test("after EOF: no trailer, a foreign byte, a broken vmdesc")
    func trailer() throws {
        var w = MigrationStreamWriter()
        try w.writeConfiguration(MigrationConfiguration(machineType: "pc-i440fx-7.2"))
        w.writeEOF()
        let plain = w.bytes
        let (_, events) = try walkAll(.bytes(plain))
        #expect(events.count == 3)

        let (junk, _) = try walkAll(.bytes(plain + [0x42, 1, 2]))
        #expect(junk.statistics.unexpectedTrailer == 0x42)

        let broken = plain + [0x06, 0, 0, 0, 5] + Array("{bad}".utf8)
        let e = walkError(broken)
        #expect(e?.code == .badVMDescription)
        #expect(e?.section == "vmdesc")

        let huge = plain + [0x06, 0x7F, 0xFF, 0xFF, 0xFF]
        let h = walkError(huge)
        #expect(h?.code == .lengthOverLimit)
        #expect(h?.offset == plain.count + 1)
    }

    /// A trailer longer than the first 256 KiB window is still found before the walk starts.
    @Test("a vmdesc longer than 256 KiB is read up front")
    func longTrailer() throws {
        var w = MigrationStreamWriter()
        try w.writeConfiguration(MigrationConfiguration(machineType: "pc-i440fx-7.2"))
        w.writeEOF()
        let json = Array(("{\"page_size\": 4096, \"devices\": []" + String(repeating: " ", count: 300_000) + "}").utf8)
        let bytes = w.bytes + [0x06] + patched([0, 0, 0, 0], at: 0, be: UInt64(json.count), width: 4) + json
        let walker = try MigrationStreamWalker(source: .bytes(bytes))
        #expect(walker.vmDescription?.pageSize == 4096)
        var events = 0
        try walker.walk { _ in events += 1 }
        #expect(events == 4)
    }

    /// The trailer is found exactly even when the length bytes hold `{` (where analyze-migration.py's
    /// last-NUL-then-brace guess fails, runs-on-this-machine.md §3).
    @Test("locating the vmdesc when its length contains 0x7B")
    func locateBrace() throws {
        let json = "{\"page_size\": 4096, \"devices\": []}" + String(repeating: " ", count: 0x7B - 34)
        let tail: [UInt8] = [0x00, 0x06, 0x00, 0x00, 0x00, 0x7B] + Array(json.utf8)
        #expect(json.utf8.count == 0x7B)
        #expect(VMDescription.locate(inTail: tail) == 1)
        #expect(VMDescription.locate(inTail: [0x00, 0x00, 0x01, 0x02]) == nil)
        #expect(VMDescription.locate(inTail: []) == nil)
    }
}
