import Foundation
import Testing
import VMState

/// `tis-sim inspect` and `tis-sim validate` as a user runs them: exit status, text, JSON, stdin.
@Suite("tis-sim inspect / validate command line")
struct CLITests {
    struct Run: Sendable, CustomTestStringConvertible {
        var name: String
        var arguments: @Sendable (_ clean: String, _ cut: String, _ garbage: String, _ encrypted: String, _ wrongKey: String) -> [String]
        var status: Int32
        var stdoutContains: String
        var testDescription: String { name }
    }

    static let runs: [Run] = [
        Run(name: "validate clean", arguments: { c, _, _, _, _ in ["validate", c, "--tpm2", "--frontend", "tis", "--machine", "pc"] },
            status: 0, stdoutContains: "No findings"),
        Run(name: "validate cut", arguments: { _, t, _, _, _ in ["validate", t] }, status: 1, stdoutContains: "ERROR TRUNCATED-STREAM"),
        Run(name: "validate garbage", arguments: { _, _, g, _, _ in ["validate", g] }, status: 2, stdoutContains: ""),
        Run(name: "validate missing file", arguments: { _, _, _, _, _ in ["validate", "/nonexistent/x.bin"] }, status: 2, stdoutContains: ""),
        Run(name: "validate wrong key", arguments: { _, _, _, e, k in ["validate", e, "--migration-key", k] },
            status: 1, stdoutContains: "ERROR WRONG-MIGRATION-KEY"),
        Run(name: "validate no key", arguments: { _, _, _, e, _ in ["validate", e] }, status: 1, stdoutContains: "WARNING NEEDS-MIGRATION-KEY"),
        Run(name: "validate bad key option", arguments: { _, _, _, e, k in ["validate", e, "--migration-key", k + ",mode=rot13"] },
            status: 2, stdoutContains: ""),
        Run(name: "validate both families", arguments: { c, _, _, _, _ in ["validate", c, "--tpm2", "--tpm1.2"] }, status: 64, stdoutContains: ""),
        Run(name: "validate --json", arguments: { c, _, _, _, _ in ["validate", c, "--json"] }, status: 0, stdoutContains: "\"exit_status\": 0"),
        Run(name: "inspect", arguments: { c, _, _, _, _ in ["inspect", c] }, status: 0, stdoutContains: "state.loc[4].iface_id"),
        Run(name: "inspect --json --section tpm-tis", arguments: { c, _, _, _, _ in ["inspect", c, "--json", "--section", "tpm-tis"] },
            status: 0, stdoutContains: "\"state.active_locty\": \"0x00\""),
        Run(name: "inspect cut", arguments: { _, t, _, _, _ in ["inspect", t] }, status: 1, stdoutContains: "Walk stopped: truncated"),
        Run(name: "validate --help", arguments: { _, _, _, _, _ in ["validate", "--help"] }, status: 0,
            stdoutContains: "Exit status: 0 clean"),
    ]

    static func files() throws -> (String, String, String, String, String) {
        let clean = try RealStreams.path(StreamSpec())
        let bytes = try RealStreams.bytes(StreamSpec())
        let cut = try RealStreams.keyFile(Array(bytes.prefix(bytes.count / 2)), name: "cut.bin")
        let garbage = try RealStreams.keyFile(Array("not a stream\n".utf8), name: "garbage.bin")
        let encrypted = try RealStreams.path(StreamSpec(migrationKeyHex: Keys.right128))
        let wrong = try RealStreams.keyFile(Array(Keys.wrong128.utf8), name: "wrong.key")
        return (clean, cut, garbage, encrypted, wrong)
    }

    @Test("exit status and output", arguments: runs)
    func run(_ r: Run) throws {
        let (c, t, g, e, k) = try Self.files()
        let (status, out, err) = try runTisSim(r.arguments(c, t, g, e, k))
        #expect(status == r.status, "stdout: \(out.prefix(2000))\nstderr: \(err.prefix(2000))")
        #expect(r.stdoutContains.isEmpty || out.contains(r.stdoutContains), "\(out.prefix(3000))")
        if r.status == 2 { #expect(!err.isEmpty) }
    }

    @Test("standard input; --json output parses and keeps analyze-migration.py's section keys")
    func stdinAndJSON() throws {
        let clean = try RealStreams.path(StreamSpec())
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try tisSimPath())
        p.arguments = ["inspect", "-", "--json"]
        p.standardInput = try FileHandle(forReadingFrom: URL(fileURLWithPath: clean))
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let doc = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let sections = try #require(doc["sections"] as? [String: Any])
        // Through a pipe the vmdesc comes last: the bodies kept on the way are decoded with it,
        // so every device section is decoded as from a file.
        #expect(sections.allSatisfy { ($0.value as? [String: Any])?["undecoded_bytes"] == nil })
        #expect(sections.keys.contains { $0.hasPrefix("0000:00:01.3/piix4_pm (") })
        let tis = try #require(sections.first { $0.key.hasPrefix("tpm-tis (") }?.value as? [String: Any])
        #expect(tis["state.rw_offset"] as? String == "0x0000")
        #expect((tis["state.loc"] as? [[String: Any]])?.count == 5)
        let emu = try #require(sections.first { $0.key.hasPrefix("tpm-emulator (") }?.value as? [String: Any])
        #expect(emu["state_blobs.savestate.size"] as? String == "0x00000000")

        let (status, json, _) = try runTisSim(["validate", clean, "--json", "--tpm1.2"])
        #expect(status == 1)
        let report = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let findings = try #require(report["findings"] as? [[String: Any]])
        #expect(findings.first?["code"] as? String == "TPM-FAMILY-MISMATCH")
        let evidence = try #require(findings.first?["evidence"] as? [String: Any])
        #expect(evidence["section"] as? String == "tpm-emulator" && evidence["offset"] is Int)
    }
}
