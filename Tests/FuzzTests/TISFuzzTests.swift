import Fuzzing
import TIS
import TISConformance
import Testing

/// The TIS op-script fuzzer, seeded: fixed pseudo-random scripts (the same on every machine)
/// plus every checked-in corpus input. Long runs: `Fuzz/` with libFuzzer (docs/FUZZING.md).
@Suite("TIS op-script fuzzer (seeded)")
struct TISFuzzTests {
    /// ≥ 100 000 ops over 5 localities, every width and lane, completions decided by the
    /// script, cancels, resets, save/restore cycles; register invariants checked after each op,
    /// the whole state (a 4 KiB copy, slow in a debug build) after every fourth. No time bound
    /// is asserted (the machine is shared); the time is printed and recorded in docs/FUZZING.md.
    @Test func seededScriptsKeepEveryInvariant() throws {
        var rng = SplitMix64(seed: 0x7153_F022)
        var total = TISFuzzReport()
        let t0 = monotonic()
        var scripts = 0
        while total.ops < 100_000 {
            let script = rng.bytes(6000)
            scripts += 1
            do {
                total += try TISOpScript.run(script, stateCheckInterval: 4)
            } catch {
                Issue.record("script \(scripts): \(error)")
                return
            }
        }
        let took = monotonic() - t0
        print("TIS fuzz: \(total.ops) ops in \(scripts) scripts, \(took) s: \(total)")
        #expect(total.ops >= 100_000)
        // Each kind of op happened many times.
        #expect(total.commandsDelivered > 1000)
        #expect(total.completions > 1000)
        #expect(total.failedCompletions > 100)
        #expect(total.saveRestores > 1000)
        #expect(total.refusedRestores > 10)
        #expect(total.resets > 500)
        #expect(total.hostileStates > 500)
    }

    @Test func checkedInCorpusReplays() throws {
        for (name, bytes) in try Paths.corpusFiles("tis") {
            do { try TISOpScript.run(bytes) } catch { Issue.record("\(name): \(error)") }
        }
    }

    /// Every input is a script: empty, one byte, all zeros, all 0xFF.
    @Test(arguments: [("empty", []), ("one zero", [0x00]), ("zeros", [UInt8](repeating: 0, count: 512)),
                      ("ones", [UInt8](repeating: 0xFF, count: 512)), ("0x10s", [UInt8](repeating: 0x10, count: 512))]
          as [(String, [UInt8])])
    func degenerateScripts(_ name: String, _ bytes: [UInt8]) throws {
        try TISOpScript.run(bytes)
    }
}
