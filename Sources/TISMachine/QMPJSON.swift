/// A JSON value as QMP carries it, object members in order. Serialized exactly as QEMU's
/// `qobject_to_json` writes a QMP message (`{"a": 1, "b": [1, 2]}`: a space after `:` and `,`).
public indirect enum QMPValue: Equatable, Sendable {
    /// Members in order (QEMU writes them in its QAPI order).
    case object([(String, QMPValue)])
    case array([QMPValue])
    case string(String)
    case int(Int64)
    case double(Double)
    case bool(Bool)
    case null

    /// Structural equality; object members compare in order.
    public static func == (a: QMPValue, b: QMPValue) -> Bool {
        switch (a, b) {
        case (.object(let x), .object(let y)):
            x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        case (.array(let x), .array(let y)): x == y
        case (.string(let x), .string(let y)): x == y
        case (.int(let x), .int(let y)): x == y
        case (.double(let x), .double(let y)): x == y
        case (.bool(let x), .bool(let y)): x == y
        case (.null, .null): true
        default: false
        }
    }

    /// The first member named `key` of an object.
    public subscript(key: String) -> QMPValue? {
        guard case .object(let m) = self else { return nil }
        return m.first { $0.0 == key }?.1
    }

    /// The string, if this is one.
    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    /// The bool, if this is one.
    public var boolValue: Bool? { if case .bool(let b) = self { b } else { nil } }
    /// The number as an integer, if it is integral.
    public var intValue: Int64? {
        switch self {
        case .int(let i): i
        case .double(let d) where d == d.rounded() && abs(d) < 9e18: Int64(d)
        default: nil
        }
    }
    /// The members, if this is an object.
    public var objectMembers: [(String, QMPValue)]? { if case .object(let m) = self { m } else { nil } }

    /// QEMU's QMP text for this value (one line, no newline).
    public var qmpText: String {
        var s = ""
        write(&s)
        return s
    }

    private func write(_ s: inout String) {
        switch self {
        case .object(let m):
            s += "{"
            for (i, (k, v)) in m.enumerated() {
                if i > 0 { s += ", " }
                Self.quote(k, &s)
                s += ": "
                v.write(&s)
            }
            s += "}"
        case .array(let a):
            s += "["
            for (i, v) in a.enumerated() {
                if i > 0 { s += ", " }
                v.write(&s)
            }
            s += "]"
        case .string(let str): Self.quote(str, &s)
        case .int(let i): s += String(i)
        case .double(let d): s += d.isFinite ? String(d) : "0"
        case .bool(let b): s += b ? "true" : "false"
        case .null: s += "null"
        }
    }

    /// QEMU `to_json` string escaping: `"`, `\`, control characters and everything outside
    /// ASCII as `\uXXXX` (UTF-16 surrogate pairs above the BMP).
    private static func quote(_ str: String, _ s: inout String) {
        s += "\""
        for u in str.utf16 {
            switch u {
            case 0x22: s += "\\\""
            case 0x5C: s += "\\\\"
            case 0x08: s += "\\b"
            case 0x0C: s += "\\f"
            case 0x0A: s += "\\n"
            case 0x0D: s += "\\r"
            case 0x09: s += "\\t"
            case 0x20..<0x7F: s.unicodeScalars.append(Unicode.Scalar(UInt8(u)))
            default:
                let h = String(u, radix: 16)
                s += "\\u" + String(repeating: "0", count: 4 - h.count) + h
            }
        }
        s += "\""
    }
}

/// A strict JSON parser for one QMP message (RFC 8259 plus QEMU's single-quoted strings), with
/// a nesting limit: QMP input comes from a client and is not trusted.
struct QMPJSONParser {
    static let maximumDepth = 1024   // QEMU json-streamer MAX_NESTING

    struct Failure: Error { var message: String }

    private let b: [UInt8]
    private var i = 0

    static func parse(_ bytes: [UInt8]) throws(Failure) -> QMPValue {
        var p = QMPJSONParser(b: bytes)
        p.ws()
        let v = try p.value(0)
        p.ws()
        guard p.i == bytes.count else { throw Failure(message: "JSON parse error, invalid keyword") }
        return v
    }

    private init(b: [UInt8]) { self.b = b }

    private mutating func ws() {
        while i < b.count, b[i] == 0x20 || b[i] == 0x0A || b[i] == 0x0D || b[i] == 0x09 { i += 1 }
    }

