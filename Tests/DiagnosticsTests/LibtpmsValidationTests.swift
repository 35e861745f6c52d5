import EmulatorBackend
import TISConformance
import TPMDiagnostics
import Testing
import VMState

/// `LibtpmsBackend.validateState(blobs:version:)` and the process-wide libtpms.
@Suite("libtpms validation and the libtpms singleton")
struct LibtpmsValidationTests {
    @Test("refused while a LibtpmsBackend is live (LIBTPMS-BUSY), the live TPM unharmed; afterwards a backend starts fresh")
    func singleton() async throws {
        let p = try RealStreams.path(StreamSpec())
        let s = try StreamInspection.walk(.path(p), name: p)
        try await LibtpmsTestLock.run {
            let backend = try LibtpmsBackend(version: .tpm20)
            try backend.startup(bufferSize: 4096, incoming: false)
            let startup = try backend.execute(TPMBackendCommand(locality: 0, bytes: TPM2.startup(), maxResponseSize: 4096))
            #expect(TPM2.responseCode(startup.bytes) == 0)
            let before = try backend.saveState()

            let r = Troubleshooter.check(s, destination: DestinationOptions(tpmFamily: .tpm20))
            #expect(codes(r) == [.libtpmsBusy])
            #expect(r.exitStatus == 1)
            #expect(throws: BackendError.self) { try LibtpmsBackend.validateState(blobs: [], version: .tpm20) }
            // The live TPM still answers, with its own state.
            let rnd = try backend.execute(TPMBackendCommand(locality: 0, bytes: TPM2.getRandom(8), maxResponseSize: 4096))
            #expect(TPM2.responseCode(rnd.bytes) == 0)
            #expect(try backend.saveState().permanent == before.permanent)
            backend.shutdown()

            // Now libtpms is free: validation runs, and releases it again.
            let clean = Troubleshooter.check(s, destination: DestinationOptions(tpmFamily: .tpm20))
            #expect(clean.findings.isEmpty && clean.libtpmsResult == 0)
            let fresh = try LibtpmsBackend(version: .tpm20)
            defer { fresh.shutdown() }
            try fresh.startup(bufferSize: 4096, incoming: false)
            // A fresh TPM (not the validated state): TPM2_Startup is needed and succeeds.
            let again = try fresh.execute(TPMBackendCommand(locality: 0, bytes: TPM2.startup(), maxResponseSize: 4096))
            #expect(TPM2.responseCode(again.bytes) == 0)
            #expect(try fresh.saveState().permanent != s.emulatorBlobs?.permanent)
        }
    }
}
