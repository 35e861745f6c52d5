import EmulatorBackend
import Synchronization
import TIS
import TISDriver
import WireFormat

/// What the server counted; a snapshot is `TPMServer.statistics`.
public struct ServerStatistics: Sendable, Equatable {
    /// Connections accepted on any port.
    public var connectionsAccepted = 0
    /// Connections closed to make room for a new one (the longest idle without a request).
    public var connectionsEvicted = 0
    /// Connections closed at once because every slot held a request in progress.
    public var connectionsRefused = 0
    /// Connections closed after `idleTimeout` without a request.
    public var idleClosed = 0
    /// The most connections open at once.
    public var peakConnections = 0
    /// TPM commands carried through the TIS (any port).
    public var tpmCommands = 0
    /// Ctrl requests answered (any code).
    public var ctrlRequests = 0
    /// mssim platform signals answered.
    public var platformSignals = 0
    /// Commands refused before the TIS: size field below 10 or above the TIS buffer, unknown
    /// mssim codes, oversize ctrl requests.
    public var refusedRequests = 0
    /// Requests that stopped arriving (EOF or `commandTimeout`) before they were complete.
    public var truncatedRequests = 0
    /// TIS transfers the driver could not finish (the TIS was brought back to idle).
    public var driverErrors = 0
    /// The locality of the last CMD_SET_LOCALITY that was accepted.
    public var ctrlLocality: UInt8 = 0
    /// Commands the TIS handed to the backend, per locality (`TISEvent.commandSent`).
    public var tisCommandsByLocality: [Int] = [0, 0, 0, 0, 0]
    /// How often each locality became the TIS's active locality (`TISEvent.newActiveLocality`).
    public var tisActivations: [Int] = [0, 0, 0, 0, 0]

    /// All zero.
    public init() {}
}

/// Shared counters; the TIS event sink feeds the TIS columns.
final class StatisticsBox: TISEventSink, Sendable {
    let value = Mutex(ServerStatistics())

    func update(_ f: (inout ServerStatistics) -> Void) { value.withLock { f(&$0) } }

    func tisEvents(_ events: [TISEvent]) {
        value.withLock { s in
            for e in events {
                switch e {
                case .commandSent(let l, _) where l < 5: s.tisCommandsByLocality[Int(l)] += 1
                case .newActiveLocality(let l) where l < 5: s.tisActivations[Int(l)] += 1
                default: break
                }
            }
        }
    }
}

/// The answer to one framed request.
struct EngineReply: Sendable {
    var bytes: [UInt8]
    /// Close the connection after the reply (mssim session end, refused input).
    var close = false
    /// Stop the server after the reply is written (CMD_SHUTDOWN).
    var stopServer = false
}

/// The one place TPM access happens: every TPM command and every ctrl or platform operation
/// runs here, one at a time, on the server's engine thread, so the TIS and the backend see the
/// sequence swtpm's single-threaded main loop would give them. TPM commands go through the
/// register-level `TISDriver` over a `TISMachineBus` on the `TISDevice`, at the locality the
/// client chose (CMD_SET_LOCALITY, or the mssim prefix).
///
/// Only the engine thread calls `handle`; the stored state (`locality`, `running`) is confined
/// to it, hence `@unchecked Sendable`.
final class TPMEngine: @unchecked Sendable {
    let device: TISDevice
    let driver: TISDriver
    let stats: StatisticsBox
    let version: TPMVersion
    private var locality: UInt8 = 0
    /// False after CMD_STOP / CMD_SHUTDOWN / POWER_OFF or a failed INIT.
    private(set) var running = true
    /// Blobs received with CMD_SET_STATEBLOB while stopped; the next INIT resumes from them.
    private var pendingBlobs = TPMStateBlobs()

    init(device: TISDevice, stats: StatisticsBox, driverTimeout: Double) {
        self.device = device
        self.stats = stats
        self.version = device.tpmVersion
        self.driver = TISDriver(bus: TISMachineBus(device: device), timeout: driverTimeout)
        self.running = !device.runner.hadStartupError
    }

    var backend: any TPMBackend { device.backend }

    /// What GET_CAPABILITY reports: what `ctrl(_:)` implements.
    var capabilities: SwtpmCtrl.Capabilities {
        var c: SwtpmCtrl.Capabilities = [.initialize, .shutdown, .getTPMEstablished, .setLocality, .cancelTPMCommand,
                                         .stop, .getConfig, .setBufferSize, .getInfo, .getStateBlob, .setStateBlob]
        if backend is LibtpmsBackend || backend is SwtpmBackend { c.insert(.storeVolatile) }
        if version == .tpm20 { c.formUnion([.resetTPMEstablished, .sendCommandHeader]) }
        return c
    }

