import EmulatorBackend
import TIS
import VMState

/// How a hostile migration stream ended.
public enum StreamFuzzOutcome: Sendable, Equatable {
    /// The walk and the TPM extraction succeeded; the extracted state re-encoded and read back
    /// equal, and its `tpm-tis` state restored into a device.
    case accepted
    /// A typed refusal.
    case refused(StreamError.Code)
}

/// The migration-stream fuzz target: `MigrationStreamWalker` and `TPMMigrationState(source:)`
/// over any byte string. Every input must end in success or a `StreamError`, never a trap,
/// with every kept buffer within its named limit; an accepted TPM state must re-encode to a
/// stream that reads back equal, and its TIS state must restore into a device.
public enum StreamFuzz {
    public static let target = "stream"

    /// Walker options for fuzzing: small input chunks (more refills, more boundaries) unless
    /// `defaultChunk`; otherwise the library's defaults.
    public static func options(smallChunks: Bool) -> MigrationStreamWalker.Options {
        var o = MigrationStreamWalker.Options()
        if smallChunks { o.chunkSize = 4096 }
        return o
    }

    /// Runs one input. `smallChunks` makes the reader refill every 4 KiB.
    @discardableResult
    public static func run(_ data: [UInt8], smallChunks: Bool = false, step: Int = 0) throws(FuzzViolation) -> StreamFuzzOutcome {
        let o = options(smallChunks: smallChunks)
        // The raw walker, every event (descriptions from the vmdesc when there is one).
        do {
            let walker = try MigrationStreamWalker(source: .bytes(data), options: o)
            try walker.walk { (event: MigrationStreamEvent) throws(StreamError) in
                if case .section(let s) = event, s.bodyLength < 0 || s.bodyLength > data.count {
                    throw StreamError(.invalidField, section: s.idstr, field: "fuzz", offset: s.offset, detail: "impossible body length")
                }
            }
            let stats = walker.statistics
            guard stats.bufferCapacity <= max(o.chunkSize, 4096) * 2 else {
                throw FuzzViolation(target: target, step: step, operation: "walk",
                                    "input buffer grew to \(stats.bufferCapacity) bytes")
            }
            for (name, block) in walker.capturedRAMBlocks where block.bytes.count > o.maximumCapturedBlockSize {
                throw FuzzViolation(target: target, step: step, operation: "walk",
                                    "captured block \(name) holds \(block.bytes.count) bytes")
            }
        } catch let e as FuzzViolation {
            throw e
        } catch let e as StreamError {
            if e.field == "fuzz" {
                throw FuzzViolation(target: target, step: step, operation: "walk", e.description)
            }
        } catch {
            throw FuzzViolation(target: target, step: step, operation: "walk", "untyped error \(error)")
        }

        // The TPM extraction a VMM uses.
        let state: TPMMigrationState
        do {
            state = try TPMMigrationState(source: .bytes(data), options: o)
        } catch {
            return .refused(error.code)
        }
        try checkAccepted(state, step: step)
        return .accepted
    }

    static func checkAccepted(_ state: TPMMigrationState, step: Int) throws(FuzzViolation) {
        func fail(_ m: String) -> FuzzViolation { FuzzViolation(target: target, step: step, operation: "accepted", m) }
        if let blobs = state.emulatorBlobs {
            for t in TPMStateBlobType.allCases where blobs[t].data.count > SwtpmBlob.maximumSize {
                throw fail("\(t) blob of \(blobs[t].data.count) bytes kept")
            }
        }
        if let ppi = state.ppi, ppi.count > 64 * 1024 { throw fail("PPI block of \(ppi.count) bytes kept") }
        if let crb = state.crbCommandBuffer, crb.count > 64 * 1024 { throw fail("CRB buffer of \(crb.count) bytes kept") }
        if let tis = state.tis {
            do { try tis.validate() } catch { throw fail("accepted tpm-tis state does not validate: \(error)") }
            let device = TISDevice(runner: BackendRunner(backend: ScriptedBackend(), mode: .inline))
            do {
                try device.reset(incoming: true)
                try device.restore(tis)
            } catch {
                throw fail("accepted tpm-tis state does not restore: \(error)")
            }
            guard device.currentState == tis else { throw fail("restored state differs") }
        }
        // What we accept we can write, and what we write reads back the same.
        let again: TPMMigrationState
        do {
            again = try TPMMigrationState(source: .bytes(try state.encodedStream()))
        } catch {
            // A machine type QEMU's writer refuses (too long) is the only acceptable refusal.
            if error.code == .lengthOverLimit || error.code == .invalidField { return }
            throw fail("re-encoding an accepted state failed: \(error)")
        }
        guard again == state else { throw fail("re-encoded state reads back different") }
    }

