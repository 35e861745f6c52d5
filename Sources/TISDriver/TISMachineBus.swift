import TIS

/// The guest-physical view of a machine with a TIS: the TIS MMIO region at 0xFED40000, the PPI
/// RAM at 0xFED45000, unassigned memory elsewhere. An access is split as QEMU's
/// `address_space_read` / `flatview_read_continue` split it (`memory_access_size`): never
/// across a region, never larger than the region's maximum (4 for the TIS), never larger than
/// the address's alignment. So an unaligned `readw` at 0xFED40019 is two byte reads, and a
/// `readq` is two dword reads, exactly as qtest sees QEMU 7.2 answer.
public final class TISMachineBus: MMIOBus, Sendable {
    public let device: TISDevice
    let ppiEnabled: Bool
    /// What QEMU answers for an address nothing is mapped at (per byte; x86 `pc` unassigned
    /// reads return 0 in QEMU 7.2 through qtest).
    public let unassignedByte: UInt8

    public init(device: TISDevice, unassignedByte: UInt8 = 0) {
        self.device = device
        self.ppiEnabled = device.configuration.ppiEnabled
        self.unassignedByte = unassignedByte
    }

    enum Region { case tis, ppi, unassigned }

    func region(_ a: UInt64) -> (Region, UInt64, UInt64) {
        let tisBase = TISGeometry.baseAddress
        if a >= tisBase && a < tisBase + TISGeometry.regionSize {
            return (.tis, a - tisBase, tisBase + TISGeometry.regionSize - a)
        }
        let ppiBase = PPIRegion.baseAddress
        if ppiEnabled && a >= ppiBase && a < ppiBase + UInt64(PPIRegion.size) {
            return (.ppi, a - ppiBase, ppiBase + UInt64(PPIRegion.size) - a)
        }
        // Unassigned up to the next mapped region (or 8 bytes, the most an access spans).
        var next: UInt64 = a &+ 8
        if a < tisBase { next = min(next, tisBase) }
        if ppiEnabled && a < ppiBase { next = min(next, ppiBase) }
        return (.unassigned, 0, next &- a)
    }

    /// QEMU `memory_access_size` for an MMIO region with max access 4 and no unaligned support.
    static func accessSize(_ remaining: Int, _ offset: UInt64) -> Int {
        var maxSize = 4
        let align = Int(truncatingIfNeeded: offset & (0 &- offset))
        if align != 0 && align < maxSize { maxSize = align }
        var l = min(remaining, maxSize)
        // pow2floor
        while l & (l - 1) != 0 { l &= l - 1 }
        return l
    }

    public func read(_ address: UInt64, size: Int) throws -> UInt64 {
        // The common case: one naturally aligned access of 1, 2 or 4 bytes inside the TIS.
        let off = address &- TISGeometry.baseAddress
        if off < TISGeometry.regionSize && (size == 4 || size == 1 || size == 2) && off & UInt64(size - 1) == 0 {
            return UInt64(device.read(offset: off, size: size))
        }
        guard (1...8).contains(size) else { throw TISBusError.badSize(size) }
        var result: UInt64 = 0
        var done = 0
        var a = address
        while done < size {
            let (r, off, avail) = region(a)
            var l = min(size - done, Int(clamping: avail))
            var v: UInt64
            switch r {
            case .tis:
                l = Self.accessSize(l, off)
                v = UInt64(device.read(offset: off, size: l))
            case .ppi:
                v = device.ppi.read(offset: Int(off), size: l)
            case .unassigned:
                v = 0
                for i in 0..<l { v |= UInt64(unassignedByte) << (8 * UInt64(i)) }
            }
            if l < 8 { v &= (1 << (8 * UInt64(l))) - 1 }
            result |= v << (8 * UInt64(done))
            done += l
            a &+= UInt64(l)
        }
        return result
    }

    public func write(_ address: UInt64, size: Int, value: UInt64) throws {
        let off = address &- TISGeometry.baseAddress
        if off < TISGeometry.regionSize && (size == 4 || size == 1 || size == 2) && off & UInt64(size - 1) == 0 {
            device.write(offset: off, size: size, value: UInt32(truncatingIfNeeded: value))
            return
        }
        guard (1...8).contains(size) else { throw TISBusError.badSize(size) }
        var done = 0
        var a = address
        while done < size {
            let (r, off, avail) = region(a)
            var l = min(size - done, Int(clamping: avail))
            let piece = value >> (8 * UInt64(done))
            switch r {
            case .tis:
                l = Self.accessSize(l, off)
                device.write(offset: off, size: l, value: UInt32(truncatingIfNeeded: piece))
            case .ppi:
                device.ppi.write(offset: Int(off), size: l, value: piece)
            case .unassigned:
                break
            }
            done += l
            a &+= UInt64(l)
        }
    }
}

/// A bus access the bus itself refuses.
public enum TISBusError: Error, Equatable, Sendable {
    case badSize(Int)
}
