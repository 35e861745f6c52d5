import Dispatch
import EmulatorBackend
import Foundation
import Synchronization
import TIS
import TISDriver
import Testing
import VMState

// Fault injection against the real swtpm 0.7.1, seen from both sides: the guest drives a
// TISDevice (.worker mode) through TISDriver and must see QEMU's behaviour (the fatal-error
// response `00 C4 00 00 00 0A 00 00 00 09`, the command completing, never a hang); the host
// gets a typed error; the source of a migration keeps its TPM. SwtpmTests/SwtpmLiveTests
// covers the same faults at the runner level; these add the guest's view, the cut reply, the
// refused and interrupted migration and the truncated stream.

@Suite("swtpm faults seen by the guest and the host")
struct SwtpmFaultTests {
    /// swtpm dies while the guest's command is in flight.
    @Test func killedMidCommand() throws {
        let tpm = try LiveSwtpm("kill")
        let g = try Guest(backend: try tpm.backend())
        #expect(rc(try g.transmit(TPM2.startup())) == 0)
        tpm.stop()                                          // the next command surely is in flight
        let process = tpm.process
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.3) { process.kill() }
        var response: [UInt8] = []
        let t = try elapsed { response = try g.transmit(TPM2.getRandom(16)) }
        #expect(response == fatalResponse)
        #expect(t < 10)                                     // no hang (bounds are loose: shared machine)
        g.runner.finishSync()                               // returns: nothing left in flight
        #expect(!g.runner.isBusy)
        #expect(g.hostErrors.last?.code == .connectionClosed)
        #expect(g.hostErrors.last?.operation == "TPM command 0x0000017b")
        // The dead TPM keeps answering the guest at once, with the same response.
        let t2 = try elapsed { response = try g.driver.transmit(TPM2.pcrReadSHA256(pcr: 16), locality: 2, relinquish: false) }
        #expect(response == fatalResponse)
        #expect(t2 < 5)
        #expect(try g.completedCleanly(locality: 2))
    }

    /// swtpm stops answering (SIGSTOP): after the data timeout the guest gets the fatal
    /// response; once swtpm runs again a reconnected backend finds its TPM intact.
    @Test func stalledSwtpmThenReconnect() throws {
        let tpm = try LiveSwtpm("stall")
        let g = try Guest(backend: try tpm.backend(dataTimeout: 0.5))
        #expect(rc(try g.transmit(TPM2.startup())) == 0)
        try g.extend16(Crypto.sha256([1]))
        let pcr = try g.pcr16()
        tpm.stop()
        var response: [UInt8] = []
        let t = try elapsed { response = try g.transmit(TPM2.getRandom(8)) }
        #expect(response == fatalResponse)
        #expect(t >= 0.45 && t < 10)
        #expect(g.hostErrors.last?.code == .timeout)
        tpm.resume()
        // The channel is out of step: refused at once, never a late reply taken for a new one.
        #expect(try g.transmit(TPM2.getRandom(8)) == fatalResponse)
        #expect(g.hostErrors.last?.code == .connectionClosed)
        // The TPM itself is fine: a new backend attached to the running swtpm reads PCR 16.
        g.releaseCtrl()                                      // swtpm serves one ctrl client at a time
        let again = try Guest(backend: try tpm.backend(), start: .attach)
        #expect(try again.pcr16() == pcr)
    }

    /// The connection closes after part of a reply (a proxy cuts it): inside the header,
    /// right after it, inside the body.
    @Test(arguments: [1, 6, 10, 14])
    func replyCutShort(after bytes: Int) throws {
        let tpm = try LiveSwtpm("cut\(bytes)", dataSocket: true)
        let upstream = try #require(tpm.process.options.dataSocketPath)
        let proxy = try CuttingProxy(path: tpm.dir.path + "/proxy.sock", upstream: upstream)
        var config = SwtpmBackend.Configuration(ctrl: tpm.process.ctrlEndpoint, data: .unix(path: proxy.path))
        config.dataTimeout = 2
        let g = try Guest(backend: try SwtpmBackend(config))
        #expect(rc(try g.transmit(TPM2.startup())) == 0)
        try g.extend16(Crypto.sha256([2]))
        let pcr = try g.pcr16()
        proxy.arm(cutAfter: bytes)
        var response: [UInt8] = []
        let t = try elapsed { response = try g.transmit(TPM2.getRandom(32)) }
        #expect(proxy.cuts == 1)
        #expect(response == fatalResponse)
        #expect(t < 10)
        #expect(g.hostErrors.last?.code == .connectionClosed)
        #expect(try g.transmit(TPM2.getRandom(8)) == fatalResponse)
        // swtpm never saw a failure: a direct connection reads the same PCR 16.
        g.releaseCtrl()
        var direct = SwtpmBackend.Configuration(ctrl: tpm.process.ctrlEndpoint, data: .unix(path: upstream))
        direct.dataTimeout = 2
        let again = try Guest(backend: try SwtpmBackend(direct), start: .attach)
        #expect(try again.pcr16() == pcr)
    }

    enum Corruption: String, CaseIterable {
        /// swtpm's blob header is damaged: refused by swtpm (TPM_BAD_PARAMETER).
        case permanentHeader
        /// the libtpms state inside is damaged: refused by libtpms.
        case volatileBody
    }

    /// The destination refuses SET_STATEBLOB: the host gets a typed error naming the blob, the
    /// destination device keeps its reset state, its guest gets an error response (never a
    /// hang), and the source keeps its TPM and migrates again fine.
    @Test(arguments: Corruption.allCases)
    func destinationRefusesTheBlob(_ corruption: Corruption) throws {
        let src = try LiveSwtpm("refuse-src")
        let source = try Guest(backend: try src.backend())
        let content = try TPMContent.provision(source)
        let (tis, blobs) = try source.device.saveWithBackend()
        var bad = blobs
        switch corruption {
        case .permanentHeader: bad.permanent.data[9] ^= 0x01                         // totlen
        case .volatileBody: bad.volatile.data[bad.volatile.data.count / 2] ^= 0xFF
        }
        let dst = try LiveSwtpm("refuse-dst")
        let destination = try Guest(backend: try dst.backend(), start: .incoming)
        let fresh = destination.device.currentState
        do {
            try destination.device.restore(tis, blobs: bad)
            Issue.record("a corrupt blob was accepted")
        } catch {
            #expect(error.code == .backendState)
            #expect(error.backendError?.code == .ctrlCommandFailed)
            #expect(error.backendError?.operation == "CMD_SET_STATEBLOB")
            #expect(error.backendError?.blobType == (corruption == .permanentHeader ? .permanent : .volatile))
            #expect(error.backendError?.tpmResult != nil)
        }
        #expect(destination.device.currentState == fresh)
        // A guest on the failed destination gets an answer, not a hang (QEMU would have exited).
        let r = try destination.transmit(TPM2.getRandom(8))
        #expect(rc(r) != 0)
        // The source still has its TPM, and a second migration works.
        #expect(try TPMContent.read(source) == content)
        let (tis2, blobs2) = try source.device.saveWithBackend()
        let dst2 = try LiveSwtpm("refuse-dst2")
        let destination2 = try Guest(backend: try dst2.backend(), start: .incoming)
        try destination2.device.restore(tis2, blobs: blobs2)
        #expect(try TPMContent.read(destination2) == content)
    }

    /// The destination's swtpm dies while the blobs are being set.
    @Test func destinationDiesDuringMigration() throws {
        let src = try LiveSwtpm("die-src")
        let source = try Guest(backend: try src.backend())
        let content = try TPMContent.provision(source)
        let (tis, blobs) = try source.device.saveWithBackend()
        let dst = try LiveSwtpm("die-dst")
        let destination = try Guest(backend: try dst.backend(), start: .incoming)
        dst.stop()
        let process = dst.process
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.3) { process.kill() }
        var thrown: TISDeviceError?
        let t = elapsed {
            do throws(TISDeviceError) { try destination.device.restore(tis, blobs: blobs) } catch { thrown = error }
        }
        #expect(t < 10)
        let e = try #require(thrown)
        #expect(e.code == .backendState)
        #expect(e.backendError?.code == .connectionClosed)
        #expect(e.backendError?.operation?.hasPrefix("CMD_") == true)
        // The destination's guest gets QEMU's fatal response.
        #expect(try destination.transmit(TPM2.getRandom(8)) == fatalResponse)
        // The source keeps its TPM; a second destination gets it.
        #expect(try TPMContent.read(source) == content)
        let dst2 = try LiveSwtpm("die-dst2")
        let destination2 = try Guest(backend: try dst2.backend(), start: .incoming)
        let (tis2, blobs2) = try source.device.saveWithBackend()
        try destination2.device.restore(tis2, blobs: blobs2)
        #expect(try TPMContent.read(destination2) == content)
    }

    /// The destination's swtpm is killed at an exact point of the restore: as the permanent
    /// blob's SET_STATEBLOB arrives, as the volatile one arrives (the permanent one already
    /// set), or as the final INIT arrives. A proxy on the ctrl channel sees each command.
    @Test(arguments: [(0x0D as UInt32, 1), (0x0D, 2), (0x02, 1)])
    func destinationKilledAtAnExactStep(command: UInt32, occurrence: Int) throws {
        let src = try LiveSwtpm("step-src")
        let source = try Guest(backend: try src.backend())
        let content = try TPMContent.provision(source)
        let (tis, blobs) = try source.device.saveWithBackend()
        let dst = try LiveSwtpm("step-dst", dataSocket: true)
        let process = dst.process
        let seen = Mutex(0)
        let killing = Mutex(false)
        let proxy = try CuttingProxy(path: dst.dir.path + "/ctrl-proxy.sock", upstream: dst.process.ctrlSocketPath) { chunk in
            guard chunk.count >= 4 else { return }
            let code = UInt32(chunk[0]) << 24 | UInt32(chunk[1]) << 16 | UInt32(chunk[2]) << 8 | UInt32(chunk[3])
            guard code == command, killing.withLock({ $0 }) else { return }
            if seen.withLock({ $0 += 1; return $0 }) == occurrence { process.kill() }
        }
        var config = SwtpmBackend.Configuration(ctrl: .unix(path: proxy.path), data: .unix(path: try #require(dst.process.options.dataSocketPath)))
        config.ctrlTimeout = 2
        let destination = try Guest(backend: try SwtpmBackend(config), start: .incoming)
        killing.withLock { $0 = true }
        do {
            try destination.device.restore(tis, blobs: blobs)
            Issue.record("restore succeeded into a killed swtpm")
        } catch {
            #expect(error.code == .backendState)
            #expect(error.backendError?.code == .connectionClosed)
            #expect(error.backendError?.operation == (command == 0x0D ? "CMD_SET_STATEBLOB" : "CMD_INIT"))
        }
        #expect(!dst.process.isRunning)
        #expect(try destination.transmit(TPM2.getRandom(8)) == fatalResponse)
        #expect(try TPMContent.read(source) == content)
    }

    /// A migration stream cut anywhere before its EOF byte is refused with a typed error; the
    /// whole stream carries the TPM to a new swtpm.
    @Test func truncatedStreamIsRefused() throws {
        let src = try LiveSwtpm("trunc-src")
        let source = try Guest(backend: try src.backend())
        let content = try TPMContent.provision(source)
        let (tis, blobs) = try source.device.saveWithBackend()
        var noTrailer = TPMMigrationState.StreamOptions()
        noTrailer.includeVMDescription = false
        let stream = try TPMMigrationState(machineType: "pc-i440fx-7.2", tis: tis, emulatorBlobs: blobs).encodedStream(noTrailer)
        var codes: Set<String> = []
        let cuts = Array(stride(from: 0, to: stream.count - 1, by: max(1, stream.count / 300))) + [stream.count - 1]
        for cut in cuts {
            do {
                _ = try TPMMigrationState(source: .bytes(Array(stream.prefix(cut))))
                Issue.record("a stream cut at \(cut) of \(stream.count) was accepted")
            } catch {
                codes.insert(error.code.rawValue)
            }
        }
        #expect(codes.contains(StreamError.Code.truncated.rawValue))
        // The whole stream, through a file as a VMM would hand it over.
        let path = src.dir.path + "/stream.bin"
        try Data(stream).write(to: URL(fileURLWithPath: path))
        let m = try TPMMigrationState(source: .path(path))
        let dst = try LiveSwtpm("trunc-dst")
        let destination = try Guest(backend: try dst.backend(), start: .incoming)
        try destination.device.restore(try #require(m.tis), blobs: try #require(m.emulatorBlobs))
        #expect(try TPMContent.read(destination) == content)
        #expect(try TPMContent.read(source) == content)
    }
}

/// Blob headers a hostile stream can carry (swtpm's `blobheader`: version, min_version,
/// hdrsize, flags, totlen). swtpm 0.7.1 dies with SIGSEGV on a version other than 1 or 2
/// (`SWTPM_NVRAM_GetDecryptedData` has no default case); the library refuses those before
/// sending, and whatever swtpm refuses comes back as a typed error. The destination swtpm
/// must survive every one of them.
@Suite("hostile blob headers against swtpm 0.7.1")
struct HostileBlobHeaderTests {
    enum Header: String, CaseIterable {
        case version0, version3, versionFD, minVersion3, hdrsizeZero, hdrsizeHuge, totlenShort, eightBytes, nineBytes
        /// What swtpm 0.7.1 answers to the headers it checks itself.
        var swtpmResult: UInt32? {
            switch self {
            case .minVersion3: 0x2E            // TPM_BAD_VERSION
            case .hdrsizeZero, .hdrsizeHuge: 0x2B   // TPM_BAD_DATASIZE
            case .totlenShort: 0x03            // TPM_BAD_PARAMETER
            default: nil
            }
        }
        func apply(_ b: [UInt8]) -> [UInt8] {
            var b = b
            switch self {
            case .version0: b[0] = 0
            case .version3: b[0] = 3
            case .versionFD: b[0] = 0xFD
            case .minVersion3: b[1] = 3
            case .hdrsizeZero: b[2] = 0; b[3] = 0
            case .hdrsizeHuge: b[2] = 0xFF; b[3] = 0xFF
            case .totlenShort: b[9] &-= 1
            case .eightBytes: b = Array(b.prefix(8))
            case .nineBytes: b = Array(b.prefix(9))
            }
            return b
        }
    }

    @Test(arguments: Header.allCases)
    func destinationSurvives(_ header: Header) throws {
        let src = try LiveSwtpm("hdr-src")
        let source = try Guest(backend: try src.backend())
        #expect(rc(try source.transmit(TPM2.startup())) == 0)
        let (tis, blobs) = try source.device.saveWithBackend()
        var bad = blobs
        bad.permanent.data = header.apply(blobs.permanent.data)
        let dst = try LiveSwtpm("hdr-dst")
        let destination = try Guest(backend: try dst.backend(), start: .incoming)
        do {
            try destination.device.restore(tis, blobs: bad)
            Issue.record("\(header) accepted")
        } catch {
            #expect(error.code == .backendState)
            #expect(error.backendError?.blobType == .permanent)
            // Refused here (nothing sent: the TPM keeps running) or by swtpm with its result.
            let e = try #require(error.backendError)
            switch header {
            case .version0, .version3, .versionFD, .eightBytes, .nineBytes:
                #expect(e.code == .stateBlob)
            default:
                #expect(e.code == .ctrlCommandFailed)
                #expect(e.tpmResult == header.swtpmResult)
            }
        }
        usleep(100_000)
        #expect(dst.process.isRunning, "swtpm died: status \(String(describing: dst.process.exitStatus))")
        // The destination still takes the good blobs.
        if dst.process.isRunning {
            try destination.device.restore(tis, blobs: blobs)
            #expect(rc(try destination.transmit(TPM2.getRandom(8))) == 0)
        }
    }
}
