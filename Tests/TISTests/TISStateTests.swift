import EmulatorBackend
import Testing
import TIS
import TISConformance
import TISDriver

/// State as a value: save, validating restore, and a restored device answering identically.
@Suite struct TISStateTests {
    /// Every register of every locality, every width, read without side effects on the FIFO.
    static func registerSnapshot(_ bus: TISMachineBus) throws -> [UInt64] {
        var out: [UInt64] = []
        for l in 0..<5 {
            for off: UInt16 in [0x00, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x19, 0x1A, 0x30, 0xF00, 0xF04] {
                for size in [1, 4] {
                    out.append(try bus.read(TISGeometry.baseAddress + UInt64(l) << 12 + UInt64(off), size: size))
                }
            }
        }
        return out
    }

    /// After many random sequences, a device rebuilt from the saved state answers every
    /// register identically, reads the same response bytes, and drives the IRQ line the same.
    @Test(arguments: [1, 2, 3, 4, 5, 6, 7, 8] as [UInt64])
    func restoredDeviceAnswersIdentically(seed: UInt64) throws {
        let a = try Rig()
        var gen = TISOpGenerator(seed: seed)
        _ = try TISOpRunner.run(gen.ops(400), on: a.bus, settle: { a.device.waitForCompletion() })
        let saved = a.device.save()
        let b = try Rig()
        try b.device.restore(saved)
        #expect(b.device.currentState == saved)
        #expect(try Self.registerSnapshot(b.bus) == Self.registerSnapshot(a.bus))
        #expect(b.device.irqLevel == a.device.irqLevel)
        // The same further accesses give the same answers on both.
        var tail = TISOpGenerator(seed: seed &+ 1000)
        let ops = tail.ops(300)
        let ra = try TISOpRunner.run(ops, on: a.bus, settle: { a.device.waitForCompletion() })
        let rb = try TISOpRunner.run(ops, on: b.bus, settle: { b.device.waitForCompletion() })
        #expect(ra == rb)
        #expect(a.device.currentState == b.device.currentState)
    }

    /// A half-read response survives save and restore.
    @Test func halfReadResponseSurvives() throws {
        let reply: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0E, 0x00, 0x00, 0x00, 0x00, 1, 2, 3, 4]
        let a = try Rig(responder: { _ in reply })
        try a.ready()
        try a.send(startupCommand)
        try a.go()
        for _ in 0..<7 { _ = try a.readb(0, 0x24) }
        let b = try Rig()
        try b.device.restore(a.device.save())
        let rest = try (0..<7).map { _ in try b.readb(0, 0x24) }
        #expect(rest == Array(reply[7...]))
        #expect(try b.readl(0, 0x18) == 0x040F_F280)
    }

    @Test(arguments: [
        ("rw_offset", TISStateError.Code.rwOffsetOutOfRange),
        ("active", .localityOutOfRange), ("aborting", .localityOutOfRange), ("next", .localityOutOfRange),
        ("buffer", .bufferSize), ("localities", .localityCount),
    ])
    func restoreRejectsInvalidState(field: String, code: TISStateError.Code) throws {
        let rig = try Rig()
        try rig.ready()
        let before = rig.device.currentState
        var bad = before
        switch field {
        case "rw_offset": bad.rwOffset = 5000
        case "active": bad.activeLocality = 5
        case "aborting": bad.abortingLocality = 7
        case "next": bad.nextLocality = 0x80
        case "buffer": bad.buffer = [1, 2, 3]
        default: bad.localities.removeLast()
        }
        do throws(TISDeviceError) {
            try rig.device.restore(bad)
            Issue.record("restore accepted \(field)")
        } catch {
            #expect(error.code == .invalidState)
            #expect(error.stateError?.code == code)
        }
        #expect(rig.device.currentState == before)
    }
}

/// The TPM 1.2 personality (QEMU with a TPM 1.2 backend).
@Suite struct TPM12PersonalityTests {
    @Test func registers() throws {
        let rig = try Rig(version: .tpm12)
        for l in 0..<5 {
            #expect(try rig.readl(l, 0x14) == 0x2000_0697)
            #expect(try rig.readl(l, 0x30) == 0xFFFF_FFFF)
        }
        try rig.writeb(0, 0, 0x02)
        #expect(try rig.readl(0, 0x18) == 0x0010_0000)
        // commandCancel and resetEstablishment are TPM 2.0 only.
        try rig.writeb(3, 0, 0x02)
        try rig.writel(0, 0x18, 0x0300_0000)
        #expect(rig.backend.cancels == 0)
    }

    /// A successful TPM_ContinueSelfTest (ordinal 0x53) sets selfTestDone in every locality;
    /// it then survives everything but reset.
    @Test func selfTestDone() throws {
        let ok: [UInt8] = [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x00]
        let rig = try Rig(version: .tpm12, responder: { _ in ok })
        try rig.ready()
        try rig.send([0x00, 0xC1, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x53])
        try rig.go()
        #expect(try rig.readl(0, 0x18) & 0xFF == 0x94)
        try rig.writeb(0, 0, 0x20)
        try rig.writeb(2, 0, 0x02)
        #expect(try rig.readl(2, 0x18) == 0x0010_0004)
        try rig.device.reset()
        try rig.writeb(2, 0, 0x02)
        #expect(try rig.readl(2, 0x18) == 0x0010_0000)
    }

    /// TPM 2.0 self-test commands are not recognised (QEMU tpm_util_is_selftest).
    @Test func tpm2SelfTestNotRecognised() throws {
        let ok: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x00]
        let rig = try Rig(responder: { _ in ok })
        try rig.ready()
        try rig.send(TPM2.selfTest())
        try rig.go()
        #expect(try rig.readl(0, 0x18) & 0x04 == 0)
    }
}

/// Hostile guest accesses: nothing traps, invariants hold after every op.
@Suite struct TISHostileAccessTests {
    @Test(arguments: [11, 12, 13] as [UInt64])
    func randomAccessesKeepInvariants(seed: UInt64) throws {
        let rig = try Rig()
        var gen = TISOpGenerator(seed: seed)
        var rng = SplitMix64(seed: seed)
        for _ in 0..<3000 {
            var ops = gen.next()
            // Also raw garbage: any offset in and around the region, any size.
            if rng.next() % 8 == 0 {
                let a = 0xFED3_F000 + rng.next() % 0x7000
                ops.append(.write(address: a, size: Int(rng.next() % 8) + 1, value: rng.next()))
                ops.append(.read(address: a, size: Int(rng.next() % 8) + 1))
            }
            _ = try TISOpRunner.run(ops, on: rig.bus, settle: { rig.device.waitForCompletion() })
            let s = rig.device.currentState
            #expect(Int(s.rwOffset) <= TISGeometry.bufferSize)
            #expect(s.localities.filter { $0.access & 0x20 != 0 }.count <= 1)
            #expect(s.activeLocality < 5 || s.activeLocality == 0xFF)
            try s.validate()
        }
        #expect(throws: TISBusError.self) { try rig.bus.read(0xFED4_0000, size: 9) }
        #expect(rig.device.read(offset: 0x5000, size: 4) == 0xFFFF_FFFF)
        #expect(rig.device.read(offset: 0, size: 3) == 0xFFFF_FFFF)
    }
}
