import EmulatorBackend
import Foundation
import Testing

/// What the tpm2-tools workflow produced on one TPM, for comparison.
struct WorkflowOutput: Equatable {
    var pcrRead: String
    var nvData: [UInt8]
    var capabilities: [String: String]
}

/// The tpm2-tools 5.4 workflow of issue 10, run against any `-T` TCTI: startup, getrandom,
/// pcrextend + pcrread, createprimary + create + load + sign + verifysignature,
/// nvdefine + nvwrite + nvread, getcap.
func toolWorkflow(_ tcti: String, dir: String, digest: [UInt8], nvData: [UInt8]) throws -> WorkflowOutput {
    try tpm2("startup", tcti, ["-c"], cwd: dir)
    let random = try tpm2("getrandom", tcti, ["16", "--hex"], cwd: dir).stdout
    #expect(random.count == 32 && random.allSatisfy(\.isHexDigit), "getrandom: \(random)")

    try tpm2("pcrextend", tcti, ["16:sha256=" + digest.hex], cwd: dir)
    let pcr = try tpm2("pcrread", tcti, ["sha256:16"], cwd: dir).stdout

    var caps: [String: String] = [:]
    for cap in ["properties-fixed", "algorithms", "commands", "pcrs", "ecc-curves"] {
        caps[cap] = try tpm2("getcap", tcti, [cap], cwd: dir).stdout
    }

    // No resource manager between the tools and the TPM (as with a plain swtpm): each tool
    // leaves its objects loaded, so transient objects are flushed between steps.
    try tpm2("createprimary", tcti, ["-C", "o", "-G", "ecc", "-c", "primary.ctx"], cwd: dir)
    try tpm2("flushcontext", tcti, ["-t"], cwd: dir)
    try tpm2("create", tcti, ["-C", "primary.ctx", "-G", "ecc", "-u", "key.pub", "-r", "key.priv"], cwd: dir)
    try tpm2("flushcontext", tcti, ["-t"], cwd: dir)
    try tpm2("load", tcti, ["-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx"], cwd: dir)
    try tpm2("flushcontext", tcti, ["-t"], cwd: dir)
    try Data("message signed through the TIS".utf8).write(to: URL(fileURLWithPath: dir + "/msg.dat"))
    try tpm2("sign", tcti, ["-c", "key.ctx", "-g", "sha256", "-o", "sig.dat", "msg.dat"], cwd: dir)
    try tpm2("verifysignature", tcti, ["-c", "key.ctx", "-g", "sha256", "-m", "msg.dat", "-s", "sig.dat"], cwd: dir)
    // A tampered message must not verify.
    try Data("message signed through the TIS!".utf8).write(to: URL(fileURLWithPath: dir + "/bad.dat"))
    let bad = try runTool(["tpm2_verifysignature", "-T", tcti, "-c", "key.ctx", "-g", "sha256", "-m", "bad.dat", "-s", "sig.dat"], cwd: dir)
    #expect(bad.status != 0, "a tampered message verified: \(bad)")

    try Data(nvData).write(to: URL(fileURLWithPath: dir + "/nv.dat"))
    try tpm2("nvdefine", tcti, ["0x1500016", "-C", "o", "-s", "\(nvData.count)", "-a", "ownerread|ownerwrite"], cwd: dir)
    try tpm2("nvwrite", tcti, ["0x1500016", "-C", "o", "-i", "nv.dat"], cwd: dir)
    try tpm2("nvread", tcti, ["0x1500016", "-C", "o", "-s", "\(nvData.count)", "-o", "nvout.dat"], cwd: dir)
    let nv = [UInt8]((try? Data(contentsOf: URL(fileURLWithPath: dir + "/nvout.dat"))) ?? Data())
    return WorkflowOutput(pcrRead: pcr, nvData: nv, capabilities: caps)
}

@Suite(.serialized) struct ToolsTests {
    static let digest = Crypto.sha256(Array("tpm2-tools through the TIS".utf8))
    static let nvData = Array((0..<32).map { UInt8($0 * 7 & 0xFF) })

