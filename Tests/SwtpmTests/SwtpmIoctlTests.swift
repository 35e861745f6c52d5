import Testing
#if canImport(Glibc)
import Glibc
#endif
import WireFormat
@testable import EmulatorBackend

/// `tis-sim ctrl`'s code path (`SwtpmIoctl.run`) against the real swtpm_ioctl 0.7.1, run as a
/// process on the same swtpm: the same text, the same exit status, and state blobs that each
/// tool loads from the other. swtpm serves one ctrl client at a time, so each side connects,
/// runs one command and disconnects, as swtpm_ioctl does.
@Suite("tis-sim ctrl vs swtpm_ioctl")
struct SwtpmIoctlTests {
    /// Runs one operation the way `tis-sim ctrl` does: connect, run, close.
    static func ours(_ op: SwtpmIoctl.Operation, _ endpoint: SwtpmEndpoint) throws -> SwtpmIoctl.Outcome {
        let client = try SwtpmCtrlClient(connectingTo: endpoint, timeout: 5)
        defer { client.close() }
        return SwtpmIoctl.run(op, client: client)
    }

    static func theirs(_ args: [String], _ endpoint: SwtpmEndpoint) throws -> ToolResult {
        switch endpoint {
        case .unix(let path): try runTool(["swtpm_ioctl", "--unix", path] + args)
        case .tcp(let host, let port): try runTool(["swtpm_ioctl", "--tcp", "\(host):\(port)"] + args)
        }
    }

    struct Step: CustomStringConvertible, Sendable {
        let args: [String]
        let op: SwtpmIoctl.Operation
        var description: String { args.joined(separator: " ") }
    }

    /// A session in swtpm_ioctl's own words; each step runs through both tools in turn.
    static let session: [Step] = [
        Step(args: ["-c"], op: .getCapability),
        Step(args: ["-g"], op: .getConfig),
        Step(args: ["--info", "1"], op: .info(flags: 1)),
        Step(args: ["--info", "3"], op: .info(flags: 3)),
        Step(args: ["--info", "4"], op: .info(flags: 4)),
        Step(args: ["--info", "8"], op: .info(flags: 8)),
        Step(args: ["-b", "0"], op: .setBufferSize(0)),
        Step(args: ["-e"], op: .getEstablished),                  // before INIT: 0xa, exit 1
        Step(args: ["-v"], op: .storeVolatile),                   // before INIT: 0xa, exit 1
        Step(args: ["-b", "3000"], op: .setBufferSize(3000)),     // stopped: allowed
        Step(args: ["-i"], op: .initialize),
        Step(args: ["-b", "4096"], op: .setBufferSize(4096)),     // running: 0xa
        Step(args: ["-e"], op: .getEstablished),
        Step(args: ["-l", "0"], op: .setLocality(0)),
        Step(args: ["-l", "4"], op: .setLocality(4)),
        Step(args: ["-h", "some data"], op: .hash(data: Array("some data".utf8))),
        Step(args: ["-e"], op: .getEstablished),                  // now 1
        Step(args: ["-r", "0"], op: .resetEstablished(locality: 0)),   // 0x3d
        Step(args: ["-r", "3"], op: .resetEstablished(locality: 3)),
        Step(args: ["-e"], op: .getEstablished),
        Step(args: ["-v"], op: .storeVolatile),
        Step(args: ["-C"], op: .cancel),
        Step(args: ["--stop"], op: .stop),
        Step(args: ["-e"], op: .getEstablished),
        Step(args: ["-i"], op: .initialize),
    ]

    @Test func sameTextAndStatusAsSwtpmIoctl() throws {
        let tpm = try LiveSwtpm("ioctl-text")
        let endpoint = tpm.process.ctrlEndpoint
        for step in Self.session {
            let a = try Self.ours(step.op, endpoint)
            let b = try Self.theirs(step.args, endpoint)
            #expect(a.standardOutput == b.stdout, "\(step)")
            #expect(a.standardError == b.stderr, "\(step)")
            #expect(a.exitCode == b.status, "\(step)")
        }
        // Spot checks of the text itself (runs-on-this-machine.md §7).
        #expect(try Self.ours(.getCapability, endpoint).standardOutput == "ptm capability is 0xffff\n")
        #expect(try Self.ours(.setBufferSize(0), endpoint).standardOutput == "TPM buffersize: 3000\nminimum size  : 2808\nmaximum size  : 4096\n")   // set while stopped, above
        // Shutdown last: swtpm exits.
        #expect(try Self.ours(.shutdown, endpoint).exitCode == 0)
    }

    @Test func overTCP() throws {
        let tpm = try LiveSwtpm("ioctl-tcp") { o in o.tcpCtrlPort = try freeTCPPort() }
        guard case .tcp = tpm.process.ctrlEndpoint else { Issue.record("not tcp"); return }
        for step in Self.session.prefix(7) {
            let a = try Self.ours(step.op, tpm.process.ctrlEndpoint)
            let b = try Self.theirs(step.args, tpm.process.ctrlEndpoint)
            #expect(a.standardOutput == b.stdout && a.exitCode == b.status, "\(step)")
        }
    }

