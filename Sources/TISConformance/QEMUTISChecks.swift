import Glibc
import TIS
import TISDriver

/// One register read that did not give the expected value.
public struct Mismatch: Equatable, Sendable, CustomStringConvertible {
    public var step: String
    public var expected: UInt64
    public var actual: UInt64
    public var description: String {
        "\(step): expected 0x\(String(expected, radix: 16)), got 0x\(String(actual, radix: 16))"
    }
}

/// Collects expectations over a bus; the check functions below never stop at the first
/// difference so one run lists them all.
public final class Expectations {
    public let bus: any MMIOBus
    public private(set) var mismatches: [Mismatch] = []
    public private(set) var checks = 0

    public init(bus: any MMIOBus) { self.bus = bus }

    public func reg(_ l: Int, _ r: UInt16) -> UInt64 { TISGeometry.baseAddress + UInt64(l) << 12 + UInt64(r) }

    public func expect(_ actual: UInt64, _ expected: UInt64, _ step: @autoclosure () -> String) {
        checks += 1
        if actual != expected { mismatches.append(Mismatch(step: step(), expected: expected, actual: actual)) }
    }

    public func expectNot(_ actual: UInt64, _ forbidden: UInt64, _ step: @autoclosure () -> String) {
        checks += 1
        if actual == forbidden { mismatches.append(Mismatch(step: step() + " (must differ)", expected: forbidden, actual: actual)) }
    }

    public func readb(_ l: Int, _ r: UInt16) throws -> UInt64 { UInt64(try bus.readb(reg(l, r))) }
    public func readl(_ l: Int, _ r: UInt16) throws -> UInt64 { UInt64(try bus.readl(reg(l, r))) }
    public func writeb(_ l: Int, _ r: UInt16, _ v: UInt8) throws { try bus.writeb(reg(l, r), v) }
    public func writel(_ l: Int, _ r: UInt16, _ v: UInt32) throws { try bus.writel(reg(l, r), v) }
}

/// QEMU's tpm-tis qtests (tests/qtest/tpm-tis-util.c), TPM 2.0, as table-like checks over any
/// bus. Each returns the mismatches; an empty list is a pass. `established` is the backend's
/// TPM-established flag (ACCESS bit 0 reads its inverse).
public enum QEMUTISChecks {
    static let valid = UInt64(TISAccess.tpmRegValidSts.rawValue)
    static let active = UInt64(TISAccess.activeLocality.rawValue)
    static let requestUse = UInt64(TISAccess.requestUse.rawValue)
    static let pending = UInt64(TISAccess.pendingRequest.rawValue)
    static let seized = UInt64(TISAccess.beenSeized.rawValue)

    static func est(_ established: Bool) -> UInt64 { established ? 0 : 1 }

    /// `tpm_tis_test_check_localities`: ACCESS, INTF_CAPABILITY, INTERFACE_ID, DID_VID, RID of
    /// every locality (each locality's own ACCESS, as fixed after 7.2).
    public static func checkLocalities(_ e: Expectations, established: Bool = false) throws {
        for l in 0..<TISGeometry.localityCount {
            e.expect(try e.readb(l, TISRegister.accessOffset), valid | est(established), "loc\(l) ACCESS")
            e.expect(try e.readl(l, TISRegister.intfCapabilityOffset), UInt64(TISConstants.capabilities20), "loc\(l) INTF_CAPABILITY")
            e.expect(try e.readl(l, TISRegister.interfaceIDOffset), UInt64(TISConstants.interfaceID20), "loc\(l) INTERFACE_ID")
            let didvid = try e.readl(l, TISRegister.didVidOffset)
            e.expectNot(didvid, 0, "loc\(l) DID_VID")
            e.expectNot(didvid, 0xFFFF_FFFF, "loc\(l) DID_VID")
            let rid = try e.readl(l, TISRegister.ridOffset)
            e.expectNot(rid, 0, "loc\(l) RID")
            e.expectNot(rid, 0xFFFF_FFFF, "loc\(l) RID")
        }
    }

