import EmulatorBackend
import Foundation
import TISConformance
import TPMDiagnostics
import Testing
import VMState
#if canImport(Glibc)
import Glibc
#endif

/// Truncated and arbitrary streams: a typed finding or error, never a trap.
@Suite("Truncated and damaged streams")
struct StreamDamageTests {
    /// Where a cut lands in the clean stream.
    enum Cut: String, CaseIterable, Sendable {
        case header, ram, tpmEmulatorBlob, tpmTIS, otherDevice, eofByte

        /// The cut offset in `s`, and the section the finding must name.
        func place(_ s: StreamInspection) -> (offset: Int, section: String)? {
            switch self {
            case .header: return (6, "header")
            case .ram: return s.sections.first.map { ($0.offset - 3000, "ram") }
            case .tpmEmulatorBlob: return s.blobOffset(.permanent).map { ($0 + 500, "tpm-emulator") }
            case .tpmTIS: return s.frontendBodyOffset.map { ($0 + 4101 + 21 * 3 + 2, "tpm-tis") }
            case .otherDevice: return s.sections.first { $0.idstr == "apic" }.map { ($0.bodyOffset + 10, "apic") }
            case .eofByte: return s.eofOffset.map { ($0, "stream") }
            }
        }
    }

    @Test("a stream cut at several offsets: TRUNCATED-STREAM at the cut, in the right section", arguments: Cut.allCases)
    func truncated(_ cut: Cut) async throws {
        let bytes = try RealStreams.bytes(StreamSpec())
        let clean = try StreamInspection.walk(.bytes(bytes), name: "clean")
        let (at, section) = try #require(cut.place(clean))
        let (s, r) = try await troubleshoot(.bytes(Array(bytes.prefix(at))), name: "cut")
        #expect(s.error?.code == .truncated)
        let f = try #require(r.findings.first)
        #expect(f.code == .truncatedStream, "\(r.findings)")
        #expect(f.evidence.offset == at)
        #expect(f.evidence.section == section, "\(f)")
        #expect(f.message.contains("ends at byte \(at)"))
        #expect(r.exitStatus == 1)
    }

    @Test("a cut stream read through a pipe: the end is found where the pipe ends")
    func truncatedPipe() async throws {
        let bytes = try RealStreams.bytes(StreamSpec())
        let clean = try StreamInspection.walk(.bytes(bytes), name: "clean")
        let at = try #require(clean.blobOffset(.volatile)) + 1000
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        let part = Array(bytes.prefix(at))
        let (readEnd, writeEnd) = (fds[0], fds[1])
        let writer = Thread {
            part.withUnsafeBytes { p in
                var done = 0
                while done < p.count, let b = p.baseAddress {
                    let n = write(writeEnd, b + done, p.count - done)
                    if n <= 0 { break }
                    done += n
                }
            }
            close(writeEnd)
        }
        writer.start()
        defer { close(readEnd) }
        let (_, r) = try await troubleshoot(.fileDescriptor(readEnd), name: "-")
        let f = try #require(r.findings.first)
        #expect(f.code == .truncatedStream && f.evidence.offset == at && f.evidence.section == "tpm-emulator")
    }

    @Test("not a migration stream: unreadable, not a finding")
    func unreadable() throws {
        for bytes: [UInt8] in [Array("hello, world\n".utf8), [0x51, 0x45, 0x56, 0x4D, 0, 0, 0, 2], [0x51, 0x45, 0x56, 0x4D, 0, 0, 0, 9]] {
            let s = try StreamInspection.walk(.bytes(bytes), name: "x")
            #expect(s.isUnreadable)
        }
        #expect(throws: StreamError.self) { try StreamInspection.walk(.path("/nonexistent/stream.bin"), name: "x") }
    }

    @Test("any byte string: random bytes and damaged real streams give findings or unreadable, never a trap")
    func anyBytes() async throws {
        let bytes = try RealStreams.bytes(StreamSpec())
        let key = try MigrationKey(key: [UInt8](repeating: 7, count: 16), mode: .aes128CBC)
        var rng = SplitMix64(seed: 0x7EA5_0000)
        var outcomes: [String: Int] = [:]
        for i in 0..<80 {
            var b: [UInt8]
            switch i % 4 {
            case 0:
                b = (0..<Int(rng.next() % 300)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                if i % 8 == 0 { b = [0x51, 0x45, 0x56, 0x4D, 0, 0, 0, 3] + b }
            case 1:
                b = bytes
                for _ in 0..<(1 + Int(rng.next() % 4)) {
                    b[Int(rng.next() % UInt64(b.count))] = UInt8(truncatingIfNeeded: rng.next())
                }
            case 2:
                // Damage inside the TPM sections, where the checks look hardest.
                b = bytes
                let s = try StreamInspection.walk(.bytes(bytes), name: "clean")
                let lo = s.emulatorBodyOffset ?? 0
                let hi = (s.frontendBodyOffset ?? lo) + 4206
                b[lo + Int(rng.next() % UInt64(hi - lo))] ^= UInt8(truncatingIfNeeded: rng.next() | 1)
            default:
                b = Array(bytes.prefix(Int(rng.next() % UInt64(bytes.count))))
            }
            let s = try StreamInspection.walk(.bytes(b), name: "fuzz")
            if s.isUnreadable {
                outcomes["unreadable", default: 0] += 1
                continue
            }
            let r = await LibtpmsTestLock.run {
                Troubleshooter.check(s, destination: DestinationOptions(tpmFamily: .tpm20, migrationKey: i % 3 == 0 ? key : nil))
            }
            _ = InspectRenderer.json(s)
            _ = ReportRenderer.text(r, s)
            #expect(r.exitStatus == 0 || r.exitStatus == 1)
            for f in r.findings { outcomes[f.code.rawValue, default: 0] += 1 }
            if r.findings.isEmpty { outcomes["clean", default: 0] += 1 }
        }
        #expect(outcomes["unreadable", default: 0] > 0)
        #expect(outcomes["TRUNCATED-STREAM", default: 0] > 0)
        print("damaged streams:", outcomes.sorted { $0.key < $1.key })
    }
}

extension StreamDamageTests {
    @Test("a stream of 70 000 tiny sections: the inspection keeps 2^16 of them and counts the rest")
    func manySections() throws {
        var w = MigrationStreamWriter()
        try w.writeConfiguration(MigrationConfiguration(machineType: MigrationFormat.i440fxMachineType))
        var bytes = w.bytes
        // FULL section 1 "x" instance 0 version 0, empty body, footer: 17 bytes each.
        let one: [UInt8] = [0x04, 0, 0, 0, 1, 1, UInt8(ascii: "x"), 0, 0, 0, 0, 0, 0, 0, 0, 0x7E, 0, 0, 0, 1]
        for _ in 0..<70_000 { bytes += one }
        bytes.append(0x00)
        let s = try StreamInspection.walk(.bytes(bytes), name: "many")
        #expect(s.error == nil && s.sawEOF)
        #expect(s.sections.count == StreamInspection.maximumKeptRecords)
        #expect(s.droppedRecords == 70_000 - StreamInspection.maximumKeptRecords)
    }
}
