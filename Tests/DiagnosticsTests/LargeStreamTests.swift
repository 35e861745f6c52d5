import Foundation
import QEMUHarness
import TISConformance
import TPMDiagnostics
import Testing
import VMState
#if canImport(Glibc)
import Glibc
#endif

/// A real 1 GiB QEMU 7.2 stream, walked while QEMU writes it, in bounded memory.
@Suite("A 1 GiB QEMU stream in bounded memory")
struct LargeStreamTests {
    @Test("QEMU -m 1G of random RAM through a pipe: every page counted, TPM state checked, RSS flat")
    func oneGiB() async throws {
        let work = try QEMUMachine.makeWorkDirectory()
        defer { work.remove() }
        let ramFile = work.file("ram.img")
        // 1 GiB of random bytes: 16 MiB from the kernel, written 64 times with a fresh first
        // word per page so no two pages are equal.
        let chunkSize = 16 << 20
        var chunk = [UInt8](repeating: 0, count: chunkSize)
        let urandom = open("/dev/urandom", O_RDONLY)
        #expect(urandom >= 0)
        var got = 0
        while got < chunkSize {
            let n = chunk.withUnsafeMutableBytes { p in read(urandom, p.baseAddress.map { $0 + got }, chunkSize - got) }
            if n <= 0 { break }
            got += n
        }
        close(urandom)
        let out = open(ramFile, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        #expect(out >= 0)
        for i in 0..<64 {
            chunk.withUnsafeMutableBytes { p in
                guard let b = p.baseAddress else { return }
                for page in stride(from: 0, to: chunkSize, by: 4096) { b.storeBytes(of: UInt64(i << 32 | page), toByteOffset: page, as: UInt64.self) }
                var done = 0
                while done < chunkSize {
                    let n = write(out, b + done, chunkSize - done)
                    if n <= 0 { break }
                    done += n
                }
            }
        }
        close(out)
        chunk = []
        let fifo = work.file("stream.fifo")
        #expect(mkfifo(fifo, 0o600) == 0)

        let m = try QEMUMachine.start(machine: .pc, device: .tis,
                                      extraArguments: ["-m", "1G", "-object", "memory-backend-file,id=mem,size=1G,mem-path=\(ramFile),share=on",
                                                       "-machine", "memory-backend=mem"],
                                      workDirectory: work, timeout: 20)
        defer { m.close() }
        try m.qmp.setMaxBandwidth(Int64(64) << 30)
        let start = Date()
        try m.qmp.migrate(uri: "exec:cat > \(fifo)")
        let fd = open(fifo, O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        let baseline = residentKiB()
        var peak = baseline
        let s = try StreamInspection.walk(.fileDescriptor(fd), name: "fifo") { _ in peak = max(peak, residentKiB()) }
        let seconds = Date().timeIntervalSince(start)
        peak = max(peak, residentKiB())
        #expect(try m.qmp.waitForMigration(timeout: 30).status == "completed")

        #expect(s.error == nil, "\(String(describing: s.error))")
        #expect(s.sawEOF && s.vmDescription != nil)
        #expect(s.ram.blocks.first { $0.name == "mem" }?.length == 1 << 30)
        #expect(s.ram.pages >= (1 << 30) / 4096, "pages \(s.ram.pages), zero \(s.ram.zeroPages)")
        #expect(s.bytesRead > 1 << 30)
        #expect(s.tis != nil && s.emulatorBlobs != nil)
        let r = await LibtpmsTestLock.run { Troubleshooter.check(s, destination: DestinationOptions(tpmFamily: .tpm20, frontend: "tpm-tis", machine: "pc")) }
        #expect(r.findings.isEmpty, "\(r.findings)")
        let growthMiB = Double(peak - baseline) / 1024
        #expect(growthMiB < 64, "RSS grew by \(growthMiB) MiB while walking \(s.bytesRead >> 20) MiB")
        #expect(seconds < 40)
        print(String(format: "1 GiB QEMU stream: %d MiB walked in %.1f s (%.0f MiB/s) through a pipe, RSS %d -> peak %d KiB (+%.1f MiB)",
                     s.bytesRead >> 20, seconds, Double(s.bytesRead) / 1_048_576 / seconds, baseline, peak, growthMiB))
    }
}
