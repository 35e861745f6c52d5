import Dispatch
import Testing
#if canImport(Glibc)
import Glibc
#endif
import WireFormat
@testable import EmulatorBackend

// Tests against the real swtpm 0.7.1 (and libtpms 0.9.2), each started by the test through
// SwtpmProcess in a temporary directory under /tmp. A missing swtpm fails them (launch throws).

/// A launched swtpm with its temporary directory; terminated and removed on deinit.
final class LiveSwtpm: @unchecked Sendable {
    let dir: TempDir
    let process: SwtpmProcess
    init(_ tag: String, version: TPMVersion = .tpm20, configure: (inout SwtpmProcess.Options) throws -> Void = { _ in }) throws {
        dir = try TempDir(tag)
        var o = SwtpmProcess.Options(stateDirectory: dir.path)
        o.version = version
        try configure(&o)
        process = try SwtpmProcess.launch(o)
    }
    deinit { process.terminate(timeout: 1) }

    /// A backend attached to it, started as QEMU does at machine reset.
    func startedBackend(dataTimeout: Double = 5, mode: ExecutionMode = .inline) throws -> (SwtpmBackend, BackendRunner) {
        let be = try SwtpmBackend(process: process, dataTimeout: dataTimeout)
        let runner = BackendRunner(backend: be, mode: mode)
        try runner.startup(bufferSize: be.bufferSize())
        return (be, runner)
    }
}

/// Delivers a command through the runner and waits for its completion.
@discardableResult
func run(_ runner: BackendRunner, _ bytes: [UInt8], locality: UInt8 = 0, maxResponseSize: Int = 4096) throws -> [UInt8] {
    let box = ResultBox()
    let ok = runner.deliver(TPMBackendCommand(locality: locality, bytes: bytes, maxResponseSize: maxResponseSize)) { resp, err in
        box.set(resp.bytes, err)
    }
    #expect(ok)
    runner.finishSync()
    if let e = box.error { throw e }
    return box.bytes
}

func rc(_ r: [UInt8]) -> UInt32 { TPM2.responseCode(r) ?? 0xFFFF_FFFF }

/// TPM2_CreatePrimary of an RSA-2048 storage key under the owner hierarchy (a command that
/// takes libtpms a while: prime generation).
func createPrimaryRSA2048() -> [UInt8] {
    var w = ByteWriter(capacity: 64)
    w.writeBigEndianUInt16(TPM2.tagSessions)
    let size = w.reserveBigEndianUInt32()
    w.writeBigEndianUInt32(0x131)            // TPM_CC_CreatePrimary
    w.writeBigEndianUInt32(TPM2.rhOwner)
    w.writeBigEndianUInt32(9); w.writeBigEndianUInt32(TPM2.rsPW); w.writeBigEndianUInt16(0); w.writeUInt8(0); w.writeBigEndianUInt16(0)
    w.writeBigEndianUInt16(4); w.writeBigEndianUInt16(0); w.writeBigEndianUInt16(0)   // inSensitive
    w.writeBigEndianUInt16(26)               // TPM2B_PUBLIC
    w.writeBigEndianUInt16(0x0001)           // TPM_ALG_RSA
    w.writeBigEndianUInt16(TPM2.algSHA256)
    w.writeBigEndianUInt32(0x0003_0072)      // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt
    w.writeBigEndianUInt16(0)                // authPolicy
    w.writeBigEndianUInt16(0x0006); w.writeBigEndianUInt16(128); w.writeBigEndianUInt16(0x0043)   // AES-128-CFB
    w.writeBigEndianUInt16(0x0010)           // scheme NULL
    w.writeBigEndianUInt16(2048); w.writeBigEndianUInt32(0)
    w.writeBigEndianUInt16(0)                // unique
    w.writeBigEndianUInt16(0)                // outsideInfo
    w.writeBigEndianUInt32(0)                // creationPCR
    w.patchBigEndianUInt32(at: size, UInt32(w.count))
    return w.bytes
}

