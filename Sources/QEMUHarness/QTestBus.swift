import Foundation
import TISDriver

/// One asynchronous `IRQ raise N` / `IRQ lower N` line seen on the qtest socket.
public struct QTestIRQEvent: Equatable, Sendable, CustomStringConvertible {
    /// The intercepted input pin (for `ioapic`, the GSI; IRQ0 shows as 0, not 2).
    public var line: Int
    /// true for `raise`, false for `lower`.
    public var raised: Bool
    /// Monotonic nanoseconds when the harness read the line.
    public var timestamp: UInt64

    public init(line: Int, raised: Bool, timestamp: UInt64) {
        self.line = line
        self.raised = raised
        self.timestamp = timestamp
    }

    public var description: String { "IRQ \(raised ? "raise" : "lower") \(line)" }
}

/// The guest-physical bus of a real QEMU, driven over its qtest socket (QEMU softmmu/qtest.c).
///
/// qtest is a line protocol: one request, one `OK ...` / `FAIL ...` / `ERR ...` answer, with
/// asynchronous `IRQ raise|lower N` lines possibly arriving before any answer once
/// `irq_intercept_in` is on. Values are parsed as numbers (QEMU 7.2 prints reads as 16 hex
/// digits; other versions may not). QEMU `g_assert`s on malformed requests, so the bus only
/// ever sends requests it formatted itself.
///
/// Not thread-safe: one test drives one bus.
public final class QTestBus: MMIOBus {
    private let connection: LineConnection
    /// How long one request may wait for its answer.
    public var timeout: Double
    /// Every IRQ line seen, oldest first.
    public private(set) var irqEvents: [QTestIRQEvent] = []
    /// The current level of each intercepted pin, as last reported by QEMU (absent = low).
    public private(set) var irqLevels: [Int: Bool] = [:]
    /// The QOM path interception is enabled on, if any.
    public private(set) var interceptedDevice: String?
    /// Supplies QEMU's stderr for error messages (set by the QEMU process that owns the bus).
    var diagnostics: () -> String? = { nil }

    /// Wraps an accepted qtest connection (the harness owns and closes the descriptor).
    init(fd: Int32, timeout: Double = 5) {
        self.connection = LineConnection(fd: fd, name: "qtest", maxLineLength: 1 << 20)
        self.timeout = timeout
    }

    /// Closes the socket; later requests fail with `.connectionClosed`.
    public func close() { connection.close() }

    // MARK: MMIOBus

    /// `readb`/`readw`/`readl`/`readq ADDR` → `OK VALUE`.
    public func read(_ address: UInt64, size: Int) throws -> UInt64 {
        try readValue(address, size: size)
    }

    /// `writeb`/`writew`/`writel`/`writeq ADDR VALUE` → `OK`.
    public func write(_ address: UInt64, size: Int, value: UInt64) throws {
        try writeValue(address, size: size, value: value)
    }

    /// The typed-throwing form of `read(_:size:)`.
    public func readValue(_ address: UInt64, size: Int) throws(HarnessError) -> UInt64 {
        let verb = try QTestBus.verb("read", size: size)
        let request = "\(verb) 0x\(String(address, radix: 16))"
        let answer = try command(request)
        guard let value = QTestBus.parseValue(answer) else {
            throw HarnessError(.protocolViolation, "qtest answer without a number: \(answer)",
                               operation: request, processOutput: diagnostics())
        }
        // Keep only the bytes asked for; QEMU zero-extends, but do not rely on it.
        return size == 8 ? value : value & ((1 << UInt64(size * 8)) - 1)
    }

    /// The typed-throwing form of `write(_:size:value:)`.
    public func writeValue(_ address: UInt64, size: Int, value: UInt64) throws(HarnessError) {
        let verb = try QTestBus.verb("write", size: size)
        let masked = size == 8 ? value : value & ((1 << UInt64(size * 8)) - 1)
        let request = "\(verb) 0x\(String(address, radix: 16)) 0x\(String(masked, radix: 16))"
        let answer = try command(request)
        guard answer == "OK" || answer.hasPrefix("OK ") else {
            throw HarnessError(.protocolViolation, "unexpected qtest answer: \(answer)",
                               operation: request, processOutput: diagnostics())
        }
    }

    /// `readq ADDR`.
    public func readq(_ address: UInt64) throws(HarnessError) -> UInt64 { try readValue(address, size: 8) }
    /// `writeq ADDR VALUE`.
    public func writeq(_ address: UInt64, _ value: UInt64) throws(HarnessError) {
        try writeValue(address, size: 8, value: value)
    }

    // MARK: raw requests