    private mutating func value(_ depth: Int) throws(Failure) -> QMPValue {
        guard depth < Self.maximumDepth else { throw Failure(message: "JSON parse error, nesting too deep") }
        guard i < b.count else { throw Failure(message: "JSON parse error, expecting value") }
        switch b[i] {
        case UInt8(ascii: "{"):
            i += 1
            var members: [(String, QMPValue)] = []
            ws()
            if i < b.count, b[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
            while true {
                ws()
                guard i < b.count, b[i] == UInt8(ascii: "\"") || b[i] == UInt8(ascii: "'") else {
                    throw Failure(message: "JSON parse error, key is not a string in object")
                }
                let k = try string()
                ws()
                guard i < b.count, b[i] == UInt8(ascii: ":") else { throw Failure(message: "JSON parse error, missing : in object pair") }
                i += 1
                ws()
                let v = try value(depth + 1)
                if members.contains(where: { $0.0 == k }) {
                    throw Failure(message: "JSON parse error, duplicate key '\(k)'")
                }
                members.append((k, v))
                ws()
                guard i < b.count else { throw Failure(message: "JSON parse error, premature EOI") }
                if b[i] == UInt8(ascii: ",") { i += 1; continue }
                if b[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
                throw Failure(message: "JSON parse error, expected separator in dict")
            }
        case UInt8(ascii: "["):
            i += 1
            var elems: [QMPValue] = []
            ws()
            if i < b.count, b[i] == UInt8(ascii: "]") { i += 1; return .array(elems) }
            while true {
                ws()
                elems.append(try value(depth + 1))
                ws()
                guard i < b.count else { throw Failure(message: "JSON parse error, premature EOI") }
                if b[i] == UInt8(ascii: ",") { i += 1; continue }
                if b[i] == UInt8(ascii: "]") { i += 1; return .array(elems) }
                throw Failure(message: "JSON parse error, expected separator in list")
            }
        case UInt8(ascii: "\""), UInt8(ascii: "'"):
            return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return try number()
        default:
            throw Failure(message: "JSON parse error, expecting value")
        }
    }

    private mutating func literal(_ word: String) throws(Failure) {
        let w = Array(word.utf8)
        guard i + w.count <= b.count, Array(b[i..<(i + w.count)]) == w else {
            throw Failure(message: "JSON parse error, invalid keyword")
        }
        i += w.count
    }

    private mutating func number() throws(Failure) -> QMPValue {
        let start = i
        var isFloat = false
        if b[i] == UInt8(ascii: "-") { i += 1 }
        while i < b.count {
            let c = b[i]
            if c >= 0x30 && c <= 0x39 { i += 1; continue }
            if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
                || ((c == UInt8(ascii: "+") || c == UInt8(ascii: "-")) && isFloat) {
                isFloat = true
                i += 1
                continue
            }
            break
        }
        let text = String(decoding: b[start..<i], as: UTF8.self)
        if !isFloat, let v = Int64(text) { return .int(v) }
        guard let d = Double(text) else { throw Failure(message: "JSON parse error, invalid number") }
        return .double(d)
    }

    private mutating func hex4() throws(Failure) -> UInt32 {
        guard i + 4 <= b.count, let v = UInt32(String(decoding: b[i..<(i + 4)], as: UTF8.self), radix: 16) else {
            throw Failure(message: "JSON parse error, invalid hex escape sequence in string")
        }
        i += 4
        return v
    }

    private mutating func string() throws(Failure) -> String {
        let quote = b[i]
        i += 1
        var units: [UInt16] = []
        var bytes: [UInt8] = []
        func flush() { if !bytes.isEmpty { units += String(decoding: bytes, as: UTF8.self).utf16; bytes.removeAll() } }
        while true {
            guard i < b.count else { throw Failure(message: "JSON parse error, missing terminating quote") }
            let c = b[i]
            i += 1
            if c == quote { break }
            if c < 0x20 { throw Failure(message: "JSON parse error, control character in string") }
            if c != UInt8(ascii: "\\") { bytes.append(c); continue }
            guard i < b.count else { throw Failure(message: "JSON parse error, missing terminating quote") }
            let e = b[i]
            i += 1
            switch e {
            case UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "\\"), UInt8(ascii: "/"): bytes.append(e)
            case UInt8(ascii: "b"): bytes.append(0x08)
            case UInt8(ascii: "f"): bytes.append(0x0C)
            case UInt8(ascii: "n"): bytes.append(0x0A)
            case UInt8(ascii: "r"): bytes.append(0x0D)
            case UInt8(ascii: "t"): bytes.append(0x09)
            case UInt8(ascii: "u"):
                flush()
                units.append(UInt16(truncatingIfNeeded: try hex4()))
            default: throw Failure(message: "JSON parse error, invalid escape sequence in string")
            }
        }
        flush()
        return String(decoding: units, as: UTF16.self)
    }
}

/// Splits a QMP byte stream into messages as QEMU's JSON streamer does: not by lines but by
/// balanced braces and brackets outside strings, so one message may span lines and one line may
/// hold several. A top-level scalar is a message of its own.
struct QMPMessageSplitter {
    /// QEMU json-streamer MAX_TOKEN_SIZE-like bound on one message.
    static let maximumMessageSize = 1 << 20

    private var pending: [UInt8] = []
    private var depth = 0
    private var inString: UInt8? = nil
    private var escaped = false
    private var started = false

    enum Piece: Equatable { case message([UInt8]); case tooLarge }

    /// Feeds bytes; returns the complete messages they finish.
    mutating func feed(_ bytes: some Sequence<UInt8>) -> [Piece] {
        var out: [Piece] = []
        for c in bytes {
            if !started {
                if c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 { continue }
                started = true
            }
            pending.append(c)
            if pending.count > Self.maximumMessageSize {
                out.append(.tooLarge)
                reset()
                continue
            }
            if let q = inString {
                if c < 0x20 {
                    // QEMU's lexer refuses a control character inside a string and starts over.
                    pending.removeLast()
                    out.append(.message(pending))
                    reset()
                    continue
                }
                if escaped { escaped = false } else if c == UInt8(ascii: "\\") { escaped = true } else if c == q { inString = nil }
                if depth == 0 && inString == nil { out.append(.message(pending)); reset() }
                continue
            }
            switch c {
            case UInt8(ascii: "\""), UInt8(ascii: "'"): inString = c
            case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth <= 0 { out.append(.message(pending)); reset() }
            case 0x20, 0x0A, 0x0D, 0x09:
                if depth == 0 {
                    pending.removeLast()
                    out.append(.message(pending))
                    reset()
                }
            default: break
            }
        }
        return out
    }

    private mutating func reset() {
        pending.removeAll(keepingCapacity: true)
        depth = 0
        inString = nil
        escaped = false
        started = false
    }
}
