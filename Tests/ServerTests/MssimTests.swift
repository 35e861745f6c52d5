import EmulatorBackend
import Foundation
import Testing
import TPMServer

/// The mssim ports (tcti-mssim, the reference simulator's TcpServer): platform signals mapped
/// onto the device, TPM_SEND_COMMAND with its locality byte, the handshake.
@Suite struct MssimTests {
    static func sendCommand(_ c: RawClient, locality: UInt8, _ command: [UInt8]) throws -> [UInt8] {
        try c.send([0, 0, 0, 8, locality, 0, 0, UInt8(command.count >> 8), UInt8(command.count & 0xFF)] + command)
        let n = Int(be32(c.read(4), 0))
        let rsp = c.read(n)
        #expect(c.read(4) == [0, 0, 0, 0], "TPM_SEND_COMMAND trailer")
        return rsp
    }

    @Test(arguments: ["libtpms", "swtpm"])
    func platformAndTPMPorts(backend: String) async throws {
        try await withServer(backend, testConfiguration(mssim: true)) { server in
            let tpmPort = Int(server.ports[.mssimTPM] ?? 0), platformPort = Int(server.ports[.mssimPlatform] ?? 0)
            let platform = try RawClient(port: platformPort)
            // tcti-mssim's init: POWER_ON, NV_ON.
            #expect(try platform.ctrl([0, 0, 0, 1]) == [0, 0, 0, 0])
            #expect(try platform.ctrl([0, 0, 0, 11]) == [0, 0, 0, 0])
            let tpm = try RawClient(port: tpmPort)
            #expect(try tpm.ctrl([0, 0, 0, 15, 0, 0, 0, 1], responseLength: 12) == [0, 0, 0, 1, 0, 0, 0, 0x0D, 0, 0, 0, 0])
            #expect(TPM2.responseCode(try Self.sendCommand(tpm, locality: 0, TPM2.startup())) == 0)
            // The locality byte reaches the TIS; locality 4 cannot (QEMU drops its writes).
            #expect(try TPM2.randomBytes(try Self.sendCommand(tpm, locality: 1, TPM2.getRandom(8))).count == 8)
            #expect(server.statistics.tisCommandsByLocality[1] == 1)
            #expect(TPM2.responseCode(try Self.sendCommand(tpm, locality: 4, TPM2.getRandom(8))) == 0x907)
            // POWER_OFF stops the TPM; POWER_ON starts it again, wanting a TPM2_Startup.
            #expect(try platform.ctrl([0, 0, 0, 2]) == [0, 0, 0, 0])
            #expect(TPM2.responseCode(try Self.sendCommand(tpm, locality: 0, TPM2.getRandom(8))) != 0)
            #expect(try platform.ctrl([0, 0, 0, 1]) == [0, 0, 0, 0])
            #expect(TPM2.responseCode(try Self.sendCommand(tpm, locality: 0, TPM2.getRandom(8))) == 0x100)
            #expect(TPM2.responseCode(try Self.sendCommand(tpm, locality: 0, TPM2.startup())) == 0)
            // RESET (17) power-cycles: Startup again.
            #expect(try platform.ctrl([0, 0, 0, 17]) == [0, 0, 0, 0])
            #expect(TPM2.responseCode(try Self.sendCommand(tpm, locality: 0, TPM2.startup())) == 0)
            // An unknown platform code: 1, then the connection closes; an unknown TPM-port code closes.
            #expect(try platform.ctrl([0, 0, 0, 99]) == [0, 0, 0, 1])
            #expect(platform.readsEOF())
            try tpm.send([0, 0, 0, 99])
            #expect(tpm.readsEOF())
            // SESSION_END closes without a reply.
            let other = try RawClient(port: tpmPort)
            try other.send([0, 0, 0, 20])
            #expect(other.readsEOF())
            BadInputTests.tisIsIdle(server)
        }
    }
}
