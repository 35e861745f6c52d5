import EmulatorBackend
import Synchronization

/// The interrupt line a VMM wires the TIS to (QEMU's `qemu_irq`): level-style, raised and
/// lowered, never pulsed.
public protocol TISInterruptLine: Sendable {
    func setLevel(_ high: Bool)
}

/// Receives `TISEvent`s (invalid accesses, transitions), after the device lock is released.
public protocol TISEventSink: Sendable {
    func tisEvents(_ events: [TISEvent])
}

/// Why a device operation failed on the host side.
public struct TISDeviceError: Error, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// The backend failed to start at reset (QEMU exits here; the device instead reads 0).
        case backendStartup
        /// A saved state was refused by validation.
        case invalidState
        /// The backend refused the saved blobs.
        case backendState
    }
    public var code: Code
    public var message: String
    public var backendError: BackendError?
    public var stateError: TISStateError?

    public var description: String { "\(code.rawValue): \(message)" }
}

/// A TIS device: `TISCore` behind a lock, a `BackendRunner`, the IRQ line and the PPI region.
/// Mirrors QEMU's `TPMStateISA` (hw/tpm/tpm_tis_isa.c) around hw/tpm/tpm_tis_common.c.
///
/// MMIO (`read`/`write`) may come from any thread and never waits for a command: tpmGo hands
/// the command to the runner, whose completion updates the device and then the IRQ line.
public final class TISDevice: Sendable {
    public let runner: BackendRunner
    public let ppi: PPIRegion
    private let core: Mutex<TISCore>
    private let irqLine: (any TISInterruptLine)?
    private let eventSink: (any TISEventSink)?
    private struct IRQSequence { var generation: UInt64 = 0; var applied: UInt64 = 0 }
    private let irqOrder = Mutex(IRQSequence())
    /// Bumped on every IRQ level change inside the core lock (ordering of line updates).
    private let irqGeneration = Atomic<UInt64>(0)
    /// Commands decided under the lock and not yet handed to the runner.
    private let pendingDeliveries = Atomic<Int>(0)
    /// Whether events are collected (an event sink was given).
    private let tracing: Bool

    /// Creates the device and resets it (QEMU realize + first machine reset). A backend that
    /// fails to start leaves the device in QEMU's startup-error mode (all reads 0, writes
    /// ignored) and the error is thrown; use `init(runner:...)` + `reset()` to keep the device.
    public convenience init(backend: any TPMBackend, mode: ExecutionMode = .worker,
                            configuration: TISConfiguration = .qemu72,
                            irq: (any TISInterruptLine)? = nil, events: (any TISEventSink)? = nil,
                            incoming: Bool = false) throws(TISDeviceError) {
        self.init(runner: BackendRunner(backend: backend, mode: mode), configuration: configuration, irq: irq, events: events)
        try reset(incoming: incoming)
    }

    /// Creates the device without resetting it; call `reset()` before use.
    public init(runner: BackendRunner, configuration: TISConfiguration = .qemu72,
                irq: (any TISInterruptLine)? = nil, events: (any TISEventSink)? = nil) {
        self.runner = runner
        self.irqLine = irq
        self.eventSink = events
        self.ppi = PPIRegion()
        self.tracing = events != nil
        self.configuration = configuration
        var c = TISCore(version: runner.backend.tpmVersion, bufferSize: TISGeometry.bufferSize, configuration: configuration)
        c.tracing = events != nil
        self.core = Mutex(c)
    }

    public var backend: any TPMBackend { runner.backend }

    // MARK: Reset

    /// QEMU `tpm_tis_reset`: version and buffer size from the backend, PPI reset, wait for an
    /// in-flight command, registers to their reset values, start the TPM. `incoming` is QEMU's
    /// INMIGRATE reset: the TPM is not INIT'ed, `restore(_:)` follows.
    public func reset(incoming: Bool = false) throws(TISDeviceError) {
        let backend = runner.backend
        let version = backend.tpmVersion
        let size = min(backend.bufferSize(), TISGeometry.bufferSize)
        if configuration.ppiEnabled { ppi.reset() }
        runner.reset()
        core.withLock { c in
            c.reset(version: version, bufferSize: size)
            c.hadStartupError = false
        }
        do {
            try runner.startup(bufferSize: size, incoming: incoming)
        } catch {
            core.withLock { $0.hadStartupError = true }
            throw TISDeviceError(code: .backendStartup, message: "the TPM backend failed to start: \(error)", backendError: error)
        }
        if !incoming { refreshEstablishedFlag() }
    }

