import EmulatorBackend
import Foundation
import Testing
import TIS
import TISConformance
import TISDriver
import WireFormat

func tempDir(_ name: String) -> String {
    let p = FileManager.default.temporaryDirectory.appendingPathComponent("stf-\(name)-\(UUID().uuidString.prefix(8))").path
    try? FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
    return p
}

/// The package root, from this file's path (Tests/EmulatorBackendTests/…).
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

func run(_ executable: String, _ args: [String]) throws -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

func execute(_ b: LibtpmsBackend, _ cmd: [UInt8], locality: UInt8 = 0) throws -> [UInt8] {
    try b.execute(TPMBackendCommand(locality: locality, bytes: cmd, maxResponseSize: 4096)).bytes
}

@Suite struct LibtpmsBackendTests {
    /// TPM2 commands straight through libtpms: Startup, GetRandom, PCR_Extend, PCR_Read.
    @Test func tpm2CommandsDirect() async throws {
        try await LibtpmsTestLock.run {
            let b = try LibtpmsBackend()
            defer { b.shutdown() }
            try b.start()
            #expect(TPM2.responseCode(try execute(b, TPM2.startup())) == 0)
            let r = try TPM2.randomBytes(try execute(b, TPM2.getRandom(32)))
            #expect(r.count == 32)
            let d = Crypto.sha256(Array("direct".utf8))
            #expect(TPM2.responseCode(try execute(b, TPM2.pcrExtendSHA256(pcr: 16, digest: d))) == 0)
            #expect(try TPM2.pcrDigest(try execute(b, TPM2.pcrReadSHA256(pcr: 16))) == Crypto.pcrExtendSHA256([d]))
            #expect(b.bufferSize() == 4096)
            #expect(try b.establishedFlag() == false)
        }
    }

    /// The same through the TIS registers (driver + device + backend, worker thread).
    @Test(arguments: [ExecutionMode.worker, .inline])
    func tpm2CommandsThroughTIS(mode: ExecutionMode) async throws {
        try await LibtpmsTestLock.run {
            let b = try LibtpmsBackend()
            defer { b.shutdown() }
            let device = try TISDevice(backend: b, mode: mode)
            let driver = TISDriver(bus: TISMachineBus(device: device))
            #expect(TPM2.responseCode(try driver.transmit(TPM2.startup())) == 0)
            #expect(try TPM2.randomBytes(try driver.transmit(TPM2.getRandom(16), locality: 2)).count == 16)
            let d = Crypto.sha256(Array("tis".utf8))
            #expect(TPM2.responseCode(try driver.transmit(TPM2.pcrExtendSHA256(pcr: 16, digest: d), locality: 1)) == 0)
            #expect(try TPM2.pcrDigest(try driver.transmit(TPM2.pcrReadSHA256(pcr: 16))) == Crypto.pcrExtendSHA256([d]))
        }
    }

    /// Blobs out, terminate, blobs into a new backend: PCR 16 unchanged, no Startup needed.
    @Test func stateBlobsRoundTrip() async throws {
        try await LibtpmsTestLock.run {
            let d = Crypto.sha256(Array("migrate".utf8))
            let blobs: TPMStateBlobs
            let before: [UInt8]
            do {
                let b = try LibtpmsBackend()
                defer { b.shutdown() }
                try b.start()
                _ = try execute(b, TPM2.startup())
                _ = try execute(b, TPM2.pcrExtendSHA256(pcr: 16, digest: d))
                before = try TPM2.pcrDigest(try execute(b, TPM2.pcrReadSHA256(pcr: 16)))
                blobs = try b.saveState()
            }
            // swtpm's migration form: header flags MIGRATION_DATA, TLV 4 around TLV 1.
            let perm = try SwtpmBlob.decode(blobs.permanent.data)
            #expect(perm.flags == .migrationData)
            #expect(try perm.plainState()?.prefix(6) == [0x00, 0x03, 0xAB, 0x36, 0x47, 0x23])
            #expect(try SwtpmBlob.decode(blobs.volatile.data).plainState()?.prefix(6) == [0x00, 0x04, 0x45, 0x63, 0x78, 0x89])
            #expect(blobs.savestate.data.isEmpty)

            let c = try LibtpmsBackend()
            defer { c.shutdown() }
            try c.startup(bufferSize: 4096, incoming: true)
            try c.restoreState(blobs)
            #expect(try TPM2.pcrDigest(try execute(c, TPM2.pcrReadSHA256(pcr: 16))) == before)
            #expect(TPM2.responseCode(try execute(c, TPM2.startup())) == 0x100)  // already initialized
        }
    }

