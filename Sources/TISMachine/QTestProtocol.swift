import TISDriver

/// QEMU 7.2's qtest command interpreter (softmmu/qtest.c `qtest_process_command`) over a
/// guest-physical bus. Answers are QEMU's, byte for byte, for every line QEMU accepts; where
/// QEMU `g_assert`s and aborts (a missing or malformed number) the line is answered with
/// `FAIL …` instead and the machine keeps running.
///
/// Implemented: `readb/w/l/q`, `writeb/w/l/q`, `read`, `write`, `b64read`, `b64write`,
/// `memset`, `inb/w/l`, `outb/w/l`, `endianness`, `irq_intercept_in/out`. As on Debian's QEMU
/// (TCG, no qtest accelerator), `clock_step` and `clock_set` are unknown commands.
public struct QTestInterpreter {
    /// Port I/O: nothing is mapped, reads return all ones (QEMU's unassigned I/O on `pc`).
    /// The QOM paths `irq_intercept_in` accepts for the interrupt controller the TIS IRQ goes to.
    public static let interceptablePaths: Set<String> = ["ioapic", "/machine/ioapic", "/machine/unattached/ioapic"]

    /// The path interception is on for, if any.
    public private(set) var interceptedPath: String?

    public init() {}

    /// The answer line (without newline) to one request line, or nil for an empty line.
    public mutating func answer(_ line: String, bus: any MMIOBus) -> String? {
        var text = Substring(line)
        if text.hasSuffix("\r") { text = text.dropLast() }
        let words = text.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard let command = words.first else { return nil }
        func arg(_ n: Int) -> UInt64? { n < words.count ? Self.strtou64(words[n]) : nil }
        func bad() -> String { "FAIL Invalid arguments for '\(command)'" }

        switch command {
        case "readb", "readw", "readl", "readq":
            guard words.count == 2, let addr = arg(1) else { return bad() }
            let size = Self.width(command.last)
            let v = (try? bus.read(addr, size: size)) ?? 0
            return "OK 0x" + Self.hex(v, digits: 16)
        case "writeb", "writew", "writel", "writeq":
            guard words.count == 3, let addr = arg(1), let value = arg(2) else { return bad() }
            let size = Self.width(command.last)
            let masked = size == 8 ? value : value & ((1 << UInt64(size * 8)) - 1)
            try? bus.write(addr, size: size, value: masked)
            return "OK"
        case "read", "b64read":
            guard words.count == 3, let addr = arg(1), let len = arg(2), len > 0, len <= Self.maximumBlock else { return bad() }
            let bytes = Self.readBlock(bus, addr, Int(len))
            return command == "read" ? "OK 0x" + bytes.map { Self.hex(UInt64($0), digits: 2) }.joined()
                                     : "OK " + Base64.encode(bytes)
        case "write":
            guard words.count == 4, let addr = arg(1), let len = arg(2), len <= Self.maximumBlock else { return bad() }
            let data = Array(words[3].utf8)
            // QEMU: data_len < 3 is answered ERR (not asserted).
            guard data.count >= 3 else { return "ERR invalid argument size" }
            var bytes = [UInt8](repeating: 0, count: Int(len))
            for i in 0..<Int(len) where i * 2 + 4 <= data.count {
                bytes[i] = Self.nibble(data[i * 2 + 2]) << 4 | Self.nibble(data[i * 2 + 3])
            }
            Self.writeBlock(bus, addr, bytes)
            return "OK"
        case "b64write":
            guard words.count == 4, let addr = arg(1), let len = arg(2), len <= Self.maximumBlock else { return bad() }
            // QEMU decodes, then writes `len` bytes, zero-filled past the decoded data.
            var bytes = Base64.decode(words[3]) ?? []
            if bytes.count < Int(len) { bytes += [UInt8](repeating: 0, count: Int(len) - bytes.count) }
            Self.writeBlock(bus, addr, Array(bytes.prefix(Int(len))))
            return "OK"
        case "memset":
            guard words.count == 4, let addr = arg(1), let len = arg(2), len <= Self.maximumBlock, let pattern = arg(3) else { return bad() }
            if len > 0 { Self.writeBlock(bus, addr, [UInt8](repeating: UInt8(truncatingIfNeeded: pattern), count: Int(len))) }
            return "OK"
        case "outb", "outw", "outl":
            guard words.count == 3, arg(1) != nil, arg(2) != nil else { return bad() }
            return "OK"
        case "inb", "inw", "inl":
            guard words.count == 2, arg(1) != nil else { return bad() }
            let size = Self.width(command.last)
            return "OK 0x" + Self.hex(size == 4 ? 0xFFFF_FFFF : (1 << UInt64(size * 8)) - 1, digits: 4)
        case "endianness":
            return "OK little"
        case "irq_intercept_in", "irq_intercept_out":
            guard words.count == 2 else { return bad() }
            guard Self.interceptablePaths.contains(words[1]) else { return "FAIL Unknown device" }
            if let current = interceptedPath {
                return current == words[1] ? "OK" : "FAIL IRQ intercept already enabled"
            }
            interceptedPath = words[1]
            return "OK"
        default:
            return "FAIL Unknown command '\(command)'"
        }
    }