    private func refreshEstablishedFlag() {
        // QEMU asks the backend on every ACCESS read (the emulator caches the answer); the flag
        // only changes through the hash sequence or a reset, so it is read here, off the MMIO path.
        // A failure reads as "not established" (QEMU's tpm_emulator_get_tpm_established_flag
        // returns false); the host hears of it through the runner's error handler.
        let flag: Bool
        do { flag = try runner.backend.establishedFlag() } catch {
            runner.onError?(error)
            flag = false
        }
        core.withLock { $0.establishedFlag = flag }
    }

    // MARK: MMIO

    /// One read as QEMU's memory core hands it to `tpm_tis_mmio_read`: `offset` within the
    /// 0x5000-byte region, `size` 1, 2 or 4. Other widths and offsets outside the region are
    /// rejected (0xFFFFFFFF) and reported. The result is truncated to `size`.
    public func read(offset: UInt64, size: Int) -> UInt32 {
        guard offset < TISGeometry.regionSize, size == 1 || size == 2 || size == 4 else {
            report([.invalidAccess(offset: offset, size: size, isWrite: false)])
            return 0xFFFF_FFFF
        }
        var irqHigh = false
        var generation: UInt64 = 0
        let value: UInt32
        if tracing {
            var events: [TISEvent] = []
            value = core.withLock { c -> UInt32 in
                let before = c.irqLevel
                let v = c.read(offset: UInt16(truncatingIfNeeded: offset), size: size)
                if c.irqLevel != before { irqHigh = c.irqLevel; generation = irqGeneration.add(1, ordering: .relaxed).newValue }
                events = c.takeEvents()
                return v
            }
            if !events.isEmpty { report(events) }
        } else {
            value = core.withLock { c -> UInt32 in
                let before = c.irqLevel
                let v = c.read(offset: UInt16(truncatingIfNeeded: offset), size: size)
                if c.irqLevel != before { irqHigh = c.irqLevel; generation = irqGeneration.add(1, ordering: .relaxed).newValue }
                return v
            }
        }
        if generation != 0 { applyIRQ((generation, irqHigh)) }
        return size == 4 ? value : value & (size == 1 ? 0xFF : 0xFFFF)
    }

    /// One write as QEMU's memory core hands it to `tpm_tis_mmio_write`.
    public func write(offset: UInt64, size: Int, value: UInt32) {
        guard offset < TISGeometry.regionSize, size == 1 || size == 2 || size == 4 else {
            report([.invalidAccess(offset: offset, size: size, isWrite: true)])
            return
        }
        var fx = TISEffects()
        var irqHigh = false
        var generation: UInt64 = 0
        if tracing {
            var events: [TISEvent] = []
            core.withLock { c in
                let before = c.irqLevel
                c.write(offset: UInt16(truncatingIfNeeded: offset), size: size, value: value, effects: &fx)
                if fx.deliver != nil { pendingDeliveries.add(1, ordering: .relaxed) }
                if c.irqLevel != before { irqHigh = c.irqLevel; generation = irqGeneration.add(1, ordering: .relaxed).newValue }
                events = c.takeEvents()
            }
            if !events.isEmpty { report(events) }
        } else {
            core.withLock { c in
                let before = c.irqLevel
                c.write(offset: UInt16(truncatingIfNeeded: offset), size: size, value: value, effects: &fx)
                if fx.deliver != nil { pendingDeliveries.add(1, ordering: .relaxed) }
                if c.irqLevel != before { irqHigh = c.irqLevel; generation = irqGeneration.add(1, ordering: .relaxed).newValue }
            }
        }
        if generation != 0 { applyIRQ((generation, irqHigh)) }
        if !fx.isEmpty { perform(fx) }
    }

    private func perform(_ fx: TISEffects) {
        if fx.cancel { runner.cancel() }
        if let l = fx.resetEstablished {
            // QEMU reports the failure (error_report) and the guest sees nothing else.
            do { try runner.backend.resetEstablishedFlag(locality: l) } catch { runner.onError?(error) }
            refreshEstablishedFlag()
        }
        if let cmd = fx.deliver {
            let accepted = runner.deliver(cmd) { [self] response, error in
                complete(response, failed: error != nil)
            }
            pendingDeliveries.subtract(1, ordering: .relaxed)
            if !accepted { report([.requestPending(locality: cmd.locality)]) }
        }
    }

