import EmulatorBackend
import Foundation
import TIS
import Testing
@testable import VMState

/// A stream of hundreds of MB, generated on the fly into a pipe (never stored), walked in
/// constant memory: the walker keeps one input buffer and no RAM page.
@Suite("Large streams in bounded memory")
struct LargeStreamTests {
    /// Pages per PART section (QEMU sends up to its rate limit per iteration; 1 MiB here).
    static let pagesPerSection = 256

    /// Writes header, configuration, `ram` START (`pc.ram` of `pages` pages + `tpm-ppi`), PART
    /// sections of PAGE and ZERO records (every fourth page zero, the first record of each
    /// section with its idstr, the rest CONTINUE), a `ram` END with the PPI page, the TPM
    /// sections, EOF and the vmdesc. Returns false if the reader stopped early.
    static func generate(into fd: Int32, pages: Int, ppi: [UInt8], tis: TISState, blobs: TPMStateBlobs) -> Bool {
        guard let head = try? {
            var w = MigrationStreamWriter()
            try w.writeConfiguration(MigrationConfiguration(machineType: MigrationFormat.i440fxMachineType))
            try w.writeRAMSetup(sectionID: 2, blocks: [RAMBlockInfo(name: "pc.ram", length: UInt64(pages) * 4096),
                                                       RAMBlockInfo(name: "tpm-ppi", length: 4096)])
            return w
        }() else { return false }
        guard writeAll(fd, head.bytes) else { return false }

        var page = [UInt8](repeating: 0, count: 4096)
        var seed: UInt64 = 0x9E37_79B9_7F4A_7C15
        for i in 0..<4096 {
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            page[i] = UInt8(truncatingIfNeeded: seed >> 33)
        }
        let name = Array("pc.ram".utf8)
        var buf = [UInt8](repeating: 0, count: pagesPerSection * (8 + 1 + name.count + 4096) + 64)
        var next = 0
        while next < pages {
            let n = min(pagesPerSection, pages - next)
            let used = buf.withUnsafeMutableBufferPointer { b -> Int in
                guard let p = b.baseAddress else { return 0 }
                var o = 0
                func be(_ v: UInt64, _ width: Int) {
                    for k in 0..<width { p[o + k] = UInt8(truncatingIfNeeded: v >> (8 * (width - 1 - k))) }
                    o += width
                }
                p[o] = SectionType.part.rawValue; o += 1
                be(2, 4)
                for j in 0..<n {
                    let index = next + j
                    var flags: RAMSaveFlags = index % 4 == 3 ? .zero : .page
                    if j > 0 { flags.insert(.continue) }
                    be(UInt64(index) * 4096 | flags.rawValue, 8)
                    if j == 0 {
                        p[o] = UInt8(name.count); o += 1
                        for c in name { p[o] = c; o += 1 }
                    }
                    if flags.contains(.zero) {
                        p[o] = 0; o += 1
                    } else {
                        page.withUnsafeBufferPointer { src in
                            if let s = src.baseAddress { (p + o).update(from: s, count: 4096) }
                        }
                        be(UInt64(index), 8)   // make every page different
                        o += 4096 - 8
                    }
                }
                be(RAMSaveFlags.eos.rawValue, 8)
                p[o] = SectionType.footer.rawValue; o += 1
                be(2, 4)
                return o
            }
            guard writeAll(fd, Array(buf[..<used])) else { return false }
            next += n
        }

        guard let tail = try? {
            var w = MigrationStreamWriter()
            try w.writeRAMPages(.end, sectionID: 2, blocks: [("tpm-ppi", ppi)])
            try w.writeDevice(sectionID: 4, idstr: EmulatorSection.idstr, description: EmulatorSection.description,
                              object: EmulatorSection.object(blobs))
            try w.writeDevice(sectionID: 40, idstr: TISSection.idstr, description: TISSection.description,
                              object: TISSection.object(tis))
            w.writeEOF()
            w.writeVMDescription()
            return Array(w.bytes[8...])
        }() else { return false }
        return writeAll(fd, tail)
    }

    @Test("hundreds of MB through a pipe: every page counted, TPM state decoded, RSS flat")
    func walkThroughPipe() throws {
        // Guest RAM in MiB; a quarter of its pages are zero pages, so the stream is ≈ 3/4 of it.
        let megabytes = Int(ProcessInfo.processInfo.environment["VMSTATE_LARGE_STREAM_MB"] ?? "") ?? 640
        let pages = megabytes * 256
        let ppi = (0..<4096).map { UInt8(truncatingIfNeeded: $0 ^ 0x5A) }
        let tis = sampleTISState(), blobs = sampleBlobs()
        let baseline = procStatusKiB("VmRSS") ?? 0

        let fd = pipeFeeding { out in
            _ = LargeStreamTests.generate(into: out, pages: pages, ppi: ppi, tis: tis, blobs: blobs)
        }
        defer { close(fd) }
        let walker = try MigrationStreamWalker(source: .fileDescriptor(fd))
        var peak = baseline
        var ramSections = 0
        var gotTIS: TISState?
        var gotBlobs: TPMStateBlobs?
        let start = Date()
        try walker.walk { e in
            guard case .section(let s) = e else { return }
            switch s.content {
            case .ram:
                ramSections += 1
                if ramSections % 64 == 0 { peak = max(peak, procStatusKiB("VmRSS") ?? 0) }
            case .tpmTIS(let t): gotTIS = t
            case .tpmEmulator(let b): gotBlobs = b
            default: break
            }
        }
        let seconds = Date().timeIntervalSince(start)
        peak = max(peak, procStatusKiB("VmRSS") ?? 0)
        let bytes = walker.statistics.bytesRead

        #expect(bytes > (pages - pages / 4) * 4096)
        #expect(walker.statistics.pages == pages - pages / 4 + 1)
        #expect(walker.statistics.zeroPages == pages / 4)
        #expect(ramSections == 2 + (pages + Self.pagesPerSection - 1) / Self.pagesPerSection)
        #expect(gotTIS == tis)
        #expect(gotBlobs == blobs)
        #expect(walker.capturedRAMBlocks["tpm-ppi"]?.bytes == ppi)
        #expect(walker.vmDescription?.devices.map(\.name) == ["tpm-emulator", "tpm-tis"])
        // Memory: one 1 MiB input buffer; RSS grows by far less than the stream.
        #expect(walker.statistics.bufferCapacity == MigrationInput.defaultChunkSize)
        let growthMiB = Double(peak - baseline) / 1024
        #expect(growthMiB < 48, "RSS grew by \(growthMiB) MiB while walking \(bytes >> 20) MiB")
        print(String(format: "large stream: %d MiB in %.2f s = %.0f MiB/s, RSS %d → %d KiB (peak growth %.1f MiB)",
                     bytes >> 20, seconds, Double(bytes) / 1_048_576 / seconds, baseline, peak, growthMiB))
    }
}
