/// A JSON value with object members kept in order, enough for QEMU's vmdesc trailer.
public indirect enum JSONValue: Equatable, Sendable {
    case object([(String, JSONValue)])
    case array([JSONValue])
    case string(String)
    case integer(Int64)
    case number(Double)
    case bool(Bool)
    case null

    /// Structural equality; object members compare in order.
    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.object(let x), .object(let y)):
            x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        case (.array(let x), .array(let y)): x == y
        case (.string(let x), .string(let y)): x == y
        case (.integer(let x), .integer(let y)): x == y
        case (.number(let x), .number(let y)): x == y
        case (.bool(let x), .bool(let y)): x == y
        case (.null, .null): true
        default: false
        }
    }

    /// The first member named `key` of an object.
    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.0 == key }?.1
    }

    /// The string, if this is one.
    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    /// The integer, if this is one.
    public var intValue: Int64? { if case .integer(let i) = self { i } else { nil } }
    /// The elements, if this is an array.
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
}

/// A strict JSON parser with a nesting limit: the vmdesc trailer comes from the stream and is
/// not trusted.
struct JSONParser {
    static let maximumDepth = 64

    private let bytes: [UInt8]
    private var i = 0
    /// Stream offset of `bytes[0]`, for errors.
    private let base: Int

    struct Failure: Error { var offset: Int; var message: String }

    static func parse(_ bytes: [UInt8], baseOffset: Int) throws(StreamError) -> JSONValue {
        var p = JSONParser(bytes: bytes, base: baseOffset)
        do throws(Failure) {
            p.skipWhitespace()
            let v = try p.value(depth: 0)
            p.skipWhitespace()
            guard p.i == bytes.count else { throw Failure(offset: p.i, message: "trailing bytes after the JSON value") }
            return v
        } catch {
            throw StreamError(.badVMDescription, section: "vmdesc", field: "json", offset: baseOffset + error.offset,
                              detail: error.message)
        }
    }

    private init(bytes: [UInt8], base: Int) {
        self.bytes = bytes
        self.base = base
    }

    private mutating func skipWhitespace() {
        while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x0A || bytes[i] == 0x0D || bytes[i] == 0x09 { i += 1 }
    }

    private func fail(_ m: String) -> Failure { Failure(offset: i, message: m) }

    private mutating func expect(_ c: UInt8) throws(Failure) {
        guard i < bytes.count, bytes[i] == c else { throw fail("expected '\(Character(UnicodeScalar(c)))'") }
        i += 1
    }

    private mutating func value(depth: Int) throws(Failure) -> JSONValue {
        guard depth < Self.maximumDepth else { throw fail("nesting deeper than \(Self.maximumDepth)") }
        guard i < bytes.count else { throw fail("unexpected end") }
        switch bytes[i] {
        case UInt8(ascii: "{"):
            i += 1
            var members: [(String, JSONValue)] = []
            skipWhitespace()
            if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
            while true {
                skipWhitespace()
                let k = try string()
                skipWhitespace()
                try expect(UInt8(ascii: ":"))
                skipWhitespace()
                members.append((k, try value(depth: depth + 1)))
                skipWhitespace()
                guard i < bytes.count else { throw fail("unterminated object") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                try expect(UInt8(ascii: "}"))
                return .object(members)
            }
        case UInt8(ascii: "["):
            i += 1
            var items: [JSONValue] = []
            skipWhitespace()
            if i < bytes.count, bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
            while true {
                skipWhitespace()
                items.append(try value(depth: depth + 1))
                skipWhitespace()
                guard i < bytes.count else { throw fail("unterminated array") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                try expect(UInt8(ascii: "]"))
                return .array(items)
            }
        case UInt8(ascii: "\""):
            return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        default:
            return try number()
        }
    }

    private mutating func literal(_ s: StaticString) throws(Failure) {
        let n = s.utf8CodeUnitCount
        guard i + n <= bytes.count else { throw fail("bad literal") }
        let ok = s.withUTF8Buffer { lit in (0..<n).allSatisfy { bytes[i + $0] == lit[$0] } }
        guard ok else { throw fail("bad literal") }
        i += n
    }

    private mutating func number() throws(Failure) -> JSONValue {
        let start = i
        if i < bytes.count, bytes[i] == UInt8(ascii: "-") { i += 1 }
        var isInteger = true
        while i < bytes.count {
            let c = bytes[i]
            if c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") { i += 1; continue }
            if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
                || c == UInt8(ascii: "+") || c == UInt8(ascii: "-") { isInteger = false; i += 1; continue }
            break
        }
        let text = String(decoding: bytes[start..<i], as: UTF8.self)
        guard i > start else { throw fail("unexpected character") }
        if isInteger, let v = Int64(text) { return .integer(v) }
        guard let d = Double(text) else { throw Failure(offset: start, message: "bad number \(text)") }
        return .number(d)
    }

    private mutating func hex4() throws(Failure) -> UInt32 {
        guard i + 4 <= bytes.count else { throw fail("short \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[i]
            let d: UInt32
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - UInt8(ascii: "A") + 10)
            default: throw fail("bad \\u escape")
            }
            v = v << 4 | d
            i += 1
        }
        return v
    }

    private mutating func string() throws(Failure) -> String {
        try expect(UInt8(ascii: "\""))
        var out: [UInt8] = []
        while true {
            guard i < bytes.count else { throw fail("unterminated string") }
            let c = bytes[i]
            i += 1
            switch c {
            case UInt8(ascii: "\""):
                return String(decoding: out, as: UTF8.self)
            case UInt8(ascii: "\\"):
                guard i < bytes.count else { throw fail("unterminated escape") }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var cp = try hex4()
                    if (0xD800..<0xDC00).contains(cp), i + 6 <= bytes.count, bytes[i] == UInt8(ascii: "\\"),
                       bytes[i + 1] == UInt8(ascii: "u") {
                        i += 2
                        let lo = try hex4()
                        if (0xDC00..<0xE000).contains(lo) { cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00) }
                    }
                    out.append(contentsOf: String(UnicodeScalar(cp).map(Character.init) ?? "\u{FFFD}").utf8)
                default:
                    throw fail("bad escape")
                }
            default:
                guard c >= 0x20 else { throw Failure(offset: i - 1, message: "control byte in string") }
                out.append(c)
            }
        }
    }
}

