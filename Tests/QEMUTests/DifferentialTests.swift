import EmulatorBackend
import Foundation
import QEMUHarness
import Testing
import TIS
import TISConformance
import TISDriver

/// The model against QEMU 7.2: the same accesses on both, every read compared.
///
/// The model runs a libtpms backend inline (deterministic completion); QEMU runs swtpm 0.7.1
/// (libtpms 0.9.2 too), so deterministic commands (TPM2_Startup and its 0x100 repeat) give the
/// same response bytes. More seeds: `TIS_DIFF_SEEDS=200 TIS_DIFF_OPS=5000 swift test --filter DifferentialTests`.
@Suite(.serialized) struct DifferentialTests {
    /// QEMU's own tpm-tis qtest checks, run against QEMU 7.2 + swtpm.
    @Test func qemuChecksPassOnQEMU() throws {
        let m = try QEMUMachine.start()
        defer { m.close() }
        let e = Expectations(bus: m.bus)
        try QEMUTISChecks.checkLocalities(e)
        try QEMUTISChecks.checkAccessReg(e)
        try QEMUTISChecks.checkAccessRegSeize(e)
        try QEMUTISChecks.checkAccessRegRelease(e)
        let response = try QEMUTISChecks.checkTransmit(e)
        #expect(e.mismatches == [], "\(m.diagnostics())")
        #expect(e.checks > 200)
        #expect(response == [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x00])
    }

    static func headerSize(_ b: [UInt8]) -> UInt32 {
        UInt32(b[2]) << 24 | UInt32(b[3]) << 16 | UInt32(b[4]) << 8 | UInt32(b[5])
    }

    /// A bus that runs every access on the model and on QEMU and records the first differences.
    final class Lockstep {
        let qemu: QTestBus
        let model: TISMachineBus
        let device: TISDevice
        var reads = 0
        var differences: [String] = []
        var log: [String] = []
        /// tpmGo writes not made because they would send QEMU a command under 10 bytes.
        var skippedShortCommands = 0
        /// Ops after which QEMU's IRQ line was high (the comparison is not vacuous).
        var irqHighOps = 0
        /// `TIS_DIFF_TRACE=FILE`: the model's state after every op, for a post-mortem.
        let trace: FileHandle? = ProcessInfo.processInfo.environment["TIS_DIFF_TRACE"].flatMap {
            FileManager.default.createFile(atPath: $0, contents: nil)
            return FileHandle(forWritingAtPath: $0)
        }

        /// A command shorter than 10 bytes hangs QEMU 7.2 with swtpm (swtpm waits for the rest of
        /// the header; QEMU then blocks in CMD_CANCEL_TPM_CMD, runs-on-this-machine.md §8), and so
        /// does one whose header size differs from the bytes sent (a dword write can carry the
        /// FIFO past the header's size): swtpm reads by the header and the channel desyncs. The
        /// model answers such commands without hanging; the differential leaves that tpmGo out.
        /// The model completes inline; QEMU completes when swtpm answers. If the model's active
        /// locality shows dataAvail, wait for QEMU's to show it too.
        func settleQEMU() throws {
            let st = device.currentState
            guard st.activeLocality < 5 else { return }
            let l = Int(st.activeLocality)
            guard st.localities[l].state == .completion, st.localities[l].sts & 0x10 != 0 else { return }
            let addr = TISGeometry.baseAddress + UInt64(l) << 12 + 0x18
            let deadline = Date().addingTimeInterval(3)
            while try qemu.read(addr, size: 4) & 0x10 == 0 && Date() < deadline { usleep(100) }
        }

        func wouldSendShortCommand(_ a: UInt64, _ s: Int, _ v: UInt64) -> Bool {
            let off = a &- TISGeometry.baseAddress
            guard off < TISGeometry.regionSize, off & 0xFFC == 0x18 else { return false }
            let l = Int(off >> 12)
            let shifted = UInt32(truncatingIfNeeded: v << (8 * (off & 3)))
            guard shifted & 0x62 == 0x20 else { return false }
            let st = device.currentState
            return Int(st.activeLocality) == l && st.localities[l].state == .reception
                && st.localities[l].sts & 0x08 == 0 && (st.rwOffset < 10 || DifferentialTests.headerSize(st.buffer) != UInt32(st.rwOffset))
        }

        init(qemu: QTestBus, device: TISDevice) {
            self.qemu = qemu
            self.device = device
            self.model = TISMachineBus(device: device)
        }

