import EmulatorBackend
import Synchronization
import TIS
import TISConformance
import TISDriver

/// Records the IRQ line's level changes.
final class IRQRecorder: TISInterruptLine, @unchecked Sendable {
    private let levels = Mutex<[Bool]>([])
    func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    var history: [Bool] { levels.withLock { $0 } }
    var level: Bool { levels.withLock { $0.last ?? false } }
}

/// Collects TIS events.
final class EventRecorder: TISEventSink, @unchecked Sendable {
    private let events = Mutex<[TISEvent]>([])
    func tisEvents(_ e: [TISEvent]) { events.withLock { $0.append(contentsOf: e) } }
    var all: [TISEvent] { events.withLock { $0 } }
}

/// A device over a FakeBackend, inline execution (deterministic), with its bus and recorders.
struct Rig {
    let backend: FakeBackend
    let device: TISDevice
    let bus: TISMachineBus
    let irq = IRQRecorder()
    let events = EventRecorder()

    init(version: TPMVersion = .tpm20, bufferSize: Int = 4096, established: Bool = false,
         configuration: TISConfiguration = .qemu72, mode: ExecutionMode = .inline,
         responder: (@Sendable (TPMBackendCommand) -> [UInt8])? = nil) throws {
        backend = FakeBackend(version: version, bufferSize: bufferSize, established: established, responder: responder)
        let irq = self.irq
        let events = self.events
        device = try TISDevice(backend: backend, mode: mode, configuration: configuration, irq: irq, events: events)
        bus = TISMachineBus(device: device)
    }

    func reg(_ l: Int, _ r: UInt16) -> UInt64 { TISGeometry.baseAddress + UInt64(l) << 12 + UInt64(r) }
    func readb(_ l: Int, _ r: UInt16) throws -> UInt8 { try bus.readb(reg(l, r)) }
    func readw(_ l: Int, _ r: UInt16) throws -> UInt16 { try bus.readw(reg(l, r)) }
    func readl(_ l: Int, _ r: UInt16) throws -> UInt32 { try bus.readl(reg(l, r)) }
    func writeb(_ l: Int, _ r: UInt16, _ v: UInt8) throws { try bus.writeb(reg(l, r), v) }
    func writew(_ l: Int, _ r: UInt16, _ v: UInt16) throws { try bus.writew(reg(l, r), v) }
    func writel(_ l: Int, _ r: UInt16, _ v: UInt32) throws { try bus.writel(reg(l, r), v) }

    /// Locality `l` active and READY.
    func ready(_ l: Int = 0) throws {
        try writeb(l, TISRegister.accessOffset, TISAccess.requestUse.rawValue)
        try writel(l, TISRegister.stsOffset, TISStatus.commandReady.rawValue)
    }

    /// Writes `bytes` to the FIFO of `l` one byte at a time.
    func send(_ bytes: [UInt8], _ l: Int = 0) throws {
        for b in bytes { try writeb(l, TISRegister.dataFIFOOffset, b) }
    }

    func go(_ l: Int = 0) throws { try writeb(l, TISRegister.stsOffset, UInt8(TISStatus.tpmGo.rawValue)) }
}

let startupCommand: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x01, 0x44, 0x00, 0x00]
