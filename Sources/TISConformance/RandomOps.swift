import TIS
import TISDriver

/// A small deterministic PRNG (SplitMix64), so a seed names one sequence on every machine.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// One guest access of a structured random sequence.
public enum TISOp: Equatable, Sendable, CustomStringConvertible {
    case read(address: UInt64, size: Int)
    case write(address: UInt64, size: Int, value: UInt64)
    /// Wait until the backend has answered (the model: `waitForCompletion`; QEMU: a pause).
    case settle

    public var description: String {
        switch self {
        case .read(let a, let s): "read\(s * 8) 0x\(String(a, radix: 16))"
        case .write(let a, let s, let v): "write\(s * 8) 0x\(String(a, radix: 16)) 0x\(String(v, radix: 16))"
        case .settle: "settle"
        }
    }
}

/// Generates sequences that reach every register, every locality, every width and byte lane,
/// the arbitration paths (request, relinquish, seize, beenSeized), whole and partial commands,
/// aborts, response reads and interrupts. Locality 4 and unknown offsets are included.
public struct TISOpGenerator {
    public var rng: SplitMix64
    /// A well-formed TPM 2.0 command the generator sends byte by byte (TPM2_GetRandom(8)).
    public var command: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x01, 0x7B, 0x00, 0x08]

    public init(seed: UInt64) { rng = SplitMix64(seed: seed) }

    static let offsets: [UInt16] = [0x00, 0x01, 0x02, 0x03, 0x04, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x10, 0x11, 0x12, 0x13,
                                    0x14, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x24, 0x25, 0x26, 0x27, 0x30, 0x32, 0x80, 0x81,
                                    0xA0, 0xBC, 0xBF, 0xC0, 0xF00, 0xF04, 0xF90, 0xFFC]
    static let accessValues: [UInt64] = [0x02, 0x20, 0x08, 0x10, 0x0A, 0x22, 0x28, 0x30, 0xFF, 0x00, 0x12]
    static let stsValues: [UInt64] = [0x40, 0x20, 0x02, 0x60, 0x42, 0x0100_0000, 0x0200_0000, 0x0300_0040, 0xFF]

    mutating func pick<T>(_ a: [T]) -> T { a[Int(rng.next() % UInt64(a.count))] }

    func addr(_ l: Int, _ off: UInt16) -> UInt64 { TISGeometry.baseAddress + UInt64(l) << 12 + UInt64(off) }

    /// The next few ops (a macro step may expand to several).
    public mutating func next() -> [TISOp] {
        let l = Int(rng.next() % 100 < 85 ? rng.next() % 4 : 4)
        let roll = rng.next() % 100
        switch roll {
        case 0..<20:
            let off = pick(Self.offsets)
            return [.read(address: addr(l, off), size: pick([1, 1, 2, 4, 4, 4]))]
        case 20..<35:
            return [.write(address: addr(l, 0), size: 1, value: pick(Self.accessValues)), .read(address: addr(l, 0), size: 1)]
        case 35..<45:
            let v = pick(Self.stsValues)
            return [.write(address: addr(l, 0x18), size: v > 0xFF ? 4 : 1, value: v), .read(address: addr(l, 0x18), size: 4)]
        case 45..<60:
            // A whole command, possibly cut short, then tpmGo and a settle.
            let cut = rng.next() % 4 == 0 ? Int(rng.next() % UInt64(command.count)) : command.count
            var ops: [TISOp] = command.prefix(cut).map { .write(address: addr(l, 0x24), size: 1, value: UInt64($0)) }
            ops.append(.read(address: addr(l, 0x18), size: 4))
            ops.append(.write(address: addr(l, 0x18), size: 1, value: 0x20))
            ops.append(.settle)
            ops.append(.read(address: addr(l, 0x18), size: 4))
            return ops
        case 60..<72:
            let n = Int(rng.next() % 6) + 1
            return (0..<n).map { _ in .read(address: addr(l, pick([0x24, 0x24, 0x80, 0x26])), size: pick([1, 1, 4])) }
        case 72..<80:
            let v: UInt64 = pick([0x8000_0087, 0x8000_0001, 0x87, 0x0, 0xFFFF_FFFF, 0x8000_0080])
            return [.write(address: addr(l, 0x08), size: pick([4, 4, 1]), value: v), .read(address: addr(l, 0x08), size: 4)]
        case 80..<88:
            return [.read(address: addr(l, 0x10), size: 4), .write(address: addr(l, 0x10), size: pick([4, 1]), value: pick([0x87, 0x01, 0x02, 0x04, 0x80, 0xFF])), .read(address: addr(l, 0x10), size: 4)]
        case 88..<92:
            return [.write(address: addr(l, 0x30), size: 4, value: pick([0x0008_0000, 0xFFFF_FFFF, 0x0])), .read(address: addr(l, 0x30), size: 4)]
        case 92..<96:
            let off = UInt16(rng.next() % 0x1000)
            let size = pick([1, 2, 4])
            return [.write(address: addr(l, off), size: size, value: rng.next()), .read(address: addr(l, off), size: size)]
        default:
            let off = pick(Self.offsets)
            return [.write(address: addr(l, off), size: pick([1, 2, 4]), value: rng.next() & 0xFFFF_FFFF)]
        }
    }

    /// `count` ops (at least; macro steps are not cut).
    public mutating func ops(_ count: Int) -> [TISOp] {
        var out: [TISOp] = []
        out.reserveCapacity(count + 16)
        while out.count < count { out += next() }
        return out
    }
}

/// Runs ops on a bus; reads are returned in order.
public enum TISOpRunner {
    public static func run(_ ops: [TISOp], on bus: any MMIOBus, settle: () throws -> Void) throws -> [UInt64] {
        var reads: [UInt64] = []
        reads.reserveCapacity(ops.count)
        for op in ops {
            switch op {
            case .read(let a, let s): reads.append(try bus.read(a, size: s))
            case .write(let a, let s, let v): try bus.write(a, size: s, value: v)
            case .settle: try settle()
            }
        }
        return reads
    }
}