        func apply(_ op: TISOp) throws {
            switch op {
            case .read(let a, let s):
                let q = try qemu.read(a, size: s)
                let mv = try model.read(a, size: s)
                reads += 1
                if q != mv && differences.count < 20 {
                    differences.append("\(op): QEMU 0x\(String(q, radix: 16)), model 0x\(String(mv, radix: 16)) after \(log.suffix(6))")
                }
            case .write(let a, let s, let v):
                if wouldSendShortCommand(a, s, v) {
                    skippedShortCommands += 1
                    return
                }
                try qemu.write(a, size: s, value: v)
                try model.write(a, size: s, value: v)
                // Any STS write may be a tpmGo (the generator also writes STS values at random):
                // the model completed inline, so wait for QEMU's completion before going on.
                let off = a &- TISGeometry.baseAddress
                if off < TISGeometry.regionSize && off & 0xFFC == 0x18 { try settleQEMU() }
            case .settle:
                try settleQEMU()
            }
            // The IRQ line: QEMU's GSI 5 as qtest intercepts it at the IOAPIC, against the level
            // the model drives.
            let qemuIRQ = try qemu.irqLevel(5)
            if qemuIRQ { irqHighOps += 1 }
            if qemuIRQ != device.irqLevel && differences.count < 20 {
                differences.append("IRQ after \(op): QEMU \(qemuIRQ), model \(device.irqLevel) after \(log.suffix(6))")
            }
            if let trace {
                let st = device.currentState
                let locs = st.localities.map { "\($0.state.rawValue)/\(String($0.sts & 0xFF, radix: 16))/\(String($0.access, radix: 16))" }.joined(separator: " ")
                trace.write("\(op) | active \(st.activeLocality) rw \(st.rwOffset) hdr \(DifferentialTests.headerSize(st.buffer)) | \(locs)\n".data(using: .utf8) ?? Data())
            }
            log.append(op.description)
            if log.count > 50 { log.removeFirst(25) }
        }
    }

    static func run(seed: UInt64, ops count: Int, machine: QEMUMachineType, version: TPMVersion = .tpm20) async throws -> (reads: Int, differences: [String], irqHighOps: Int) {
        try await LibtpmsTestLock.run {
            let m = try QEMUMachine.start(machine: machine, tpmVersion: version)
            defer { m.close() }
            let backend = try LibtpmsBackend(version: version)
            defer { backend.shutdown() }
            let device = try TISDevice(backend: backend, mode: .inline)
            try m.bus.interceptIRQs()
            let lock = Lockstep(qemu: m.bus, device: device)
            var gen = TISOpGenerator(seed: seed)
            gen.command = version == .tpm12
                ? [0x00, 0xC1, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x00, 0x99, 0x00, 0x01]   // TPM_Startup(ST_CLEAR)
                : [0x80, 0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x01, 0x44, 0x00, 0x00]   // TPM2_Startup(SU_CLEAR)
            for op in gen.ops(count) {
                do {
                    try lock.apply(op)
                } catch {
                    throw DifferentialFailure(seed: seed, error: "\(error)\ndifferences: \(lock.differences)", lastOps: Array(lock.log.suffix(40)) + ["-> \(op)"],
                                              model: lock.device.currentState)
                }
                if lock.differences.count >= 20 { break }
            }
            return (lock.reads, lock.differences, lock.irqHighOps)
        }
    }

    /// Seeded random sequences over all localities and registers: arbitration, seize, whole
    /// and cut commands, aborts, partial reads, interrupts, widths and lanes.
    @Test(arguments: [1, 2, 3] as [UInt64])
    func randomDifferential(seed: UInt64) async throws {
        let r = try await Self.run(seed: seed, ops: 1500, machine: seed % 2 == 0 ? .q35 : .pc)
        #expect(r.differences == [])
        #expect(r.reads > 400)
        #expect(r.irqHighOps > 0)
    }

    /// The TPM 1.2 personality against QEMU 7.2 with swtpm `--tpm` 1.2.
    @Test(arguments: [7, 8] as [UInt64])
    func randomDifferentialTPM12(seed: UInt64) async throws {
        let r = try await Self.run(seed: seed, ops: 1500, machine: .pc, version: .tpm12)
        #expect(r.differences == [])
        #expect(r.reads > 400)
    }

    /// The PPI region (plain RAM at 0xFED45000, 0x400 bytes) and what lies around the TIS: every
    /// width, alignments, accesses that cross into unassigned memory, on both.
    @Test func ppiAndUnassignedOnBoth() async throws {
        try await LibtpmsTestLock.run {
            let m = try QEMUMachine.start()
            defer { m.close() }
            let backend = try LibtpmsBackend()
            defer { backend.shutdown() }
            let device = try TISDevice(backend: backend, mode: .inline)
            let model = TISMachineBus(device: device)
            var rng = SplitMix64(seed: 42)
            var reads = 0
            var differences: [String] = []
            let bases: [UInt64] = [0xFED4_5000, 0xFED4_5100, 0xFED4_515A, 0xFED4_53F8, 0xFED4_53FE, 0xFED4_5400, 0xFED4_4FFC, 0xFED3_FFFE, 0xFED4_6000]
            for i in 0..<600 {
                let a = bases[Int(rng.next() % UInt64(bases.count))] + rng.next() % 8
                let size = [1, 2, 4, 8][Int(rng.next() % 4)]
                if i % 3 == 0 {
                    let v = rng.next()
                    // Keep TIS writes out: this test is about the memory around it.
                    if a >= 0xFED4_5000 {
                        try m.bus.write(a, size: size, value: v)
                        try model.write(a, size: size, value: v)
                    }
                } else {
                    let q = try m.bus.read(a, size: size), mv = try model.read(a, size: size)
                    reads += 1
                    if q != mv { differences.append("read\(size * 8) 0x\(String(a, radix: 16)): QEMU 0x\(String(q, radix: 16)) model 0x\(String(mv, radix: 16))") }
                }
            }
            #expect(differences == [])
            #expect(reads > 300)
        }
    }

