import Foundation
import QEMUHarness
import Testing

/// TIS geometry as QEMU 7.2 maps it on pc and q35 (include/hw/acpi/tpm.h).
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

    /// The address of `register` in the page of `locality`.
    static func reg(_ locality: Int, _ register: UInt64) -> UInt64 {
        base + UInt64(locality) << 12 + register
    }

    // STS bits (TCG PC Client PTP, QEMU TPM_TIS_STS_*).
    static let stsValid: UInt32 = 0x80
    static let commandReady: UInt32 = 0x40
    static let tpmGo: UInt32 = 0x20
    static let dataAvail: UInt32 = 0x10
    static let expect: UInt32 = 0x08
    static let family20: UInt32 = 0x0400_0000

    /// STS as QEMU composes it: `sts | burst << 8`.
    static func sts(_ bits: UInt32, burst: Int) -> UInt32 { family20 | bits | UInt32(burst) << 8 }

    // ACCESS bits.
    static let requestUse: UInt8 = 0x02
    static let activeLocality: UInt8 = 0x20
}

/// TPM2_Startup(SU_CLEAR) and its answer, as seen on this machine (runs-on-this-machine.md §2).
let startupClear: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x01, 0x44, 0x00, 0x00]
let startupClearResponse: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x00]

/// `0x%0*x`, for failure messages that read like the reference.
func hex<T: BinaryInteger>(_ v: T, width: Int = 8) -> String {
    let s = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, width - s.count)) + s
}

/// Starts a machine for one test; the caller closes it with `defer { m.close() }`. Errors
/// raised while it runs carry QEMU's stderr; `diagnostics()` adds swtpm's output.
func startMachine(machine: QEMUMachineType = .pc, device: TPMInterface = .tis, incoming: String? = nil,
                  workDirectory: WorkDirectory? = nil) throws -> QEMUMachine {
    try QEMUMachine.start(machine: machine, device: device, incoming: incoming, workDirectory: workDirectory)
}

/// Polls STS of `locality` until `done` holds (QEMU completes commands on its own thread).
func pollSTS(_ bus: QTestBus, locality: Int = 0, timeout: Double = 3,
             until done: (UInt32) -> Bool) throws -> UInt32 {
    let start = Date()
    while true {
        let v = try bus.readl(TIS.reg(locality, TIS.sts))
        if done(v) { return v }
        if Date().timeIntervalSince(start) > timeout { return v }
        usleep(200)
    }
}

/// Whether a process id still names a live (or zombie) process.
func processExists(_ pid: Int32) -> Bool {
    kill(pid, 0) == 0 || errno != ESRCH
}

/// The parent of every QEMU suite. Serialized: each test starts its own QEMU and swtpm (and
/// is safe to run in parallel, with its own /tmp directory), but a dozen TCG QEMUs starting at
/// once on a 2-core machine starve the timing-sensitive tests of other targets.
@Suite("QEMU 7.2 oracle", .serialized)
enum QEMUSuite {}