    /// The largest `read`/`write`/`memset` block accepted (QEMU allocates whatever is asked).
    public static let maximumBlock: UInt64 = 1 << 20

    static func width(_ c: Character?) -> Int {
        switch c {
        case "b": 1
        case "w": 2
        case "l": 4
        default: 8
        }
    }

    /// `read`/`write` move a block as `address_space_rw` does: the TIS sees accesses of at most
    /// 4 bytes, never crossing a 4-byte boundary (the bus splits further by alignment).
    static func readBlock(_ bus: any MMIOBus, _ addr: UInt64, _ len: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(len)
        var a = addr
        while out.count < len {
            let l = min(len - out.count, 4 - Int(a & 3))
            let v = (try? bus.read(a, size: l)) ?? 0
            for i in 0..<l { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
            a &+= UInt64(l)
        }
        return out
    }

    static func writeBlock(_ bus: any MMIOBus, _ addr: UInt64, _ bytes: [UInt8]) {
        var done = 0
        var a = addr
        while done < bytes.count {
            let l = min(bytes.count - done, 4 - Int(a & 3))
            var v: UInt64 = 0
            for i in 0..<l { v |= UInt64(bytes[done + i]) << (8 * UInt64(i)) }
            try? bus.write(a, size: l, value: v)
            done += l
            a &+= UInt64(l)
        }
    }

    /// glib/QEMU `qemu_strtou64(s, NULL, 0, …)`: `0x` hex, leading `0` octal, else decimal;
    /// the whole word must be a number; a leading `-` negates modulo 2^64, as strtoull does.
    static func strtou64(_ s: String) -> UInt64? {
        var t = Substring(s)
        var negative = false
        if t.hasPrefix("-") { negative = true; t = t.dropFirst() } else if t.hasPrefix("+") { t = t.dropFirst() }
        var radix = 10
        if t.hasPrefix("0x") || t.hasPrefix("0X") {
            radix = 16
            t = t.dropFirst(2)
        } else if t.count > 1 && t.hasPrefix("0") {
            radix = 8
            t = t.dropFirst()
        }
        guard !t.isEmpty, let v = UInt64(t, radix: radix) else { return nil }
        return negative ? 0 &- v : v
    }

    static func hex(_ v: UInt64, digits: Int) -> String {
        let h = String(v, radix: 16)
        return h.count >= digits ? h : String(repeating: "0", count: digits - h.count) + h
    }

    static func nibble(_ c: UInt8) -> UInt8 {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x41...0x46: c - 0x41 + 10
        case 0x61...0x66: c - 0x61 + 10
        default: 0
        }
    }
}

/// RFC 4648 base64 as glib's `g_base64_encode` / `g_base64_decode` (lenient decoding).
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func encode(_ b: [UInt8]) -> String {
        var out: [UInt8] = []
        var i = 0
        while i < b.count {
            let n = min(3, b.count - i)
            let v = UInt32(b[i]) << 16 | (n > 1 ? UInt32(b[i + 1]) << 8 : 0) | (n > 2 ? UInt32(b[i + 2]) : 0)
            out.append(alphabet[Int(v >> 18 & 63)])
            out.append(alphabet[Int(v >> 12 & 63)])
            out.append(n > 1 ? alphabet[Int(v >> 6 & 63)] : UInt8(ascii: "="))
            out.append(n > 2 ? alphabet[Int(v & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ s: String) -> [UInt8]? {
        var out: [UInt8] = []
        var acc: UInt32 = 0
        var bits = 0
        for c in s.utf8 {
            let v: UInt32
            switch c {
            case 0x41...0x5A: v = UInt32(c - 0x41)
            case 0x61...0x7A: v = UInt32(c - 0x61 + 26)
            case 0x30...0x39: v = UInt32(c - 0x30 + 52)
            case UInt8(ascii: "+"): v = 62
            case UInt8(ascii: "/"): v = 63
            default: continue
            }
            acc = acc << 6 | v
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
            }
        }
        return out
    }
}