    /// The runner's completion: `tpm_tis_request_completed` under the lock, then the IRQ line.
    private func complete(_ response: TPMBackendResponse, failed: Bool) {
        let (irq, events) = core.withLock { c -> ((UInt64, Bool)?, [TISEvent]) in
            let before = c.irqLevel
            c.requestCompleted(response: response.bytes, selftestDone: response.selftestDone, failed: failed)
            let irq = c.irqLevel != before ? (irqGeneration.add(1, ordering: .relaxed).newValue, c.irqLevel) : nil
            return (irq, c.takeEvents())
        }
        if let irq { applyIRQ(irq) }
        if !events.isEmpty { report(events) }
    }

    /// Applies IRQ level changes in the order the core made them, whichever thread gets here
    /// first.
    private func applyIRQ(_ change: (UInt64, Bool)) {
        guard let line = irqLine else { return }
        irqOrder.withLock { seq in
            guard change.0 > seq.applied else { return }
            seq.applied = change.0
            line.setLevel(change.1)
        }
    }

    private func report(_ events: [TISEvent]) {
        eventSink?.tisEvents(events)
    }

    // MARK: State

    /// The IRQ line level the device drives.
    public var irqLevel: Bool { core.withLock { $0.irqLevel } }

    /// QEMU `tpm_backend_finish_sync`: returns once no command is in flight.
    public func waitForCompletion() {
        runner.finishSync()
    }

    /// A copy of the migrated state as it is now (no wait).
    public var currentState: TISState { core.withLock { $0.state } }

    /// QEMU `tpm_tis_pre_save` + the `tpm-tis` section: waits for an in-flight command, then
    /// returns the state. Save cannot fail.
    public func save() -> TISState {
        runner.finishSync()
        return core.withLock { $0.state }
    }

    /// Saves the device and its backend together, as QEMU writes the `tpm-emulator` and
    /// `tpm-tis` sections: no command in flight, blobs from the running TPM. The guest should
    /// be paused (QEMU stops the vCPUs first); a tpmGo arriving meanwhile is waited for.
    public func saveWithBackend() throws(BackendError) -> (tis: TISState, blobs: TPMStateBlobs) {
        while true {
            runner.finishSync()
            let snapshot = try core.withLock { c throws(BackendError) -> (TISState, TPMStateBlobs)? in
                guard !runner.isBusy, pendingDeliveries.load(ordering: .relaxed) == 0 else { return nil }
                return (c.state, try runner.backend.saveState())
            }
            if let snapshot { return snapshot }
        }
    }

    /// Replaces the device state with a saved one after validating it (QEMU has no post_load
    /// for tpm-tis and trusts the stream; we do not). The IRQ line is driven to the level the
    /// restored INT_STATUS implies. On error nothing changes.
    public func restore(_ state: TISState) throws(TISDeviceError) {
        do {
            try state.validate()
        } catch {
            throw TISDeviceError(code: .invalidState, message: "saved TIS state refused: \(error)", stateError: error)
        }
        runner.finishSync()
        let (level, gen) = core.withLock { c -> (Bool, UInt64) in
            c.restore(state)
            return (c.irqLevel, irqGeneration.add(1, ordering: .relaxed).newValue)
        }
        applyIRQ((gen, level))
        refreshEstablishedFlag()
    }

    /// Restores the backend from blobs (QEMU `tpm_emulator_post_load`: SET_STATEBLOB, INIT), then
    /// the device (`restore(_:)`). The TIS state is validated first, so a bad device state
    /// leaves the backend untouched; a refused blob leaves the device untouched.
    public func restore(_ state: TISState, blobs: TPMStateBlobs) throws(TISDeviceError) {
        do {
            try state.validate()
        } catch {
            throw TISDeviceError(code: .invalidState, message: "saved TIS state refused: \(error)", stateError: error)
        }
        runner.finishSync()
        do {
            try runner.backend.restoreState(blobs)
        } catch {
            throw TISDeviceError(code: .backendState, message: "the backend refused the saved state: \(error)", backendError: error)
        }
        try restore(state)
    }

    /// The backend's buffer size as the device uses it (`be_buffer_size`).
    public var bufferSize: Int { core.withLock { $0.bufferSize } }
    public var tpmVersion: TPMVersion { core.withLock { $0.version } }
    /// The device's properties (fixed at creation).
    public let configuration: TISConfiguration
}

extension TISCore {
    mutating func takeEvents() -> [TISEvent] {
        guard tracing, !events.isEmpty else { return [] }
        defer { events.removeAll(keepingCapacity: true) }
        return events
    }
}
