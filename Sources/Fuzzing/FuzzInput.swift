/// A cursor over a fuzzer's input that never fails: past the end it yields zeros, so every byte
/// string is a valid script (cloud-hypervisor's op-script fuzz targets; style-anchors §1.4).
public struct FuzzInput: Sendable {
    public let bytes: [UInt8]
    public private(set) var position = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var isAtEnd: Bool { position >= bytes.count }
    public var remaining: Int { max(bytes.count - position, 0) }

    public mutating func u8() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    public mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    public mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    public mutating func bool() -> Bool { u8() & 1 != 0 }

    /// Up to `count` bytes (fewer at the end of the input).
    public mutating func take(_ count: Int) -> [UInt8] {
        let n = min(max(count, 0), remaining)
        defer { position += n }
        return Array(bytes[position..<position + n])
    }

    /// The rest of the input.
    public mutating func rest() -> [UInt8] { take(remaining) }

    public mutating func pick<T>(_ choices: [T]) -> T { choices[Int(u8()) % choices.count] }
}

/// An invariant a fuzz target found broken: the input, the op and what was wrong. Tests record
/// it; the libFuzzer shims in `Fuzz/` turn it into a crash so the input is kept.
public struct FuzzViolation: Error, Sendable, CustomStringConvertible {
    /// Which target (`tis`, `stream`, `ctrl`, `data`).
    public var target: String
    /// The op (or input) index at which the invariant broke.
    public var step: Int
    /// What the op was.
    public var operation: String
    public var message: String

    public init(target: String, step: Int, operation: String, _ message: String) {
        self.target = target
        self.step = step
        self.operation = operation
        self.message = message
    }

    public var description: String { "\(target) step \(step) (\(operation)): \(message)" }
}
