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
