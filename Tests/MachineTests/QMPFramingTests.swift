@testable import TISMachine
import Testing

/// QMP input split as QEMU's JSON streamer splits it, and values written as QEMU writes them.
@Suite("QMP framing")
struct QMPFramingTests {
    @Test("messages split by balanced braces, not by lines", arguments: [
        (#"{"execute":"a"}{"execute":"b"}"#, [#"{"execute":"a"}"#, #"{"execute":"b"}"#]),
        ("{\"execute\":\n\"a\"}\n", ["{\"execute\":\n\"a\"}"]),
        (#"{"s":"}{"}"#, [#"{"s":"}{"}"#]),
        (#"{"s":"\"}"}"#, [#"{"s":"\"}"}"#]),
        ("  123 [1,[2]]", ["123", "[1,[2]]"]),
        ("}", ["}"]),
        // A raw newline inside a string ends the message there (QEMU's lexer refuses it); what
        // follows starts a new one.
        ("{\"s\":\"a\nb\"}", ["{\"s\":\"a"]),
    ])
    func split(input: String, messages: [String]) {
        var s = QMPMessageSplitter()
        var out: [String] = []
        // Byte by byte: a message may arrive in any number of reads.
        for b in input.utf8 {
            for p in s.feed([b]) {
                if case .message(let m) = p { out.append(String(decoding: m, as: UTF8.self)) }
            }
        }
        #expect(out == messages)
    }

    @Test("a message larger than the limit is refused and the stream resynchronises")
    func tooLarge() {
        var s = QMPMessageSplitter()
        let big = "[" + String(repeating: "1,", count: QMPMessageSplitter.maximumMessageSize / 2 + 1)
        let pieces = s.feed(Array(big.utf8))
        #expect(pieces == [.tooLarge])
    }

    @Test("QEMU's output spacing and escapes")
    func output() {
        let v: QMPValue = .object([("return", .object([("a", .array([.int(1), .bool(false), .null])),
                                                       ("s", .string("q\"\\\n\u{1}é"))]))])
        #expect(v.qmpText == #"{"return": {"a": [1, false, null], "s": "q\"\\\n\u0001\u00e9"}}"#)
    }

    @Test("parser refusals carry QEMU's words", arguments: [
        ("{\"a\":}", "JSON parse error, expecting value"),
        ("{\"a\" 1}", "JSON parse error, missing : in object pair"),
        ("{1:2}", "JSON parse error, key is not a string in object"),
        ("[1 2]", "JSON parse error, expected separator in list"),
        ("{\"a\":1,\"a\":2}", "JSON parse error, duplicate key 'a'"),
        (String(repeating: "[", count: 1100) + String(repeating: "]", count: 1100), "JSON parse error, nesting too deep"),
    ])
    func refusals(text: String, message: String) {
        #expect(throws: QMPJSONParser.Failure.self) { try QMPJSONParser.parse(Array(text.utf8)) }
        do {
            _ = try QMPJSONParser.parse(Array(text.utf8))
        } catch {
            #expect(error.message == message)
        }
    }
}

import TISConformance

/// Seeded garbage into the QMP dispatcher and the qtest interpreter of an in-process machine:
/// every message gets one QEMU-shaped answer, nothing traps, and the machine still answers.
@Suite("Hostile QMP and qtest input (seeded)")
struct HostileInputTests {
    static let qmpAlphabet = Array(#"{}[]":,'\ 0123456789-.eE truefalsnull execute arguments id migrate quit stop cont query-status uri"#.utf8)

    @Test("random QMP messages", arguments: [UInt64(1), 2, 3])
    func qmp(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        let m = try Machine(configuration: MachineConfiguration(backend: .emulator(ctrlSocket: "/unused")),
                            backend: FakeBackend(), log: { _ in })
        defer { m.close() }
        var splitter = QMPMessageSplitter()
        var answered = 0
        var negotiated = true
        for _ in 0..<3000 {
            let len = Int(rng.next() % 40)
            var bytes = (0..<len).map { _ in Self.qmpAlphabet[Int(rng.next() % UInt64(Self.qmpAlphabet.count))] }
            if rng.next() % 8 == 0 { bytes.append(UInt8(truncatingIfNeeded: rng.next())) }
            for piece in splitter.feed(bytes) {
                guard case .message(let msg) = piece else { continue }
                let (reply, now, isQuit) = QMPCommands.handle(msg, negotiated: negotiated, machine: m)
                negotiated = now
                #expect(!isQuit)
                #expect(reply["return"] != nil || reply["error"]?["class"]?.stringValue != nil, "\(reply.qmpText)")
                answered += 1
            }
        }
        #expect(answered > 100)
        let (status, _, _) = QMPCommands.handle(Array(#"{"execute":"query-status"}"#.utf8), negotiated: true, machine: m)
        #expect(status["return"]?["status"] != nil)
    }

    @Test("random qtest lines", arguments: [UInt64(1), 2, 3])
    func qtest(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        let m = try Machine(configuration: MachineConfiguration(backend: .emulator(ctrlSocket: "/unused")),
                            backend: FakeBackend(), log: { _ in })
        defer { m.close() }
        var q = QTestInterpreter()
        let verbs = ["readb", "readw", "readl", "readq", "writeb", "writew", "writel", "writeq", "read", "write", "b64read",
                     "b64write", "memset", "inb", "outl", "irq_intercept_in", "endianness", "x"]
        let numbers = ["0xfed40000", "0xfed40018", "0xfed40024", "0xfed45000", "0xfed44fff", "0xffffffffffffffff", "0", "-1",
                       "077", "0x", "zz", "4", "65536", "ioapic", "QUJD", ""]
        for _ in 0..<5000 {
            var words = [verbs[Int(rng.next() % UInt64(verbs.count))]]
            for _ in 0..<Int(rng.next() % 5) { words.append(numbers[Int(rng.next() % UInt64(numbers.count))]) }
            let answer = m.qtestAnswer(words.joined(separator: " "), interpreter: &q)
            #expect(answer.map { $0.hasPrefix("OK") || $0.hasPrefix("FAIL") || $0.hasPrefix("ERR") } ?? true, "\(words)")
        }
        #expect(m.qtestAnswer("readl 0xfed40f00", interpreter: &q) == "OK 0x0000000000011014")
    }
}
