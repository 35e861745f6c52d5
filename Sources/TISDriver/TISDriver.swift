#if canImport(Glibc)
import Glibc
#endif
import TIS
import WireFormat

/// Why a driver transfer failed.
public struct TISDriverError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// The locality was not granted in time.
        case localityNotGranted
        /// A status bit did not appear in time.
        case timeout
        /// The TPM still expects data after the whole command was written.
        case expectStillSet
        /// The command is larger than the TPM's burst/buffer allows.
        case commandTooLarge
        /// The response header is malformed (size below 10 or above the buffer).
        case badResponse
        /// The bus failed.
        case bus
    }
    public var code: Code
    public var message: String
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    public var description: String { "\(code.rawValue): \(message)" }
}

/// A register-level TIS driver: the guest side of the FIFO protocol (TCG PC Client PTP §5.5,
/// the sequence of QEMU's tests/qtest/tpm-tis-util.c `tpm_tis_transfer` and of Linux's
/// drivers/char/tpm/tpm_tis_core.c), over any `MMIOBus`: the in-process device or real QEMU.
public final class TISDriver {
    public let bus: any MMIOBus
    public let base: UInt64
    /// How long to wait for a status bit (seconds).
    public var timeout: Double
    /// Write the command one byte at a time (as QEMU's qtest does) or in dwords where the burst
    /// count allows (as Linux does).
    public var byteWrites: Bool
    /// When set, each register step of `transmit` is recorded in `transcript`.
    public var recording = false
    public private(set) var transcript: [String] = []

    public init(bus: any MMIOBus, base: UInt64 = TISGeometry.baseAddress, timeout: Double = 10, byteWrites: Bool = false) {
        self.bus = bus
        self.base = base
        self.timeout = timeout
        self.byteWrites = byteWrites
    }

    public func address(_ locality: UInt8, _ register: UInt16) -> UInt64 {
        base + (UInt64(locality) << 12) + UInt64(register)
    }

    func note(_ s: @autoclosure () -> String) { if recording { transcript.append(s()) } }

    public func clearTranscript() { transcript.removeAll() }

    // MARK: Registers

    public func access(_ l: UInt8) throws -> UInt8 { try bus.readb(address(l, TISRegister.accessOffset)) }
    public func status(_ l: UInt8) throws -> UInt32 { try bus.readl(address(l, TISRegister.stsOffset)) }
    public func writeAccess(_ l: UInt8, _ v: TISAccess) throws { try bus.writeb(address(l, TISRegister.accessOffset), v.rawValue) }
    public func writeStatus(_ l: UInt8, _ v: TISStatus) throws { try bus.writel(address(l, TISRegister.stsOffset), v.rawValue) }

    /// Burst count field of an STS value.
    public static func burstCount(_ sts: UInt32) -> Int { Int((sts >> 8) & 0xFFFF) }

