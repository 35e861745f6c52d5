import Dispatch
import EmulatorBackend
import Foundation
import QEMUHarness
import Synchronization
import TIS
import TISDriver
import Testing
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// QEMU `tpm_util_write_fatal_error_response`: what the guest reads when the backend died.
let fatalResponse: [UInt8] = [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x09]

func rc(_ r: [UInt8]) -> UInt32 { TPM2.responseCode(r) ?? 0xFFFF_FFFF }

/// Collects the errors a runner reports to the host (`BackendRunner.onError`).
final class HostErrors: @unchecked Sendable {
    private let errors = Mutex<[BackendError]>([])
    func record(_ e: BackendError) { errors.withLock { $0.append(e) } }
    var all: [BackendError] { errors.withLock { $0 } }
    var last: BackendError? { all.last }
}

/// A guest on a TIS device over any backend: the device in `.worker` mode (QEMU's thread pool),
/// the guest-side driver through the machine bus, host errors collected.
final class Guest {
    let runner: BackendRunner
    let device: TISDevice
    let driver: TISDriver
    let hostErrors = HostErrors()

    /// `reset`: QEMU's machine reset (starts the TPM); `incoming`: the INMIGRATE reset;
    /// neither: attach to a TPM that is already running (a reconnect).
    enum Start { case reset, incoming, attach }

    init(backend: any TPMBackend, start: Start = .reset, timeout: Double = 30) throws {
        let errors = hostErrors
        runner = BackendRunner(backend: backend, mode: .worker, onError: { errors.record($0) })
        device = TISDevice(runner: runner)
        switch start {
        case .reset: try device.reset()
        case .incoming: try device.reset(incoming: true)
        case .attach: break
        }
        driver = TISDriver(bus: TISMachineBus(device: device), timeout: timeout)
    }

    func transmit(_ cmd: [UInt8], locality: UInt8 = 0) throws -> [UInt8] { try driver.transmit(cmd, locality: locality) }

    /// STS of the still-active `locality` after a command: no dataAvail left, not expecting,
    /// no command in flight: the command completed and its response was read in full.
    func completedCleanly(locality: UInt8 = 0) throws -> Bool {
        // The guest has the response once dataAvail shows; the runner's completion handler may
        // still be returning on its worker thread (it takes new requests first): wait for it.
        runner.finishSync()
        let sts = try driver.status(locality)
        return sts != 0xFFFF_FFFF && sts & (TISStatus.expect.rawValue | TISStatus.dataAvailable.rawValue) == 0 && !runner.isBusy
    }

    /// Closes a swtpm backend's ctrl connection (swtpm serves one ctrl client at a time), so
    /// another backend can attach to the same swtpm.
    func releaseCtrl() {
        (runner.backend as? SwtpmBackend)?.ctrl.close()
    }

    func pcr16() throws -> [UInt8] {
        let r = try transmit(TPM2.pcrReadSHA256(pcr: 16))
        guard rc(r) == 0 else { throw BackendError(.protocolViolation, "PCR_Read rc 0x\(String(rc(r), radix: 16))") }
        return try TPM2.pcrDigest(r)
    }

    func extend16(_ digest: [UInt8]) throws {
        let r = try transmit(TPM2.pcrExtendSHA256(pcr: 16, digest: digest))
        guard rc(r) == 0 else { throw BackendError(.protocolViolation, "PCR_Extend rc 0x\(String(rc(r), radix: 16))") }
    }
}

/// A real swtpm 0.7.1 in a fresh /tmp directory, killed and removed on deinit.
final class LiveSwtpm: @unchecked Sendable {
    let dir: WorkDirectory
    let process: SwtpmProcess

    init(_ tag: String, dataSocket: Bool = false) throws {
        dir = try WorkDirectory(prefix: "hardening-\(tag)")
        var o = SwtpmProcess.Options(stateDirectory: dir.path)
        if dataSocket { o.dataSocketPath = dir.path + "/data.sock" }
        process = try SwtpmProcess.launch(o)
    }

    deinit {
        kill(process.pid, SIGCONT)
        process.terminate(timeout: 1)
        dir.remove()
    }

    func backend(dataTimeout: Double = 5, ctrlTimeout: Double = 5) throws -> SwtpmBackend {
        try SwtpmBackend(process: process, dataTimeout: dataTimeout, ctrlTimeout: ctrlTimeout)
    }

    func stop() { kill(process.pid, SIGSTOP) }
    func resume() { kill(process.pid, SIGCONT) }
}