    /// `tpm_tis_test_check_access_reg`: request and release each of localities 0-3.
    public static func checkAccessReg(_ e: Expectations, established: Bool = false) throws {
        let base = valid | est(established)
        for l in 0..<4 {
            e.expect(try e.readb(l, 0), base, "loc\(l) ACCESS before")
            try e.writeb(l, 0, TISAccess.requestUse.rawValue)
            e.expect(try e.readb(l, 0), base | active, "loc\(l) ACCESS after requestUse")
            try e.writeb(l, 0, TISAccess.activeLocality.rawValue)
            e.expect(try e.readb(l, 0), base, "loc\(l) ACCESS after relinquish")
        }
    }

    /// `tpm_tis_test_check_access_reg_seize`: lower localities cannot seize, higher ones can;
    /// beenSeized is shown and cleared; release hands the locality down.
    public static func checkAccessRegSeize(_ e: Expectations, established: Bool = false) throws {
        let base = valid | est(established)
        for locty in 0..<4 {
            var pend: UInt64 = 0
            e.expect(try e.readb(locty, 0), base, "owner \(locty) ACCESS before")
            try e.writeb(locty, 0, TISAccess.requestUse.rawValue)
            e.expect(try e.readb(locty, 0), base | active, "owner \(locty) granted")
            for l in 0..<locty {
                e.expect(try e.readb(l, 0), base | pend, "owner \(locty): lower \(l) not active")
                try e.writeb(l, 0, TISAccess.requestUse.rawValue)
                e.expect(try e.readb(l, 0), base | requestUse | pend, "owner \(locty): lower \(l) requestUse pending")
                e.expect(try e.readb(locty, 0), base | active | pending, "owner \(locty): owner sees pending from \(l)")
                try e.writeb(l, 0, TISAccess.seize.rawValue)
                e.expect(try e.readb(l, 0), base | requestUse | pend, "owner \(locty): lower \(l) seize refused")
                e.expect(try e.readb(locty, 0), base | active | pending, "owner \(locty): owner unchanged after \(l) seize")
                pend = pending
            }
            var l = locty + 1
            while l < 4 {
                try e.writeb(l, 0, TISAccess.requestUse.rawValue)
                e.expect(try e.readb(l, 0), base | requestUse | pend, "owner \(locty): higher \(l) requestUse pending")
                e.expect(try e.readb(l - 1, 0), base | active | pending, "owner \(locty): \(l - 1) sees pending")
                try e.writeb(l, 0, TISAccess.seize.rawValue)
                e.expect(try e.readb(l, 0), base | active | pend, "owner \(locty): higher \(l) seized")
                e.expect(try e.readb(l - 1, 0), base | seized | pend, "owner \(locty): \(l - 1) beenSeized")
                try e.writeb(l - 1, 0, TISAccess.beenSeized.rawValue)
                e.expect(try e.readb(l - 1, 0), base | pend, "owner \(locty): \(l - 1) beenSeized cleared")
                l += 1
            }
            if locty <= 1 { pend = 0 }
            l -= 1
            try e.writeb(l, 0, TISAccess.activeLocality.rawValue)
            e.expect(try e.readb(l, 0), base | pend, "owner \(locty): \(l) relinquished")
            var k = locty - 1
            while k >= 0 {
                e.expect(try e.readb(k, 0), base | active | pend, "owner \(locty): \(k) granted on release")
                try e.writeb(k, 0, TISAccess.activeLocality.rawValue)
                if k == 1 { pend = 0 }
                k -= 1
            }
            for m in 0..<4 {
                e.expect(try e.readb(m, 0), base, "owner \(locty): loc\(m) inactive at the end")
            }
        }
    }

