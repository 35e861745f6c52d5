import EmulatorBackend
import Foundation
import TISConformance
import TPMServer

/// Test settings: free ports, short deadlines, a small connection cap.
func testConfiguration(maxConnections: Int = 16, commandTimeout: Double = 0.3, mssim: Bool = false) -> TPMServer.Configuration {
    var c = TPMServer.Configuration()
    c.dataPort = 0
    c.mssimPort = mssim ? 0 : nil
    c.maxConnections = maxConnections
    c.commandTimeout = commandTimeout
    c.idleTimeout = 5
    c.writeTimeout = 2
    return c
}

/// Runs `body` with a `TPMServer` in this process over a fresh TPM: libtpms (under the
/// process-wide libtpms lock) or a swtpm child.
func withServer(_ backend: String, _ configuration: TPMServer.Configuration = testConfiguration(),
                _ body: (TPMServer) throws -> Void) async throws {
    if backend == "libtpms" {
        try await LibtpmsTestLock.run {
            let tpm = try LibtpmsBackend(version: .tpm20)
            defer { tpm.shutdown() }
            let server = try TPMServer(backend: tpm, configuration: configuration)
            defer { server.stop(); server.wait() }
            try body(server)
        }
    } else {
        _ = try requireTool("swtpm")
        let dir = try TempDir("swtpm")
        let process = try SwtpmProcess.launch(SwtpmProcess.Options(stateDirectory: dir.path))
        defer { process.terminate() }
        let tpm = try SwtpmBackend(process: process, dataTimeout: 10, ctrlTimeout: 10)
        defer { tpm.shutdown() }
        let server = try TPMServer(backend: tpm, configuration: configuration)
        defer { server.stop(); server.wait() }
        try body(server)
    }
}

extension TPMServer {
    var dataPort: Int { Int(ports[.data] ?? 0) }
    var ctrlPort: Int { Int(ports[.ctrl] ?? 0) }
}

/// Waits up to `timeout` seconds for `condition`.
func eventually(_ timeout: Double = 3, _ condition: () -> Bool) -> Bool {
    let deadline = monotonic() + timeout
    while !condition() {
        if monotonic() > deadline { return false }
        usleep(5_000)
    }
    return true
}
