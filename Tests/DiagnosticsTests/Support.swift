import EmulatorBackend
import Foundation
import QEMUHarness
import TISConformance
import TPMDiagnostics
import Testing
import VMState
#if canImport(Glibc)
import Glibc
#endif

/// A real QEMU 7.2 + swtpm 0.7.1 stream made for these tests: which machine, device and TPM,
/// and whether swtpm ran with `--migration-key`.
struct StreamSpec: Hashable, Sendable, CustomStringConvertible {
    var machine: QEMUMachineType = .pc
    var device: TPMInterface = .tis
    var tpm: TPMVersion = .tpm20
    /// The key file content (hex) swtpm gets as `--migration-key file=…,mode=…`.
    var migrationKeyHex: String?
    var mode = "aes-cbc"

    var description: String {
        "\(machine)/\(device.rawValue)/TPM \(tpm)" + (migrationKeyHex == nil ? "" : "/migration-key \(mode)")
    }
}

/// Keys used by the migration-key tests.
enum Keys {
    static let right128 = "00112233445566778899aabbccddeeff"
    static let wrong128 = "ffeeddccbbaa99887766554433221100"
    static let right256 = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
}

/// Streams made once per test process by real QEMU 7.2 and swtpm 0.7.1 (one QEMU at a time),
/// kept in one work directory removed at exit.
enum RealStreams {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var made: [StreamSpec: String] = [:]
    nonisolated(unsafe) private static var work: WorkDirectory?

    /// The directory the streams and key files live in.
    static func directory() throws -> WorkDirectory {
        if let work { return work }
        let w = try QEMUMachine.makeWorkDirectory()
        work = w
        removeAtExit(w.path)
        return w
    }

    /// The path of a stream QEMU saved with `migrate "exec:cat > FILE"`, after a guest-side
    /// TIS handshake (locality 0 requested, commandReady), so the TIS state is not all reset
    /// values.
    static func path(_ spec: StreamSpec) throws -> String {
        lock.lock()
        defer { lock.unlock() }
        if let p = made[spec] { return p }
        let work = try directory()
        let name = "s\(made.count)"
        let out = work.file("\(name).bin")
        var external: SwtpmProcess?
        let m: QEMUMachine
        if let hex = spec.migrationKeyHex {
            let keyFile = work.file("\(name).key")
            try hex.write(toFile: keyFile, atomically: true, encoding: .utf8)
            var o = SwtpmProcess.Options(stateDirectory: try work.subdirectory("\(name).swtpm"))
            o.version = spec.tpm
            o.ctrlSocketPath = work.file("\(name).ctrl")
            o.migrationKey = "file=\(keyFile),format=hex,mode=\(spec.mode)"
            let s = try SwtpmProcess.launch(o)
            external = s
            m = try QEMUMachine.start(externalCtrlSocket: s.ctrlSocketPath, machine: spec.machine, device: spec.device,
                                      workDirectory: work)
        } else {
            m = try QEMUMachine.start(machine: spec.machine, device: spec.device, tpmVersion: spec.tpm, workDirectory: work)
        }
        defer {
            m.close()
            external?.terminate(timeout: 1)
        }
        if spec.device == .tis {
            try m.bus.writeb(0xFED4_0000, 0x02)           // ACCESS_0: requestUse
            try m.bus.writeb(0xFED4_0018, 0x40)           // STS_0: commandReady
        }
        try m.qmp.migrate(uri: "exec:cat > \(out)")
        try m.qmp.waitForMigration(timeout: 20)
        made[spec] = out
        return out
    }

    static func bytes(_ spec: StreamSpec) throws -> [UInt8] {
        try [UInt8](Data(contentsOf: URL(fileURLWithPath: path(spec))))
    }

    /// A key file in the work directory.
    static func keyFile(_ content: [UInt8], name: String) throws -> String {
        let p = try directory().file(name)
        try Data(content).write(to: URL(fileURLWithPath: p))
        return p
    }
}

nonisolated(unsafe) private var pathsToRemove: [String] = []

/// Removes `path` (recursively) when the test process exits.
func removeAtExit(_ path: String) {
    if pathsToRemove.isEmpty {
        atexit {
            for p in pathsToRemove { try? FileManager.default.removeItem(atPath: p) }
        }
    }
    pathsToRemove.append(path)
}

/// Inspects and checks, holding the process-wide libtpms as the other suites do.
func troubleshoot(_ source: MigrationStreamSource, name: String = "stream",
                  _ destination: DestinationOptions = DestinationOptions()) async throws -> (StreamInspection, TroubleshootReport) {
    let s = try StreamInspection.walk(source, name: name)
    let r = await LibtpmsTestLock.run { Troubleshooter.check(s, destination: destination) }
    return (s, r)
}

/// The codes of a report.
func codes(_ r: TroubleshootReport) -> [Finding.Code] { r.findings.map(\.code) }

/// `VmRSS` of this process in KiB.
func residentKiB() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? 0
    }
    return 0
}

/// The built `tis-sim` beside the test bundle (`swift build --build-tests` builds it).
func tisSimPath() throws -> String {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    for dir in [".build/debug", ".build/release"] {
        let p = root.appendingPathComponent(dir).appendingPathComponent("tis-sim").path
        if FileManager.default.isExecutableFile(atPath: p) { return p }
    }
    throw HarnessError(.notInstalled, "tis-sim is not built: run swift build --build-tests (make test)")
}

/// Runs `tis-sim` with `arguments`; returns (exit status, stdout, stderr).
func runTisSim(_ arguments: [String]) throws -> (Int32, String, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: try tisSimPath())
    p.arguments = arguments
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}
