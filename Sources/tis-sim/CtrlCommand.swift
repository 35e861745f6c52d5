import ArgumentParser
import EmulatorBackend
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// `tis-sim ctrl`: swtpm's ctrl channel from the command line, a drop-in for `swtpm_ioctl`
/// over `--unix PATH` or `--tcp [HOST]:[PORT]`: the same options, the same output text and exit
/// status (swtpm 0.7.1's `tpm_ioctl.c`), plus `--json` for programs. The operations themselves
/// are `SwtpmIoctl.run` in EmulatorBackend, which the tests exercise.
///
/// swtpm serves one ctrl client at a time: this command blocks while another client (QEMU, a
/// SwtpmBackend) holds the ctrl socket, up to `--timeout`.
struct Ctrl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ctrl",
        abstract: "Send swtpm ctrl commands (like swtpm_ioctl) over a UnixIO or TCP ctrl socket.",
        discussion: """
            Exactly one command. Output matches swtpm_ioctl's; --json prints one JSON object instead.
            swtpm serves one ctrl client at a time: close other clients (QEMU, swtpm_ioctl) first.
            """,
        helpNames: [.long])   // -h is swtpm_ioctl's hash command

    @Option(name: .customLong("unix"), help: ArgumentHelp("Connect to the TPM using a UnixIO socket.", valueName: "path"))
    var unixPath: String?

    @Option(name: .customLong("tcp"), help: ArgumentHelp("Connect to the TPM on host and port (default 127.0.0.1:6546).", valueName: "[host]:[port]"))
    var tcp: String?

    @Flag(name: .customShort("c"), help: "Get ptm capabilities.")
    var capability = false

    @Flag(name: .customShort("i"), help: "Do a hardware TPM_Init (INIT with DELETE_VOLATILE): resume from volatile state, then delete it.")
    var initialize = false

    @Flag(name: .customLong("stop"), help: "Stop the TPM without exiting.")
    var stop = false

    @Flag(name: .customShort("s"), help: "Shutdown the TPM; stops and exits.")
    var shutdown = false

    @Flag(name: .customShort("e"), help: "Get the tpmEstablished bit.")
    var established = false

    @Option(name: .customShort("r"), help: ArgumentHelp("Reset the tpmEstablished bit using the given locality.", valueName: "loc"))
    var resetLocality: String?

    @Flag(name: .customShort("v"), help: "Store the TPM's volatile data.")
    var storeVolatile = false

    @Flag(name: .customShort("C"), help: "Cancel an ongoing TPM command.")
    var cancel = false

    @Option(name: .customShort("l"), help: ArgumentHelp("Set the locality (0-4).", valueName: "loc"))
    var locality: String?

    @Option(name: .customShort("h"), help: ArgumentHelp("Hash the given data; '-' reads stdin.", valueName: "data"))
    var hashInput: String?

    @Option(name: .customLong("save"), parsing: .upToNextOption,
            help: ArgumentHelp("Store the state blob of a type (volatile, permanent, savestate) in a file.", valueName: "type> <file"))
    var save: [String] = []

    @Option(name: .customLong("load"), parsing: .upToNextOption,
            help: ArgumentHelp("Load the state blob of a type (volatile, permanent, savestate) from a file.", valueName: "type> <file"))
    var load: [String] = []

    @Flag(name: .customShort("g"), help: "Get configuration flags indicating which keys are in use.")
    var configFlags = false

    @Option(name: .customShort("b"), help: ArgumentHelp("Set the buffer size (0 queries); print size, minimum and maximum.", valueName: "buffersize"))
    var bufferSize: String?

    @Option(name: .customLong("info"), help: ArgumentHelp("Get TPM implementation specific information (integer flags).", valueName: "flags"))
    var info: String?

    @Option(name: .customLong("lock-storage"), help: ArgumentHelp("Lock the storage, retrying N times every 10 ms (swtpm 0.8+).", valueName: "retries"))
    var lockStorage: String?

    @Flag(name: .customLong("json"), help: "Print one JSON object instead of swtpm_ioctl's text.")
    var json = false

    @Option(name: .customLong("timeout"), help: "Seconds to wait for each reply (at most 10).")
    var timeout: Double = 5

    /// swtpm_ioctl's messages go to stderr, then exit status 1.
    private func fail(_ message: String) -> ExitCode {
        Self.write(2, message)
        return ExitCode.failure
    }

    /// Writes all of `text` to fd 1 or 2 (unbuffered, so stdout and stderr keep their order).
    static func write(_ fd: Int32, _ text: String) {
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { buf -> Int in
                guard let base = buf.baseAddress else { return 0 }
                return Glibc.write(fd, base + done, buf.count - done)
            }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            done += n
        }
    }

    /// `sscanf("%u")`: leading decimal digits.
    private static func scanUnsigned(_ s: String) -> UInt32? {
        let digits = s.drop { $0 == " " || $0 == "\t" }.prefix { $0.isASCII && $0.isNumber }
        return digits.isEmpty ? nil : UInt32(digits)
    }

    /// `strtoul(s, &end, 0)` with the whole string consumed: 0x hex, leading-0 octal, decimal.
    private static func parseCInteger(_ s: String) -> UInt64? {
        var t = Substring(s.drop { $0 == " " || $0 == "\t" })
        if t.hasPrefix("+") { t = t.dropFirst() }
        guard !t.isEmpty else { return nil }
        if t.lowercased().hasPrefix("0x") { return UInt64(t.dropFirst(2), radix: 16) }
        if t.count > 1 && t.hasPrefix("0") { return UInt64(t.dropFirst(), radix: 8) }
        return UInt64(t, radix: 10)
    }

    private func locality(_ s: String) throws -> UInt8 {
        guard let v = Self.scanUnsigned(s) else { throw fail("Could not get locality number from \(s).\n") }
        guard v <= 4 else { throw fail("Locality outside valid range of [0..4].\n") }
        return UInt8(v)
    }

    private func blob(_ values: [String], option: String) throws -> (TPMStateBlobType, String) {
        guard values.count == 2 else { throw fail("Missing filename argument for --\(option) option\n") }
        guard let type = SwtpmIoctl.blobType(named: values[0]) else {
            throw fail("Unknown TPM state type '\(values[0])'")   // swtpm_ioctl prints no newline here
        }
        return (type, values[1])
    }

    private func readStandardInput() -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    /// The one operation the options name (swtpm_ioctl: "Only one command may be given.").
    private func operation() throws -> SwtpmIoctl.Operation {
        var ops: [SwtpmIoctl.Operation] = []
        if capability { ops.append(.getCapability) }
        if initialize { ops.append(.initialize) }
        if stop { ops.append(.stop) }
        if shutdown { ops.append(.shutdown) }
        if established { ops.append(.getEstablished) }
        if let r = resetLocality { ops.append(.resetEstablished(locality: try locality(r))) }
        if storeVolatile { ops.append(.storeVolatile) }
        if cancel { ops.append(.cancel) }
        if let l = locality { ops.append(.setLocality(try locality(l))) }
        if let h = hashInput { ops.append(.hash(data: h == "-" ? readStandardInput() : Array(h.utf8))) }
        if !save.isEmpty { let (t, f) = try blob(save, option: "save"); ops.append(.save(type: t, file: f)) }
        if !load.isEmpty { let (t, f) = try blob(load, option: "load"); ops.append(.load(type: t, file: f)) }
        if configFlags { ops.append(.getConfig) }
        if let b = bufferSize {
            guard let v = Self.scanUnsigned(b) else { throw fail("Could not get buffersize from \(b).\n") }
            ops.append(.setBufferSize(v))
        }
        if let i = info {
            guard let v = Self.parseCInteger(i) else { throw fail("Cannot parse info flags.\n") }
            ops.append(.info(flags: v))
        }
        if let l = lockStorage {
            guard let v = Self.parseCInteger(l), v <= UInt64(UInt32.max) else { throw fail("Cannot parse retries.\n") }
            ops.append(.lockStorage(retries: UInt32(v)))
        }
        guard ops.count <= 1 else { throw fail("Only one command may be given.\n") }
        guard let op = ops.first else { throw fail("No valid command.\n") }
        return op
    }

    /// swtpm_ioctl `parse_tcp_optarg`: "host", ":port", "host:port"; default 127.0.0.1:6546.
    static func parseTCP(_ s: String) -> (host: String, port: UInt16)? {
        guard let colon = s.lastIndex(of: ":") else { return (s, 6546) }
        let host = colon == s.startIndex ? "127.0.0.1" : String(s[..<colon])
        let portText = s[s.index(after: colon)...]
        if portText.isEmpty { return colon == s.startIndex ? (host, 6546) : nil }
        guard let p = scanUnsigned(String(portText)), p < 65536 else { return nil }
        return (host, UInt16(p))
    }

    func run() throws {
        let op = try operation()
        let endpoint: SwtpmEndpoint
        if let unixPath {
            endpoint = .unix(path: unixPath)
        } else if let tcp {
            guard let hp = Self.parseTCP(tcp) else { throw fail("Invalid port '\(tcp)'\n") }
            endpoint = .tcp(host: hp.host, port: hp.port)
        } else {
            throw fail("Error: Missing device name.\n")
        }
        let client: SwtpmCtrlClient
        do {
            client = try SwtpmCtrlClient(connectingTo: endpoint, timeout: timeout)
        } catch {
            if json {
                Self.write(1, "{\"command\":\"\(op.code.name)\",\"ok\":false,\"error\":\(JSONString.quote(error.description)),\"code\":\"\(error.code.rawValue)\"}\n")
                throw ExitCode.failure
            }
            // swtpm_ioctl's open_connection / connect_nonblock messages.
            let reason = error.errno.map { String(cString: strerror($0)) } ?? error.message
            switch endpoint {
            case .unix:
                if error.errno != nil && error.code != .timeout { throw fail("Connect failed: \(reason)\n") }
                throw fail("Could not connect using UnixIO socket.\n")
            case .tcp(let h, let p):
                throw fail("Could not connect to host '\(h)' on port '\(p)' using TCP socket: \(reason)\n")
            }
        }
        let outcome = SwtpmIoctl.run(op, client: client)
        client.close()
        if json {
            Self.write(1, outcome.json + "\n")
        } else {
            Self.write(1, outcome.standardOutput)
            Self.write(2, outcome.standardError)
        }
        if outcome.exitCode != 0 { throw ExitCode(outcome.exitCode) }
    }

}
