import ArgumentParser
import Dispatch
import EmulatorBackend
import Foundation
import TPMServer

/// `tis-sim serve`: a TPM that tpm2-tools reach through this library's TIS. Listens like
/// `swtpm socket --server type=tcp,port=P --ctrl type=tcp,port=P+1` on 127.0.0.1, so
/// `tpm2_* -T swtpm:host=127.0.0.1,port=P` works, and optionally speaks the mssim protocol
/// (`-T mssim:host=127.0.0.1,port=M`). Every command goes through the TIS registers.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a TPM behind the TIS to tpm2-tools (swtpm TCP data/ctrl protocol, optionally mssim).",
        discussion: """
            Every TPM command a client sends is written into the TIS FIFO by a register-level driver at the
            client's locality (CMD_SET_LOCALITY on the ctrl port, or the mssim locality byte), executed by
            the backend, and read back out of the FIFO.

            The TPM comes up as after firmware's TPM_Init: the client sends TPM2_Startup itself
            (tpm2_startup -c), unless --startup-clear is given (like swtpm's --flags startup-clear).
            Locality 4 is refused (QEMU's TIS drops locality-4 writes). Example:
              tis-sim serve --backend libtpms --state-dir /tmp/tpm --port 2321 &
              tpm2_startup -c -T swtpm:host=127.0.0.1,port=2321
              tpm2_getrandom -T swtpm:host=127.0.0.1,port=2321 8 --hex
            """)

    enum Backend: String, ExpressibleByArgument, CaseIterable {
        case libtpms, swtpm
    }

    @Option(help: "The TPM behind the TIS: libtpms (in process) or swtpm (a child process).")
    var backend: Backend = .libtpms

    @Option(help: "Keep the TPM state here (swtpm's file names); it persists across restarts. Default: a temporary directory.")
    var stateDir: String?

    @Option(help: "Data port (swtpm --server); the ctrl port is PORT+1. 0 picks a free pair.")
    var port: UInt16 = 2321

    @Option(help: "Also serve the mssim protocol: TPM port N, platform port N+1 (0 picks a free pair).")
    var mssimPort: UInt16?

    @Flag(help: "A TPM 2.0 (default).")
    var tpm2 = false

    @Flag(name: .customLong("tpm1.2"), help: "A TPM 1.2.")
    var tpm12 = false

    @Flag(help: "Send TPM2_Startup(CLEAR) through the TIS at start (swtpm --flags startup-clear).")
    var startupClear = false

    @Option(help: "Connections open at once (all ports).")
    var maxConnections = 64

    enum Execution: String, ExpressibleByArgument, CaseIterable {
        case worker, inline
    }

    @Option(help: "Where the backend runs a command: on its worker thread, as QEMU does (the driver polls STS for dataAvail), or inline in the tpmGo write on the server's engine thread (faster).")
    var execution: Execution = .worker

    @Option(help: "Write the bound ports as JSON to this file once serving.")
    var portFile: String?

    func validate() throws {
        if tpm2 && tpm12 { throw ValidationError("--tpm2 and --tpm1.2 exclude each other") }
        if maxConnections < 2 { throw ValidationError("--max-connections must be at least 2") }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let version: TPMVersion = tpm12 ? .tpm12 : .tpm20
        var temporary = false
        let dir: String
        if let stateDir {
            dir = URL(fileURLWithPath: stateDir).standardizedFileURL.path
        } else {
            dir = FileManager.default.temporaryDirectory.appendingPathComponent("tis-sim-serve-\(getpid())").path
            temporary = true
        }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { if temporary { try? FileManager.default.removeItem(atPath: dir) } }

        var process: SwtpmProcess? = nil
        let tpm: any TPMBackend
        switch backend {
        case .libtpms:
            tpm = try LibtpmsBackend(version: version, stateDirectory: dir)
        case .swtpm:
            var o = SwtpmProcess.Options(stateDirectory: dir)
            o.version = version
            // A UnixIO path holds at most 107 bytes: a deep state directory gets its ctrl
            // socket under /tmp instead.
            if (dir + "/ctrl.sock").utf8.count > 100 {
                o.ctrlSocketPath = "/tmp/tis-sim-serve-\(getpid()).ctrl"
            }
            let p = try SwtpmProcess.launch(o)
            process = p
            tpm = try SwtpmBackend(process: p, dataTimeout: 10, ctrlTimeout: 10)
        }
        defer {
            tpm.shutdown()
            process?.terminate()
        }

        var config = TPMServer.Configuration()
        config.dataPort = port
        config.mssimPort = mssimPort
        config.startupClear = startupClear
        config.maxConnections = maxConnections
        let server = try TPMServer(backend: tpm, configuration: config, executionMode: execution == .inline ? .inline : .worker)

        let data = server.ports[.data] ?? 0, ctrl = server.ports[.ctrl] ?? 0
        var line = "tis-sim serve: TPM \(version) (\(backend.rawValue)) behind the TIS; data 127.0.0.1:\(data), ctrl 127.0.0.1:\(ctrl)"
        var ports: [String: Int] = ["data": Int(data), "ctrl": Int(ctrl)]
        if let m = server.ports[.mssimTPM], let p = server.ports[.mssimPlatform] {
            line += ", mssim 127.0.0.1:\(m) (platform \(p))"
            ports["mssim"] = Int(m)
            ports["mssimPlatform"] = Int(p)
        }
        FileHandle.standardOutput.write(Data((line + "; state in \(temporary ? "a temporary directory" : dir)\n").utf8))
        if let portFile {
            let json = try JSONSerialization.data(withJSONObject: ports, options: [.sortedKeys])
            let tmp = portFile + ".tmp"
            try json.write(to: URL(fileURLWithPath: tmp))
            _ = rename(tmp, portFile)
        }

        // SIGINT / SIGTERM stop the server; so does a client's CMD_SHUTDOWN.
        signal(SIGINT, SIG_IGN)
        signal(SIGTERM, SIG_IGN)
        let queue = DispatchQueue(label: "tis-sim-serve-signals")
        let sources = [SIGINT, SIGTERM].map { sig -> DispatchSourceSignal in
            let s = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            s.setEventHandler { server.stop() }
            s.resume()
            return s
        }
        server.wait()
        sources.forEach { $0.cancel() }
        let s = server.statistics
        FileHandle.standardError.write(Data(("tis-sim serve: stopped; \(s.connectionsAccepted) connections, \(s.tpmCommands) TPM commands, "
            + "\(s.ctrlRequests) ctrl requests, TIS commands by locality \(s.tisCommandsByLocality), "
            + "\(s.refusedRequests) refused, \(s.truncatedRequests) truncated, \(s.connectionsEvicted) evicted\n").utf8))
    }
}
