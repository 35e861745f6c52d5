import Synchronization

/// The Physical Presence Interface region (QEMU hw/tpm/tpm_ppi.c, docs/specs/tpm.rst): plain
/// RAM at 0xFED45000 shared by firmware and ACPI, migrated as the RAM block `tpm-ppi` (page
/// rounded: 4096 bytes on x86), not in the device section.
public final class PPIRegion: Sendable {
    /// `TPM_PPI_ADDR_BASE`.
    public static let baseAddress: UInt64 = 0xFED4_5000
    /// `TPM_PPI_ADDR_SIZE`: what the guest sees.
    public static let size = 0x400
    /// The RAM block's length in a migration stream (host page rounded).
    public static let ramBlockSize = 0x1000
    /// The RAM block's name in a migration stream.
    public static let ramBlockName = "tpm-ppi"

    /// Offsets of the fields firmware and ACPI share (docs/specs/tpm.rst).
    public enum Field {
        public static let functions = 0x000      // func[256]
        public static let ppin = 0x100
        public static let ppip = 0x101
        public static let pprp = 0x105
        public static let pprq = 0x109
        public static let pprm = 0x10D
        public static let lppr = 0x111
        public static let fret = 0x115
        public static let nextStep = 0x159
        /// movv: bit 0 asks for a memory clear at the next reset.
        public static let movv = 0x15A
    }

    private let ram = Mutex([UInt8](repeating: 0, count: PPIRegion.ramBlockSize))
    /// Called by `reset()` when the guest asked for a memory clear (movv bit 0). QEMU zeroes all
    /// guest RAM there (`tpm_ppi_reset`); the VMM owns guest RAM, so it gets the request.
    public let onMemoryClear: (@Sendable () -> Void)?

    public init(onMemoryClear: (@Sendable () -> Void)? = nil) {
        self.onMemoryClear = onMemoryClear
    }

    /// A little-endian read of `size` (1...8) bytes at `offset` (0..<0x400); bytes past the
    /// region read as 0.
    public func read(offset: Int, size: Int) -> UInt64 {
        ram.withLock { b in
            var v: UInt64 = 0
            for i in 0..<min(max(size, 0), 8) {
                let o = offset + i
                let byte: UInt8 = (o >= 0 && o < Self.size) ? b[o] : 0
                v |= UInt64(byte) << (8 * UInt64(i))
            }
            return v
        }
    }

    /// A little-endian write; bytes past the region are dropped.
    public func write(offset: Int, size: Int, value: UInt64) {
        ram.withLock { b in
            for i in 0..<min(max(size, 0), 8) {
                let o = offset + i
                if o >= 0 && o < Self.size { b[o] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
            }
        }
    }

    /// QEMU `tpm_ppi_reset`: if movv bit 0 is set, ask for guest memory to be cleared. QEMU does
    /// not clear movv itself.
    public func reset() {
        let clear = ram.withLock { $0[Field.movv] & 1 != 0 }
        if clear { onMemoryClear?() }
    }

    /// The RAM block as migrated (4096 bytes).
    public var contents: [UInt8] { ram.withLock { $0 } }

    /// Loads the RAM block from a stream; shorter input is zero-padded, longer is truncated.
    public func load(_ bytes: [UInt8]) {
        ram.withLock { b in
            for i in 0..<Self.ramBlockSize { b[i] = i < bytes.count ? bytes[i] : 0 }
        }
    }
}