    /// Sends one request line and returns its answer line (`OK ...`), consuming IRQ lines.
    /// `FAIL ...` and `ERR ...` answers throw `.qtestFailure`.
    @discardableResult
    public func command(_ request: String) throws(HarnessError) -> String {
        guard !request.contains("\n") else {
            throw HarnessError(.invalidArgument, "a qtest request is one line", operation: request)
        }
        let deadline = Deadline(seconds: timeout)
        do throws(HarnessError) {
            try connection.write(request + "\n", deadline: deadline)
            while true {
                let line = try connection.readLine(deadline: deadline)
                if record(line) { continue }
                if line == "OK" || line.hasPrefix("OK ") { return line }
                if line.hasPrefix("FAIL") || line.hasPrefix("ERR") {
                    throw HarnessError(.qtestFailure, line, operation: request)
                }
                throw HarnessError(.protocolViolation, "unexpected qtest line: \(line)", operation: request)
            }
        } catch {
            var e = error.with(output: diagnostics())
            if e.operation == nil { e.operation = request }
            throw e
        }
    }

    // MARK: IRQ interception

    /// `irq_intercept_in QOM-PATH` (for the PC: `ioapic`, whose input pins are the GSIs).
    ///
    /// After this, every level change of an intercepted pin arrives as `IRQ raise|lower N`.
    /// QEMU allows one intercepted device per run; asking again for the same one is a no-op.
    /// The pin levels start at "low" when the qtest connection opens; a pin already high then
    /// is reported only when it next changes.
    public func interceptIRQs(qomPath: String = "ioapic") throws(HarnessError) {
        guard !qomPath.contains(" "), !qomPath.isEmpty else {
            throw HarnessError(.invalidArgument, "bad QOM path: \(qomPath)")
        }
        try command("irq_intercept_in \(qomPath)")
        interceptedDevice = qomPath
    }

    /// The level QEMU last reported for `line` (GSI 5 is the TIS interrupt on pc and q35).
    /// Reads whatever IRQ lines are already waiting on the socket first.
    public func irqLevel(_ line: Int = 5) throws(HarnessError) -> Bool {
        try drainAsync(waiting: 0)
        return irqLevels[line] ?? false
    }

    /// Waits up to `timeout` seconds for `line` to reach `level`; returns whether it did.
    /// Only IRQ lines are read here; no request is sent.
    public func waitForIRQ(_ line: Int = 5, level: Bool = true, timeout: Double = 2) throws(HarnessError) -> Bool {
        let deadline = Deadline(seconds: timeout)
        while true {
            if (irqLevels[line] ?? false) == level { return true }
            if deadline.expired { return false }
            let next: String?
            do throws(HarnessError) {
                next = try connection.readLineIfAvailable(deadline: deadline)
            } catch {
                throw error.with(output: diagnostics())
            }
            guard let text = next else { return (irqLevels[line] ?? false) == level }
            if !record(text) {
                throw HarnessError(.protocolViolation, "unsolicited qtest line: \(text)",
                                   processOutput: diagnostics())
            }
        }
    }

    /// Reads IRQ lines that arrive within `waiting` seconds without sending anything.
    public func drainAsync(waiting: Double = 0) throws(HarnessError) {
        let deadline = Deadline(seconds: waiting)
        while true {
            let next: String?
            do throws(HarnessError) {
                next = try connection.readLineIfAvailable(deadline: deadline)
            } catch {
                throw error.with(output: diagnostics())
            }
            guard let line = next else { return }
            if !record(line) {
                throw HarnessError(.protocolViolation, "unsolicited qtest line: \(line)",
                                   processOutput: diagnostics())
            }
        }
    }

    /// Forgets the recorded IRQ events (levels are kept).
    public func clearIRQEvents() { irqEvents.removeAll() }

    /// Records an `IRQ raise|lower N` line; false for any other line.
    private func record(_ line: String) -> Bool {
        let words = line.split(separator: " ", omittingEmptySubsequences: true)
        guard words.count == 3, words[0] == "IRQ", let n = Int(words[2]) else { return false }
        let raised: Bool
        switch words[1] {
        case "raise": raised = true
        case "lower": raised = false
        default: return false
        }
        irqEvents.append(QTestIRQEvent(line: n, raised: raised, timestamp: Deadline.now()))
        irqLevels[n] = raised
        return true
    }

    // MARK: parsing

    static func verb(_ base: String, size: Int) throws(HarnessError) -> String {
        switch size {
        case 1: return base + "b"
        case 2: return base + "w"
        case 4: return base + "l"
        case 8: return base + "q"
        default: throw HarnessError(.invalidArgument, "qtest access width must be 1, 2, 4 or 8, not \(size)")
        }
    }

    /// Parses `OK 0x...` (any number of hex digits) or `OK decimal`; nil otherwise.
    static func parseValue(_ answer: String) -> UInt64? {
        let words = answer.split(separator: " ", omittingEmptySubsequences: true)
        guard words.count == 2, words[0] == "OK" else { return nil }
        let token = words[1]
        if token.hasPrefix("0x") || token.hasPrefix("0X") {
            let digits = token.dropFirst(2)
            guard !digits.isEmpty else { return nil }
            // Leading zeros beyond 16 digits are fine; a value past 64 bits is not.
            let significant = digits.drop { $0 == "0" }
            guard significant.count <= 16 else { return nil }
            return significant.isEmpty ? 0 : UInt64(significant, radix: 16)
        }
        return UInt64(token)
    }
}
