import EmulatorBackend
import Foundation
import QEMUHarness
import Testing
import TISDriver

/// The package root (for the built `tis-sim`).
let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

/// The built `tis-sim` (`<package root>/.build/debug/tis-sim`).
func tisSimBinary() throws -> String {
    let tool = packageRoot + "/.build/debug/tis-sim"
    try #require(FileManager.default.isExecutableFile(atPath: tool),
                 "\(tool) is missing: build it first (make test builds it; or swift build --product tis-sim)")
    return tool
}

/// `BIN` for the harness: a two-line script that runs `tis-sim machine` with QEMU's arguments,
/// so the harness swaps only the binary it starts.
func tisSimMachineExecutable(in work: WorkDirectory) throws -> String {
    let path = work.file("tis-sim-machine")
    if !FileManager.default.fileExists(atPath: path) {
        let script = "#!/bin/sh\nexec '\(try tisSimBinary())' machine \"$@\"\n"
        try #require(FileManager.default.createFile(atPath: path, contents: Data(script.utf8),
                                                    attributes: [.posixPermissions: 0o755]))
    }
    return path
}

/// TIS geometry as QEMU 7.2 maps it (include/hw/acpi/tpm.h).
enum TIS {
    static let base: UInt64 = 0xFED4_0000
    static let access: UInt64 = 0x00
    static let intEnable: UInt64 = 0x08
    static let intVector: UInt64 = 0x0C
    static let intStatus: UInt64 = 0x10
    static let intfCapability: UInt64 = 0x14
    static let sts: UInt64 = 0x18
    static let dataFIFO: UInt64 = 0x24
    static let interfaceID: UInt64 = 0x30
    static let didVid: UInt64 = 0xF00
    static let rid: UInt64 = 0xF04

    static func reg(_ locality: Int, _ register: UInt64) -> UInt64 { base + UInt64(locality) << 12 + register }

    static let commandReady: UInt8 = 0x40
    static let tpmGo: UInt8 = 0x20
    static let dataAvail: UInt32 = 0x10
    static let requestUse: UInt8 = 0x02
    static let activeLocality: UInt8 = 0x20
}

/// The digest extended into PCR 16 and the value it must then hold (runs-on-this-machine.md §2).
let probeDigest = Crypto.sha256(Array("qtest-probe".utf8))
let pcr16AfterProbe = Crypto.pcrExtendSHA256([probeDigest])

/// Register-level FIFO steps, each recorded as `what = value`, for transcripts that must be
/// identical on QEMU and on tis-sim.
struct RegisterScript {
    let bus: any MMIOBus
    var transcript: [String] = []

    init(bus: any MMIOBus) { self.bus = bus }

    mutating func note(_ what: String, _ value: UInt64) { transcript.append("\(what) = 0x\(String(value, radix: 16))") }

    mutating func readb(_ l: Int, _ r: UInt64, _ name: String) throws {
        note("loc\(l) \(name) b", UInt64(try bus.readb(TIS.reg(l, r))))
    }

    mutating func readl(_ l: Int, _ r: UInt64, _ name: String) throws {
        note("loc\(l) \(name) l", UInt64(try bus.readl(TIS.reg(l, r))))
    }

    /// Polls STS until dataAvail (QEMU completes on another thread; only the final value is
    /// recorded, the number of polls is timing).
    func waitDataAvail(_ l: Int, timeout: Double = 5) throws -> UInt32 {
        let end = Date().addingTimeInterval(timeout)
        while true {
            let v = try bus.readl(TIS.reg(l, TIS.sts))
            if v & TIS.dataAvail != 0 || Date() > end { return v }
            usleep(200)
        }
    }

