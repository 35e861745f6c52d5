import EmulatorBackend
import Synchronization
import TIS
import TISDriver
import VMState

/// Records the level a `TISDevice` drives on its IRQ line.
final class RecordingIRQLine: TISInterruptLine, @unchecked Sendable {
    private let level = Atomic<Bool>(false)
    func setLevel(_ high: Bool) { level.store(high, ordering: .sequentiallyConsistent) }
    var isHigh: Bool { level.load(ordering: .sequentiallyConsistent) }
}

/// What one run of `TISOpScript` did.
public struct TISFuzzReport: Sendable, Equatable {
    public var ops = 0
    public var reads = 0
    public var writes = 0
    public var commandsDelivered = 0
    public var completions = 0
    public var failedCompletions = 0
    public var cancels = 0
    public var resets = 0
    public var saveRestores = 0
    public var refusedRestores = 0
    public var hostileStates = 0

    public init() {}

    public static func += (a: inout TISFuzzReport, b: TISFuzzReport) {
        a.ops += b.ops; a.reads += b.reads; a.writes += b.writes; a.commandsDelivered += b.commandsDelivered
        a.completions += b.completions; a.failedCompletions += b.failedCompletions; a.cancels += b.cancels
        a.resets += b.resets; a.saveRestores += b.saveRestores; a.refusedRestores += b.refusedRestores
        a.hostileStates += b.hostileStates
    }
}

/// The op-script fuzzer of the TIS (cloud-hypervisor's fuzz targets, style-anchors §1.4): any
/// byte string becomes a sequence of
/// - guest accesses through `TISMachineBus` (QEMU's access splitting): every locality page,
///   the PPI page and unassigned memory around the region, widths 1, 2, 4 and 8, every byte
///   lane, values from a table of meaningful bits or raw;
/// - whole commands (request use, commandReady, FIFO bytes, tpmGo) to reach deep states fast;
/// - backend completions decided by the script (`ScriptedBackend` in `.worker` mode): success
///   responses of any length and header, QEMU's fatal response, failures; cancels;
/// - device resets (with backend startup failures), save/restore cycles (`save()` or
///   `saveWithBackend()` → `TISState` → the `tpm-tis` migration section and back → a new device
///   `restore`, sometimes with the backend refusing its blobs), and restores of hostile states;
/// - direct device calls with widths and offsets the bus never produces.
///
/// After every op it checks: no trap; the state validates (rw_offset within the buffer, every
/// locality 0...4 or 0xFF); the ACCESS activeLocality bit is set on at most one locality, and
/// on exactly the active one; the IRQ line is at the level the device reports; a device in
/// startup-error mode reads 0. After every save/restore it checks that the restored device
/// answers every register identically and holds an equal state.
public final class TISOpScript {
    public static let target = "tis"

    var input: FuzzInput
    let version: TPMVersion
    let configuration: TISConfiguration
    let backendBufferSize: Int
    var backend: ScriptedBackend
    var device: TISDevice
    var bus: TISMachineBus
    var line: RecordingIRQLine
    var startupError = false
    var report = TISFuzzReport()
    let maxOps: Int
    var step = 0
    var checks = 0
    let stateCheckInterval: Int
    var lastOp = "setup"