    /// tpm2-tools against `tis-sim serve` (every command through the TIS FIFO) give the same
    /// outputs as against a plain swtpm: PCR 16 = sha256(0³² ‖ d), the NV data written, and
    /// identical getcap answers; the signature made through the TIS verifies.
    @Test(arguments: ["libtpms", "swtpm"])
    func workflowMatchesDirectSwtpm(backend: String) throws {
        let work = try TempDir("tools-\(backend)")
        let served = work.path + "/served", direct = work.path + "/direct"
        for d in [served, direct, served + "-state", direct + "-state"] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        let server = try ServeProcess(backend: backend, stateDir: served + "-state")
        let reference = try DirectSwtpm(stateDir: direct + "-state")

        let ours = try toolWorkflow(server.tcti, dir: served, digest: Self.digest, nvData: Self.nvData)
        let theirs = try toolWorkflow(reference.tcti, dir: direct, digest: Self.digest, nvData: Self.nvData)

        let expected = Crypto.pcrExtendSHA256([Self.digest])
        #expect(ours.pcrRead.uppercased().contains(expected.hex.uppercased()), "pcrread: \(ours.pcrRead)")
        #expect(ours.pcrRead == theirs.pcrRead)
        #expect(ours.nvData == Self.nvData)
        #expect(ours.nvData == theirs.nvData)
        for (cap, text) in theirs.capabilities {
            #expect(ours.capabilities[cap] == text, "getcap \(cap) differs")
        }
        #expect(server.stop() == 0, "serve exit: \(server.output)")
    }

    /// The mssim TCTI (`-T mssim`) reaches the same TIS: power-on and NV-on on the platform
    /// port, TPM_SEND_COMMAND on the TPM port; and swtpm_ioctl talks to the ctrl port.
    @Test func mssimAndSwtpmIoctl() throws {
        let work = try TempDir("mssim")
        let server = try ServeProcess(backend: "libtpms", stateDir: work.path + "/state", extra: ["--mssim-port", "0"])
        let mssim = "mssim:host=127.0.0.1,port=\(server.ports["mssim"] ?? 0)"
        try tpm2("startup", mssim, ["-c"], cwd: work.path)
        let r = try tpm2("getrandom", mssim, ["8", "--hex"], cwd: work.path).stdout
        #expect(r.count == 16)
        try tpm2("pcrextend", mssim, ["16:sha256=" + Self.digest.hex], cwd: work.path)
        // The same PCR read back over the swtpm TCTI: one TPM behind both protocols.
        let pcr = try tpm2("pcrread", server.tcti, ["sha256:16"], cwd: work.path).stdout
        #expect(pcr.uppercased().contains(Crypto.pcrExtendSHA256([Self.digest]).hex.uppercased()))

        let ctrl = "127.0.0.1:\(server.ctrlPort)"
        let caps = try runTool(["swtpm_ioctl", "--tcp", ctrl, "-c"])
        #expect(caps.status == 0 && caps.stdout.hasPrefix("ptm capability is 0x"), "\(caps)")
        let est = try runTool(["swtpm_ioctl", "--tcp", ctrl, "-e"])
        #expect(est.stdout == "tpmEstablished is 0\n", "\(est)")
        let info = try runTool(["swtpm_ioctl", "--tcp", ctrl, "--info", "1"])
        #expect(info.stdout.contains("\"family\":\"2.0\""), "\(info)")
        let loc4 = try runTool(["swtpm_ioctl", "--tcp", ctrl, "-l", "4"])
        #expect(loc4.status != 0, "locality 4 must be refused: \(loc4)")
        // CMD_SHUTDOWN stops the server (swtpm exits on it).
        let down = try runTool(["swtpm_ioctl", "--tcp", ctrl, "-s"])
        #expect(down.status == 0, "\(down)")
        #expect(server.stop() == 0)
    }

