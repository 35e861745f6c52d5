import QEMUHarness
import Testing

extension QEMUSuite {
    /// The TIS registers of QEMU 7.2's `tpm-tis` right after start-up, read over qtest
    /// (runs-on-this-machine.md §2, qemu-tpm.md §1), identical on pc and q35.
    @Suite("QEMU 7.2 TIS registers over qtest")
    struct TISRegisterTests {
        @Test("Initial values of all five localities", arguments: QEMUMachineType.allCases)
        func initialValues(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine)
            defer { m.close() }
            let bus = m.bus
            for l in 0..<5 {
                #expect(try bus.readb(TIS.reg(l, TIS.access)) == 0x81, "ACCESS loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.intEnable)) == 0x0000_0008, "INT_ENABLE loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.intVector)) == 0x05, "INT_VECTOR loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.intStatus)) == 0x0000_0000, "INT_STATUS loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.intfCapability)) == 0x3000_0697, "INTF_CAPABILITY loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.sts)) == 0xFFFF_FFFF, "STS loc\(l) (not active)")
                #expect(try bus.readl(TIS.reg(l, TIS.interfaceID)) == 0x0000_2100, "INTERFACE_ID loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.didVid)) == 0x0001_1014, "DID_VID loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.rid)) == 0x01, "RID loc\(l)")
            }
            #expect(try m.qmp.queryStatus() == "running")
        }

        @Test("requestUse makes the locality active: ACCESS 0xA1, STS 0x04100000",
              arguments: QEMUMachineType.allCases)
        func requestUse(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine)
            defer { m.close() }
            let bus = m.bus
            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            #expect(try bus.readb(TIS.reg(0, TIS.access)) == 0xA1)
            #expect(try bus.readl(TIS.reg(0, TIS.sts)) == 0x0410_0000)
            // The other localities are untouched.
            for l in 1..<5 {
                #expect(try bus.readb(TIS.reg(l, TIS.access)) == 0x81, "ACCESS loc\(l)")
                #expect(try bus.readl(TIS.reg(l, TIS.sts)) == 0xFFFF_FFFF, "STS loc\(l)")
            }
        }

        @Test("Locality arbitration: pendingRequest, then relinquish hands over")
        func arbitration() throws {
            let m = try startMachine()
            defer { m.close() }
            let bus = m.bus
            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            try bus.writeb(TIS.reg(1, TIS.access), TIS.requestUse)
            #expect(try bus.readb(TIS.reg(0, TIS.access)) == 0xA5)
            #expect(try bus.readb(TIS.reg(1, TIS.access)) == 0x83)
            try bus.writeb(TIS.reg(0, TIS.access), TIS.activeLocality)
            #expect(try bus.readb(TIS.reg(0, TIS.access)) == 0x81)
            #expect(try bus.readb(TIS.reg(1, TIS.access)) == 0xA1)
        }

        /// Facts for the model's bus adapter, measured on QEMU 7.2.22 (pc and q35 alike).
        ///
        /// The TIS region declares no unaligned support, so QEMU's memory core
        /// (`memory_access_size`) splits an access into pieces no larger than the address's
        /// natural alignment (and at most 4 bytes); each piece reaches `tpm_tis_mmio_read` with
        /// its own size and byte lane, so the 1-byte STS burst clamp applies per piece.
        @Test("Unaligned and 8-byte reads split the way QEMU's memory core does",
              arguments: QEMUMachineType.allCases)
        func splitReads(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine)
            defer { m.close() }
            let bus = m.bus
            // Inactive locality: STS reads 0xFFFFFFFF in every lane.
            #expect(try bus.readw(0xFED4_0019) == 0xFFFF)
            #expect(try bus.readl(0xFED4_001A) == 0xFFFF_FFFF)
            // 8 bytes = two 4-byte accesses: ACCESS (0x81, upper bytes 0) + reserved 0x04.
            #expect(try bus.readq(0xFED4_0000) == 0xFFFF_FFFF_0000_0081)
            // INTF_CAPABILITY + STS of an inactive locality.
            #expect(try bus.readq(0xFED4_0014) == 0xFFFF_FFFF_3000_0697)
            // DID_VID + RID.
            #expect(try bus.readq(0xFED4_0F00) == 0x0000_0001_0001_1014)
            // 0x02: 2 bytes (ACCESS >> 16 = 0), 0x04: 4 bytes (reserved), 0x08: 2 bytes (INT_ENABLE).
            #expect(try bus.readq(0xFED4_0002) == 0x0008_FFFF_FFFF_0000)
            // 0x03: 1 byte (ACCESS >> 24 = 0), 0x04: 1 byte (reserved 0xFF).
            #expect(try bus.readw(0xFED4_0003) == 0xFF00)
            // Unknown offsets inside a locality page.
            #expect(try bus.readl(0xFED4_0FFC) == 0xFFFF_FFFF)
            #expect(try bus.readl(0xFED4_0040) == 0xFFFF_FFFF)
            #expect(try bus.readb(0xFED4_0040) == 0xFF)

            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            #expect(try bus.readq(0xFED4_0000) == 0xFFFF_FFFF_0000_00A1)
            #expect(try bus.readq(0xFED4_0018) == 0xFFFF_FFFF_0410_0000)
            // Byte reads clamp the burst count to 0xFF.
            #expect(try bus.readb(0xFED4_0019) == 0xFF)
            #expect(try bus.readb(0xFED4_001A) == 0x00)
            // readw 0x19 = two 1-byte pieces: 0x19 (clamped 0xFF) and 0x1A (0x00).
            #expect(try bus.readw(0xFED4_0019) == 0x00FF)
            // readl 0x1A = two 2-byte pieces: 0x1A (STS >> 16 = 0x0410) and 0x1C (unknown, 0xFFFF).
            #expect(try bus.readl(0xFED4_001A) == 0xFFFF_0410)
            // readl 0x19 = 1 byte at 0x19 (0xFF, clamped) + 2 at 0x1A (0x0410, not clamped)
            // + 1 at 0x1C (0xFF).
            #expect(try bus.readl(0xFED4_0019) == 0xFF04_10FF)
        }

        /// What the guest sees around the TIS region: the PPI page at 0xFED45000 is RAM (0x400
        /// bytes, `tpm-ppi`); past it, and past the region, reads are 0 and writes vanish.
        @Test("Addresses outside the TIS registers", arguments: QEMUMachineType.allCases)
        func outsideTheRegisters(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine)
            defer { m.close() }
            let bus = m.bus
            // PPI: plain RAM, zero at start, keeps what is written.
            #expect(try bus.readl(0xFED4_5000) == 0)
            try bus.writeb(0xFED4_5000, 0xAB)
            #expect(try bus.readl(0xFED4_5000) == 0xAB)
            #expect(try bus.readq(0xFED4_5000) == 0xAB)
            // Unassigned: after the PPI page, after the region, before it.
            for a: UInt64 in [0xFED4_5400, 0xFED4_6000, 0xFED3_F000] {
                #expect(try bus.readb(a) == 0, "readb \(hex(a))")
                #expect(try bus.readl(a) == 0, "readl \(hex(a))")
                #expect(try bus.readq(a) == 0, "readq \(hex(a))")
                try bus.writeb(a, 0xAB)
                #expect(try bus.readl(a) == 0, "readl \(hex(a)) after a write")
            }
        }
    }
}
