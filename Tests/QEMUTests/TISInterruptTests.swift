import QEMUHarness
import Testing

extension QEMUSuite {
    /// The TIS interrupt line as QEMU's qtest reports it after `irq_intercept_in ioapic`
    /// (qemu-tpm.md §2.8): ISA IRQ 5 arrives at I/O APIC pin (GSI) 5.
    @Suite("QEMU 7.2 TIS interrupt line over qtest")
    struct TISInterruptTests {
        @Test("commandReady and completion raise GSI 5; INT_STATUS write-1-to-clear lowers it",
              arguments: QEMUMachineType.allCases)
        func irqLine(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine)
            defer { m.close() }
            let bus = m.bus
            try bus.interceptIRQs(qomPath: "ioapic")
            #expect(try bus.irqLevel(5) == false)

            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            // 7.2: INT_ENABLE is writable by the active locality only. Global enable plus all
            // four sources, polarity bits kept.
            try bus.writel(TIS.reg(0, TIS.intEnable), 0x8000_008F)
            #expect(try bus.readl(TIS.reg(0, TIS.intEnable)) == 0x8000_008F)
            #expect(try bus.irqLevel(5) == false)

            // IDLE → READY raises commandReady (0x80).
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.commandReady))
            #expect(try bus.waitForIRQ(5, level: true, timeout: 2))
            #expect(try bus.readl(TIS.reg(0, TIS.intStatus)) == 0x80)
            try bus.writel(TIS.reg(0, TIS.intStatus), 0x80)
            #expect(try bus.waitForIRQ(5, level: false, timeout: 2))
            #expect(try bus.readl(TIS.reg(0, TIS.intStatus)) == 0)

            // Completion raises dataAvail | stsValid (0x03).
            for byte in startupClear { try bus.writeb(TIS.reg(0, TIS.dataFIFO), byte) }
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.tpmGo))
            #expect(try bus.waitForIRQ(5, level: true, timeout: 3))
            #expect(try bus.readl(TIS.reg(0, TIS.intStatus)) == 0x03)
            #expect(try bus.readl(TIS.reg(0, TIS.sts)) == 0x0400_0A90)

            let gsi5 = bus.irqEvents.filter { $0.line == 5 }.map(\.raised)
            #expect(gsi5 == [true, false, true])
        }
    }
}