    /// The state directory outlives the server: an NV index written through one `tis-sim
    /// serve` is read back through the next one started on the same `--state-dir` (which is
    /// a real restart: PCR 16 is back to zero after TPM2_Startup). The second start uses
    /// `--startup-clear`, so no tpm2_startup is needed.
    @Test(arguments: ["libtpms", "swtpm"])
    func statePersistsAcrossRestart(backend: String) throws {
        let work = try TempDir("persist-\(backend)")
        let state = work.path + "/state"
        let data = Array("persisted through the TIS".utf8)
        try Data(data).write(to: URL(fileURLWithPath: work.path + "/nv.dat"))
        do {
            let first = try ServeProcess(backend: backend, stateDir: state)
            try tpm2("startup", first.tcti, ["-c"], cwd: work.path)
            try tpm2("nvdefine", first.tcti, ["0x1500017", "-C", "o", "-s", "\(data.count)", "-a", "ownerread|ownerwrite"], cwd: work.path)
            try tpm2("nvwrite", first.tcti, ["0x1500017", "-C", "o", "-i", "nv.dat"], cwd: work.path)
            try tpm2("pcrextend", first.tcti, ["16:sha256=" + Self.digest.hex], cwd: work.path)
            #expect(first.stop() == 0, "\(first.output)")
        }
        let second = try ServeProcess(backend: backend, stateDir: state, extra: ["--startup-clear"])
        try tpm2("nvread", second.tcti, ["0x1500017", "-C", "o", "-s", "\(data.count)", "-o", "out.dat"], cwd: work.path)
        #expect([UInt8]((try? Data(contentsOf: URL(fileURLWithPath: work.path + "/out.dat"))) ?? Data()) == data)
        let pcr = try tpm2("pcrread", second.tcti, ["sha256:16"], cwd: work.path).stdout
        #expect(pcr.contains("0x" + String(repeating: "0", count: 64)), "PCR 16 after restart: \(pcr)")
        #expect(second.stop() == 0, "\(second.output)")
    }

    /// `--tpm1.2 --startup-clear`: a TPM 1.2 behind the TIS; the server already sent
    /// TPM_Startup(ST_CLEAR), so a second one is refused (TPM_INVALID_POSTINIT) and
    /// TPM_GetRandom answers.
    @Test func tpm12() throws {
        let work = try TempDir("tpm12")
        let server = try ServeProcess(backend: "libtpms", stateDir: work.path + "/state", extra: ["--tpm1.2", "--startup-clear"])
        let startup = try RawClient.command(port: server.dataPort, [0x00, 0xC1, 0, 0, 0, 0x0C, 0, 0, 0, 0x99, 0, 1])
        #expect(startup == [0x00, 0xC4, 0, 0, 0, 0x0A, 0, 0, 0, 0x26])
        let random = try RawClient.command(port: server.dataPort, [0x00, 0xC1, 0, 0, 0, 0x0E, 0, 0, 0, 0x46, 0, 0, 0, 8])
        #expect(random.count == 22 && random.prefix(2) == [0x00, 0xC4] && be32(random, 6) == 0 && be32(random, 10) == 8, "\(random.hex)")
        #expect(server.stop() == 0)
    }

    /// Real tpm2-tools keep working while another client floods `tis-sim serve` with
    /// connections (200 opened and held, 20 of them stuck mid-command, some ctrl), and the
    /// PCR value they build is exact.
    @Test func toolsDuringConnectionFlood() throws {
        let work = try TempDir("flood")
        let server = try ServeProcess(backend: "libtpms", stateDir: work.path + "/state")
        try tpm2("startup", server.tcti, ["-c"], cwd: work.path)
        var held: [RawClient] = []
        var extends = 0
        for i in 0..<200 {
            let c = try RawClient(port: i % 10 == 9 ? server.ctrlPort : server.dataPort)
            if i % 10 == 5 { try c.send([0x80, 0x01, 0, 0, 0, 0x0C]) }
            held.append(c)
            if i % 40 == 0 {
                let r = try tpm2("getrandom", server.tcti, ["8", "--hex"], cwd: work.path).stdout
                #expect(r.count == 16)
                try tpm2("pcrextend", server.tcti, ["16:sha256=" + Self.digest.hex], cwd: work.path)
                extends += 1
            }
        }
        let pcr = try tpm2("pcrread", server.tcti, ["sha256:16"], cwd: work.path).stdout
        #expect(pcr.uppercased().contains(Crypto.pcrExtendSHA256(Array(repeating: Self.digest, count: extends)).hex.uppercased()))
        held.removeAll()
        #expect(server.stop() == 0)
        #expect(server.output.contains(" evicted") && !server.output.contains(" 0 evicted"), "\(server.output)")
    }

