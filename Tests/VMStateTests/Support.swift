import EmulatorBackend
import Foundation
import TIS
import Testing
@testable import VMState

/// The real QEMU 7.2 streams beside this file (see Fixtures/README.md).
enum Fixture: String, CaseIterable, CustomStringConvertible {
    case pc = "pc-tis.bin"
    case q35 = "q35-tis.bin"

    var path: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("Fixtures").appendingPathComponent(rawValue).path
    }

    var bytes: [UInt8] {
        get throws { try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) }
    }

    var machineType: String { self == .pc ? "pc-i440fx-7.2" : "pc-q35-7.2" }
    /// `tpm-tis` section id QEMU 7.2 gave (registration order differs between machines).
    var tisSectionID: UInt32 { self == .pc ? 40 : 39 }
    var description: String { rawValue }
}

/// Every event of a walk, in order.
func walkAll(_ source: MigrationStreamSource,
             options: MigrationStreamWalker.Options = MigrationStreamWalker.Options()) throws -> (MigrationStreamWalker, [MigrationStreamEvent]) {
    let w = try MigrationStreamWalker(source: source, options: options)
    var events: [MigrationStreamEvent] = []
    try w.walk { events.append($0) }
    return (w, events)
}

/// The sections of a walk.
func sections(_ events: [MigrationStreamEvent]) -> [MigrationSection] {
    events.compactMap { if case .section(let s) = $0 { s } else { nil } }
}

/// The error a walk of `bytes` ends with (nil if it succeeds).
func walkError(_ bytes: [UInt8], options: MigrationStreamWalker.Options = MigrationStreamWalker.Options()) -> StreamError? {
    do {
        _ = try walkAll(.bytes(bytes), options: options)
        return nil
    } catch let e as StreamError {
        return e
    } catch {
        Issue.record("unexpected error type \(error)")
        return nil
    }
}

/// Overwrites bytes at `offset` with big-endian `value` of `width` bytes.
func patched(_ b: [UInt8], at offset: Int, be value: UInt64, width: Int) -> [UInt8] {
    var b = b
    for i in 0..<width { b[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * (width - 1 - i))) }
    return b
}

/// A recognisable TIS state: locality 2 active mid-response, others idle.
func sampleTISState() -> TISState {
    var s = TISState()
    s.buffer = (0..<TISGeometry.bufferSize).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
    s.rwOffset = 6
    s.activeLocality = 2
    s.localities[2] = TISLocality(state: .completion, inte: 0x8000_0008, ints: 0x1, access: 0xA0, sts: 0x0400_0090,
                                  ifaceID: 0x0000_2100)
    s.localities[0] = TISLocality(state: .ready, inte: 0x8, ints: 0, access: 0x80, sts: 0x0400_0000, ifaceID: 0x2100)
    return s
}

/// Blobs shaped like swtpm's (GET_STATEBLOB containers around libtpms-looking bytes).
func sampleBlobs() -> TPMStateBlobs {
    let perm = SwtpmBlob.migration(wrapping: [0x00, 0x03, 0xAB, 0x36, 0x47, 0x23] + [UInt8](repeating: 0x11, count: 1300))
    let vol = SwtpmBlob.migration(wrapping: [0x00, 0x04, 0x45, 0x63, 0x78, 0x89] + [UInt8](repeating: 0x22, count: 8000))
    return TPMStateBlobs(permanent: TPMStateBlob(flags: 0, data: perm.encoded()),
                         volatile: TPMStateBlob(flags: 2, data: vol.encoded()),
                         savestate: .empty)
}

/// `VmRSS` / `VmHWM` of this process in KiB, from /proc/self/status.
func procStatusKiB(_ key: String) -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
    }
    return nil
}

/// A pipe whose write end `produce` fills from a thread of its own (then it is closed); returns
/// the read end, which the caller closes.
func pipeFeeding(_ produce: @escaping @Sendable (Int32) -> Void) -> Int32 {
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else { return -1 }
    let (r, w) = (fds[0], fds[1])
    // A larger pipe buffer (1 MiB; F_SETPIPE_SZ = 1031 on Linux) means fewer wake-ups between
    // the two threads. A reader that stops early must not kill the test process with SIGPIPE.
    _ = fcntl(w, 1031, 1 << 20)
    signal(SIGPIPE, SIG_IGN)
    let t = Thread {
        produce(w)
        close(w)
    }
    t.start()
    return r
}

/// Writes all of `bytes` to `fd`, across short writes; false if the reader went away.
@discardableResult
func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
    bytes.withUnsafeBytes { p in
        guard let base = p.baseAddress else { return true }
        var done = 0
        while done < p.count {
            let r = write(fd, base + done, p.count - done)
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return false }
            done += r
        }
        return true
    }
}