    /// commandReady, the command byte by byte (STS after each of the first two and the last),
    /// tpmGo, wait, `readCount` response bytes (default all) with STS noted before and after.
    @discardableResult
    mutating func command(_ cmd: [UInt8], locality l: Int, readCount: Int? = nil) throws -> [UInt8] {
        try bus.writeb(TIS.reg(l, TIS.sts), TIS.commandReady)
        try readl(l, TIS.sts, "STS after commandReady")
        for (i, b) in cmd.enumerated() {
            try bus.writeb(TIS.reg(l, TIS.dataFIFO), b)
            if i < 2 || i == cmd.count - 1 { try readl(l, TIS.sts, "STS after byte \(i)") }
        }
        try bus.writeb(TIS.reg(l, TIS.sts), TIS.tpmGo)
        note("loc\(l) STS when done", UInt64(try waitDataAvail(l)))
        let size = Int(try bus.readl(TIS.reg(l, TIS.sts)) >> 8 & 0xFFFF)
        var rsp: [UInt8] = []
        for _ in 0..<min(readCount ?? size, size) { rsp.append(try bus.readb(TIS.reg(l, TIS.dataFIFO))) }
        transcript.append("loc\(l) response \(rsp.map { String(format: "%02x", $0) }.joined())")
        try readl(l, TIS.sts, "STS after reading")
        return rsp
    }

    /// Every register of every locality that reading does not change.
    mutating func snapshot() throws {
        for l in 0..<5 {
            try readb(l, TIS.access, "ACCESS")
            try readl(l, TIS.intEnable, "INT_ENABLE")
            try readb(l, TIS.intVector, "INT_VECTOR")
            try readl(l, TIS.intStatus, "INT_STATUS")
            try readl(l, TIS.intfCapability, "INTF_CAPABILITY")
            try readl(l, TIS.sts, "STS")
            try readl(l, TIS.interfaceID, "INTERFACE_ID")
            try readl(l, TIS.didVid, "DID_VID")
            try readb(l, TIS.rid, "RID")
        }
    }
}

/// The register-level test script: initial registers, locality arbitration, a command round trip
/// (Startup), PCR_Extend(16) and PCR_Read(16), an unaligned and an 8-byte read, a bad qtest line.
func registerLevelScript(_ bus: QTestBus) throws -> [String] {
    var s = RegisterScript(bus: bus)
    try s.snapshot()
    // Locality arbitration: loc0 takes it, loc1 asks (loc0 sees pendingRequest), loc0 lets go.
    try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
    try s.readb(0, TIS.access, "ACCESS after request")
    try s.readl(0, TIS.sts, "STS after request")
    try bus.writeb(TIS.reg(1, TIS.access), TIS.requestUse)
    try s.readb(0, TIS.access, "ACCESS with loc1 pending")
    try s.readb(1, TIS.access, "ACCESS pending")
    try bus.writeb(TIS.reg(0, TIS.access), TIS.activeLocality)
    try s.readb(0, TIS.access, "ACCESS after relinquish")
    try s.readb(1, TIS.access, "ACCESS after handover")
    try s.readl(1, TIS.sts, "STS after handover")
    // TPM2_Startup from locality 1 is TPM_RC_LOCALITY (0x907): part of the script.
    try s.command(TPM2.startup(), locality: 1)
    // And back to loc0, which may start the TPM.
    try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
    try s.readb(1, TIS.access, "ACCESS with loc0 pending")
    try bus.writeb(TIS.reg(1, TIS.access), TIS.activeLocality)
    try s.readb(0, TIS.access, "ACCESS after handover back")
    try s.command(TPM2.startup(), locality: 0)
    try s.command(TPM2.pcrExtendSHA256(pcr: 16, digest: probeDigest), locality: 0)
    let rsp = try s.command(TPM2.pcrReadSHA256(pcr: 16), locality: 0)
    s.transcript.append("PCR16 matches sha256(0^32 ‖ digest): \(Array(rsp.suffix(32)) == pcr16AfterProbe)")
    // Interrupts: intercept the IOAPIC, enable dataAvail (global enable), run a command; the
    // IRQ line (GSI 5) rises, and falls when INT_STATUS is acknowledged.
    try bus.interceptIRQs(qomPath: "ioapic")
    try bus.writel(TIS.reg(0, TIS.intEnable), 0x8000_0001)
    try s.readl(0, TIS.intEnable, "INT_ENABLE enabled")
    try s.command(TPM2.pcrReadSHA256(pcr: 16), locality: 0)
    s.transcript.append("IRQ 5 raised: \(try bus.waitForIRQ(5, level: true, timeout: 5))")
    try s.readl(0, TIS.intStatus, "INT_STATUS after completion")
    // Acknowledging dataAvail leaves stsValid pending: the line stays up (QEMU lowers it only
    // when every INT_STATUS bit is clear; the IRQ line is written before the OK).
    try bus.writel(TIS.reg(0, TIS.intStatus), 0x1)
    s.transcript.append("IRQ 5 level after acknowledging dataAvail: \(try bus.irqLevel(5))")
    try s.readl(0, TIS.intStatus, "INT_STATUS after acknowledging dataAvail")
    try bus.writel(TIS.reg(0, TIS.intStatus), 0x2)
    s.transcript.append("IRQ 5 lowered: \(try bus.waitForIRQ(5, level: false, timeout: 5))")
    try s.readl(0, TIS.intStatus, "INT_STATUS after acknowledging all")
    // Only the TPM's line: QEMU's PIT also toggles GSI 0, which tis-sim does not model.
    s.transcript.append("IRQ 5 lines: \(bus.irqEvents.filter { $0.line == 5 }.map(\.description))")
    try bus.writel(TIS.reg(0, TIS.intEnable), 0x0000_0008)
    s.note("readw 0xfed40019 (unaligned)", UInt64(try bus.readw(TIS.reg(0, TIS.sts) + 1)))
    s.note("readq 0xfed40000", try bus.readq(TIS.reg(0, TIS.access)))
    s.note("readl unassigned 0x1000", UInt64(try bus.readl(0x1000)))
    for bad in ["nonesuch 1", "clock_step", "irq_intercept_in nonesuch"] {
        do {
            let ok = try bus.command(bad)
            s.transcript.append("\(bad) → \(ok)")
        } catch {
            s.transcript.append("\(bad) → \(error.message)")
        }
    }
    try bus.writeb(TIS.reg(0, TIS.access), TIS.activeLocality)
    try s.snapshot()
    return s.transcript
}