    /// A refused blob leaves the running TPM as it was (its PCR 16 is still readable).
    @Test func refusedBlobLosesNothing() async throws {
        try await LibtpmsTestLock.run {
            let b = try LibtpmsBackend()
            defer { b.shutdown() }
            try b.start()
            _ = try execute(b, TPM2.startup())
            let d = Crypto.sha256(Array("keep".utf8))
            _ = try execute(b, TPM2.pcrExtendSHA256(pcr: 16, digest: d))
            var blobs = try b.saveState()
            var corrupt = try #require(try SwtpmBlob.decode(blobs.volatile.data).plainState())
            corrupt[40] ^= 0xFF
            blobs.volatile = TPMStateBlob(data: SwtpmBlob.migration(wrapping: corrupt).encoded())
            #expect(throws: BackendError.self) { try b.restoreState(blobs) }
            #expect(try TPM2.pcrDigest(try execute(b, TPM2.pcrReadSHA256(pcr: 16))) == Crypto.pcrExtendSHA256([d]))
            // Encrypted and empty permanent blobs are typed errors too.
            var enc = try b.saveState()
            enc.permanent.flags = 2
            #expect(throws: BackendError.self) { try b.restoreState(enc) }
            #expect(throws: BackendError.self) { try b.restoreState(TPMStateBlobs()) }
        }
    }

    /// libtpms holds one TPM per process: a second live backend is a clear error.
    @Test func secondInstanceRefused() async throws {
        try await LibtpmsTestLock.run {
            let b = try LibtpmsBackend()
            do throws(BackendError) {
                _ = try LibtpmsBackend()
                Issue.record("a second LibtpmsBackend was created")
            } catch {
                #expect(error.code == .libtpmsInUse)
            }
            b.shutdown()
            let c = try LibtpmsBackend()
            c.shutdown()
        }
    }

    /// The state directory is swtpm's: the file swtpm would write, readable by swtpm's rules.
    @Test func stateDirectoryUsesSwtpmFormat() async throws {
        try await LibtpmsTestLock.run {
            let dir = tempDir("statedir")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let b = try LibtpmsBackend(stateDirectory: dir)
            try b.start()
            _ = try execute(b, TPM2.startup())
            b.shutdown()
            let file = try #require(try StateDirectory.readFile(dir + "/tpm2-00.permall", limit: 1 << 20))
            #expect(Array(file.prefix(10)) == [0x02, 0x01, 0x00, 0x0A, 0x00, 0x00] + bigEndian(UInt32(file.count)))
            #expect(Array(file[10..<12]) == [0x00, 0x01])   // TLV tag DATA
            #expect(!FileManager.default.fileExists(atPath: dir + "/TMP2-00.permall"))
        }
    }

    /// An NV index written by one process is read back by a second process on the same
    /// state directory (two runs of tis-sim).
    @Test func nvIndexAcrossProcesses() async throws {
        let tool = packageRoot + "/.build/debug/tis-sim"
        try #require(FileManager.default.isExecutableFile(atPath: tool), "build tis-sim first (make test builds it)")
        let dir = tempDir("nv")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let data = "00112233445566778899aabbccddeeff"
        let define = try run(tool, ["nv", "define", "--state-dir", dir, "--size", "16"])
        #expect(define.status == 0, "\(define.err)")
        let write = try run(tool, ["nv", "write", "--state-dir", dir, "--data", data])
        #expect(write.status == 0, "\(write.err)")
        let read = try run(tool, ["nv", "read", "--state-dir", dir, "--size", "16"])
        #expect(read.status == 0, "\(read.err)")
        #expect(read.out.trimmingCharacters(in: .whitespacesAndNewlines) == data)
    }

    /// The TPM 1.2 personality of libtpms answers through the TIS.
    @Test func tpm12ThroughTIS() async throws {
        try await LibtpmsTestLock.run {
            let b = try LibtpmsBackend(version: .tpm12)
            defer { b.shutdown() }
            let device = try TISDevice(backend: b, mode: .inline)
            let bus = TISMachineBus(device: device)
            #expect(try bus.readl(0xFED4_0014) == 0x2000_0697)
            let driver = TISDriver(bus: bus)
            // TPM_Startup(ST_CLEAR)
            let r = try driver.transmit([0x00, 0xC1, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x00, 0x99, 0x00, 0x01])
            #expect(Array(r.prefix(2)) == [0x00, 0xC4])
            #expect(TPM2.responseCode(r) == 0)
        }
    }
}

func bigEndian(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)] }