    func handle(_ frame: Frame) -> EngineReply {
        switch frame {
        case .tpmCommand(let bytes, let l, let mssim):
            let rsp = tpm(bytes, locality: l ?? locality)
            return EngineReply(bytes: mssim ? Self.mssimWrap(rsp) : rsp)
        case .ctrl(let bytes):
            stats.update { $0.ctrlRequests += 1 }
            return ctrl(bytes)
        case .platform(let code):
            stats.update { $0.platformSignals += 1 }
            return platform(code)
        case .mssimHandshake:
            var w = ByteWriter(capacity: 12)
            w.writeBigEndianUInt32(1)
            w.writeBigEndianUInt32(MssimCode.handshakeFlags)
            w.writeBigEndianUInt32(0)
            return EngineReply(bytes: w.bytes)
        case .mssimSessionEnd:
            return EngineReply(bytes: [], close: true)
        }
    }

    /// mssim TPM_SEND_COMMAND reply: be32 length, the response, be32 0.
    static func mssimWrap(_ rsp: [UInt8]) -> [UInt8] {
        var w = ByteWriter(capacity: rsp.count + 8)
        w.writeBigEndianUInt32(UInt32(rsp.count))
        w.writeBytes(rsp)
        w.writeBigEndianUInt32(0)
        return w.bytes
    }

    // MARK: TPM commands

    /// The TPM's "wrong command size" answer (TPM 2.0 TPM_RC_COMMAND_SIZE, TPM 1.2
    /// TPM_BAD_PARAM_SIZE): what swtpm's libtpms answers to a truncated command, and what
    /// `SwtpmBackend` answers to a command it will not send.
    var commandSizeError: [UInt8] {
        version == .tpm12 ? [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x19]
                          : [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x01, 0x42]
    }

    /// TPM_RC_LOCALITY / TPM_BAD_LOCALITY: for locality 4 (QEMU's TIS drops every locality-4
    /// write, so no command can be sent from it) and above.
    var localityError: [UInt8] {
        version == .tpm12 ? [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x3D]
                          : [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x09, 0x07]
    }

    /// One command through the TIS FIFO (`TISDriver.transmit`). A transfer the driver cannot
    /// finish gives QEMU's fatal-error response, after the device is brought back to idle
    /// (wait for the backend, commandReady, relinquish) so the next command starts clean.
    func tpm(_ command: [UInt8], locality l: UInt8) -> [UInt8] {
        guard l <= 3 else { return localityError }
        if device.runner.hadStartupError {
            // The TIS reads all zeros in this mode (QEMU): no transfer can complete.
            return TPMResponses.fatalError
        }
        do {
            let r = try driver.transmit(command, locality: l)
            stats.update { $0.tpmCommands += 1 }
            return r
        } catch {
            stats.update { $0.driverErrors += 1 }
            device.waitForCompletion()
            try? driver.writeStatus(l, .commandReady)
            try? driver.relinquish(l)
            return TPMResponses.fatalError
        }
    }

    /// TPM2_Startup(SU_CLEAR) / TPM_Startup(ST_CLEAR) through the TIS, as swtpm's
    /// `--flags startup-clear` sends it. Returns the response code.
    func startupClear() -> UInt32? {
        let cmd: [UInt8] = version == .tpm12
            ? [0x00, 0xC1, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x00, 0x99, 0x00, 0x01]
            : TPM2.startup()
        let r = tpm(cmd, locality: 0)
        guard r.count >= 10 else { return nil }
        return UInt32(r[6]) << 24 | UInt32(r[7]) << 16 | UInt32(r[8]) << 8 | UInt32(r[9])
    }

    // MARK: Ctrl channel

    private func result(_ rc: UInt32) -> EngineReply {
        EngineReply(bytes: SwtpmCtrl.ResultResponse(result: rc).encoded())
    }

    private static func rc(_ e: BackendError) -> UInt32 {
        if let r = e.tpmResult, r != 0 { return r }
        return SwtpmCtrl.Result.fail
    }