    @Test func jsonOutput() throws {
        let tpm = try LiveSwtpm("ioctl-json")
        let e = tpm.process.ctrlEndpoint
        #expect(try Self.ours(.getCapability, e).json.hasPrefix(#"{"command":"CMD_GET_CAPABILITY","ok":true,"capabilities":65535,"names":["INIT","SHUTDOWN""#))
        #expect(try Self.ours(.setBufferSize(0), e).json == #"{"command":"CMD_SET_BUFFERSIZE","ok":true,"bufferSize":4096,"minimumSize":2808,"maximumSize":4096}"#)
        #expect(try Self.ours(.info(flags: 1), e).json == #"{"command":"CMD_GET_INFO","ok":true,"info":"{\"TPMSpecification\":{\"family\":\"2.0\",\"level\":0,\"revision\":164}}"}"#)
        let failed = try Self.ours(.getEstablished, e)
        #expect(failed.exitCode == 1)
        #expect(failed.json.hasPrefix(#"{"command":"CMD_GET_TPMESTABLISHED","ok":false,"tpmResult":10,"error":"#))
    }

    /// Blobs saved through `tis-sim ctrl --save` load with `swtpm_ioctl --load`, and the reverse;
    /// PCR 16 survives both ways.
    @Test func blobsMoveBetweenBothTools() throws {
        let digest = Crypto.sha256(Array("moved".utf8))
        let source = try LiveSwtpm("ioctl-src")
        let expected: [UInt8]
        do {
            let (be, runner) = try source.startedBackend()
            #expect(rc(try run(runner, TPM2.startup())) == 0)
            #expect(rc(try run(runner, TPM2.pcrExtendSHA256(pcr: 16, digest: digest))) == 0)
            expected = try TPM2.pcrDigest(try run(runner, TPM2.pcrReadSHA256(pcr: 16)))
            be.ctrl.close()                      // free the ctrl socket for the tools; swtpm keeps running
        }
        let d = source.dir.path
        let src = source.process.ctrlEndpoint
        // Save with both tools from the same running TPM.
        for (t, name) in [(TPMStateBlobType.permanent, "permanent"), (.volatile, "volatile"), (.savestate, "savestate")] {
            #expect(try Self.ours(.save(type: t, file: "\(d)/ours.\(name)"), src).exitCode == 0)
            #expect(try Self.theirs(["--save", name, "\(d)/theirs.\(name)"], src).status == 0)
        }
        #expect(try readWholeFile("\(d)/ours.permanent") == readWholeFile("\(d)/theirs.permanent"))
        #expect(try readWholeFile("\(d)/ours.savestate").isEmpty)
        #expect(try SwtpmBlob.decode(readWholeFile("\(d)/ours.volatile")).flags == .migrationData)

        // ours -> swtpm_ioctl --load -> PCR 16 on a fresh swtpm
        let b = try LiveSwtpm("ioctl-b")
        for name in ["permanent", "volatile", "savestate"] {
            let r = try Self.theirs(["--load", name, "\(d)/ours.\(name)"], b.process.ctrlEndpoint)
            #expect(r.status == 0, "\(name): \(r.stderr)")
        }
        #expect(try Self.theirs(["-i"], b.process.ctrlEndpoint).status == 0)
        #expect(try Self.pcr16(b) == expected)

        // swtpm_ioctl --save -> ours (--load, -i) -> PCR 16 on another fresh swtpm
        let c = try LiveSwtpm("ioctl-c")
        for (t, name) in [(TPMStateBlobType.permanent, "permanent"), (.volatile, "volatile"), (.savestate, "savestate")] {
            let o = try Self.ours(.load(type: t, file: "\(d)/theirs.\(name)"), c.process.ctrlEndpoint)
            #expect(o.exitCode == 0, "\(name): \(o.standardError)")
        }
        #expect(try Self.ours(.initialize, c.process.ctrlEndpoint).exitCode == 0)
        #expect(try Self.pcr16(c) == expected)
    }

    /// PCR 16 of a swtpm already initialised by a tool: attach a backend without a machine reset.
    static func pcr16(_ tpm: LiveSwtpm) throws -> [UInt8] {
        let be = try SwtpmBackend(process: tpm.process)
        defer { be.shutdown() }
        let r = try be.execute(TPMBackendCommand(locality: 0, bytes: TPM2.pcrReadSHA256(pcr: 16), maxResponseSize: 4096))
        #expect(rc(r.bytes) == 0)
        return try TPM2.pcrDigest(r.bytes)
    }

    @Test func fileErrorsAreReportedLikeSwtpmIoctl() throws {
        let tpm = try LiveSwtpm("ioctl-files")
        let e = tpm.process.ctrlEndpoint
        let missing = tpm.dir.path + "/no/such/dir/blob"
        // Both tools connect before they open the file and then leave without a command; a
        // round trip after each lets swtpm drain its one-deep listen queue, which swtpm_ioctl
        // needs (it gives up when the backlog is full).
        func drain() throws { #expect(try Self.ours(.getCapability, e).exitCode == 0) }
        let b = try Self.theirs(["--save", "permanent", missing], e)
        try drain()
        let a = try Self.ours(.save(type: .permanent, file: missing), e)
        try drain()
        #expect(a.exitCode == 1 && b.status == 1)
        #expect(a.standardError == b.stderr)
        let d = try Self.theirs(["--load", "permanent", missing], e)
        try drain()
        let c = try Self.ours(.load(type: .permanent, file: missing), e)
        try drain()
        #expect(c.exitCode == 1 && d.status == 1)
        #expect(c.standardError == d.stderr)
        // swtpm_ioctl leaves an empty file when the save fails (the TPM is not running).
        let f = tpm.dir.path + "/vol"
        #expect(try Self.ours(.save(type: .volatile, file: f), e).standardError == "TPM result from PTM_GET_STATEBLOB: 0xa\n")
        #expect(try readWholeFile(f).isEmpty)
    }
}
