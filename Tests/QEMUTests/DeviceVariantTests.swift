import Foundation
import QEMUHarness
import Testing

extension QEMUSuite {
    /// The other configurations the harness starts: a TPM 1.2 swtpm behind tpm-tis, and tpm-crb.
    @Suite("QEMU 7.2 device variants")
    struct DeviceVariantTests {
        @Test("TPM 1.2 behind tpm-tis: INTF_CAPABILITY 0x20000697, INTERFACE_ID 0xFFFFFFFF, family 0")
        func tpm12() throws {
            let m = try QEMUMachine.start(tpmVersion: .tpm12)
            defer { m.close() }
            let bus = m.bus
            for l in 0..<5 {
                #expect(try bus.readl(TIS.reg(l, TIS.intfCapability)) == 0x2000_0697, "loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.interfaceID)) == 0xFFFF_FFFF, "loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.didVid)) == 0x0001_1014, "loc\(l)")
            }
            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            #expect(try bus.readb(TIS.reg(0, TIS.access)) == 0xA1)
            // TPM 1.2: tpmFamily 00, burst count 4096.
            #expect(try bus.readl(TIS.reg(0, TIS.sts)) == 0x0010_0000)
        }

        @Test("tpm-crb registers after start-up and after requestAccess", arguments: QEMUMachineType.allCases)
        func crb(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine, device: .crb)
            defer { m.close() }
            let bus = m.bus
            let expected: [(UInt64, UInt32, String)] = [
                (0x00, 0x81, "LOC_STATE"), (0x08, 0, "LOC_CTRL"), (0x0C, 0, "LOC_STS"),
                (0x30, 0x0002_5811, "INTF_ID"), (0x34, 0x0000_1014, "INTF_ID2"), (0x38, 0, "CTRL_EXT"),
                (0x40, 0, "CTRL_REQ"), (0x44, 0x0000_0002, "CTRL_STS"), (0x48, 0, "CTRL_CANCEL"),
                (0x4C, 0, "CTRL_START"), (0x50, 0, "INT_ENABLE"), (0x54, 0, "INT_STS"),
                (0x58, 0x0000_0F80, "CMD_SIZE"), (0x5C, 0xFED4_0080, "CMD_LADDR"), (0x60, 0, "CMD_HADDR"),
                (0x64, 0x0000_0F80, "RSP_SIZE"), (0x68, 0xFED4_0080, "RSP_ADDR"),
            ]
            for (offset, value, name) in expected {
                #expect(try bus.readl(TIS.base + offset) == value, "\(name)")
            }
            try bus.writel(TIS.base + 0x08, 1)  // LOC_CTRL requestAccess
            #expect(try bus.readl(TIS.base + 0x00) == 0x83)
            #expect(try bus.readl(TIS.base + 0x0C) == 1)
            try bus.writel(TIS.base + 0x40, 1)  // CTRL_REQ cmdReady
            #expect(try bus.readl(TIS.base + 0x40) == 0)
            #expect(try bus.readl(TIS.base + 0x44) == 0)

            // Startup through the command buffer at 0x80, little-endian words, then START.
            var padded = startupClear
            while padded.count % 4 != 0 { padded.append(0) }
            for i in stride(from: 0, to: padded.count, by: 4) {
                let word = UInt32(padded[i]) | UInt32(padded[i + 1]) << 8 | UInt32(padded[i + 2]) << 16
                    | UInt32(padded[i + 3]) << 24
                try bus.writel(TIS.base + 0x80 + UInt64(i), word)
            }
            try bus.writel(TIS.base + 0x4C, 1)
            let start = Date()
            while try bus.readl(TIS.base + 0x4C) & 1 != 0 && Date().timeIntervalSince(start) < 3 { usleep(200) }
            #expect(try bus.readl(TIS.base + 0x4C) == 0)
            var rsp: [UInt8] = []
            for i in 0..<startupClearResponse.count { rsp.append(try bus.readb(TIS.base + 0x80 + UInt64(i))) }
            #expect(rsp == startupClearResponse)
        }

        @Test("swtpmStateDir: swtpm keeps the TPM's NV state in the given directory")
        func stateDirectory() throws {
            let work = try WorkDirectory(prefix: "qemu-statedir")
            defer { work.remove() }
            let state = try work.subdirectory("tpm-state")
            let m = try QEMUMachine.start(swtpmStateDir: state)
            defer { m.close() }
            #expect(m.swtpmStateDirectory == state)
            let bus = m.bus
            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.commandReady))
            for byte in startupClear { try bus.writeb(TIS.reg(0, TIS.dataFIFO), byte) }
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.tpmGo))
            #expect(try pollSTS(bus) { $0 & TIS.dataAvail != 0 } == 0x0400_0A90)
            #expect(FileManager.default.fileExists(atPath: state + "/tpm2-00.permall"))
        }
    }
}