    /// swtpm's `ctrlchannel_process_fd` over this device: the subset of `CMD_*` a TCP client
    /// (tcti-swtpm, swtpm_ioctl --tcp) uses. Requests the TPM must be running for answer
    /// TPM_BAD_ORDINAL (0x0A) after STOP, as swtpm does; a short body answers
    /// TPM_BAD_PARAMETER (0x03); unimplemented codes answer TPM_BAD_ORDINAL.
    func ctrl(_ bytes: [UInt8]) -> EngineReply {
        let request: SwtpmCtrl.AnyRequest
        do {
            request = try SwtpmCtrl.AnyRequest.decode(bytes)
        } catch {
            return result(error.code == .truncated && bytes.count < 4 ? SwtpmCtrl.Result.badOrdinal : SwtpmCtrl.Result.badParameter)
        }
        switch request {
        case .getCapability:
            return EngineReply(bytes: SwtpmCtrl.CapabilityResponse(capabilities: capabilities).encoded())
        case .initialize:
            return result(initialize())
        case .shutdown:
            stopTPM()
            return EngineReply(bytes: SwtpmCtrl.ResultResponse(result: 0).encoded(), close: true, stopServer: true)
        case .stop:
            stopTPM()
            return result(0)
        case .getTPMEstablished:
            guard running else { return result(SwtpmCtrl.Result.badOrdinal) }
            do {
                let flag = try backend.establishedFlag()
                return EngineReply(bytes: SwtpmCtrl.EstablishedResponse(bit: flag ? 1 : 0).encoded())
            } catch {
                return result(Self.rc(error))
            }
        case .setLocality(let r):
            // Locality 4 is refused like swtpm's `--locality reject-locality-4`: QEMU's TIS drops
            // every locality-4 write, so nothing could be sent from it.
            guard r.locality <= 3 else { return result(SwtpmCtrl.Result.badLocality) }
            locality = r.locality
            stats.update { $0.ctrlLocality = r.locality }
            return result(0)
        case .cancelTPMCommand:
            guard running else { return result(SwtpmCtrl.Result.badOrdinal) }
            device.runner.cancel()
            return result(0)
        case .resetTPMEstablished(let r):
            guard running else { return result(SwtpmCtrl.Result.badOrdinal) }
            guard r.locality <= 4 else { return result(SwtpmCtrl.Result.badLocality) }
            do {
                try backend.resetEstablishedFlag(locality: r.locality)
                return result(0)
            } catch {
                return result(Self.rc(error))
            }
        case .getStateBlob(let r):
            guard running else { return result(SwtpmCtrl.Result.badOrdinal) }
            do {
                let blob = try device.saveWithBackend().blobs[r.type]
                if blob.data.isEmpty {
                    return EngineReply(bytes: SwtpmCtrl.GetStateBlobResponse(result: SwtpmCtrl.Result.nonFatal, data: []).encoded())
                }
                guard Int(r.offset) <= blob.data.count else { return result(SwtpmCtrl.Result.badParameter) }
                let flags = SwtpmCtrl.StateFlags(rawValue: blob.flags)
                return EngineReply(bytes: SwtpmCtrl.GetStateBlobResponse(stateFlags: flags, data: Array(blob.data[Int(r.offset)...])).encoded())
            } catch {
                return result(Self.rc(error))
            }
        case .getConfig:
            return EngineReply(bytes: SwtpmCtrl.GetConfigResponse(flags: []).encoded())
        case .setBufferSize(let r):
            let limits = bufferLimits()
            // A size may only be set while stopped (swtpm: TPM_BAD_ORDINAL while running); the
            // size chosen is always the TIS buffer's, fixed at the device's reset.
            guard r.size == 0 || !running else { return result(SwtpmCtrl.Result.badOrdinal) }
            return EngineReply(bytes: SwtpmCtrl.SetBufferSizeResponse(bufferSize: UInt32(limits.current),
                                                                       minimumSize: UInt32(limits.minimum),
                                                                       maximumSize: UInt32(limits.maximum)).encoded())
        case .getInfo(let r):
            let text = Array(info(r.flags).utf8) + [0]
            guard Int(r.offset) < text.count - 1 || (r.offset == 0 && text.count == 1) else {
                return result(SwtpmCtrl.Result.badParameter)
            }
            let chunk = Array(text[Int(r.offset)...].prefix(SwtpmCtrl.getInfoChunkLimit))
            return EngineReply(bytes: SwtpmCtrl.GetInfoResponse(totalLength: UInt32(text.count), chunk: chunk).encoded())
        case .storeVolatile:
            guard running else { return result(SwtpmCtrl.Result.badOrdinal) }
            do {
                try storeVolatile()
                return result(0)
            } catch {
                return result(Self.rc(error))
            }
        case .setStateBlob(let r):
            // As swtpm: only while stopped; the next INIT resumes from the blobs (QEMU's
            // incoming migration: STOP, SET permanent / volatile / savestate, INIT).
            guard !running else { return result(SwtpmCtrl.Result.badOrdinal) }
            pendingBlobs[r.type] = TPMStateBlob(flags: r.flags.rawValue, data: r.data)
            return result(0)
        case .hashStart, .hashData, .hashEnd, .setDataFD, .lockStorage, .unknown:
            return result(SwtpmCtrl.Result.badOrdinal)
        }
    }