@Suite("swtpm 0.7.1, live")
struct SwtpmLiveTests {
    // MARK: Every ctrl command

    @Test func everyCtrlCommandAgainstSwtpm() throws {
        let tpm = try LiveSwtpm("ctrl")
        let c = try SwtpmCtrlClient(connectingTo: tpm.process.ctrlEndpoint, timeout: 5)
        #expect(try c.capabilities().rawValue == 0xFFFF)                     // swtpm 0.7.1, TPM 2
        #expect(try c.configuration() == [])
        #expect(try c.info(.tpmSpecification) == #"{"TPMSpecification":{"family":"2.0","level":0,"revision":164}}"#)
        #expect(try c.info([.tpmSpecification, .tpmAttributes, .tpmFeatures, .runtimeAlgorithms]).contains(#""TPMFeatures":{"RSAKeySizes""#))
        let q = try c.setBufferSize(0)
        #expect((q.bufferSize, q.minimumSize, q.maximumSize) == (4096, 2808, 4096))
        // "Needs running" commands before CMD_INIT: TPM_BAD_ORDINAL, 4-byte reply.
        for body: () throws -> Void in [{ _ = try c.isEstablished() }, { _ = try c.stateBlob(.permanent) }, { try c.hashStart() }] {
            do { try body(); Issue.record("expected 0xA") } catch let e as BackendError { #expect(e.tpmResult == 0x0A) }
        }
        try c.initialize()
        #expect(try c.isEstablished() == false)
        for loc: UInt8 in 0...4 { try c.setLocality(loc) }
        do { try c.setLocality(5); Issue.record("locality 5 accepted") } catch { #expect(error.tpmResult == 0x3D) }
        try c.hash(Array("H-CRTM".utf8))                                      // HASH_START/DATA/END
        #expect(try c.isEstablished() == true)
        try c.resetEstablished(locality: 3)
        #expect(try c.isEstablished() == false)
        try c.cancelTPMCommand()
        try c.storeVolatile()
        #expect(fileExists(tpm.dir.path + "/tpm2-00.volatilestate"))
        let perm = try c.stateBlob(.permanent)
        let vol = try c.stateBlob(.volatile)
        #expect(try c.stateBlob(.savestate).data.isEmpty)                     // TPM 2: TPM_RETRY -> empty
        #expect(try SwtpmBlob.decode(perm.data).flags == .migrationData)
        #expect(try SwtpmBlob.decode(vol.data).plainState()?.prefix(6) == [0x00, 0x04, 0x45, 0x63, 0x78, 0x89])
        do { try c.setBufferSize(3000); Issue.record("SET_BUFFERSIZE while running") } catch { #expect(error.tpmResult == 0x0A) }
        try c.stop()
        #expect(try c.setBufferSize(3000).bufferSize == 3000)
        try c.setStateBlob(.permanent, perm)
        try c.setStateBlob(.volatile, vol)
        try c.initialize(flags: .deleteVolatile)
        do { try c.lockStorage(retries: 1); Issue.record("LOCK_STORAGE on 0.7.1") } catch { #expect(error.tpmResult == 0x0A) }
        let (mine, theirs) = try SwtpmSocket.pair(labels: ("a", "b"))
        try c.setDataFD(theirs.rawValue)
        do { try c.setDataFD(theirs.rawValue); Issue.record("second SET_DATAFD") } catch { #expect(error.tpmResult == 0x1F) }
        theirs.close(); mine.close()
        try c.shutdownTPM()                                                     // swtpm exits
        let deadline = monotonicNow() + 3
        while tpm.process.isRunning && monotonicNow() < deadline { usleep(2000) }
        #expect(!tpm.process.isRunning)
        #expect(tpm.process.exitStatus.map(SwtpmProcess.describe) == "exit status 0")
    }

    @Test func configFlagsReportKeys() throws {
        let tpm = try LiveSwtpm("keys") { o in
            let pw = o.stateDirectory + "/pw"
            let fd = open(pw, O_WRONLY | O_CREAT, 0o600)
            _ = write(fd, "secret", 6)
            close(fd)
            o.key = "pwdfile=\(pw)"
            o.migrationKey = "pwdfile=\(pw)"
        }
        let c = try SwtpmCtrlClient(connectingTo: tpm.process.ctrlEndpoint)
        #expect(try c.configuration() == [.fileKey, .migrationKey])
    }

    // MARK: QEMU's sequences, as swtpm logs them

    /// The ctrl commands swtpm received, in order (its level-20 log).
    static func ctrlLog(_ path: String) throws -> [UInt32] {
        let text = String(decoding: try readWholeFile(path), as: UTF8.self)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        var codes: [UInt32] = []
        for (i, l) in lines.enumerated() where l.contains("Ctrl Cmd:") && i + 1 < lines.count {
            let hex = lines[i + 1].split(separator: " ").prefix(4).joined()
            if let v = UInt32(hex, radix: 16) { codes.append(v) }
        }
        return codes
    }

    @Test func creationResetCommandsAndShutdownFollowQEMU() throws {
        let tpm = try LiveSwtpm("seq") { o in
            o.logFile = o.stateDirectory + "/log"
            o.logLevel = 20
        }
        let (be, runner) = try tpm.startedBackend()
        #expect(be.tpmVersion == .tpm20 && be.supportsMigration)
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        try run(runner, TPM2.getRandom(4))
        try run(runner, TPM2.getRandom(4), locality: 3)
        try run(runner, TPM2.getRandom(4), locality: 3)
        #expect(be.lastCommandLocality == 3)
        be.shutdown()
        let deadline = monotonicNow() + 3
        while tpm.process.isRunning && monotonicNow() < deadline { usleep(2000) }
        // SwtpmProcess.launch's readiness probe (GET_CAPABILITY on its own connection), then
        // QEMU's sequence (runs-on-this-machine.md §1): SET_DATAFD, GET_CAPABILITY, STOP,
        // SET_BUFFERSIZE(0), STOP, SET_BUFFERSIZE(4096), INIT(0); SET_LOCALITY only when the
        // locality changes; SHUTDOWN.
        #expect(try Self.ctrlLog(tpm.dir.path + "/log") == [0x01, 0x10, 0x01, 0x0E, 0x11, 0x0E, 0x11, 0x02, 0x05, 0x05, 0x03])
        let log = String(decoding: try readWholeFile(tpm.dir.path + "/log"), as: UTF8.self)
        #expect(log.contains("80 01 00 00 00 0A 00 00 01 81"))                // the version probe
        #expect(log.contains("00 00 00 11 00 00 10 00"))                       // SET_BUFFERSIZE(4096)
        #expect(log.contains("00 00 00 05 03 00 00 00"))                       // SET_LOCALITY(3)
        #expect(!tpm.process.isRunning)
        expectBackendError(.notRunning) { _ = try be.execute(TPMBackendCommand(locality: 0, bytes: TPM2.getRandom(1), maxResponseSize: 4096)) }
    }

    // MARK: TPM 2 commands through BackendRunner, over every transport

    enum Transport: String, CaseIterable, Sendable { case setDataFD, unixServer, tcp }

    @Test("Startup, GetRandom, PCR_Extend, PCR_Read", arguments: Transport.allCases)
    func tpm2Commands(_ transport: Transport) throws {
        let tpm = try LiveSwtpm("tx-\(transport.rawValue)") { o in
            switch transport {
            case .setDataFD: break
            case .unixServer: o.dataSocketPath = o.stateDirectory + "/data.sock"
            case .tcp:
                o.tcpDataPort = try freeTCPPort()
                o.tcpCtrlPort = try freeTCPPort()
            }
        }
        switch transport {
        case .setDataFD: #expect(tpm.process.dataEndpoint == nil)
        case .unixServer: #expect(tpm.process.dataEndpoint == .unix(path: tpm.dir.path + "/data.sock"))
        case .tcp: #expect(tpm.process.arguments.contains { $0.hasPrefix("type=tcp,port=") && $0.hasSuffix(",bindaddr=127.0.0.1") })
        }
        let (be, runner) = try tpm.startedBackend()
        defer { be.shutdown() }
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        let random = try TPM2.randomBytes(try run(runner, TPM2.getRandom(32)))
        #expect(random.count == 32 && random != [UInt8](repeating: 0, count: 32))
        let digest = Crypto.sha256(Array("measured".utf8))
        #expect(rc(try run(runner, TPM2.pcrExtendSHA256(pcr: 16, digest: digest))) == 0)
        let pcr = try TPM2.pcrDigest(try run(runner, TPM2.pcrReadSHA256(pcr: 16)))
        #expect(pcr == Crypto.pcrExtendSHA256([digest]))
    }

    // MARK: Locality, established flag, short and oversized traffic

    @Test func establishedFlagIsCachedAndResetUsesTheLastLocality() throws {
        let tpm = try LiveSwtpm("est")
        let (be, runner) = try tpm.startedBackend()
        defer { be.shutdown() }
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        #expect(try be.establishedFlag() == false)
        try be.ctrl.hash([1, 2, 3])                                           // sets the flag in the TPM
        #expect(try be.ctrl.isEstablished() == true)
        #expect(try be.establishedFlag() == false)                            // cached, as QEMU
        // The reset goes out from the locality of the last command (0): libtpms refuses below 3,
        // whatever locality the caller names. The cache survives the failure.
        try run(runner, TPM2.getRandom(1), locality: 0)
        expectBackendError(.ctrlCommandFailed, operation: "CMD_RESET_TPMESTABLISHED") { try be.resetEstablishedFlag(locality: 3) }
        #expect(try be.establishedFlag() == false)
        // After a command from locality 3 the same call succeeds and clears the cache.
        try run(runner, TPM2.getRandom(1), locality: 3)
        try be.resetEstablishedFlag(locality: 0)
        #expect(try be.ctrl.isEstablished() == false)
        try be.ctrl.hash([4])
        #expect(try be.establishedFlag() == true)                             // re-read after the reset
    }

    @Test func commandsShorterThanAHeaderAreAnsweredWithoutSwtpm() throws {
        let tpm = try LiveSwtpm("short") { o in
            o.logFile = o.stateDirectory + "/log"
            o.logLevel = 20
        }
        let (be, runner) = try tpm.startedBackend()
        defer { be.shutdown() }
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        for bytes in [[], [0x80], [0x80, 0x01, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x01]] as [[UInt8]] {
            let t = try elapsed { () throws -> Void in #expect(try run(runner, bytes) == [0x80, 0x01, 0, 0, 0, 0x0A, 0, 0, 0x01, 0x42]) }
            #expect(t < 0.5)
        }
        #expect(try run(runner, [UInt8](repeating: 0x80, count: 4097)) == be.localCommandSizeError)
        #expect(try run(runner, [0x80, 0x01], maxResponseSize: 6) == [0x80, 0x01, 0, 0, 0, 0x0A])
        #expect(rc(try run(runner, TPM2.getRandom(8))) == 0)                  // still in step
        // A header size that differs from the bytes sent (the TIS lets this through, as QEMU's
        // does) would make swtpm wait or desynchronise: answered locally too.
        var long = TPM2.getRandom(8) + [0, 0]
        #expect(try run(runner, long) == be.localCommandSizeError)
        long = Array(TPM2.getRandom(8).prefix(10)) + [0x00]
        #expect(try run(runner, long) == be.localCommandSizeError)
        #expect(rc(try run(runner, TPM2.getRandom(8))) == 0)                  // still in step
        let log = String(decoding: try readWholeFile(tpm.dir.path + "/log"), as: UTF8.self)
        #expect(!log.contains("SWTPM_IO_Read: length 1\n") && !log.contains("SWTPM_IO_Read: length 9\n"))
    }

    /// QEMU hazard §9.20: a response larger than the frontend's buffer is refused, not copied;
    /// the guest gets QEMU's fatal response, and the channel stays in step.
    @Test func responseLargerThanTheFrontendBufferIsRefused() throws {
        let tpm = try LiveSwtpm("big")
        let (be, runner) = try tpm.startedBackend()
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        let box = ResultBox()
        _ = runner.deliver(TPMBackendCommand(locality: 0, bytes: TPM2.getRandom(32), maxResponseSize: 20)) { r, e in box.set(r.bytes, e) }
        runner.finishSync()
        #expect(box.error?.code == .protocolViolation)
        #expect(box.bytes == TPMResponses.fatalError)                         // the guest sees QEMU's fatal response
        #expect(rc(try be.execute(TPMBackendCommand(locality: 0, bytes: TPM2.getRandom(1), maxResponseSize: 4096)).bytes) == 0)
        be.shutdown()
    }

    // MARK: State blobs

    @Test func stateBlobRoundTripKeepsPCR16AndNVIndex() throws {
        let nvIndex: UInt32 = 0x0150_0016
        let digest = Crypto.sha256(Array("pcr16".utf8))
        let nvData: [UInt8] = Array("persisted across migration".utf8)
        let source = try LiveSwtpm("src")
        let (srcBackend, src) = try source.startedBackend()
        #expect(rc(try run(src, TPM2.startup())) == 0)
        #expect(rc(try run(src, TPM2.pcrExtendSHA256(pcr: 16, digest: digest))) == 0)
        #expect(rc(try run(src, TPM2.nvDefineSpace(index: nvIndex, size: UInt16(nvData.count)))) == 0)
        #expect(rc(try run(src, TPM2.nvWrite(index: nvIndex, data: nvData))) == 0)
        let pcrBefore = try TPM2.pcrDigest(try run(src, TPM2.pcrReadSHA256(pcr: 16)))
        src.finishSync()
        let blobs = try srcBackend.saveState()
        #expect(!blobs.permanent.data.isEmpty && !blobs.volatile.data.isEmpty && blobs.savestate.data.isEmpty)
        #expect(blobs.permanent.flags == 0)
        // The source keeps running after a save (QEMU sends no STOP).
        #expect(rc(try run(src, TPM2.getRandom(4))) == 0)

        // Destination: a fresh swtpm on an empty directory, INMIGRATE startup, then post_load.
        let dest = try LiveSwtpm("dst")
        let dstBackend = try SwtpmBackend(process: dest.process)
        let dst = BackendRunner(backend: dstBackend, mode: .inline)
        try dst.startup(bufferSize: dstBackend.bufferSize(), incoming: true)
        try dstBackend.restoreState(blobs)
        #expect(try TPM2.pcrDigest(try run(dst, TPM2.pcrReadSHA256(pcr: 16))) == pcrBefore)
        #expect(try TPM2.nvReadData(try run(dst, TPM2.nvRead(index: nvIndex, size: UInt16(nvData.count)))) == nvData)
        #expect(rc(try run(dst, TPM2.startup())) == 0x100)                    // already initialised
        #expect(try dstBackend.vmResumed() == false)                          // no LOCK_STORAGE cap on 0.7.1
        expectBackendError(.unsupported, operation: "CMD_LOCK_STORAGE") { try dstBackend.lockStorage(retries: 1) }
        srcBackend.shutdown()
        dstBackend.shutdown()
    }

    @Test func refusedBlobIsATypedErrorNamingTheBlob() throws {
        let tpm = try LiveSwtpm("refuse")
        let (be, _) = try tpm.startedBackend()
        defer { be.shutdown() }
        var blobs = try be.saveState()
        blobs.volatile.data[blobs.volatile.data.count / 2] ^= 0xFF        // corrupt the libtpms state
        blobs.permanent.data = Array(blobs.permanent.data.prefix(40))       // totlen no longer matches
        do {
            try be.restoreState(blobs)
            Issue.record("corrupt blobs accepted")
        } catch {
            #expect(error.code == .ctrlCommandFailed)
            #expect(error.operation == "CMD_SET_STATEBLOB")
            #expect(error.blobType == .permanent)
            #expect(error.tpmResult == 0x03)                                  // TPM_BAD_PARAMETER: header
        }
    }

    // MARK: A dying or stalled swtpm

    /// swtpm is killed while a TPM2_CreatePrimary(RSA-2048) is in flight: the guest gets QEMU's
    /// fatal response with a typed error in bounded time, and a new swtpm + backend work.
    @Test func swtpmKilledMidCommand() throws {
        let tpm = try LiveSwtpm("kill")
        let (be, runner) = try tpm.startedBackend(mode: .worker)
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        kill(tpm.process.pid, SIGSTOP)             // deterministic: the command is surely in flight
        let box = ResultBox()
        let done = DispatchSemaphore(value: 0)
        #expect(runner.deliver(TPMBackendCommand(locality: 0, bytes: createPrimaryRSA2048(), maxResponseSize: 4096)) { r, e in
            box.set(r.bytes, e)
            done.signal()
        })
        usleep(50_000)
        #expect(runner.isBusy)
        let t0 = monotonicNow()
        tpm.process.kill()
        #expect(done.wait(timeout: .now() + 3) == .success)
        let took = monotonicNow() - t0
        runner.finishSync()
        #expect(took < 1)
        #expect(box.bytes == TPMResponses.fatalError)
        #expect(box.error?.code == .connectionClosed)
        #expect(box.error?.operation == "TPM command 0x00000131")
        // Later commands fail fast with typed errors too.
        let t = try elapsed {
            _ = try? run(runner, TPM2.getRandom(1), locality: 2)
            expectBackendError(.connectionClosed) { _ = try be.saveState() }
        }
        #expect(t < 1)

        // Replace: a new swtpm and a new backend.
        let fresh = try LiveSwtpm("kill-new")
        let (be2, runner2) = try fresh.startedBackend()
        defer { be2.shutdown() }
        #expect(rc(try run(runner2, TPM2.startup())) == 0)
        #expect(rc(try run(runner2, createPrimaryRSA2048())) == 0)
    }

    @Test func swtpmKilledWhileIdleThenExecute() throws {
        let tpm = try LiveSwtpm("killidle")
        let (_, runner) = try tpm.startedBackend()
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        tpm.process.kill()
        let box = ResultBox()
        let t = elapsed {
            _ = runner.deliver(TPMBackendCommand(locality: 0, bytes: TPM2.getRandom(8), maxResponseSize: 4096)) { r, e in box.set(r.bytes, e) }
            runner.finishSync()
        }
        #expect(t < 1)
        #expect(box.bytes == TPMResponses.fatalError)
        #expect(box.error?.code == .connectionClosed)
    }

    @Test func stalledSwtpmTimesOutWithinTheDataTimeout() throws {
        let tpm = try LiveSwtpm("stall")
        let (be, runner) = try tpm.startedBackend(dataTimeout: 0.5)
        #expect(be.configuration.dataTimeout == 0.5)
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        kill(tpm.process.pid, SIGSTOP)
        defer { tpm.process.kill() }
        let box = ResultBox()
        let t = elapsed {
            _ = runner.deliver(TPMBackendCommand(locality: 0, bytes: TPM2.getRandom(8), maxResponseSize: 4096)) { r, e in box.set(r.bytes, e) }
            runner.finishSync()
        }
        #expect(t >= 0.49 && t < 1.5)
        #expect(box.error?.code == .timeout)
        #expect(box.error?.operation == "TPM command 0x0000017b")
        #expect(box.bytes == TPMResponses.fatalError)
    }

    /// cancelCommand goes over the ctrl channel while execute blocks on the data channel: no
    /// shared lock, no deadlock; swtpm (single-threaded) answers the cancel once it is free.
    @Test func cancelWhileExecuteBlocks() throws {
        let tpm = try LiveSwtpm("cancel")
        let (be, runner) = try tpm.startedBackend(mode: .worker)
        defer { be.shutdown() }
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        kill(tpm.process.pid, SIGSTOP)
        let box = ResultBox()
        let done = DispatchSemaphore(value: 0)
        _ = runner.deliver(TPMBackendCommand(locality: 0, bytes: createPrimaryRSA2048(), maxResponseSize: 4096)) { r, e in
            box.set(r.bytes, e)
            done.signal()
        }
        usleep(20_000)
        let cancelled = DispatchSemaphore(value: 0)
        startThread {
            runner.cancel()
            cancelled.signal()
        }
        usleep(50_000)
        #expect(runner.isBusy)
        kill(tpm.process.pid, SIGCONT)
        #expect(done.wait(timeout: .now() + 5) == .success)
        #expect(cancelled.wait(timeout: .now() + 5) == .success)
        runner.finishSync()
        #expect(box.error == nil)
        #expect(box.bytes.count >= 10)
        #expect(rc(try run(runner, TPM2.getRandom(4))) == 0)                   // both channels in step
    }

    // MARK: Cost

    /// Generous bounds (the suite runs tests in parallel on 2 cores): a ctrl round trip and a
    /// data round trip well under a millisecond on average, a whole state round trip (3×
    /// GET_STATEBLOB, STOP, 2× SET_STATEBLOB, INIT) under 20 ms. Release-build numbers on this
    /// machine are in the commit history; these only catch a regression by orders of magnitude.
    @Test func roundTripCost() throws {
        let tpm = try LiveSwtpm("cost")
        let (be, runner) = try tpm.startedBackend()
        defer { be.shutdown() }
        #expect(rc(try run(runner, TPM2.startup())) == 0)
        let ctrl = try elapsed { for _ in 0..<200 { _ = try be.ctrl.capabilities() } } / 200
        let cmd = TPMBackendCommand(locality: 0, bytes: TPM2.getRandom(32), maxResponseSize: 4096)
        let data = try elapsed { for _ in 0..<200 { _ = try be.execute(cmd) } } / 200
        let state = try elapsed { for _ in 0..<10 { try be.restoreState(try be.saveState()) } } / 10
        #expect(ctrl < 0.002, "ctrl \(ctrl)")
        #expect(data < 0.002, "data \(data)")
        #expect(state < 0.02, "state \(state)")
        #expect(rc(try run(runner, TPM2.getRandom(8))) == 0)
    }

    // MARK: TPM 1.2

    @Test func tpm12PersonalityProbeSelftestAndState() throws {
        let tpm = try LiveSwtpm("tpm12", version: .tpm12)
        #expect(!tpm.process.arguments.contains("--tpm2"))
        let (be, runner) = try tpm.startedBackend()
        defer { be.shutdown() }
        #expect(be.tpmVersion == .tpm12)
        #expect(be.capabilities.isSuperset(of: .qemuMinimumTPM12))
        let startup: [UInt8] = [0x00, 0xC1, 0, 0, 0, 0x0C, 0, 0, 0, 0x99, 0x00, 0x01]        // TPM_Startup(ST_CLEAR)
        #expect(try run(runner, startup) == [0x00, 0xC4, 0, 0, 0, 0x0A, 0, 0, 0, 0])
        let selftest: [UInt8] = [0x00, 0xC1, 0, 0, 0, 0x0A, 0, 0, 0, 0x53]                   // TPM_ContinueSelfTest
        let r = try be.execute(TPMBackendCommand(locality: 0, bytes: selftest, maxResponseSize: 4096))
        #expect(r.selftestDone)
        #expect(try be.execute(TPMBackendCommand(locality: 0, bytes: [0, 0xC1, 0], maxResponseSize: 4096)).bytes
                == [0x00, 0xC4, 0, 0, 0, 0x0A, 0, 0, 0, 0x19])
        try be.resetEstablishedFlag(locality: 0)                              // a no-op for 1.2, as in QEMU
        let blobs = try be.saveState()
        #expect(!blobs.permanent.data.isEmpty)
        try be.restoreState(blobs)
        #expect(try run(runner, startup).count == 10)
    }
}
