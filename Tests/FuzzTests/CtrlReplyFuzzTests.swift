import EmulatorBackend
import Fuzzing
import TISConformance
import Testing

/// The swtpm-reply fuzzer, seeded: ctrl response decoders, the ctrl client's framing and the
/// data channel's response reader over replies that are random, or valid replies mutated.
@Suite("swtpm reply fuzzer (seeded)")
struct CtrlReplyFuzzTests {
    /// Replies shaped like swtpm's: a result word (0, an error, TPM_RETRY) then a payload whose
    /// length fields are sometimes right, sometimes lies.
    static func reply(_ rng: inout SplitMix64) -> [UInt8] {
        let results: [UInt32] = [0, 0, 0, 0x03, 0x09, 0x0A, 0x800, 0x801, 0xFFFF_FFFF]
        let r = results[Int(rng.next() % UInt64(results.count))]
        var out: [UInt8] = [UInt8(r >> 24), UInt8(truncatingIfNeeded: r >> 16), UInt8(truncatingIfNeeded: r >> 8), UInt8(truncatingIfNeeded: r)]
        switch rng.next() % 4 {
        case 0: out += rng.bytes(Int(rng.next() % 24))
        case 1:
            // A GET_STATEBLOB head: flags, totlength, length, then up to that much data.
            let len = UInt32(rng.next() % 64)
            let claimed = rng.next() % 3 == 0 ? UInt32(truncatingIfNeeded: rng.next()) : len
            out += [0, 0, 0, 0] + be32(claimed) + be32(len) + rng.bytes(Int(len))
        case 2:
            // A TPM response on the data channel: tag, size, code.
            let n = UInt32(rng.next() % 40)
            let size = rng.next() % 3 == 0 ? UInt32(truncatingIfNeeded: rng.next()) : n
            out = [0x80, 0x01] + be32(size) + rng.bytes(Int(n) - 6 > 0 ? Int(n) - 6 : 4)
        default:
            // A blob container (SwtpmBlob): header then TLVs with any lengths.
            out = [0x02, 0x01, 0x00, 0x00, 0x00, 0x0A] + rng.bytes(4) + [0x00, 0x01] + be32(UInt32(rng.next() % 32)) + rng.bytes(Int(rng.next() % 32))
        }
        return out
    }

    static func be32(_ v: UInt32) -> [UInt8] {
        [UInt8(v >> 24), UInt8(truncatingIfNeeded: v >> 16), UInt8(truncatingIfNeeded: v >> 8), UInt8(truncatingIfNeeded: v)]
    }

    @Test func hundredThousandHostileReplies() throws {
        var rng = SplitMix64(seed: 0xC791_0FF5)
        var total = CtrlReplyFuzz.Outcome()
        let t0 = monotonic()
        for i in 0..<100_000 {
            // Decoders on every input; the socket paths on one in eight (each costs a socketpair).
            let mode: UInt8 = i % 8 == 0 ? UInt8(truncatingIfNeeded: rng.next()) | 1 : 0
            let body = rng.next() % 4 == 0 ? rng.bytes(Int(rng.next() % 48)) : Self.reply(&rng)
            do {
                total += try CtrlReplyFuzz.run([mode] + body, step: i)
            } catch {
                Issue.record("reply \(i): \(error)")
                return
            }
        }
        let took = monotonic() - t0
        print("ctrl fuzz: 100000 replies, \(took) s: \(total)")
        #expect(total.decoded > 10_000)
        #expect(total.refusedDecodes > 10_000)
        #expect(total.ctrlSucceeded > 100 && total.ctrlFailed > 100)
        #expect(total.dataSucceeded > 100 && total.dataFailed > 100)
    }

    @Test func checkedInCorpusReplays() throws {
        for (name, bytes) in try Paths.corpusFiles("ctrl") {
            do { try CtrlReplyFuzz.run(bytes) } catch { Issue.record("\(name): \(error)") }
        }
    }
}