/// Which binary a VM runs and which TPM backs it.
enum VMKind: String, CustomStringConvertible, CaseIterable {
    /// qemu-system-x86_64 7.2 + swtpm.
    case qemu
    /// tis-sim machine + swtpm (`-tpmdev emulator`).
    case tisSimSwtpm = "tis-sim+swtpm"
    /// tis-sim machine + libtpms (`-tpmdev libtpms`).
    case tisSimLibtpms = "tis-sim+libtpms"

    var description: String { rawValue }
}

/// One VM of a test: started through the QEMU harness with only the binary swapped, closed
/// with `close()`.
final class VM {
    let kind: VMKind
    let machine: QEMUMachine?
    let process: QEMUProcess
    var bus: QTestBus { process.qtest }
    var qmp: QMPClient { process.qmp }

    private static let counter = Counter()

    /// `incoming`: `-incoming URI` (one argv element).
    /// `swtpmLog`: swtpm logs at level 20 into `swtpmLogPath` (every ctrl command).
    init(_ kind: VMKind, work: WorkDirectory, incoming: String? = nil, machine type: QEMUMachineType = .pc,
         swtpmLog: Bool = false, tpmVersion: TPMVersion = .tpm20) throws {
        self.kind = kind
        switch kind {
        case .qemu:
            let m = try QEMUMachine.start(machine: type, incoming: incoming, tpmVersion: tpmVersion, workDirectory: work,
                                          swtpmLogLevel: swtpmLog ? 20 : nil)
            machine = m
            process = m.qemu
        case .tisSimSwtpm:
            let m = try QEMUMachine.start(machine: type, incoming: incoming, tpmVersion: tpmVersion, workDirectory: work,
                                          swtpmLogLevel: swtpmLog ? 20 : nil, executable: try tisSimMachineExecutable(in: work))
            machine = m
            process = m.qemu
        case .tisSimLibtpms:
            let n = Self.counter.next()
            let state = try work.subdirectory("libtpms\(n)")
            var o = QEMUOptions(machine: type, device: nil, incoming: incoming,
                                extraArguments: ["-tpmdev", "libtpms,id=tpm0,state=\(state)\(tpmVersion == .tpm12 ? ",version=1.2" : "")",
                                                 "-device", "tpm-tis,tpmdev=tpm0"])
            o.name = "lt\(n)"
            o.executable = try tisSimMachineExecutable(in: work)
            o.qtestLog = false
            machine = nil
            process = try QEMUProcess.launch(o, in: work)
        }
    }

