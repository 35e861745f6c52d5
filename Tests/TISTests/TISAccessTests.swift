import Testing
import TIS
import TISConformance

/// QEMU's tests/qtest/tpm-tis-util.c checks, against the model.
@Suite struct TISAccessTests {
    @Test(arguments: [false, true])
    func qemuCheckLocalities(established: Bool) throws {
        let rig = try Rig(established: established)
        let e = Expectations(bus: rig.bus)
        try QEMUTISChecks.checkLocalities(e, established: established)
        #expect(e.mismatches == [])
        #expect(e.checks == 35)
    }

    @Test func qemuCheckAccessReg() throws {
        let rig = try Rig()
        let e = Expectations(bus: rig.bus)
        try QEMUTISChecks.checkAccessReg(e)
        #expect(e.mismatches == [])
    }

    @Test func qemuCheckAccessRegSeize() throws {
        let rig = try Rig()
        let e = Expectations(bus: rig.bus)
        try QEMUTISChecks.checkAccessRegSeize(e)
        #expect(e.mismatches == [])
        #expect(e.checks > 60)
    }

    @Test func qemuCheckAccessRegRelease() throws {
        let rig = try Rig()
        let e = Expectations(bus: rig.bus)
        try QEMUTISChecks.checkAccessRegRelease(e)
        #expect(e.mismatches == [])
    }

    /// runs-on-this-machine.md §2: while loc0 is active, loc1's requestUse shows pendingRequest
    /// on loc0 (0xA5) and requestUse on loc1 (0x83); loc0's relinquish hands over to loc1.
    @Test func pendingRequestAndHandover() throws {
        let rig = try Rig()
        try rig.writeb(0, 0, 0x02)
        try rig.writeb(1, 0, 0x02)
        #expect(try rig.readb(0, 0) == 0xA5)
        #expect(try rig.readb(1, 0) == 0x83)
        try rig.writeb(0, 0, 0x20)
        #expect(try rig.readb(0, 0) == 0x81)
        #expect(try rig.readb(1, 0) == 0xA1)
    }

    /// Locality 4 is hardware only: every write to it is dropped (and reported), reads work.
    @Test func locality4WritesDropped() throws {
        let rig = try Rig()
        try rig.writeb(4, 0, 0x02)
        #expect(try rig.readb(4, 0) == 0x81)
        #expect(try rig.readl(4, TISRegister.stsOffset) == 0xFFFF_FFFF)
        #expect(rig.events.all.contains { if case .writeLocality4Dropped = $0 { true } else { false } })
    }

    /// Seize never reads back; a seize written together with requestUse only seizes.
    @Test func seizeBitIsNeverVisible() throws {
        let rig = try Rig()
        try rig.writeb(0, 0, 0x02)
        try rig.writeb(2, 0, 0x08 | 0x02)
        #expect(try rig.readb(2, 0) == 0xA1)
        #expect(try rig.readb(0, 0) == 0x91)
    }

    /// The established flag: ACCESS bit 0 is its inverse; resetEstablishment from locality 3
    /// (TPM 2.0) reaches the backend; from locality 0 it does not.
    @Test func resetEstablishment() throws {
        let rig = try Rig(established: true)
        #expect(try rig.readb(0, 0) == 0x80)
        try rig.writeb(0, 0, 0x02)
        try rig.writeb(0, TISRegister.stsOffset + 3, 0x02)
        #expect(rig.backend.establishedResets == [])
        try rig.writeb(0, 0, 0x20)
        try rig.writeb(3, 0, 0x02)
        try rig.writeb(3, TISRegister.stsOffset + 3, 0x02)
        #expect(rig.backend.establishedResets == [3])
        #expect(try rig.readb(3, 0) == 0xA1)
    }

    /// INTERFACE_ID's IntfSelLock written by any locality 0-3 locks all five.
    @Test func interfaceSelectorLock() throws {
        let rig = try Rig()
        try rig.writel(2, TISRegister.interfaceIDOffset, 0x0008_0000)
        for l in 0..<5 { #expect(try rig.readl(l, TISRegister.interfaceIDOffset) == 0x0008_2100) }
        let other = try Rig()
        try other.writel(4, TISRegister.interfaceIDOffset, 0x0008_0000)
        #expect(try other.readl(0, TISRegister.interfaceIDOffset) == 0x2100)
    }

    /// Constant registers and unknown offsets (0xFFFFFFFF), including the debug register.
    @Test(arguments: [
        (UInt16(0x04), UInt32(0xFFFF_FFFF)), (0x0C, 5), (0x14, 0x3000_0697), (0x1C, 0xFFFF_FFFF),
        (0x28, 0xFFFF_FFFF), (0x34, 0xFFFF_FFFF), (0xC0, 0xFFFF_FFFF), (0xF00, 0x0001_1014),
        (0xF04, 1), (0xF08, 0xFFFF_FFFF), (0xF90, 0xFFFF_FFFF), (0xFFC, 0xFFFF_FFFF),
    ])
    func constantRegisters(offset: UInt16, expected: UInt32) throws {
        let rig = try Rig()
        for l in 0..<5 { #expect(try rig.readl(l, offset) == expected) }
    }
}
