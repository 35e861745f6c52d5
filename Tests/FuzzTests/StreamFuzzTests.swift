import EmulatorBackend
import Foundation
import Fuzzing
import TIS
import TISConformance
import Testing
import VMState

/// The migration-stream fuzzer, seeded: arbitrary bytes, mutations of TPM-only streams built
/// from the real QEMU 7.2 fixtures, structural mutations of the whole fixtures, and every
/// checked-in corpus input. Each must end in success or a `StreamError`, never a trap.
@Suite("migration stream fuzzer (seeded)")
struct StreamFuzzTests {
    /// The TPM-only streams of both fixtures (what a VMM hands to QEMU) and a CRB variant.
    static func tpmOnlySeeds() throws -> [[UInt8]] {
        var seeds: [[UInt8]] = []
        for name in ["pc-tis.bin", "q35-tis.bin"] {
            let whole = try Paths.fixture(name)
            let state = try TPMMigrationState(source: .bytes(whole))
            seeds.append(try state.encodedStream())
            var small = state
            small.emulatorBlobs = TPMStateBlobs(permanent: TPMStateBlob(data: Array((state.emulatorBlobs?.permanent.data ?? []).prefix(64))))
            seeds.append(try small.encodedStream())
            var noDesc = TPMMigrationState.StreamOptions()
            noDesc.includeVMDescription = false
            seeds.append(try state.encodedStream(noDesc))
            let crb = TPMMigrationState(machineType: state.machineType, crbRegisters: Array(repeating: 0, count: 32),
                                        crbCommandBuffer: [UInt8](repeating: 0, count: 4096))
            seeds.append(try crb.encodedStream())
        }
        return seeds
    }

    @Test func twentyThousandHostileStreams() throws {
        var rng = SplitMix64(seed: 0x5EED_57EA)
        let seeds = try Self.tpmOnlySeeds()
        var accepted = 0, refused: [StreamError.Code: Int] = [:]
        let t0 = monotonic()
        let total = 20_000
        for i in 0..<total {
            let input: [UInt8]
            switch i % 4 {
            case 0:
                // Arbitrary bytes after a valid header half the time.
                let n = Int(rng.next() % 512)
                input = (i % 8 == 0 ? [0x51, 0x45, 0x56, 0x4D, 0, 0, 0, 3] : []) + rng.bytes(n)
            default:
                let seed = seeds[Int(rng.next() % UInt64(seeds.count))]
                input = StreamFuzz.mutate(seed, count: Int(rng.next() % 4) + 1, rng: &rng)
            }
            do {
                switch try StreamFuzz.run(input, smallChunks: i % 3 == 0, step: i) {
                case .accepted: accepted += 1
                case .refused(let c): refused[c, default: 0] += 1
                }
            } catch {
                Issue.record("input \(i) (\(input.count) bytes): \(error)")
                return
            }
        }
        let took = monotonic() - t0
        print("stream fuzz: \(total) inputs, \(accepted) accepted, \(took) s, refusals \(refused)")
        #expect(accepted > 100)
        #expect(refused.count >= 5)
    }

    /// Mutations of the whole real streams at their structure (headers, footers, TPM
    /// sections, the vmdesc), and truncation at every section boundary.
    @Test(arguments: ["pc-tis.bin", "q35-tis.bin"])
    func mutatedRealStreams(_ name: String) throws {
        var rng = SplitMix64(seed: 0xF1C5_0000 ^ UInt64(name.count))
        let whole = try Paths.fixture(name)
        let offsets = StreamFuzz.structuralOffsets(whole)
        #expect(offsets.count > 1000)
        for i in 0..<40 {
            let input = StreamFuzz.mutateAt(whole, offsets: offsets, rng: &rng)
            do { try StreamFuzz.run(input, smallChunks: i % 2 == 0, step: i) } catch { Issue.record("\(name) #\(i): \(error)") }
        }
    }

    @Test func checkedInCorpusReplays() throws {
        for (name, bytes) in try Paths.corpusFiles("stream") {
            do { try StreamFuzz.run(bytes) } catch { Issue.record("\(name): \(error)") }
        }
    }
}

/// `FUZZ_SEED_DIR=DIR swift test --filter writeStreamSeeds` writes the TPM-only seed streams
/// (derived from the real fixtures) into DIR for a libFuzzer corpus; without it, checks they build.
@Test func writeStreamSeeds() throws {
    let seeds = try StreamFuzzTests.tpmOnlySeeds()
    #expect(seeds.count == 8)
    guard let dir = ProcessInfo.processInfo.environment["FUZZ_SEED_DIR"] else { return }
    for (i, s) in seeds.enumerated() {
        try Data(s).write(to: URL(fileURLWithPath: dir + "/tpm-only-\(i).bin"))
    }
}
