/// A guest-physical bus the driver reads and writes, little-endian, 1, 2, 4 or 8 bytes wide.
/// Two implementations prove fidelity: the in-process `TISBus` over a `TISDevice`, and real
/// QEMU through its qtest socket (`QTestBus` in the QEMU harness).
public protocol MMIOBus: AnyObject {
    /// Reads `size` bytes at `address`; the value is little-endian assembled.
    func read(_ address: UInt64, size: Int) throws -> UInt64
    /// Writes the low `size` bytes of `value` at `address`, little-endian.
    func write(_ address: UInt64, size: Int, value: UInt64) throws
}

extension MMIOBus {
    public func readb(_ a: UInt64) throws -> UInt8 { UInt8(truncatingIfNeeded: try read(a, size: 1)) }
    public func readw(_ a: UInt64) throws -> UInt16 { UInt16(truncatingIfNeeded: try read(a, size: 2)) }
    public func readl(_ a: UInt64) throws -> UInt32 { UInt32(truncatingIfNeeded: try read(a, size: 4)) }
    public func writeb(_ a: UInt64, _ v: UInt8) throws { try write(a, size: 1, value: UInt64(v)) }
    public func writew(_ a: UInt64, _ v: UInt16) throws { try write(a, size: 2, value: UInt64(v)) }
    public func writel(_ a: UInt64, _ v: UInt32) throws { try write(a, size: 4, value: UInt64(v)) }
}