    private func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Polls `read` until `done` holds or the timeout passes. Spins first (in-process devices
    /// answer in microseconds), then sleeps briefly between polls.
    func poll<T>(_ what: String, read: () throws -> T, until done: (T) -> Bool) throws -> T {
        let deadline = now() + timeout
        var spins = 0
        while true {
            let v = try read()
            if done(v) { return v }
            spins += 1
            if spins > 2000 {
                if now() > deadline { throw TISDriverError(.timeout, "\(what) did not happen within \(timeout) s") }
                usleep(spins > 4000 ? 200 : 10)
            } else if spins % 64 == 0 {
                sched_yield()
            }
        }
    }

    // MARK: Locality

    /// Requests `locality` and waits until it is the active one.
    public func requestLocality(_ l: UInt8) throws {
        if try access(l) & TISAccess.activeLocality.rawValue != 0 { return }
        try writeAccess(l, .requestUse)
        let a = try poll("locality \(l) grant", read: { try access(l) }, until: { $0 & TISAccess.activeLocality.rawValue != 0 })
        note(String(format2: "ACCESS(%d) <- requestUse; ACCESS = 0x%02x (activeLocality)", Int(l), Int(a)))
    }

    /// Gives up `locality` (writes activeLocality to ACCESS).
    public func relinquish(_ l: UInt8) throws {
        try writeAccess(l, .activeLocality)
        note("ACCESS(\(l)) <- activeLocality (relinquish)")
    }

    // MARK: Transfer

    /// Sends one command through the FIFO of `locality` and returns the response: request the
    /// locality, commandReady, write the command honouring the burst count, check Expect, tpmGo,
    /// wait for dataAvail, read the response by its header size, commandReady again, and give
    /// the locality up (as QEMU's tests/qtest/tpm-util.c `tpm_util_tis_transfer` does) unless
    /// `relinquish` is false.
    public func transmit(_ command: [UInt8], locality l: UInt8 = 0, relinquish release: Bool = true) throws -> [UInt8] {
        try requestLocality(l)
        try writeStatus(l, .commandReady)
        let ready = try poll("commandReady", read: { try status(l) }, until: { $0 & TISStatus.commandReady.rawValue != 0 })
        note(String(format2: "STS(%d) <- commandReady; STS = 0x%08x (burstCount %d)", Int(l), Int(ready), Self.burstCount(ready)))

        var sent = 0
        var burst = Self.burstCount(ready)
        while sent < command.count {
            if burst == 0 {
                let s = try poll("burst count", read: { try status(l) }, until: { Self.burstCount($0) > 0 })
                burst = Self.burstCount(s)
            }
            let fifo = address(l, TISRegister.dataFIFOOffset)
            let remaining = command.count - sent
            if !byteWrites && remaining >= 4 && burst >= 4 {
                let v = UInt32(command[sent]) | UInt32(command[sent + 1]) << 8 | UInt32(command[sent + 2]) << 16 | UInt32(command[sent + 3]) << 24
                try bus.writel(fifo, v)
                sent += 4
                burst -= 4
            } else {
                try bus.writeb(fifo, command[sent])
                sent += 1
                burst -= 1
            }
            if burst == 0 && sent < command.count {
                let s = try status(l)
                if s & TISStatus.expect.rawValue == 0 {
                    throw TISDriverError(.commandTooLarge, "the TPM stopped expecting data after \(sent) of \(command.count) bytes")
                }
                burst = Self.burstCount(s)
            }
        }
        let afterWrite = try poll("stsValid", read: { try status(l) }, until: { $0 & TISStatus.valid.rawValue != 0 })
        note(String(format2: "DATA_FIFO(%d) <- %d command bytes; STS = 0x%08x", Int(l), command.count, Int(afterWrite)))
        if afterWrite & TISStatus.expect.rawValue != 0 {
            throw TISDriverError(.expectStillSet, "the TPM still expects data after \(command.count) bytes (STS 0x\(String(afterWrite, radix: 16)))")
        }

        try bus.writeb(address(l, TISRegister.stsOffset), UInt8(TISStatus.tpmGo.rawValue))
        let avail = try poll("dataAvail", read: { try status(l) },
                             until: { $0 & (TISStatus.valid.rawValue | TISStatus.dataAvailable.rawValue) == (TISStatus.valid.rawValue | TISStatus.dataAvailable.rawValue) })
        note(String(format2: "STS(%d) <- tpmGo; STS = 0x%08x (dataAvail, %d response bytes)", Int(l), Int(avail), Self.burstCount(avail)))

        let response = try readResponse(l, burst: Self.burstCount(avail))
        note("DATA_FIFO(\(l)) -> \(response.count) response bytes")
        try writeStatus(l, .commandReady)
        if release { try relinquish(l) }
        return response
    }

    func readResponse(_ l: UInt8, burst initial: Int) throws -> [UInt8] {
        let fifo = address(l, TISRegister.dataFIFOOffset)
        var out: [UInt8] = []
        out.reserveCapacity(64)
        var burst = initial
        var expected = 10
        while out.count < expected {
            if burst == 0 {
                let s = try status(l)
                guard s & TISStatus.dataAvailable.rawValue != 0 else {
                    throw TISDriverError(.badResponse, "dataAvail cleared after \(out.count) of \(expected) response bytes")
                }
                burst = Self.burstCount(s)
                if burst == 0 { continue }
            }
            let want = min(burst, expected - out.count)
            if !byteWrites && want >= 4 {
                let v = try bus.readl(fifo)
                out.append(UInt8(truncatingIfNeeded: v))
                out.append(UInt8(truncatingIfNeeded: v >> 8))
                out.append(UInt8(truncatingIfNeeded: v >> 16))
                out.append(UInt8(truncatingIfNeeded: v >> 24))
                burst -= 4
            } else {
                out.append(try bus.readb(fifo))
                burst -= 1
            }
            if out.count >= 6 && expected == 10 {
                let size = Int(out[2]) << 24 | Int(out[3]) << 16 | Int(out[4]) << 8 | Int(out[5])
                guard size >= 10 && size <= TISGeometry.bufferSize else {
                    throw TISDriverError(.badResponse, "response header size \(size)")
                }
                expected = size
            }
        }
        return out
    }
}

extension String {
    /// A tiny printf for %d, %02x, %08x, without Foundation.
    init(format2 f: String, _ args: Int...) {
        var out = ""
        var it = args.makeIterator()
        var chars = Array(f)
        var i = 0
        while i < chars.count {
            let c = chars[i]
            if c == "%" && i + 1 < chars.count {
                var j = i + 1
                var width = 0
                var zero = false
                if chars[j] == "0" { zero = true; j += 1 }
                while j < chars.count, let d = chars[j].wholeNumberValue { width = width * 10 + d; j += 1 }
                guard j < chars.count else { out.append(c); i += 1; continue }
                let conv = chars[j]
                let v = it.next() ?? 0
                var s = conv == "x" ? String(v, radix: 16) : String(v)
                if s.count < width { s = String(repeating: zero ? "0" : " ", count: width - s.count) + s }
                out += s
                i = j + 1
            } else {
                out.append(c)
                i += 1
            }
        }
        chars.removeAll()
        self = out
    }
}