    static let tpm2Reply: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x00]
    static let tpm12Reply: [UInt8] = [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x00]
    static let bufferSizes = [4096, 4096, 4096, 4096, 3968, 1024, 64, 10, 1, 0, 100_000]
    static let registerOffsets: [UInt64] = [0x00, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x24, 0x30, 0x80, 0xBC, 0xF00, 0xF04, 0xF90,
                                            0x04, 0x1C, 0x20, 0x28, 0x34, 0x7C, 0xC0, 0xF08, 0xFFC]
    static let values: [UInt64] = [0x02, 0x20, 0x08, 0x10, 0x40, 0x80, 0x01, 0x04, 0x0A, 0x22, 0x28, 0x30, 0x12, 0xFF, 0x00,
                                   0x60, 0x42, 0x0100_0000, 0x0200_0000, 0x0300_0040, 0x8000_0087, 0x8000_0001, 0x8000_0080,
                                   0x87, 0xFFFF_FFFF, 0x0008_0000, 0xFFFF_FFFF_FFFF_FFFF]

    /// Runs `data` as a script of at most `maxOps` ops. Throws the first broken invariant.
    @discardableResult
    public static func run(_ data: [UInt8], maxOps: Int = 100_000, stateCheckInterval: Int = 1) throws(FuzzViolation) -> TISFuzzReport {
        let script = try TISOpScript(data, maxOps: maxOps, stateCheckInterval: stateCheckInterval)
        defer { script.finish() }
        try script.runAll()
        return script.report
    }

    init(_ data: [UInt8], maxOps: Int, stateCheckInterval: Int) throws(FuzzViolation) {
        input = FuzzInput(data)
        self.maxOps = maxOps
        self.stateCheckInterval = max(stateCheckInterval, 1)
        let setup = input.u8()
        version = setup & 1 == 0 ? .tpm20 : .tpm12
        configuration = TISConfiguration(irqNumber: UInt32(input.u8() & 0xF),
                                         interruptRegistersWritableFromAnyLocality: setup & 2 != 0,
                                         ppiEnabled: setup & 4 == 0)
        backendBufferSize = Self.bufferSizes[Int(setup >> 3) % Self.bufferSizes.count]
        backend = ScriptedBackend(version: version, bufferSize: backendBufferSize, established: setup & 0x80 != 0)
        line = RecordingIRQLine()
        device = TISDevice(runner: BackendRunner(backend: backend, mode: .worker), configuration: configuration, irq: line)
        bus = TISMachineBus(device: device)
        do { try device.reset() } catch {
            throw FuzzViolation(target: Self.target, step: 0, operation: "reset", "a scripted backend failed to start: \(error)")
        }
        try check()
    }

    /// Ends the command in flight, if any, so no worker thread stays blocked.
    func finish() {
        if device.runner.isBusy {
            backend.complete(.respond(TPMResponses.fatalError, selftestDone: false))
            device.waitForCompletion()
        }
    }

    func fail(_ message: String) -> FuzzViolation {
        FuzzViolation(target: Self.target, step: step, operation: lastOp, message)
    }

    func runAll() throws(FuzzViolation) {
        while !input.isAtEnd && report.ops < maxOps {
            step += 1
            try runOne()
            report.ops += 1
            try check()
        }
    }

    // MARK: Decoding

    func address() -> UInt64 {
        let page = input.u8()
        let base = TISGeometry.baseAddress
        if page >= 0xF8 {
            // Around the edges: accesses that straddle the region's start or end, or the PPI's.
            let d = UInt64(input.u8() & 7) + 1
            switch page & 3 {
            case 0: return base &- d
            case 1: return base + TISGeometry.regionSize - d
            case 2: return PPIRegion.baseAddress + UInt64(PPIRegion.size) - d
            default: return base + UInt64(input.u16())
            }
        }
        let locality = UInt64(page % 8)   // 5: the PPI page, 6 and 7: unassigned
        let o = input.u8()
        var offset: UInt64
        if o < 0xC0 {
            offset = Self.registerOffsets[Int(o) % Self.registerOffsets.count]
            if o & 0x80 != 0 { offset += UInt64(input.u8() & 3) }    // another byte lane
        } else {
            offset = UInt64(input.u16() & 0xFFF)
        }
        return base + locality << 12 + offset
    }

    func width() -> Int { [1, 2, 4, 8][Int(input.u8() & 3)] }

    func value() -> UInt64 {
        let v = input.u8()
        if v & 3 == 0 { return input.u64() }
        return Self.values[Int(v >> 2) % Self.values.count]
    }

    func response() -> ScriptedBackend.Completion {
        let kind = input.u8()
        let selftest = kind & 0x80 != 0
        switch kind & 0x7 {
        case 0, 1:
            return .respond(version == .tpm12 ? Self.tpm12Reply : Self.tpm2Reply, selftestDone: selftest)
        case 2:
            return .respond(TPMResponses.fatalError, selftestDone: selftest)
        case 3:
            // A header whose size field says what the script says, and a body of any length.
            let claimed = input.u32()
            let n = Int(input.u8())
            var r: [UInt8] = [0x80, 0x01, UInt8(truncatingIfNeeded: claimed >> 24), UInt8(truncatingIfNeeded: claimed >> 16),
                              UInt8(truncatingIfNeeded: claimed >> 8), UInt8(truncatingIfNeeded: claimed)]
            r += input.take(n)
            return .respond(r, selftestDone: selftest)
        case 4:
            return .respond(input.take(Int(input.u8() % 16)), selftestDone: selftest)
        case 5:
            // A full buffer, or more than the frontend can take.
            let n = input.bool() ? 4096 : 4096 + Int(input.u16() % 2048)
            var r = [UInt8](repeating: input.u8(), count: n)
            r[0] = 0x80; r[1] = 0x01
            r[2] = 0; r[3] = 0; r[4] = UInt8(truncatingIfNeeded: n >> 8); r[5] = UInt8(truncatingIfNeeded: n)
            return .respond(r, selftestDone: selftest)
        case 6:
            return .respond([], selftestDone: selftest)
        default:
            return .fail([.connectionClosed, .timeout, .io, .protocolViolation][Int(input.u8() & 3)])
        }
    }

    /// Lets a command in flight finish (as the script decides), waiting for its completion.
    func settle(_ completion: ScriptedBackend.Completion? = nil) {
        guard device.runner.isBusy else { return }
        let c = completion ?? response()
        if case .fail = c { report.failedCompletions += 1 }
        report.completions += 1
        backend.complete(c)
        device.waitForCompletion()
    }

    // MARK: Ops

    func runOne() throws(FuzzViolation) {
        let op = input.u8()
        switch op % 32 {
        case 0..<8:
            let a = address(), w = width()
            lastOp = "read\(w * 8) 0x\(String(a, radix: 16))"
            report.reads += 1
            do { _ = try bus.read(a, size: w) } catch { throw fail("bus refused a valid width: \(error)") }
        case 8..<16:
            let a = address(), w = width(), v = value()
            lastOp = "write\(w * 8) 0x\(String(a, radix: 16)) 0x\(String(v, radix: 16))"
            report.writes += 1
            let busyBefore = device.runner.isBusy
            do { try bus.write(a, size: w, value: v) } catch { throw fail("bus refused a valid width: \(error)") }
            if !busyBefore && device.runner.isBusy { report.commandsDelivered += 1 }
        case 16, 17:
            try sendCommand()
        case 18, 19:
            lastOp = "complete"
            settle()
        case 20:
            lastOp = "complete(fail)"
            settle(.fail(.connectionClosed))
        case 21:
            lastOp = "cancel"
            report.cancels += 1
            if input.bool() {
                device.runner.cancel()
            } else {
                try? bus.write(address(for: input.u8() % 5, 0x18), size: 4, value: 0x0100_0000)
            }
        case 22:
            try reset()
        case 23:
            try saveRestore()
        case 24:
            if input.bool() { try hostileRestore() } else { try saveRestore() }
        case 25:
            let l = input.u8() % 5
            lastOp = "sts read \(l)"
            report.reads += 1
            _ = try? bus.read(address(for: l, 0x18), size: 4)
        case 26:
            lastOp = "established"
            backend.established = input.bool()
        case 27:
            // Device calls a VMM could make that the bus never does.
            let off = UInt64(input.u16()) | (input.bool() ? 0x5000 : 0)
            let size = [0, 3, 5, 8, -1, 16, 1, 4][Int(input.u8() & 7)]
            lastOp = "device raw size \(size) at 0x\(String(off, radix: 16))"
            if input.bool() {
                let v = device.read(offset: off, size: size)
                let inRange = off < TISGeometry.regionSize && (size == 1 || size == 2 || size == 4)
                if !inRange && v != 0xFFFF_FFFF { throw fail("an invalid access read 0x\(String(v, radix: 16)), not 0xFFFFFFFF") }
            } else {
                device.write(offset: off, size: size, value: input.u32())
            }
        case 28, 29:
            let l = input.u8() % 5
            let v = value()
            lastOp = "access(\(l)) = 0x\(String(v, radix: 16))"
            try? bus.write(address(for: l, 0x00), size: 1, value: v)
        default:
            let l = input.u8() % 5
            let n = Int(input.u8() % 64) + 1
            let w = input.bool() ? 4 : 1
            lastOp = "fifo read \(n)×\(w) locality \(l)"
            for _ in 0..<n { _ = try? bus.read(address(for: l, 0x24), size: w) }
        }
    }

    func address(for locality: UInt8, _ offset: UInt64) -> UInt64 {
        TISGeometry.baseAddress + UInt64(locality) << 12 + offset
    }

    func sendCommand() throws(FuzzViolation) {
        let l = input.u8() % 5
        let kind = input.u8()
        var cmd: [UInt8]
        switch kind & 3 {
        case 0: cmd = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x01, 0x7B, 0x00, 0x08]   // GetRandom(8)
        case 1: cmd = [0x00, 0xC1, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x53]               // TPM 1.2 ContinueSelfTest
        case 2:
            let n = Int(input.u8())
            cmd = [0x80, 0x01, 0x00, 0x00, UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] + input.take(n)
        default:
            cmd = [0x80, 0x01] + input.take(Int(input.u8() % 24))
        }
        lastOp = "command \(cmd.count) bytes at locality \(l)"
        let w = input.bool() ? 4 : 1
        let busyBefore = device.runner.isBusy
        try? bus.write(address(for: l, 0x00), size: 1, value: 0x02)            // requestUse
        try? bus.write(address(for: l, 0x18), size: 1, value: 0x40)            // commandReady
        var i = 0
        while i < cmd.count {
            if w == 4 && i + 4 <= cmd.count {
                let v = UInt64(cmd[i]) | UInt64(cmd[i + 1]) << 8 | UInt64(cmd[i + 2]) << 16 | UInt64(cmd[i + 3]) << 24
                try? bus.write(address(for: l, 0x24), size: 4, value: v)
                i += 4
            } else {
                try? bus.write(address(for: l, 0x24), size: 1, value: UInt64(cmd[i]))
                i += 1
            }
        }
        try? bus.write(address(for: l, 0x18), size: 1, value: 0x20)            // tpmGo
        if !busyBefore && device.runner.isBusy { report.commandsDelivered += 1 }
    }

    func reset() throws(FuzzViolation) {
        lastOp = "reset"
        report.resets += 1
        settle()
        let failStartup = input.u8() % 8 == 0
        backend.setFailStartup(failStartup)
        do throws(TISDeviceError) {
            try device.reset()
            startupError = false
        } catch {
            guard failStartup, error.code == .backendStartup else { throw fail("reset failed: \(error)") }
            startupError = true
        }
        if failStartup && !startupError { throw fail("reset succeeded with a failing backend startup") }
        backend.setFailStartup(false)
    }

    // MARK: Save and restore

    /// Every register as a guest reads it, without side effects (no FIFO reads).
    func registerSnapshot(_ d: TISDevice) -> [UInt32] {
        var out: [UInt32] = []
        out.reserveCapacity(5 * 16)
        for l in 0..<UInt64(TISGeometry.localityCount) {
            let page = l << 12
            for (off, size) in [(0x00, 1), (0x00, 4), (0x01, 1), (0x08, 4), (0x0B, 1), (0x0C, 4), (0x10, 4), (0x14, 4),
                                (0x18, 4), (0x18, 1), (0x19, 2), (0x1A, 1), (0x30, 4), (0xF00, 4), (0xF04, 4), (0xF90, 4),
                                (0x34, 4)] {
                out.append(d.read(offset: page + UInt64(off), size: size))
            }
        }
        return out
    }

    func saveRestore() throws(FuzzViolation) {
        lastOp = "save/restore"
        settle()
        let mode = input.u8()
        let withBlobs = mode & 1 != 0
        let throughStream = mode & 0x0E == 0x02     // one in eight: the vmdesc JSON is costly
        let refuse = withBlobs && mode & 0x1C == 0x1C
        var saved: TISState
        var blobs = TPMStateBlobs()
        if withBlobs {
            backend.setBlobs(TPMStateBlobs(permanent: TPMStateBlob(data: input.take(Int(input.u8() % 32)))))
            do {
                (saved, blobs) = try device.saveWithBackend()
            } catch {
                throw fail("saveWithBackend failed on a healthy backend: \(error)")
            }
        } else {
            saved = device.save()
        }
        do { try saved.validate() } catch { throw fail("a saved state does not validate: \(error)") }

        if throughStream {
            // QEMU's tpm-tis section (and tpm-emulator when there are blobs), written and read back.
            let m = TPMMigrationState(machineType: "pc-i440fx-7.2", tis: saved, emulatorBlobs: withBlobs ? blobs : nil)
            do {
                let stream = try m.encodedStream()
                let back = try TPMMigrationState(source: .bytes(stream))
                guard back == m else { throw fail("the tpm-tis section did not read back equal") }
            } catch let e as FuzzViolation {
                throw e
            } catch {
                throw fail("the saved state does not survive the migration stream: \(error)")
            }
        }

        // The flag as the source device caches it (ACCESS bit 0 is its inverse): the script may
        // have changed the backend's since, which a device only learns at reset.
        let established = startupError ? backend.established
            : device.read(offset: 0, size: 1) & UInt32(TISAccess.tpmEstablishment.rawValue) == 0
        let newBackend = ScriptedBackend(version: version, bufferSize: backendBufferSize, established: established)
        newBackend.setFailRestore(refuse)
        let newLine = RecordingIRQLine()
        let newDevice = TISDevice(runner: BackendRunner(backend: newBackend, mode: .worker), configuration: configuration,
                                  irq: newLine)
        do { try newDevice.reset(incoming: true) } catch { throw fail("incoming reset failed: \(error)") }
        let fresh = newDevice.currentState
        do {
            if withBlobs {
                try newDevice.restore(saved, blobs: blobs)
            } else {
                try newDevice.restore(saved)
            }
            if refuse { throw fail("a refused blob did not fail the restore") }
        } catch let e as FuzzViolation {
            throw e
        } catch {
            guard refuse, let e = error as? TISDeviceError, e.code == .backendState else {
                throw fail("restore of a saved state failed: \(error)")
            }
            report.refusedRestores += 1
            guard newDevice.currentState == fresh else { throw fail("a refused restore changed the device") }
            return    // keep the old device
        }
        if startupError {
            // The source reads 0 everywhere; the destination started fine: only the state is compared.
            guard newDevice.currentState == saved else { throw fail("restored state differs") }
        } else {
            let a = registerSnapshot(device), b = registerSnapshot(newDevice)
            if a != b {
                let i = zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? 0
                throw fail("restored device answers register #\(i % 17) of locality \(i / 17) with 0x\(String(b[i], radix: 16)), source 0x\(String(a[i], radix: 16))")
            }
            if Self.isValid(saved.activeLocality) {
                // One FIFO read on both (same side effect on both).
                let off = UInt64(saved.activeLocality) << 12 + 0x24
                let x = device.read(offset: off, size: 4), y = newDevice.read(offset: off, size: 4)
                guard x == y else { throw fail("restored FIFO reads 0x\(String(y, radix: 16)), source 0x\(String(x, radix: 16))") }
            }
            guard newDevice.currentState == device.currentState else { throw fail("restored state differs after reads") }
        }
        // The line level is not migrated (QEMU: the interrupt controller carries it); a restored
        // device drives it high exactly while some INT_STATUS holds a bit. The source may
        // differ: QEMU's reset and a per-locality INT_STATUS clear leave it out of step with ints.
        guard newDevice.irqLevel == saved.localities.contains(where: { $0.ints != 0 }) else {
            throw fail("restored IRQ level is not what INT_STATUS implies")
        }
        guard newLine.isHigh == newDevice.irqLevel else { throw fail("restored IRQ line not driven to the device's level") }
        report.saveRestores += 1
        backend = newBackend
        device = newDevice
        bus = TISMachineBus(device: newDevice)
        line = newLine
        startupError = false
    }

    static func isValid(_ l: UInt8) -> Bool { l < TISGeometry.localityCount }

    /// A state a hostile stream could carry: refused with a typed error and no change when it
    /// does not validate; restored without a trap when it does.
    func hostileRestore() throws(FuzzViolation) {
        lastOp = "hostile restore"
        settle()
        report.hostileStates += 1
        var s = device.currentState
        let field = input.u8()
        let l = Int(input.u8() % 5)
        switch field % 10 {
        case 0: s.rwOffset = input.u16()
        case 1: s.activeLocality = input.u8()
        case 2: s.abortingLocality = input.u8()
        case 3: s.nextLocality = input.u8()
        case 4: s.localities[l].state = TISLocalityState(rawValue: UInt32(input.u8() % 5)) ?? .idle
        case 5: s.localities[l].sts = input.u32()
        case 6: s.localities[l].ints = input.u32(); s.localities[l].inte = input.u32()
        case 7: s.buffer = input.take(Int(input.u16() % 8192))
        case 8:
            let n = Int(input.u8() % 8)
            s.localities = Array(repeating: TISLocality(), count: n)
        default:
            let at = Int(input.u16() % 4090)
            for (i, b) in input.take(6).enumerated() { s.buffer[at + i] = b }
        }
        // Keep the one-active-locality invariant the fuzzer checks: the ACCESS byte follows
        // active_locty (a stream's ACCESS bytes are carried as they are; see ThreatModel).
        if s.localities.count == TISGeometry.localityCount {
            for i in 0..<TISGeometry.localityCount {
                if i == Int(s.activeLocality) {
                    s.localities[i].access |= TISAccess.activeLocality.rawValue
                } else {
                    s.localities[i].access &= ~TISAccess.activeLocality.rawValue
                }
            }
        }
        let before = device.currentState
        var valid = true
        do { try s.validate() } catch { valid = false }
        do {
            try device.restore(s)
            guard valid else { throw fail("an invalid state was restored") }
            // A restore does not clear a startup error (QEMU: only a reset that starts the TPM).
        } catch let e as FuzzViolation {
            throw e
        } catch {
            guard !valid, let e = error as? TISDeviceError, e.code == .invalidState, e.stateError != nil else {
                throw fail("a valid state was refused: \(error)")
            }
            guard device.currentState == before else { throw fail("a refused restore changed the device") }
        }
    }

    // MARK: Invariants

    func check() throws(FuzzViolation) {
        checks += 1
        let fullCheck = checks % stateCheckInterval == 0
        // Register-level invariants after every op; the whole state (a 4 KiB copy) every
        // `stateCheckInterval` ops (1 under libFuzzer, more in a debug-build test run).
        let s = fullCheck ? device.currentState : nil
        if let s {
            do { try s.validate() } catch { throw fail("state invalid after op: \(error)") }
            guard Int(s.rwOffset) <= s.buffer.count else { throw fail("rw_offset \(s.rwOffset) past the buffer") }
        }
        var active: [Int] = []
        for l in 0..<TISGeometry.localityCount {
            let a = device.read(offset: UInt64(l) << 12, size: 1)
            if startupError {
                guard a == 0 else { throw fail("startup-error device reads ACCESS(\(l)) = 0x\(String(a, radix: 16)), not 0") }
                continue
            }
            if a & UInt32(TISAccess.activeLocality.rawValue) != 0 { active.append(l) }
        }
        if !startupError {
            guard active.count <= 1 else { throw fail("ACCESS.activeLocality set on localities \(active)") }
            if let s {
                let expected = Self.isValid(s.activeLocality) ? [Int(s.activeLocality)] : []
                guard active == expected else {
                    throw fail("ACCESS.activeLocality on \(active) but active_locty is \(s.activeLocality)")
                }
            }
        }
        if !device.runner.isBusy {
            guard line.isHigh == device.irqLevel else {
                throw fail("IRQ line \(line.isHigh) but the device drives \(device.irqLevel)")
            }
        }
    }
}