    /// Many more seeds, when asked for (`TIS_DIFF_SEEDS`).
    @Test func manySeedsWhenAsked() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let n = env["TIS_DIFF_SEEDS"].flatMap(Int.init), n > 0 else { return }
        let ops = env["TIS_DIFF_OPS"].flatMap(Int.init) ?? 3000
        let first = env["TIS_DIFF_FIRST_SEED"].flatMap(UInt64.init) ?? 100
        for seed in first..<(first + UInt64(n)) {
            let version: TPMVersion = env["TIS_DIFF_TPM12"] == "1" ? .tpm12 : .tpm20
            let r = try await Self.run(seed: seed, ops: ops, machine: seed % 2 == 0 ? .q35 : .pc, version: version)
            #expect(r.differences == [], "seed \(seed)")
            print("differential seed \(seed): \(r.reads) reads compared, IRQ high after \(r.irqHighOps) ops, \(r.differences.count) differences")
        }
    }

    /// One driver scenario, two devices: locality arbitration, a command round trip, PCR extend
    /// and read; every register read and every response byte equal.
    @Test func driverScenarioOnBoth() async throws {
        try await LibtpmsTestLock.run {
            let m = try QEMUMachine.start()
            defer { m.close() }
            let backend = try LibtpmsBackend()
            defer { backend.shutdown() }
            let device = try TISDevice(backend: backend, mode: .worker)
            var transcripts: [[String]] = []
            var responses: [[[UInt8]]] = []
            for bus in [m.bus as any MMIOBus, TISMachineBus(device: device)] {
                let recorder = RecordingBus(bus)
                let driver = TISDriver(bus: recorder, byteWrites: true)
                let d = Crypto.sha256(Array("differential".utf8))
                var rs: [[UInt8]] = []
                rs.append(try driver.transmit(TPM2.startup(), locality: 0))
                rs.append(try driver.transmit(TPM2.pcrExtendSHA256(pcr: 16, digest: d), locality: 2))
                rs.append(try driver.transmit(TPM2.pcrReadSHA256(pcr: 16), locality: 3))
                rs.append(try driver.transmit(TPM2.startup(), locality: 1))
                responses.append(rs)
                transcripts.append(recorder.reads)
            }
            #expect(responses[0] == responses[1])
            #expect(transcripts[0] == transcripts[1])
            #expect(transcripts[0].count > 100)
            #expect(try TPM2.pcrDigest(responses[0][2]) == Crypto.pcrExtendSHA256([Crypto.sha256(Array("differential".utf8))]))
        }
    }
}

struct DifferentialFailure: Error, CustomStringConvertible {
    var seed: UInt64
    var error: String
    var lastOps: [String]
    var model: TISState
    var description: String {
        let locs = model.localities.enumerated().map { "loc\($0.offset) \($0.element.state) sts 0x\(String($0.element.sts, radix: 16)) access 0x\(String($0.element.access, radix: 16))" }
        return "seed \(seed): \(error)\nlast ops:\n  " + lastOps.joined(separator: "\n  ")
            + "\nmodel: active \(model.activeLocality) rw_offset \(model.rwOffset) header \(model.buffer.prefix(12).map { String($0, radix: 16) })\n  " + locs.joined(separator: "\n  ")
    }
}

/// Records every access. Polls, whose count depends on timing, are collapsed: of consecutive
/// reads of one register only the last (the value the driver acted on) is kept.
final class RecordingBus: MMIOBus {
    let inner: any MMIOBus
    private(set) var reads: [String] = []
    private var lastRead: String?
    init(_ inner: any MMIOBus) { self.inner = inner }
    func read(_ address: UInt64, size: Int) throws -> UInt64 {
        let v = try inner.read(address, size: size)
        let key = "r\(size) \(String(address, radix: 16))"
        let line = key + " = \(String(v, radix: 16))"
        if lastRead == key, !reads.isEmpty { reads[reads.count - 1] = line } else { reads.append(line) }
        lastRead = key
        return v
    }
    func write(_ address: UInt64, size: Int, value: UInt64) throws {
        try inner.write(address, size: size, value: value)
        lastRead = nil
        reads.append("w\(size) \(String(address, radix: 16)) \(String(value, radix: 16))")
    }
}
