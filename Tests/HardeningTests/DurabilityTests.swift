import EmulatorBackend
import Foundation
import QEMUHarness
import TIS
import TISConformance
import TISDriver
import Testing
import VMState
#if canImport(Glibc)
import Glibc
#endif

/// Moves a TPM from `source` to a new guest over `backend` the way a VMM migrates: save with
/// the backend, optionally through QEMU's migration stream (written and read back), INMIGRATE
/// reset of the destination, restore.
func migrate(_ source: Guest, to backend: any TPMBackend, throughStream: Bool) throws -> Guest {
    var (tis, blobs) = try source.device.saveWithBackend()
    if throughStream {
        let stream = try TPMMigrationState(machineType: "pc-i440fx-7.2", tis: tis, emulatorBlobs: blobs).encodedStream()
        let back = try TPMMigrationState(source: .bytes(stream))
        tis = try #require(back.tis)
        blobs = try #require(back.emulatorBlobs)
    }
    let destination = try Guest(backend: backend, start: .incoming)
    try destination.device.restore(tis, blobs: blobs)
    return destination
}

/// PCRs (within a boot), NV indexes and persistent keys survive save/restore cycles and
/// repeated migrations, on both backends; the libtpms state directory survives a kill at any
/// point of a write.
@Suite("durability")
struct DurabilityTests {
    /// 100 save/restore cycles of the embedded libtpms (every tenth through the stream); PCR 16
    /// is extended in every cycle and must hold the running hash chain.
    @Test func libtpmsHundredSaveRestoreCycles() async throws {
        try await LibtpmsTestLock.run {
            let dir = try WorkDirectory(prefix: "hardening-durable")
            defer { dir.remove() }
            let backend = try LibtpmsBackend(version: .tpm20, stateDirectory: dir.path)
            defer { backend.shutdown() }
            var guest = try Guest(backend: backend)
            var content = try TPMContent.provision(guest)
            for cycle in 0..<100 {
                let digest = Crypto.sha256([UInt8(truncatingIfNeeded: cycle), 0x16])
                try guest.extend16(digest)
                content.pcr16 = Crypto.pcrExtendSHA256([digest], from: content.pcr16)
                guest = try migrate(guest, to: backend, throughStream: cycle % 10 == 0)
                let now = try TPMContent.read(guest)
                #expect(now == content, "cycle \(cycle)")
                if now != content { return }
            }
        }
    }

    /// 40 migrations between two swtpm 0.7.1 processes, back and forth, every fourth through
    /// the stream; PCR 16 extended on every hop.
    @Test func swtpmRepeatedMigrations() throws {
        let tpms = [try LiveSwtpm("mig-a"), try LiveSwtpm("mig-b")]
        var guest = try Guest(backend: try tpms[0].backend())
        var content = try TPMContent.provision(guest)
        for hop in 1...40 {
            let digest = Crypto.sha256([UInt8(hop), 0x61])
            try guest.extend16(digest)
            content.pcr16 = Crypto.pcrExtendSHA256([digest], from: content.pcr16)
            let target = tpms[hop % 2]
            let next = try migrate(guest, to: try target.backend(), throughStream: hop % 4 == 0)
            guest.releaseCtrl()                      // the source goes away (swtpm keeps running)
            guest = next
            let now = try TPMContent.read(guest)
            #expect(now == content, "hop \(hop)")
            if now != content { return }
        }
    }

    /// The blobs are swtpm's migration form on both backends: libtpms → swtpm → libtpms.
    @Test func acrossBackends() async throws {
        try await LibtpmsTestLock.run {
            let dir = try WorkDirectory(prefix: "hardening-across")
            defer { dir.remove() }
            let libtpms = try LibtpmsBackend(version: .tpm20, stateDirectory: dir.path)
            defer { libtpms.shutdown() }
            let first = try Guest(backend: libtpms)
            let content = try TPMContent.provision(first)
            let tpm = try LiveSwtpm("across")
            let onSwtpm = try migrate(first, to: try tpm.backend(), throughStream: true)
            #expect(try TPMContent.read(onSwtpm) == content)
            let back = try migrate(onSwtpm, to: libtpms, throughStream: true)
            #expect(try TPMContent.read(back) == content)
        }
    }

    /// `tis-sim nv write` SIGKILLed at random points of its run (libtpms writing NVChip through
    /// `StateDirectory.writeFileAtomically`: temporary file, fsync, rename, fsync): the state
    /// directory always loads and the index holds the old or the new value, never anything else.
    @Test func stateDirectorySurvivesKillsDuringWrites() throws {
        let tool = Paths.packageRoot + "/.build/debug/tis-sim"
        try #require(FileManager.default.isExecutableFile(atPath: tool), "build tis-sim first (make test builds it)")
        let dir = try WorkDirectory(prefix: "hardening-kill")
        defer { dir.remove() }
        let state = try dir.subdirectory("state")
        let log = dir.file("tool.log")
        func run(_ args: [String], killAfter: Double? = nil) throws -> (Bool, String) {
            _ = try? FileManager.default.removeItem(atPath: log)
            let child = try ChildProcess(executable: tool, arguments: ["nv"] + args + ["--state-dir", state], outputPath: log)
            if let killAfter {
                usleep(useconds_t(killAfter * 1e6))
                child.signal(SIGKILL)
            }
            #expect(child.waitForExit(timeout: 60))
            let ok = child.exitStatus.map { $0 & 0x7F == 0 && ($0 >> 8) & 0xFF == 0 } ?? false
            return (ok, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        }
        func value(_ i: Int) -> String { String(repeating: String(format: "%02x", i & 0xFF), count: 16) }
        let (defined, out) = try run(["define", "--size", "16"])
        try #require(defined, "nv define failed: \(out)")
        let t0 = monotonicSeconds()
        let (wrote, out2) = try run(["write", "--data", value(0)])
        try #require(wrote, "nv write failed: \(out2)")
        let full = monotonicSeconds() - t0
        var rng = SplitMix64(seed: 0xDEAD_0001)
        var current = value(0)
        var committed = 0, killedBefore = 0
        for i in 1...25 {
            // Stratified over 0...1.5 × a whole run, jittered; the last write is not killed.
            let at: Double? = i == 25 ? nil : (Double(i - 1) + Double(rng.next() % 1000) / 1000) / 24 * full * 1.5
            _ = try run(["write", "--data", value(i)], killAfter: at)
            let (ok, text) = try run(["read", "--size", "16"])
            #expect(ok, "iteration \(i): the state directory no longer loads after a kill at \(String(describing: at)) s: \(text)")
            let read = text.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(read == current || read == value(i), "iteration \(i): index holds \(read)")
            if read == value(i) { committed += 1 } else { killedBefore += 1 }
            current = read
        }
        print("kill during nv write: full run \(full) s, \(committed) committed, \(killedBefore) killed before the commit")
        #expect(committed > 0 && killedBefore > 0)
    }
}

enum Paths {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
}
