import EmulatorBackend
import Foundation
import Testing
import TIS
import TPMServer

/// Hostile and broken clients cost their own connection only: the server keeps answering
/// others, and the TIS only ever sees whole commands (it is idle between them).
@Suite struct BadInputTests {
    static let sizeError: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x01, 0x42]

    /// A good client: GetRandom(8) on a fresh connection answers 8 bytes.
    static func goodClient(_ port: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try RawClient.command(port: port, TPM2.getRandom(8))
        #expect(try TPM2.randomBytes(r).count == 8, sourceLocation: sourceLocation)
    }

    /// The TIS is back to idle: no active locality, every locality idle or ready.
    static func tisIsIdle(_ server: TPMServer, sourceLocation: SourceLocation = #_sourceLocation) {
        let s = server.device.currentState
        #expect(s.activeLocality == 0xFF, "active locality \(s.activeLocality)", sourceLocation: sourceLocation)
        #expect(s.localities.allSatisfy { $0.state == .idle || $0.state == .ready }, "\(s.localities.map(\.state))",
                sourceLocation: sourceLocation)
    }

    struct Oversize: CustomTestStringConvertible, Sendable {
        var name: String
        var bytes: [UInt8]
        var testDescription: String { name }
    }

    static let refusedCommands: [Oversize] = [
        Oversize(name: "size field 4097, header only", bytes: [0x80, 0x01, 0, 0, 0x10, 0x01, 0, 0, 1, 0x7B]),
        Oversize(name: "size field 5000 with all 5000 bytes",
                 bytes: [0x80, 0x01, 0, 0, 0x13, 0x88, 0, 0, 1, 0x7B] + [UInt8](repeating: 0xAB, count: 4990)),
        Oversize(name: "size field 2^32-1", bytes: [0x80, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 1, 0x7B]),
        Oversize(name: "size field 4 (below the header)", bytes: [0x80, 0x01, 0, 0, 0, 4, 0, 0, 1, 0x7B]),
        Oversize(name: "size field 0", bytes: [0x80, 0x01, 0, 0, 0, 0, 0, 0, 1, 0x7B]),
        Oversize(name: "mssim prefix, length 70000", bytes: [0, 0, 0, 8, 0, 0, 1, 0x11, 0x70]),
    ]

    /// Oversize and undersize commands get the TPM's TPM_RC_COMMAND_SIZE answer at once, before
    /// any body is read, and the connection is closed; the TIS never sees them.
    @Test(arguments: ["libtpms", "swtpm"])
    func refusedBeforeTheTIS(backend: String) async throws {
        try await withServer(backend) { server in
            _ = try RawClient.command(port: server.dataPort, TPM2.startup())
            let before = server.statistics.tisCommandsByLocality.reduce(0, +)
            for c in Self.refusedCommands {
                let client = try RawClient(port: server.dataPort)
                try client.send(c.bytes)
                var answer = client.read(c.bytes.starts(with: [0, 0, 0, 8]) ? 18 : 10)
                if c.bytes.starts(with: [0, 0, 0, 8]) {
                    #expect(answer.prefix(4) == [0, 0, 0, 10] && answer.suffix(4) == [0, 0, 0, 0], "\(c.name)")
                    answer = Array(answer.dropFirst(4).prefix(10))
                }
                #expect(answer == Self.sizeError, "\(c.name): \(answer)")
                #expect(client.readsEOF(), "\(c.name): connection left open")
                try Self.goodClient(server.dataPort)
            }
            // Exactly the TIS buffer (4096 bytes) is not refused: it goes through the FIFO and
            // the TPM itself answers it.
            let full = [0x80, 0x01, 0, 0, 0x10, 0x00, 0, 0, 1, 0x7B] + [UInt8](repeating: 0, count: 4086)
            let answer = try RawClient.command(port: server.dataPort, full)
            #expect(answer.count >= 10 && answer != Self.sizeError && TPM2.responseCode(answer) != 0, "\(answer.hex)")
            let s = server.statistics
            #expect(s.refusedRequests == Self.refusedCommands.count)
            // Only the good clients' commands reached the TIS.
            #expect(s.tisCommandsByLocality.reduce(0, +) - before == Self.refusedCommands.count + 1)
            Self.tisIsIdle(server)
        }
    }

    /// A client that disconnects mid-command, and one that stalls mid-command: the first is
    /// dropped, the second is answered TPM_RC_COMMAND_SIZE after `commandTimeout` (2 s) and
    /// closed; meanwhile another client is served at once.
    @Test(arguments: ["libtpms", "swtpm"])
    func truncatedCommands(backend: String) async throws {
        try await withServer(backend, testConfiguration(commandTimeout: 2)) { server in
            _ = try RawClient.command(port: server.dataPort, TPM2.startup())
            let getRandom = TPM2.getRandom(8)
            do {
                let quitter = try RawClient(port: server.dataPort)
                try quitter.send(Array(getRandom.prefix(6)))
            }   // closed here, mid-command
            let staller = try RawClient(port: server.dataPort)
            try staller.send(Array(getRandom.prefix(8)))
            let start = monotonic()
            try Self.goodClient(server.dataPort)
            #expect(monotonic() - start < 1.5, "the good client waited for the stalled one")
            #expect(staller.read(10) == Self.sizeError)
            #expect(monotonic() - start >= 1.5, "the stalled command was answered before its deadline")
            #expect(staller.readsEOF())
            #expect(eventually { server.statistics.truncatedRequests == 2 }, "\(server.statistics)")
            try Self.goodClient(server.dataPort)
            Self.tisIsIdle(server)
        }
    }

    /// Clients that send a command and reset the connection before the reply (RST): the
    /// command completes in the TIS, its reply is dropped, and the server goes on serving.
    @Test(arguments: ["libtpms", "swtpm"])
    func resetBeforeReply(backend: String) async throws {
        try await withServer(backend) { server in
            _ = try RawClient.command(port: server.dataPort, TPM2.startup())
            let digest = Crypto.sha256(Array("reset".utf8))
            for _ in 0..<20 {
                let c = try RawClient(port: server.dataPort)
                try c.send(TPM2.pcrExtendSHA256(pcr: 16, digest: digest))
                c.reset()
            }
            // A reset may discard a command the server had not read yet (Linux drops queued
            // data on RST); every command that was read ran whole: PCR 16 is the digest
            // extended exactly as many times as the TIS executed commands.
            var ran = -1
            #expect(eventually {
                let n = server.statistics.tpmCommands
                defer { ran = n }
                usleep(100_000)
                return n == ran
            })
            #expect(try pcrValue(port: server.dataPort, 16) == Crypto.pcrExtendSHA256(Array(repeating: digest, count: ran - 1)))
            try Self.goodClient(server.dataPort)
            Self.tisIsIdle(server)
        }
    }

    /// 200 data and 50 ctrl connections held open, 20 more each stuck mid-command: a client
    /// keeps getting answers throughout (the longest-idle and slowest connections are closed
    /// to make room), and afterwards the TIS is idle and the TPM's state is intact.
    @Test(arguments: ["libtpms", "swtpm"])
    func connectionFlood(backend: String) async throws {
        try await withServer(backend, testConfiguration(maxConnections: 16, commandTimeout: 5)) { server in
            _ = try RawClient.command(port: server.dataPort, TPM2.startup())
            let digest = Crypto.sha256(Array("flood".utf8))
            var held: [RawClient] = []
            var extends = 0
            for i in 0..<270 {
                let c = try RawClient(port: i % 5 == 4 && i < 250 ? server.ctrlPort : server.dataPort)
                if i >= 250 { try c.send(Array(TPM2.getRandom(8).prefix(7))) }
                held.append(c)
                if i % 27 == 0 {
                    try Self.goodClient(server.dataPort)
                    let ext = try RawClient.command(port: server.dataPort, TPM2.pcrExtendSHA256(pcr: 16, digest: digest))
                    #expect(TPM2.responseCode(ext) == 0)
                    extends += 1
                }
            }
            for _ in 0..<5 { try Self.goodClient(server.dataPort) }
            let caps = try RawClient(port: server.ctrlPort).ctrl(SwtpmCtrl.GetCapability().encoded(), responseLength: 8)
            #expect(caps.count == 8 && caps.prefix(4) == [0, 0, 0, 0])
            let s = server.statistics
            #expect(s.connectionsEvicted >= 200, "\(s)")
            #expect(s.peakConnections <= 16)
            held.removeAll()
            #expect(try pcrValue(port: server.dataPort, 16) == Crypto.pcrExtendSHA256(Array(repeating: digest, count: extends)))
            Self.tisIsIdle(server)
        }
    }

    /// Ctrl channel input swtpm answers with an error code: an unknown code (TPM_BAD_ORDINAL),
    /// locality 4 and 5 (TPM_BAD_LOCALITY: QEMU's TIS drops locality-4 writes), a body that
    /// never completes (TPM_BAD_PARAMETER once the deadline passes, as swtpm's 500 ms wait), an
    /// oversize SET_STATEBLOB (refused by its length, then closed).
    @Test func ctrlErrors() async throws {
        try await withServer("swtpm") { server in
            let port = server.ctrlPort
            #expect(try RawClient(port: port).ctrl([0, 0, 0, 0x77]) == [0, 0, 0, 0x0A])
            #expect(try RawClient(port: port).ctrl([0, 0, 0, 5, 4]) == [0, 0, 0, 0x3D])
            #expect(try RawClient(port: port).ctrl([0, 0, 0, 5, 5]) == [0, 0, 0, 0x3D])
            #expect(try RawClient(port: port).ctrl([0, 0, 0, 2, 0, 0]) == [0, 0, 0, 0x03])
            let big = try RawClient(port: port)
            #expect(try big.ctrl([0, 0, 0, 0x0D, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x10, 0, 0]) == [0, 0, 0, 0x03])
            #expect(big.readsEOF())
            // Several requests on one connection, as swtpm_ioctl and QEMU send them.
            let c = try RawClient(port: port)
            #expect(try c.ctrl(SwtpmCtrl.SetLocality(locality: 1).encoded()) == [0, 0, 0, 0])
            #expect(try c.ctrl(SwtpmCtrl.GetConfig().encoded(), responseLength: 8) == [0, 0, 0, 0, 0, 0, 0, 0])
            #expect(server.statistics.ctrlLocality == 1)
            // STOP: TPM commands fail through the TIS; INIT brings the TPM back (Startup needed).
            #expect(try c.ctrl(SwtpmCtrl.Stop().encoded()) == [0, 0, 0, 0])
            #expect(try c.ctrl(SwtpmCtrl.GetTPMEstablished().encoded()) == [0, 0, 0, 0x0A])
            let failed = try RawClient.command(port: server.dataPort, TPM2.getRandom(8))
            #expect(TPM2.responseCode(failed) != 0)
            #expect(try c.ctrl(SwtpmCtrl.Initialize().encoded()) == [0, 0, 0, 0])
            // Still at locality 1, where the TPM refuses TPM2_Startup (TPM_RC_LOCALITY); from 0 it works.
            #expect(TPM2.responseCode(try RawClient.command(port: server.dataPort, TPM2.startup())) == 0x907)
            #expect(try c.ctrl(SwtpmCtrl.SetLocality(locality: 0).encoded()) == [0, 0, 0, 0])
            #expect(TPM2.responseCode(try RawClient.command(port: server.dataPort, TPM2.startup())) == 0)
            try BadInputTests.goodClient(server.dataPort)
            Self.tisIsIdle(server)
        }
    }
}