    // MARK: Mutations

    /// Deterministic structured mutations of `seed` (a real stream): bit flips, interesting
    /// integers at any offset, truncations, insertions, deletions, duplications. `rng` picks.
    public static func mutate(_ seed: [UInt8], count: Int, rng: inout some RandomNumberGenerator) -> [UInt8] {
        var b = seed
        let interesting: [UInt64] = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
                                     0x1000, 0x10000, UInt64(seed.count), UInt64(seed.count) + 1, 0xFFFF_FFFF_FFFF_FFFF]
        for _ in 0..<max(count, 1) {
            guard !b.isEmpty else { b = [0x51]; continue }
            let at = Int.random(in: 0..<b.count, using: &rng)
            switch Int.random(in: 0..<8, using: &rng) {
            case 0: b[at] ^= UInt8(1) << UInt8.random(in: 0..<8, using: &rng)
            case 1: b[at] = UInt8.random(in: 0...255, using: &rng)
            case 2, 3:
                let v = interesting.randomElement(using: &rng) ?? 0
                let w = [1, 2, 4, 8].randomElement(using: &rng) ?? 4
                for i in 0..<w where at + i < b.count { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(w - 1 - i))) }
            case 4: b.removeSubrange(at...)
            case 5:
                let n = Int.random(in: 1...16, using: &rng)
                b.insert(contentsOf: (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }, at: at)
            case 6: b.removeSubrange(at..<min(b.count, at + Int.random(in: 1...64, using: &rng)))
            default:
                let n = min(Int.random(in: 1...64, using: &rng), b.count - at)
                b.insert(contentsOf: b[at..<at + n], at: at)
            }
        }
        return b
    }

    /// Offsets worth mutating in a whole stream: every section header and footer, the vmdesc,
    /// the TPM sections (found by walking `stream` once); mutating RAM page data teaches little.
    public static func structuralOffsets(_ stream: [UInt8]) -> [Int] {
        var out: [Int] = Array(0..<min(64, stream.count))
        guard let w = try? MigrationStreamWalker(source: .bytes(stream)) else { return out }
        try? w.walk { (e: MigrationStreamEvent) throws(StreamError) in
            if case .section(let s) = e {
                out += (max(0, s.offset - 8)..<min(stream.count, s.offset + 32))
                if s.idstr.hasPrefix("tpm") {
                    out += (s.bodyOffset..<min(stream.count, s.bodyOffset + s.bodyLength + 16))
                } else {
                    out += (max(0, s.bodyOffset + s.bodyLength - 4)..<min(stream.count, s.bodyOffset + s.bodyLength + 8))
                }
            }
        }
        out += (max(0, stream.count - 4096)..<stream.count)      // EOF and the vmdesc trailer
        return out
    }

    /// A mutation of a whole stream at structural offsets.
    public static func mutateAt(_ stream: [UInt8], offsets: [Int], rng: inout some RandomNumberGenerator) -> [UInt8] {
        var b = stream
        guard let at = offsets.randomElement(using: &rng), at < b.count else { return b }
        switch Int.random(in: 0..<5, using: &rng) {
        case 0: b[at] ^= UInt8(1) << UInt8.random(in: 0..<8, using: &rng)
        case 1: b[at] = [0, 0xFF, 0x7F, 0x80, 0x01].randomElement(using: &rng) ?? 0
        case 2:
            for i in 0..<4 where at + i < b.count { b[at + i] = 0xFF }
        case 3: b.removeSubrange(at...)
        default: b.insert(contentsOf: [UInt8](repeating: UInt8.random(in: 0...255, using: &rng), count: Int.random(in: 1...8, using: &rng)), at: at)
        }
        return b
    }
}
