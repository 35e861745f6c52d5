import QEMUHarness
import TISDriver
import Testing

extension QEMUSuite {
    /// A whole TPM2_Startup through the FIFO of QEMU 7.2's `tpm-tis`, one byte per access, with
    /// every STS value the reference records (runs-on-this-machine.md §2).
    @Suite("QEMU 7.2 TIS FIFO over qtest")
    struct TISFIFOTests {
        @Test("TPM2_Startup round trip by byte writes", arguments: QEMUMachineType.allCases)
        func startupRoundTrip(machine: QEMUMachineType) throws {
            let m = try startMachine(machine: machine)
            defer { m.close() }
            let bus = m.bus
            let sts = TIS.reg(0, TIS.sts)
            let fifo = TIS.reg(0, TIS.dataFIFO)

            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            #expect(try bus.readb(TIS.reg(0, TIS.access)) == 0xA1)
            #expect(try bus.readl(sts) == 0x0410_0000)

            // commandReady: IDLE → READY; stsValid is not set here.
            try bus.writeb(sts, UInt8(TIS.commandReady))
            #expect(try bus.readl(sts) == 0x0410_0040)

            // Each byte lowers the burst count; Expect stays until the header's size is in.
            for (i, byte) in startupClear.enumerated() {
                try bus.writeb(fifo, byte)
                let written = i + 1
                let expected: UInt32 = written < startupClear.count
                    ? TIS.sts(TIS.stsValid | TIS.expect, burst: 4096 - written)
                    : TIS.sts(TIS.stsValid, burst: 4096 - written)
                let got = try bus.readl(sts)
                #expect(got == expected, "STS after \(written) bytes: \(hex(got)) != \(hex(expected))")
            }
            #expect(try bus.readl(sts) == 0x040F_F480)

            // tpmGo: the command runs on swtpm; STS is unchanged until completion.
            try bus.writeb(sts, UInt8(TIS.tpmGo))
            let right = try bus.readl(sts)
            #expect(right == 0x040F_F480 || right == 0x0400_0A90, "STS right after tpmGo: \(hex(right))")
            let done = try pollSTS(bus) { $0 & TIS.dataAvail != 0 }
            #expect(done == 0x0400_0A90, "STS at completion: \(hex(done))")

            // The response, byte by byte; burst = bytes left while dataAvail.
            var response: [UInt8] = []
            for k in 0..<startupClearResponse.count {
                let before = try bus.readl(sts)
                #expect(before == TIS.sts(TIS.stsValid | TIS.dataAvail, burst: startupClearResponse.count - k),
                        "STS before response byte \(k): \(hex(before))")
                response.append(try bus.readb(fifo))
            }
            #expect(response == startupClearResponse)
            #expect(try bus.readl(sts) == 0x040F_F680)
            // Past the end the FIFO reads 0xFF.
            #expect(try bus.readb(fifo) == 0xFF)

            // commandReady again: COMPLETION → READY.
            try bus.writeb(sts, UInt8(TIS.commandReady))
            #expect(try bus.readl(sts) == 0x0410_0040)
        }

        /// QEMU's memory core splits writes as it splits reads (natural alignment, at most 4
        /// bytes per piece); a piece that lands outside the FIFO registers is dropped.
        @Test("8-byte and unaligned FIFO writes: only the pieces that hit the FIFO count")
        func splitWrites() throws {
            let m = try startMachine()
            defer { m.close() }
            let bus = m.bus
            let sts = TIS.reg(0, TIS.sts)
            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            try bus.writeb(sts, UInt8(TIS.commandReady))
            // The header (80 01 00 00 33 33 ...) declares more than is written: Expect stays set.
            // 0x24 + 8: 4 bytes into DATA_FIFO, 4 bytes at 0x28 (unknown register) dropped.
            try bus.writeq(TIS.reg(0, TIS.dataFIFO), 0x1111_1111_0000_0180)
            #expect(try bus.readl(sts) == TIS.sts(TIS.stsValid | TIS.expect, burst: 4096 - 4))
            // 0x80 + 8: both halves are XDATA_FIFO.
            try bus.writeq(TIS.reg(0, 0x80), 0x2222_2222_3333_3333)
            #expect(try bus.readl(sts) == TIS.sts(TIS.stsValid | TIS.expect, burst: 4096 - 12))
            // writel at 0x26: 2 bytes at 0x26 (FIFO) + 2 at 0x28 (dropped).
            try bus.writel(TIS.reg(0, 0x26), 0x4444_4444)
            #expect(try bus.readl(sts) == TIS.sts(TIS.stsValid | TIS.expect, burst: 4096 - 14))
            // writew at 0x25: 1 byte at 0x25 + 1 byte at 0x26, both FIFO.
            try bus.writew(TIS.reg(0, 0x25), 0x5555)
            #expect(try bus.readl(sts) == TIS.sts(TIS.stsValid | TIS.expect, burst: 4096 - 16))
            // writeq at 0x08: INT_ENABLE takes the low half (val & 0x8000009F); INT_VECTOR ignores the rest.
            try bus.writeq(TIS.reg(0, TIS.intEnable), 0x0000_0009_8000_0081)
            #expect(try bus.readl(TIS.reg(0, TIS.intEnable)) == 0x8000_0081)
            #expect(try bus.readl(TIS.reg(0, TIS.intVector)) == 0x05)
        }

        @Test("4-byte FIFO reads are little-endian")
        func dwordFIFORead() throws {
            let m = try startMachine()
            defer { m.close() }
            let bus = m.bus
            try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.commandReady))
            for byte in startupClear { try bus.writeb(TIS.reg(0, TIS.dataFIFO), byte) }
            try bus.writeb(TIS.reg(0, TIS.sts), UInt8(TIS.tpmGo))
            _ = try pollSTS(bus) { $0 & TIS.dataAvail != 0 }
            #expect(try bus.readl(TIS.reg(0, TIS.dataFIFO)) == 0x0000_0180)
        }

        @Test("The shared TISDriver runs over QTestBus")
        func driverOverQTest() throws {
            let m = try startMachine()
            defer { m.close() }
            let driver = TISDriver(bus: m.bus, timeout: 5, byteWrites: true)
            #expect(try driver.transmit(startupClear) == startupClearResponse)
            // TPM2_GetRandom(8): header + be16 size 8 + 8 bytes.
            let getRandom: [UInt8] = [0x80, 0x01, 0, 0, 0, 0x0C, 0, 0, 0x01, 0x7B, 0x00, 0x08]
            let rsp = try driver.transmit(getRandom)
            #expect(rsp.count == 20)
            #expect(Array(rsp.prefix(10)) == [0x80, 0x01, 0, 0, 0, 0x14, 0, 0, 0, 0])
        }
    }
}
