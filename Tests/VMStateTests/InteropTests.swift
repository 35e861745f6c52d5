import EmulatorBackend
import Foundation
import QEMUHarness
import Testing
import TIS
import TISConformance
import TISDriver
import VMState

/// The TPM migrated between this library and real QEMU 7.2, both ways, with both backends:
/// PCR 16 and every TIS register of every locality must come out equal.
@Suite("Interop with QEMU 7.2: QEMU -> library and library -> QEMU", .serialized)
struct InteropTests {
    static let digest = Crypto.sha256(Array("interop".utf8))
    static let pcr16 = Crypto.pcrExtendSHA256([digest])

    /// Every register of every locality that reads without side effects (no FIFO), at every
    /// width the registers have.
    static func registers(_ bus: any MMIOBus) throws -> [String: UInt64] {
        var out: [String: UInt64] = [:]
        for l in 0..<5 {
            for (name, off, size) in [("ACCESS", 0x00, 1), ("INT_ENABLE", 0x08, 4), ("INT_VECTOR", 0x0C, 4), ("INT_STATUS", 0x10, 4),
                                      ("INTF_CAPABILITY", 0x14, 4), ("STS", 0x18, 4), ("STS.burst.byte", 0x19, 1),
                                      ("INTERFACE_ID", 0x30, 4), ("DID_VID", 0xF00, 4), ("RID", 0xF04, 4)] {
                out["loc\(l).\(name)"] = try bus.read(TISGeometry.baseAddress + UInt64(l) << 12 + UInt64(off), size: size)
            }
        }
        return out
    }

    /// Drives a TIS into a state worth migrating: Startup and an extend of PCR 16, interrupts
    /// enabled on locality 0, locality 0 active and READY, locality 2 waiting (pendingRequest),
    /// INTERFACE_ID locked.
    static func prepare(_ bus: any MMIOBus) throws {
        let driver = TISDriver(bus: bus, byteWrites: true)
        _ = try driver.transmit(TPM2.startup())
        #expect(TPM2.responseCode(try driver.transmit(TPM2.pcrExtendSHA256(pcr: 16, digest: digest), locality: 1)) == 0)
        try driver.requestLocality(0)
        try bus.writel(TISGeometry.baseAddress + 0x08, 0x8000_0087)
        try bus.writel(TISGeometry.baseAddress + 0x18, 0x40)
        try bus.writeb(TISGeometry.baseAddress + 2 << 12, 0x02)
        try bus.writel(TISGeometry.baseAddress + 0x30, 0x0008_0000)
    }

    static func pcr16(through bus: any MMIOBus) throws -> [UInt8] {
        let driver = TISDriver(bus: bus, byteWrites: true)
        let r = try driver.transmit(TPM2.pcrReadSHA256(pcr: 16), locality: 0, relinquish: false)
        do {
            return try TPM2.pcrDigest(r)
        } catch {
            Issue.record("PCR_Read(16) response \(r.hexString): \(error)")
            return []
        }
    }

    enum Backend: String, CaseIterable { case libtpms, swtpm }

    /// QEMU saves (after a PCR extend through its TIS); the library loads the stream into a TIS
    /// with the libtpms backend and, separately, with a fresh swtpm on an empty state dir.
    @Test(arguments: Backend.allCases)
    func qemuToLibrary(backend kind: Backend) async throws {
        try await LibtpmsTestLock.run {
            let m = try QEMUMachine.start()
            defer { m.close() }
            try Self.prepare(m.bus)
            let before = try Self.registers(m.bus)
            let file = m.file("out.bin")
            try m.qmp.migrate(uri: "exec:cat > \(file)")
            #expect(try m.qmp.waitForMigration(timeout: 10).status == "completed")

            let state = try TPMMigrationState(source: .path(file))
            #expect(state.machineType == "pc-i440fx-7.2")
            let tis = try #require(state.tis)
            let blobs = try #require(state.emulatorBlobs)

            let backend: any TPMBackend
            var swtpm: SwtpmProcess? = nil
            switch kind {
            case .libtpms:
                backend = try LibtpmsBackend()
            case .swtpm:
                var o = SwtpmProcess.Options(stateDirectory: m.workDirectory.file("dest.swtpm"))
                o.ctrlSocketPath = m.workDirectory.file("dest.ctrl.sock")
                swtpm = try SwtpmProcess.launch(o)
                backend = try SwtpmBackend(SwtpmBackend.Configuration(process: try #require(swtpm)))
            }
            defer { backend.shutdown(); swtpm?.terminate() }
            let device = TISDevice(runner: BackendRunner(backend: backend, mode: .worker))
            try device.reset(incoming: true)
            try device.restore(tis, blobs: blobs)
            let bus = TISMachineBus(device: device)
            let after = try Self.registers(bus)
            #expect(after == before)
            #expect(after["loc2.ACCESS"] == 0x83)
            #expect(try Self.pcr16(through: bus) == Self.pcr16)
        }
    }

    /// The library saves (libtpms or swtpm behind its TIS); QEMU 7.2 loads the stream with
    /// `-incoming` into a fresh swtpm: PCR 16 and the registers read through QEMU's TIS equal.
    @Test(arguments: Backend.allCases)
    func libraryToQEMU(backend kind: Backend) async throws {
        try await LibtpmsTestLock.run {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let backend: any TPMBackend
            var swtpm: SwtpmProcess? = nil
            switch kind {
            case .libtpms:
                backend = try LibtpmsBackend()
            case .swtpm:
                var o = SwtpmProcess.Options(stateDirectory: work.file("src.swtpm"))
                o.ctrlSocketPath = work.file("src.ctrl.sock")
                swtpm = try SwtpmProcess.launch(o)
                backend = try SwtpmBackend(SwtpmBackend.Configuration(process: try #require(swtpm)))
            }
            defer { backend.shutdown(); swtpm?.terminate() }
            let device = try TISDevice(backend: backend, mode: .worker)
            let bus = TISMachineBus(device: device)
            try Self.prepare(bus)
            device.ppi.write(offset: PPIRegion.Field.ppin, size: 1, value: 0x5A)
            let before = try Self.registers(bus)
            let saved = try device.saveWithBackend()
            let state = TPMMigrationState(machineType: "pc-i440fx-7.2", tis: saved.tis, emulatorBlobs: saved.blobs,
                                          ppi: device.ppi.contents)
            let file = work.file("tpm-only.bin")
            try Data(state.encodedStream()).write(to: URL(fileURLWithPath: file))

            let m = try QEMUMachine.start(incoming: "exec:cat < \(file)", workDirectory: work)
            defer { m.close() }
            #expect(try m.qmp.waitForMigration(timeout: 10).status == "completed")
            #expect(try Self.registers(m.bus) == before)
            #expect(try m.bus.readb(PPIRegion.baseAddress + UInt64(PPIRegion.Field.ppin)) == 0x5A)
            #expect(try Self.pcr16(through: m.bus) == Self.pcr16)
        }
    }
}
