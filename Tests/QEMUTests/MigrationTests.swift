import Foundation
import QEMUHarness
import Testing

extension QEMUSuite {
    /// Migration of a TPM-equipped QEMU 7.2 through QMP (runs-on-this-machine.md §3, §4).
    @Suite("QEMU 7.2 migration over QMP")
    struct MigrationTests {
        @Test("migrate to exec:cat > FILE completes", arguments: QEMUMachineType.allCases)
        func migrateToFile(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine)
            defer { m.close() }
            let stream = m.file("vm.bin")
            try m.qmp.migrate(uri: "exec:cat > \(stream)")
            let info = try m.qmp.waitForMigration(timeout: 8)
            #expect(info.status == "completed")
            #expect(try m.qmp.queryStatus() == "postmigrate")
            #expect(try m.qmp.waitForEvent("STOP", timeout: 2) != nil)

            let data = try #require(FileManager.default.contents(atPath: stream))
            #expect(data.count > 100_000)
            // QEVM magic, version 3, then the configuration section naming the machine.
            #expect(Array(data.prefix(8)) == [0x51, 0x45, 0x56, 0x4D, 0x00, 0x00, 0x00, 0x03])
            let machineName = machine == .pc ? "pc-i440fx-7.2" : "pc-q35-7.2"
            #expect(data.count > 13 + machineName.utf8.count)
            #expect(data[8] == 0x07)
            #expect(String(decoding: data[13..<(13 + machineName.utf8.count)], as: UTF8.self) == machineName)
            // The TIS registers can still be read after the migration.
            #expect(try m.bus.readl(TIS.reg(0, TIS.didVid)) == 0x0001_1014)
        }

        @Test("A stream restores into a fresh QEMU and swtpm with -incoming")
        func restore() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let stream = work.file("vm.bin")

            // Source: Startup, leave loc0 READY, migrate.
            let source = try startMachine(workDirectory: work)
            defer { source.close() }
            let src = source.bus
            try src.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            try src.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.commandReady))
            for byte in startupClear { try src.writeb(TIS.reg(0, TIS.dataFIFO), byte) }
            try src.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.tpmGo))
            _ = try pollSTS(src) { $0 & TIS.dataAvail != 0 }
            for _ in startupClearResponse { _ = try src.readb(TIS.reg(0, TIS.dataFIFO)) }
            try src.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.commandReady))
            try source.qmp.migrate(uri: "exec:cat > \(stream)")
            try source.qmp.waitForMigration(timeout: 8)
            let before = try registerSnapshot(src)
            source.close()
            #expect(before[0] == 0xA1 && before[1] == 0x0410_0040)

            // Destination: fresh swtpm on an empty state directory.
            let m = try startMachine(incoming: "exec:cat < \(stream)", workDirectory: work)
            defer { m.close() }
            try m.qmp.waitForMigration(timeout: 8)
            // The VM resumes on its own after an -incoming load.
            var status = try m.qmp.queryStatus()
            let start = Date()
            while status != "running" && Date().timeIntervalSince(start) < 3 {
                usleep(5_000)
                status = try m.qmp.queryStatus()
            }
            #expect(status == "running")
            let bus = m.bus
            let after = try registerSnapshot(bus)
            #expect(after == before)
            // The restored TPM is started: a second Startup says TPM_RC_INITIALIZE (0x100).
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.commandReady))
            for byte in startupClear { try bus.writeb(TIS.reg(0, TIS.dataFIFO), byte) }
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.tpmGo))
            _ = try pollSTS(bus) { $0 & TIS.dataAvail != 0 }
            var rsp: [UInt8] = []
            for _ in 0..<10 { rsp.append(try bus.readb(TIS.reg(0, TIS.dataFIFO))) }
            #expect(rsp == [0x80, 0x01, 0, 0, 0, 0x0A, 0, 0, 0x01, 0x00])
        }

        /// ACCESS, STS, INT_ENABLE, INT_STATUS and INTERFACE_ID of all five localities.
        func registerSnapshot(_ bus: QTestBus) throws -> [UInt32] {
            var values: [UInt32] = []
            for l in 0..<5 {
                for r in [TIS.access, TIS.sts, TIS.intEnable, TIS.intStatus, TIS.interfaceID] {
                    values.append(try bus.readl(TIS.reg(l, r)))
                }
            }
            return values
        }
    }
}