    /// `tpm_tis_test_check_access_reg_release`: every other locality requests use; each
    /// relinquish hands the locality to the highest requester.
    public static func checkAccessRegRelease(_ e: Expectations, established: Bool = false) throws {
        let base = valid | est(established)
        for locty in stride(from: 3, through: 0, by: -1) {
            var pend: UInt64 = 0
            e.expect(try e.readb(locty, 0), base, "owner \(locty) ACCESS before")
            try e.writeb(locty, 0, TISAccess.requestUse.rawValue)
            e.expect(try e.readb(locty, 0), base | active, "owner \(locty) granted")
            for l in 0..<4 where l != locty {
                try e.writeb(l, 0, TISAccess.requestUse.rawValue)
                e.expect(try e.readb(l, 0), base | requestUse | pend, "owner \(locty): \(l) requests use")
                pend = pending
            }
            try e.writeb(locty, 0, TISAccess.activeLocality.rawValue)
            for l in stride(from: 3, through: 0, by: -1) where l != locty {
                e.expect(try e.readb(l, 0), base | active | pend, "owner \(locty): \(l) active in turn")
                try e.writeb(l, 0, TISAccess.activeLocality.rawValue)
                if l == 1 || (locty <= 1 && l == 2) { pend = 0 }
                e.expect(try e.readb(l, 0), base | pend, "owner \(locty): \(l) released")
            }
        }
    }

    /// `tpm_tis_test_check_transmit`: TPM2_Startup one byte at a time, STS and burst count
    /// after each byte, tpmGo, the response read byte by byte. Returns the response.
    @discardableResult
    public static func checkTransmit(_ e: Expectations, command: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x01, 0x44, 0x00, 0x00],
                                     established: Bool = false, timeout: Double = 10) throws -> [UInt8] {
        let base = valid | est(established)
        try e.writeb(0, 0, TISAccess.requestUse.rawValue)
        e.expect(try e.readb(0, 0), base | active, "transmit: locality 0 granted")
        var sts = try e.readl(0, TISRegister.stsOffset)
        e.expect(sts & 0xFF, 0, "transmit: STS low byte idle")
        e.expect(sts & UInt64(TISStatus.familyMask.rawValue), UInt64(TISStatus.family20.rawValue), "transmit: family 2.0")
        var bcount = (sts >> 8) & 0xFFFF
        if bcount < 128 { e.expect(bcount, 128, "transmit: burst count >= 128") }
        try e.writel(0, TISRegister.stsOffset, TISStatus.commandReady.rawValue)
        sts = try e.readl(0, TISRegister.stsOffset)
        e.expect(sts & 0xFF, UInt64(TISStatus.commandReady.rawValue), "transmit: commandReady")
        for (i, byte) in command.enumerated() {
            try e.writeb(0, TISRegister.dataFIFOOffset, byte)
            sts = try e.readl(0, TISRegister.stsOffset)
            let last = i == command.count - 1
            e.expect(sts & 0xFF, last ? 0x80 : 0x88, "transmit: STS after byte \(i + 1)")
            let b = (sts >> 8) & 0xFFFF
            e.expect(b, bcount - 1, "transmit: burst after byte \(i + 1)")
            bcount = b
        }
        try e.writeb(0, TISRegister.stsOffset, UInt8(TISStatus.tpmGo.rawValue))
        let deadline = Clock.now + timeout
        repeat {
            sts = try e.readl(0, TISRegister.stsOffset)
        } while sts & UInt64(TISStatus.dataAvailable.rawValue) == 0 && Clock.now < deadline
        e.expect(sts & 0xFF, 0x90, "transmit: dataAvail")
        bcount = (sts >> 8) & 0xFFFF
        var response: [UInt8] = []
        for i in 0..<Int(bcount) {
            response.append(UInt8(try e.readb(0, TISRegister.dataFIFOOffset)))
            sts = try e.readl(0, TISRegister.stsOffset)
            if sts & UInt64(TISStatus.dataAvailable.rawValue) != 0 {
                e.expect((sts >> 8) & 0xFFFF, bcount - UInt64(i) - 1, "transmit: burst while reading byte \(i + 1)")
            }
        }
        try e.writeb(0, 0, TISAccess.activeLocality.rawValue)
        return response
    }
}

/// Monotonic seconds.
public enum Clock {
    public static var now: Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