    /// swtpm_ioctl over TCP prints the same against `tis-sim serve` as against a plain swtpm
    /// (swtpm 0.7.1's messages and exit codes), and the saved blobs have the same sizes.
    @Test func swtpmIoctlOutputsMatchSwtpm() throws {
        let work = try TempDir("ioctl")
        let server = try ServeProcess(backend: "libtpms", stateDir: work.path + "/state", extra: ["--startup-clear"])
        let reference = try DirectSwtpm(stateDir: work.path + "/direct")
        let commands: [[String]] = [
            ["-e"], ["-r", "3"], ["-r", "0"], ["-l", "2"], ["-l", "0"], ["-g"], ["--info", "1"], ["--info", "2"],
            ["--info", "4"], ["--info", "8"], ["-b", "0"], ["-b", "4096"], ["-C"], ["-v"],
            ["--save", "permanent", "perm"], ["--save", "volatile", "vol"], ["--save", "savestate", "save"],
        ]
        for args in commands {
            let ours = try runTool(["swtpm_ioctl", "--tcp", "127.0.0.1:\(server.ctrlPort)"] + args.map { ["perm", "vol", "save"].contains($0) ? work.path + "/ours-" + $0 : $0 })
            let theirs = try runTool(["swtpm_ioctl", "--tcp", "127.0.0.1:\(reference.port + 1)"] + args.map { ["perm", "vol", "save"].contains($0) ? work.path + "/theirs-" + $0 : $0 })
            #expect(ours.status == theirs.status && ours.stdout == theirs.stdout && ours.stderr == theirs.stderr,
                    "swtpm_ioctl \(args.joined(separator: " ")): ours \(ours), swtpm \(theirs)")
        }
        for blob in ["perm", "vol", "save"] {
            let a = FileManager.default.contents(atPath: work.path + "/ours-" + blob) ?? Data([1])
            let b = FileManager.default.contents(atPath: work.path + "/theirs-" + blob) ?? Data()
            #expect(a.count == b.count && a.prefix(4) == b.prefix(4), "\(blob): \(a.count) vs \(b.count) bytes")
        }
        #expect(server.stop() == 0)
    }

    /// A TPM moves between servers with swtpm_ioctl as QEMU moves it: `--save` permanent and
    /// volatile from a libtpms-backed server, then `--stop`, `--load` both and `-i` on a
    /// swtpm-backed one; PCR 16 and an NV index arrive, and the TPM is already started.
    @Test func stateBlobsMoveBetweenBackends() throws {
        let work = try TempDir("blobs")
        let source = try ServeProcess(backend: "libtpms", stateDir: work.path + "/a")
        try tpm2("startup", source.tcti, ["-c"], cwd: work.path)
        try tpm2("pcrextend", source.tcti, ["16:sha256=" + Self.digest.hex], cwd: work.path)
        try Data(Self.nvData).write(to: URL(fileURLWithPath: work.path + "/nv.dat"))
        try tpm2("nvdefine", source.tcti, ["0x1500018", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite"], cwd: work.path)
        try tpm2("nvwrite", source.tcti, ["0x1500018", "-C", "o", "-i", "nv.dat"], cwd: work.path)
        let a = "127.0.0.1:\(source.ctrlPort)"
        for (type, file) in [("permanent", "perm"), ("volatile", "vol")] {
            let r = try runTool(["swtpm_ioctl", "--tcp", a, "--save", type, work.path + "/" + file])
            #expect(r.status == 0, "\(r)")
        }
        #expect(source.stop() == 0)

        let target = try ServeProcess(backend: "swtpm", stateDir: work.path + "/b")
        let b = "127.0.0.1:\(target.ctrlPort)"
        let loadWhileRunning = try runTool(["swtpm_ioctl", "--tcp", b, "--load", "permanent", work.path + "/perm"])
        #expect(loadWhileRunning.status != 0, "SET_STATEBLOB needs a stopped TPM: \(loadWhileRunning)")
        for args in [["--stop"], ["--load", "permanent", work.path + "/perm"], ["--load", "volatile", work.path + "/vol"], ["-i"]] {
            let r = try runTool(["swtpm_ioctl", "--tcp", b] + args)
            #expect(r.status == 0, "swtpm_ioctl \(args): \(r)")
        }
        let startup = try RawClient.command(port: target.dataPort, TPM2.startup())
        #expect(TPM2.responseCode(startup) == 0x100, "the TPM resumed, already started")
        let pcr = try tpm2("pcrread", target.tcti, ["sha256:16"], cwd: work.path).stdout
        #expect(pcr.uppercased().contains(Crypto.pcrExtendSHA256([Self.digest]).hex.uppercased()), "\(pcr)")
        try tpm2("nvread", target.tcti, ["0x1500018", "-C", "o", "-s", "32", "-o", "out.dat"], cwd: work.path)
        #expect([UInt8](FileManager.default.contents(atPath: work.path + "/out.dat") ?? Data()) == Self.nvData)
        #expect(target.stop() == 0)
    }
}
