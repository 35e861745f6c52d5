import Testing
import TIS
import TISConformance

/// INT_ENABLE / INT_STATUS / INT_VECTOR and the IRQ line (QEMU tpm_tis_raise_irq and the
/// INT_STATUS write-1-to-clear).
@Suite struct TISInterruptTests {
    static let all: UInt32 = 0x8000_0087

    /// INT_ENABLE keeps only 0x8000009F; bytes not written are kept.
    @Test func intEnableMask() throws {
        let rig = try Rig()
        try rig.writeb(0, 0, 0x02)
        try rig.writel(0, 0x08, 0xFFFF_FFFF)
        #expect(try rig.readl(0, 0x08) == 0x8000_009F)
        try rig.writeb(0, 0x08, 0x00)
        #expect(try rig.readl(0, 0x08) == 0x8000_0000)
        try rig.writeb(0, 0x0B, 0x00)
        #expect(try rig.readl(0, 0x08) == 0)
    }

    /// QEMU 7.2 ignores INT_ENABLE / INT_STATUS writes from a non-active locality; 8.1+ takes them.
    @Test(arguments: [(TISConfiguration.qemu72, UInt32(0x08)), (TISConfiguration.qemu81, UInt32(0x8000_0087))])
    func intEnableFromNonActiveLocality(configuration: TISConfiguration, expected: UInt32) throws {
        let rig = try Rig(configuration: configuration)
        try rig.writel(1, 0x08, Self.all)
        #expect(try rig.readl(1, 0x08) == expected)
    }

    /// Every event of the table in qemu-tpm.md §2.8 on a full command, and the line.
    @Test func eventsOfACommand() throws {
        let rig = try Rig()
        try rig.writeb(0, 0, 0x02)                       // locality change, but INTs still off
        #expect(try rig.readl(0, 0x10) == 0)
        try rig.writel(0, 0x08, Self.all)
        try rig.writeb(0, 0x18, 0x40)                    // IDLE -> READY: commandReady
        #expect(try rig.readl(0, 0x10) == 0x80)
        #expect(rig.device.irqLevel)
        try rig.writel(0, 0x10, 0x80)                    // write 1 to clear -> line lowered
        #expect(try rig.readl(0, 0x10) == 0)
        #expect(!rig.device.irqLevel)
        try rig.send(startupCommand)                      // no stsValid interrupt on FIFO writes
        #expect(try rig.readl(0, 0x10) == 0)
        try rig.go()                                      // completion: dataAvail | stsValid
        #expect(try rig.readl(0, 0x10) == 0x03)
        try rig.writel(0, 0x10, 0x03)
        for _ in 0..<10 { _ = try rig.readb(0, 0x24) }   // last byte read: stsValid
        #expect(try rig.readl(0, 0x10) == 0x02)
        try rig.writel(0, 0x10, 0x02)
        try rig.writeb(0, 0x18, 0x40)                    // COMPLETION -> READY: commandReady
        #expect(try rig.readl(0, 0x10) == 0x80)
        #expect(rig.irq.history == [true, false, true, false, true, false, true])
    }

    /// The locality-change interrupt goes to the new active locality.
    @Test func localityChangeInterrupt() throws {
        let rig = try Rig()
        try rig.writeb(0, 0, 0x02)
        try rig.writel(0, 0x08, Self.all)
        try rig.writeb(0, 0, 0x20)
        try rig.writeb(1, 0, 0x02)
        #expect(try rig.readl(1, 0x10) == 0)           // loc1's INT_ENABLE is off
        try rig.writel(1, 0x08, Self.all)
        try rig.writeb(1, 0, 0x20)
        try rig.writeb(0, 0, 0x02)
        #expect(try rig.readl(0, 0x10) == 0x04)
        #expect(rig.device.irqLevel)
    }

    /// Only enabled sources are recorded; without globalIntEnable nothing is.
    @Test func disabledSourcesAreNotRecorded() throws {
        let rig = try Rig()
        try rig.writeb(0, 0, 0x02)
        try rig.writel(0, 0x08, 0x0000_0087)
        try rig.writeb(0, 0x18, 0x40)
        #expect(try rig.readl(0, 0x10) == 0)
        #expect(!rig.device.irqLevel)
        try rig.writel(0, 0x08, 0x8000_0002)            // only stsValid: completion records both bits
        try rig.send(startupCommand)
        try rig.go()
        #expect(try rig.readl(0, 0x10) == 0x03)
    }

    /// INT_VECTOR is the configured IRQ and ignores writes.
    @Test func intVector() throws {
        let rig = try Rig(configuration: TISConfiguration(irqNumber: 11))
        try rig.writeb(0, 0, 0x02)
        try rig.writel(0, 0x0C, 3)
        #expect(try rig.readl(0, 0x0C) == 11)
    }
}