    /// CMD_INIT: QEMU's machine reset of the TIS (`tpm_tis_reset`), which starts the backend
    /// (swtpm: STOP, SET_BUFFERSIZE, INIT; libtpms: TPMLIB_MainInit from the state directory).
    ///
    /// After CMD_SET_STATEBLOB the TIS is reset without starting the TPM, and the TPM resumes
    /// from the blobs instead (`TISDevice.restore(_:blobs:)`: QEMU's `tpm_emulator_post_load`).
    /// A refused blob set leaves the TPM stopped and answers TPM_FAIL; the blobs are dropped
    /// either way, as libtpms drops its cached blobs.
    func initialize() -> UInt32 {
        let blobs = pendingBlobs
        pendingBlobs = TPMStateBlobs()
        do {
            if blobs == TPMStateBlobs() {
                try device.reset()
            } else {
                try device.reset(incoming: true)
                try device.restore(device.currentState, blobs: blobs)
            }
            running = true
            return 0
        } catch {
            running = false
            return SwtpmCtrl.Result.fail
        }
    }

    /// CMD_STOP: the TPM stops (swtpm: STOP; libtpms: TPMLIB_Terminate); the TIS stays as it is.
    /// TPM commands then get the backend's not-running answer through the TIS.
    func stopTPM() {
        device.waitForCompletion()
        try? backend.startup(bufferSize: device.bufferSize, incoming: true)
        running = false
    }

    /// CMD_STORE_VOLATILE: the volatile state written next to the permanent one (libtpms:
    /// `storeVolatile()`; swtpm: the same ctrl command).
    private func storeVolatile() throws(BackendError) {
        device.waitForCompletion()
        if let l = backend as? LibtpmsBackend {
            try l.storeVolatile()
        } else if let s = backend as? SwtpmBackend {
            try s.ctrl.storeVolatile()
        } else {
            throw BackendError(.unsupported, "the backend cannot store its volatile state")
        }
    }

    private func bufferLimits() -> (current: Int, minimum: Int, maximum: Int) {
        if let l = backend as? LibtpmsBackend {
            let b = l.bufferSizeLimits()
            return (min(b.current, device.bufferSize), b.minimum, min(b.maximum, TISGeometry.bufferSize))
        }
        if let s = backend as? SwtpmBackend, let r = try? s.ctrl.setBufferSize(0) {
            return (min(Int(r.bufferSize), device.bufferSize), Int(r.minimumSize), min(Int(r.maximumSize), TISGeometry.bufferSize))
        }
        return (device.bufferSize, device.bufferSize, device.bufferSize)
    }

    private func info(_ flags: SwtpmCtrl.InfoFlags) -> String {
        if let l = backend as? LibtpmsBackend {
            return l.info(flags: UInt32(truncatingIfNeeded: flags.rawValue))
        }
        if let s = backend as? SwtpmBackend, let text = try? s.ctrl.info(flags) {
            return text
        }
        return "{}"
    }

    // MARK: mssim platform port

    /// The mssim platform signals mapped onto the device (peers §2.4): POWER_ON starts a
    /// stopped TPM (a no-op when it runs, as the reference simulator's `_rpc__Signal_PowerOn`),
    /// RESET / RESTART reset the TIS and restart the TPM, POWER_OFF stops it, CANCEL_ON cancels;
    /// NV, physical presence and key cache signals are acknowledged. Unknown codes answer 1
    /// and close, as the simulator does.
    func platform(_ code: UInt32) -> EngineReply {
        switch code {
        case MssimCode.powerOn:
            return EngineReply(bytes: [0, 0, 0, running ? 0 : (initialize() == 0 ? 0 : 1)])
        case MssimCode.powerOff:
            stopTPM()
        case MssimCode.reset, MssimCode.restart:
            return EngineReply(bytes: [0, 0, 0, initialize() == 0 ? 0 : 1])
        case MssimCode.cancelOn:
            device.runner.cancel()
        case MssimCode.cancelOff, MssimCode.nvOn, MssimCode.nvOff, MssimCode.physicalPresenceOn,
             MssimCode.physicalPresenceOff, MssimCode.keyCacheOn, MssimCode.keyCacheOff:
            break
        case MssimCode.sessionEnd, MssimCode.stop:
            return EngineReply(bytes: [], close: true)
        default:
            return EngineReply(bytes: [0, 0, 0, 1], close: true)
        }
        return EngineReply(bytes: [0, 0, 0, 0])
    }
}