    func close() {
        if let machine { machine.close() } else { process.close() }
    }

    /// swtpm's log (with `swtpmLog`).
    var swtpmLogPath: String? { machine?.file("swtpm.log") }

    /// The ctrl command codes swtpm logged, in order (`Ctrl Cmd:` then the request bytes).
    func swtpmCtrlCommands() throws -> [UInt32] {
        let path = try #require(swtpmLogPath)
        let text = String(decoding: try #require(FileManager.default.contents(atPath: path)), as: UTF8.self)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        var codes: [UInt32] = []
        for (i, l) in lines.enumerated() where l.contains("Ctrl Cmd:") && i + 1 < lines.count {
            let hex = lines[i + 1].split(separator: " ").prefix(4).joined()
            if let v = UInt32(hex, radix: 16) { codes.append(v) }
        }
        return codes
    }

    func kill() {
        if let machine { machine.kill() } else { process.kill() }
    }

    /// Waits for an incoming migration to complete and the guest to run.
    func waitIncoming(timeout: Double = 10) throws {
        try qmp.waitForMigration(timeout: timeout)
        let end = Date().addingTimeInterval(3)
        while try qmp.queryStatus() != "running" && Date() < end { usleep(5_000) }
        #expect(try qmp.queryStatus() == "running")
    }

    /// Output of the process (for failure messages).
    var output: String { process.output() }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func next() -> Int {
        lock.lock()
        defer { lock.unlock() }
        value += 1
        return value
    }
}

/// The state a migration test leaves on the source: Startup, PCR_Extend(16), loc0 holding half
/// of a PCR_Read(16) response, loc2 waiting for the locality, INT_ENABLE changed.
func prepareSource(_ bus: QTestBus) throws {
    var s = RegisterScript(bus: bus)
    try bus.writeb(TIS.reg(0, TIS.access), TIS.requestUse)
    try s.command(TPM2.startup(), locality: 0)
    try s.command(TPM2.pcrExtendSHA256(pcr: 16, digest: probeDigest), locality: 0)
    try s.command(TPM2.pcrReadSHA256(pcr: 16), locality: 0, readCount: 31)
    try bus.writel(TIS.reg(0, TIS.intEnable), 0x0000_000F)
    try bus.writeb(TIS.reg(2, TIS.access), TIS.requestUse)
}

/// Every register of every locality.
func snapshot(_ bus: QTestBus) throws -> [String] {
    var s = RegisterScript(bus: bus)
    try s.snapshot()
    return s.transcript
}

/// On a destination: the rest of the half-read response, then a fresh PCR_Read(16); both must
/// show the PCR extended on the source.
func checkPCR16AfterMigration(_ bus: QTestBus, sourceLeftHalf: Bool = true) throws {
    var s = RegisterScript(bus: bus)
    if sourceLeftHalf {
        var rest: [UInt8] = []
        for _ in 0..<31 { rest.append(try bus.readb(TIS.reg(0, TIS.dataFIFO))) }
        #expect(Array(rest.suffix(32)) == Array(pcr16AfterProbe.suffix(31)), "second half of the migrated response")
    }
    let rsp = try s.command(TPM2.pcrReadSHA256(pcr: 16), locality: 0)
    #expect(Array(rsp.suffix(32)) == pcr16AfterProbe, "PCR 16 after migration")
}

/// A PCR_Read(16) on a running machine whose loc0 is active.
func readPCR16(_ bus: QTestBus) throws -> [UInt8] {
    var s = RegisterScript(bus: bus)
    return Array(try s.command(TPM2.pcrReadSHA256(pcr: 16), locality: 0).suffix(32))
}

/// Parent of every suite that starts QEMU or tis-sim processes: serialized (2 shared cores).
@Suite("tis-sim machine", .serialized)
enum MachineSuite {}