func elapsed(_ body: () throws -> Void) rethrows -> Double {
    let t0 = monotonicSeconds()
    try body()
    return monotonicSeconds() - t0
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Runs `body` on a thread of its own (a blocked call there must not starve the test pool).
func startThread(_ body: @escaping @Sendable () -> Void) {
    Thread { body() }.start()
}

// MARK: TPM 2.0 commands the durability tests need (TPM 2.0 Part 3)

enum TPM2Extra {
    /// A password session with an empty password (TPMS_AUTH_COMMAND).
    static func passwordSession(_ w: inout ByteWriter) {
        w.writeBigEndianUInt32(9)
        w.writeBigEndianUInt32(TPM2.rsPW)
        w.writeBigEndianUInt16(0); w.writeUInt8(0); w.writeBigEndianUInt16(0)
    }

    /// TPM2_CreatePrimary of an ECC P-256 restricted decryption key under the owner hierarchy
    /// (fast, unlike RSA prime generation). The handle comes back at offset 10.
    static func createPrimaryECC() -> [UInt8] {
        var w = ByteWriter(capacity: 80)
        w.writeBigEndianUInt16(TPM2.tagSessions)
        let size = w.reserveBigEndianUInt32()
        w.writeBigEndianUInt32(0x131)                 // TPM_CC_CreatePrimary
        w.writeBigEndianUInt32(TPM2.rhOwner)
        passwordSession(&w)
        w.writeBigEndianUInt16(4); w.writeBigEndianUInt16(0); w.writeBigEndianUInt16(0)   // inSensitive
        var p = ByteWriter(capacity: 32)
        p.writeBigEndianUInt16(0x0023)                // TPM_ALG_ECC
        p.writeBigEndianUInt16(TPM2.algSHA256)
        p.writeBigEndianUInt32(0x0003_0072)           // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt
        p.writeBigEndianUInt16(0)                     // authPolicy
        p.writeBigEndianUInt16(0x0006); p.writeBigEndianUInt16(128); p.writeBigEndianUInt16(0x0043)   // AES-128-CFB
        p.writeBigEndianUInt16(0x0010)                // scheme NULL
        p.writeBigEndianUInt16(0x0003)                // TPM_ECC_NIST_P256
        p.writeBigEndianUInt16(0x0010)                // kdf NULL
        p.writeBigEndianUInt16(0); p.writeBigEndianUInt16(0)   // unique x, y
        w.writeBigEndianUInt16(UInt16(p.count))
        w.writeBytes(p.bytes)
        w.writeBigEndianUInt16(0)                     // outsideInfo
        w.writeBigEndianUInt32(0)                     // creationPCR
        w.patchBigEndianUInt32(at: size, UInt32(w.count))
        return w.bytes
    }

    /// TPM2_EvictControl(owner, object, persistentHandle).
    static func evictControl(object: UInt32, persistent: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 40)
        w.writeBigEndianUInt16(TPM2.tagSessions)
        let size = w.reserveBigEndianUInt32()
        w.writeBigEndianUInt32(0x120)                 // TPM_CC_EvictControl
        w.writeBigEndianUInt32(TPM2.rhOwner)
        w.writeBigEndianUInt32(object)
        passwordSession(&w)
        w.writeBigEndianUInt32(persistent)
        w.patchBigEndianUInt32(at: size, UInt32(w.count))
        return w.bytes
    }

    /// TPM2_ReadPublic(handle): rc 0 and the public area if the object exists.
    static func readPublic(_ handle: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 14)
        w.writeBigEndianUInt16(TPM2.tagNoSessions)
        w.writeBigEndianUInt32(14)
        w.writeBigEndianUInt32(0x173)                 // TPM_CC_ReadPublic
        w.writeBigEndianUInt32(handle)
        return w.bytes
    }

    /// TPM2_FlushContext(handle).
    static func flushContext(_ handle: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 14)
        w.writeBigEndianUInt16(TPM2.tagNoSessions)
        w.writeBigEndianUInt32(14)
        w.writeBigEndianUInt32(0x165)
        w.writeBigEndianUInt32(handle)
        return w.bytes
    }

    static func handle(_ response: [UInt8]) -> UInt32? {
        guard response.count >= 14 else { return nil }
        return UInt32(response[10]) << 24 | UInt32(response[11]) << 16 | UInt32(response[12]) << 8 | UInt32(response[13])
    }
}

/// A TPM's content the durability tests track: PCR 16 (within a boot), an NV index, a
/// persistent key.
struct TPMContent: Equatable {
    static let nvIndex: UInt32 = 0x0150_0016
    static let persistentHandle: UInt32 = 0x8100_0016
    var pcr16: [UInt8]
    var nv: [UInt8]
    var persistentPublic: [UInt8]

    /// Startup, extend PCR 16, define and write the NV index, create and persist a key.
    static func provision(_ g: Guest) throws -> TPMContent {
        #expect(rc(try g.transmit(TPM2.startup())) == 0)
        try g.extend16(Crypto.sha256(Array("provision".utf8)))
        #expect(rc(try g.transmit(TPM2.nvDefineSpace(index: nvIndex, size: 32))) == 0)
        let data = Crypto.sha256(Array("nv".utf8))
        #expect(rc(try g.transmit(TPM2.nvWrite(index: nvIndex, data: data))) == 0)
        let primary = try g.transmit(TPM2Extra.createPrimaryECC())
        try #require(rc(primary) == 0, "CreatePrimary rc 0x\(String(rc(primary), radix: 16))")
        let h = try #require(TPM2Extra.handle(primary))
        let evict = try g.transmit(TPM2Extra.evictControl(object: h, persistent: persistentHandle))
        try #require(rc(evict) == 0, "EvictControl rc 0x\(String(rc(evict), radix: 16))")
        _ = try g.transmit(TPM2Extra.flushContext(h))
        return try read(g)
    }

    static func read(_ g: Guest) throws -> TPMContent {
        let nvr = try g.transmit(TPM2.nvRead(index: nvIndex, size: 32))
        try #require(rc(nvr) == 0, "NV_Read rc 0x\(String(rc(nvr), radix: 16))")
        let pub = try g.transmit(TPM2Extra.readPublic(persistentHandle))
        try #require(rc(pub) == 0, "ReadPublic rc 0x\(String(rc(pub), radix: 16))")
        return TPMContent(pcr16: try g.pcr16(), nv: try TPM2.nvReadData(nvr), persistentPublic: Array(pub.dropFirst(10)))
    }
}