/// Emits JSON exactly as QEMU's `JSONWriter` in non-pretty mode (qobject/json-writer.c), which
/// QEMU 7.2 uses for the vmdesc trailer: `", "` between members, `": "` after names, strings
/// escaped by `quoted_str` (control and non-ASCII characters as `\uXXXX`, uppercase hex).
struct QEMUJSONWriter {
    private(set) var text: [UInt8] = []
    private var needComma = false

    private mutating func comma() {
        if needComma { text.append(contentsOf: [0x2C, 0x20]) }
        needComma = false
    }

    private mutating func append(_ s: String) { text.append(contentsOf: s.utf8) }

    private mutating func name(_ n: String?) {
        comma()
        if let n {
            quoted(n)
            append(": ")
        }
    }

    private mutating func quoted(_ s: String) {
        text.append(0x22)
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": append("\\\"")
            case "\\": append("\\\\")
            case "\u{08}": append("\\b")
            case "\u{0C}": append("\\f")
            case "\n": append("\\n")
            case "\r": append("\\r")
            case "\t": append("\\t")
            default:
                let v = scalar.value
                if v > 0xFFFF {
                    let u = v - 0x10000
                    append(Self.u4(0xD800 | (u >> 10)) + Self.u4(0xDC00 | (u & 0x3FF)))
                } else if v < 0x20 || v >= 0x7F {
                    append(Self.u4(v))
                } else {
                    text.append(UInt8(v))
                }
            }
        }
        text.append(0x22)
    }

    private static func u4(_ v: UInt32) -> String {
        let h = String(v, radix: 16, uppercase: true)
        return "\\u" + String(repeating: "0", count: max(0, 4 - h.count)) + h
    }

    mutating func startObject(_ n: String? = nil) { name(n); text.append(0x7B) }
    mutating func endObject() { text.append(0x7D); needComma = true }
    mutating func startArray(_ n: String? = nil) { name(n); text.append(0x5B) }
    mutating func endArray() { text.append(0x5D); needComma = true }
    mutating func string(_ n: String?, _ v: String) { name(n); quoted(v); needComma = true }
    mutating func int(_ n: String?, _ v: Int64) { name(n); append(String(v)); needComma = true }
    mutating func bool(_ n: String?, _ v: Bool) { name(n); append(v ? "true" : "false"); needComma = true }

    /// Writes a parsed value back in QEMU's style.
    mutating func value(_ n: String?, _ v: JSONValue) {
        switch v {
        case .object(let members):
            startObject(n)
            for (k, m) in members { value(k, m) }
            endObject()
        case .array(let items):
            startArray(n)
            for m in items { value(nil, m) }
            endArray()
        case .string(let s): string(n, s)
        case .integer(let i): int(n, i)
        case .number(let d): name(n); append(String(d)); needComma = true
        case .bool(let b): bool(n, b)
        case .null: name(n); append("null"); needComma = true
        }
    }
}
