import Foundation
import QEMUHarness
import TIS
import TISDriver
import Testing
@testable import VMState

/// TPM-only streams written by this library, loaded by real QEMU 7.2 with
/// `-incoming 'exec:cat < FILE'` into a fresh QEMU and a fresh swtpm on an empty state directory.
@Suite("TPM-only streams load into real QEMU 7.2", .serialized)
struct QEMULoadTests {
    /// TPM2_PCR_Read(sha256, PCR16) and the value PCR16 has after the fixture's PCR_Extend:
    /// sha256(0^32 ‖ sha256("qtest-probe")) (runs-on-this-machine.md §2).
    static let pcrRead16 = [UInt8](hexString: "8001000000140000017e00000001000b03000001") ?? []
    static let pcr16 = [UInt8](hexString: "6bfe16f88395e62d4ae866b70428fa3d05799c229eafe3f10a029704d04dd08f") ?? []

    static let tisBase: UInt64 = 0xFED4_0000
    static let ppiBase: UInt64 = 0xFED4_5000

    /// Waits until `query-status` says `running` (QEMU resumes by itself after -incoming).
    static func waitRunning(_ m: QEMUMachine) throws -> String {
        var status = try m.qmp.queryStatus()
        let start = Date()
        while status != "running" && Date().timeIntervalSince(start) < 5 {
            usleep(5_000)
            status = try m.qmp.queryStatus()
        }
        return status
    }

    @Test("from a QEMU stream's TPM state: completes, runs, registers, PPI and PCR 16 restored", arguments: Fixture.allCases)
    func loadTIS(_ f: Fixture) throws {
        var state = try TPMMigrationState(source: .path(f.path))
        var ppi = try #require(state.ppi)
        ppi[0x100] = 0x5A   // ppin
        ppi[0x010] = 0x03   // func[0x10]
        state.ppi = ppi
        let work = try QEMUMachine.makeWorkDirectory()
        defer { work.remove() }
        let file = work.file("tpm-only.bin")
        var o = TPMMigrationState.StreamOptions()
        o.deviceSectionID = f.tisSectionID
        try Data(state.encodedStream(o)).write(to: URL(fileURLWithPath: file))

        let m = try QEMUMachine.start(machine: f == .pc ? .pc : .q35, device: .tis, incoming: "exec:cat < \(file)",
                                      workDirectory: work)
        defer { m.close() }
        let info = try m.qmp.waitForMigration(timeout: 10)
        #expect(info.status == "completed")
        #expect(try Self.waitRunning(m) == "running")

        let bus = m.bus
        #expect(try bus.readb(Self.tisBase) == 0xA1)                  // loc0 active, not established
        #expect(try bus.readl(Self.tisBase + 0x18) == 0x0410_0040)    // READY, burst 0x1000
        for l in UInt64(1)..<5 {
            #expect(try bus.readb(Self.tisBase + l << 12) == 0x81)
            #expect(try bus.readl(Self.tisBase + l << 12 + 0x18) == 0xFFFF_FFFF)
        }
        #expect(try bus.readl(Self.tisBase + 0x30) == 0x0000_2100)
        #expect(try bus.readb(Self.ppiBase + 0x100) == 0x5A)
        #expect(try bus.readb(Self.ppiBase + 0x010) == 0x03)
        // The swtpm blobs carried the PCR: PCR_Read(16) gives the extended value.
        let rsp = try TISDriver(bus: bus, timeout: 5).transmit(Self.pcrRead16)
        #expect(rsp.count == 62)
        #expect(Array(rsp.suffix(32)) == Self.pcr16)
    }

    /// tpm-crb has no fixture: QEMU saves one, the library extracts the CRB registers and the
    /// `tpm-crb-cmd` block, changes them, writes a TPM-only stream, and QEMU loads it.
    @Test("tpm-crb: registers and the command buffer block load into QEMU")
    func loadCRB() throws {
        let work = try QEMUMachine.makeWorkDirectory()
        defer { work.remove() }
        let saved = work.file("crb.bin")
        do {
            let src = try QEMUMachine.start(machine: .q35, device: .crb, workDirectory: work)
            defer { src.close() }
            try src.qmp.migrate(uri: "exec:cat > \(saved)")
            try src.qmp.waitForMigration(timeout: 10)
        }
        var state = try TPMMigrationState(source: .path(saved))
        #expect(state.machineType == "pc-q35-7.2")
        #expect(state.tis == nil)
        var regs = try #require(state.crbRegisters)
        #expect(regs[12] == 0x0002_5811 && regs[13] == 0x1014 && regs[17] == 2 && regs[22] == 0xF80)
        var cmd = try #require(state.crbCommandBuffer)
        #expect(cmd.count == 4096)
        regs[0] |= 0x2   // LOC_STATE.locAssigned
        regs[3] = 1      // LOC_STS.Granted
        regs[17] = 0     // CTRL_STS: not idle
        cmd[0..<4] = [0xDE, 0xAD, 0xBE, 0xEF]
        state.crbRegisters = regs
        state.crbCommandBuffer = cmd
        let file = work.file("crb-only.bin")
        try Data(state.encodedStream()).write(to: URL(fileURLWithPath: file))

        let m = try QEMUMachine.start(machine: .q35, device: .crb, incoming: "exec:cat < \(file)", workDirectory: work)
        defer { m.close() }
        #expect(try m.qmp.waitForMigration(timeout: 10).status == "completed")
        #expect(try Self.waitRunning(m) == "running")
        #expect(try m.bus.readl(Self.tisBase + 0x00) == 0x83)
        #expect(try m.bus.readl(Self.tisBase + 0x0C) == 1)
        #expect(try m.bus.readl(Self.tisBase + 0x44) == 0)
        #expect(try m.bus.readl(Self.tisBase + 0x30) == 0x0002_5811)
        #expect(try m.bus.readl(Self.tisBase + 0x80) == 0xEFBE_ADDE)
    }
}
