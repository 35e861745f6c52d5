import EmulatorBackend
import Testing
import TISConformance

/// Regression: `LibtpmsBackend.validateState` left libtpms' globals holding the validated
/// state, so the next fresh TPM in the process answered TPM2_PCR_Read with no digest (the
/// whole suite failed about one run in two, in whichever libtpms test came next).
@Suite struct LibtpmsValidateStateTests {
    @Test func aFreshTPMAfterValidationIsFresh() async throws {
        try await LibtpmsTestLock.run {
            let (perm, vol): ([UInt8], [UInt8]) = try {
                let b = try LibtpmsBackend()
                defer { b.shutdown() }
                try b.start()
                _ = try b.execute(TPMBackendCommand(locality: 0, bytes: TPM2.startup(), maxResponseSize: 4096))
                return (try b.plainState(.permanent), try b.plainState(.volatile))
            }()
            for blobs in [[(TPMStateBlobType.permanent, perm)], [(.permanent, perm), (.volatile, vol)]] {
                try? LibtpmsBackend.validateState(blobs: blobs, version: .tpm20)
                let b = try LibtpmsBackend()
                defer { b.shutdown() }
                try b.start()
                let startup = try b.execute(TPMBackendCommand(locality: 0, bytes: TPM2.startup(), maxResponseSize: 4096))
                #expect(TPM2.responseCode(startup.bytes) == 0)
                let pcr = try b.execute(TPMBackendCommand(locality: 0, bytes: TPM2.pcrReadSHA256(pcr: 16), maxResponseSize: 4096))
                #expect(try TPM2.pcrDigest(pcr.bytes) == [UInt8](repeating: 0, count: 32))
                #expect(try b.plainState(.permanent) != perm)
            }
        }
    }
}
