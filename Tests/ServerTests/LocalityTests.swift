import EmulatorBackend
import Foundation
import Testing
import TPMServer

/// What one locality sequence gave: response codes and PCR 20 before and after.
struct LocalityOutcome: Equatable {
    var extendAtLocality2: UInt32?
    var extendAtLocality0: UInt32?
    var extendAtLocality3ViaPrefix: UInt32?
    var pcr20Before: [UInt8]
    var pcr20After: [UInt8]
}

/// The same sequence against any swtpm-protocol TPM: swtpm_ioctl sets the locality on the
/// ctrl port (the real tool's CMD_SET_LOCALITY), then PCR_Extend(20) — which the PC Client
/// profile allows from localities 1–3 only — on the data port; then locality 0 again; then a
/// command with the mssim prefix naming locality 3.
func localitySequence(dataPort: Int, ctrlPort: Int, digest: [UInt8]) throws -> LocalityOutcome {
    let ctrl = "127.0.0.1:\(ctrlPort)"
    _ = try RawClient.command(port: dataPort, TPM2.startup())
    let before = try pcrValue(port: dataPort, 20)

    let set2 = try runTool(["swtpm_ioctl", "--tcp", ctrl, "-l", "2"])
    #expect(set2.status == 0, "\(set2)")
    let rc2 = TPM2.responseCode(try RawClient.command(port: dataPort, TPM2.pcrExtendSHA256(pcr: 20, digest: digest)))

    let set0 = try runTool(["swtpm_ioctl", "--tcp", ctrl, "-l", "0"])
    #expect(set0.status == 0, "\(set0)")
    let rc0 = TPM2.responseCode(try RawClient.command(port: dataPort, TPM2.pcrExtendSHA256(pcr: 20, digest: digest)))

    // swtpm serves one data connection at a time: this one is closed before the next.
    let rc3: UInt32? = try {
        let cmd = TPM2.pcrExtendSHA256(pcr: 20, digest: digest)
        let c = try RawClient(port: dataPort)
        try c.send([0, 0, 0, 8, 3] + [0, 0, 0, UInt8(cmd.count)] + cmd)
        let len = Int(be32(c.read(4), 0))
        let rsp = c.read(len)
        #expect(c.read(4) == [0, 0, 0, 0])
        return TPM2.responseCode(rsp)
    }()

    return LocalityOutcome(extendAtLocality2: rc2, extendAtLocality0: rc0, extendAtLocality3ViaPrefix: rc3,
                           pcr20Before: before, pcr20After: try pcrValue(port: dataPort, 20))
}

@Suite struct LocalityTests {
    static let digest = Crypto.sha256(Array("locality".utf8))

    /// A client's CMD_SET_LOCALITY reaches the TIS: the driver requests that locality, the
    /// TIS hands the command to the backend from it (TISEvent.commandSent), and the TPM
    /// enforces it (PCR 20 extends from locality 2 and 3, TPM_RC_LOCALITY from 0) — exactly
    /// as a plain swtpm does for the same sequence.
    @Test(arguments: ["libtpms", "swtpm"])
    func clientLocalityReachesTheTIS(backend: String) async throws {
        let dir = try TempDir("locality-direct")
        let reference = try DirectSwtpm(stateDir: dir.path)
        let theirs = try localitySequence(dataPort: Int(reference.port), ctrlPort: Int(reference.port) + 1, digest: Self.digest)
        #expect(theirs.extendAtLocality2 == 0)
        #expect(theirs.extendAtLocality0 == 0x907)

        try await withServer(backend) { server in
            let ours = try localitySequence(dataPort: server.dataPort, ctrlPort: server.ctrlPort, digest: Self.digest)
            #expect(ours == theirs)
            #expect(ours.pcr20After == Crypto.pcrExtendSHA256([Self.digest, Self.digest], from: ours.pcr20Before))
            let s = server.statistics
            #expect(s.tisCommandsByLocality[2] == 1, "\(s)")
            #expect(s.tisCommandsByLocality[3] == 1, "\(s)")
            #expect(s.tisActivations[2] >= 1 && s.tisActivations[3] >= 1, "\(s)")
            #expect(s.ctrlLocality == 0)
            // What tpm2-tools read through tcti-swtpm (which sets locality 0 first).
            let work = try TempDir("locality-tools")
            let text = try tpm2("pcrread", "swtpm:host=127.0.0.1,port=\(server.dataPort)", ["sha256:20"], cwd: work.path).stdout
            #expect(text.uppercased().contains(ours.pcr20After.hex.uppercased()))
            #expect(server.device.currentState.activeLocality == 0xFF)
        }
    }
}
