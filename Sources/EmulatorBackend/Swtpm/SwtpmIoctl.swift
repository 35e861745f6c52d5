#if canImport(Glibc)
import Glibc
import WireFormat
#endif

/// The operations of swtpm's `swtpm_ioctl` tool over a ctrl socket, with its exact output text
/// (swtpm `src/swtpm_ioctl/tpm_ioctl.c`, 0.7.1): the code path of `tis-sim ctrl`, kept in the
/// library so tests run exactly what the CLI runs.
public enum SwtpmIoctl {
    /// One swtpm_ioctl command.
    public enum Operation: Sendable, Equatable {
        /// `-c`: CMD_GET_CAPABILITY.
        case getCapability
        /// `-i`: CMD_INIT with DELETE_VOLATILE.
        case initialize
        /// `--stop`: CMD_STOP.
        case stop
        /// `-s`: CMD_SHUTDOWN (swtpm exits).
        case shutdown
        /// `-e`: CMD_GET_TPMESTABLISHED.
        case getEstablished
        /// `-r LOC`: CMD_RESET_TPMESTABLISHED.
        case resetEstablished(locality: UInt8)
        /// `-v`: CMD_STORE_VOLATILE.
        case storeVolatile
        /// `-C`: CMD_CANCEL_TPM_CMD.
        case cancel
        /// `-l LOC`: CMD_SET_LOCALITY.
        case setLocality(UInt8)
        /// `-h DATA`: CMD_HASH_START, CMD_HASH_DATA (4 KiB chunks), CMD_HASH_END.
        case hash(data: [UInt8])
        /// `--save TYPE FILE`: CMD_GET_STATEBLOB (DECRYPTED) into FILE.
        case save(type: TPMStateBlobType, file: String)
        /// `--load TYPE FILE`: CMD_SET_STATEBLOB (flags 0) from FILE.
        case load(type: TPMStateBlobType, file: String)
        /// `-g`: CMD_GET_CONFIG.
        case getConfig
        /// `-b SIZE`: CMD_SET_BUFFERSIZE.
        case setBufferSize(UInt32)
        /// `--info FLAGS`: CMD_GET_INFO.
        case info(flags: UInt64)
        /// `--lock-storage RETRIES`: CMD_LOCK_STORAGE (swtpm_ioctl ≥ 0.8).
        case lockStorage(retries: UInt32)

        /// The ctrl command it sends first.
        public var code: SwtpmCtrl.CommandCode {
            switch self {
            case .getCapability: .getCapability
            case .initialize: .initialize
            case .stop: .stop
            case .shutdown: .shutdown
            case .getEstablished: .getTPMEstablished
            case .resetEstablished: .resetTPMEstablished
            case .storeVolatile: .storeVolatile
            case .cancel: .cancelTPMCommand
            case .setLocality: .setLocality
            case .hash: .hashStart
            case .save: .getStateBlob
            case .load: .setStateBlob
            case .getConfig: .getConfig
            case .setBufferSize: .setBufferSize
            case .info: .getInfo
            case .lockStorage: .lockStorage
            }
        }
    }

    /// What the tool printed and its exit status, plus a one-line JSON object for `--json`.
    public struct Outcome: Sendable, Equatable {
        public var exitCode: Int32
        public var standardOutput: String
        public var standardError: String
        public var json: String
    }

    /// Blob type names as swtpm_ioctl takes them (`get_blobtype`).
    public static func blobType(named name: String) -> TPMStateBlobType? {
        switch name {
        case "permanent": .permanent
        case "volatile": .volatile
        case "savestate": .savestate
        default: nil
        }
    }

    /// Runs `operation` over `client`.
    public static func run(_ operation: Operation, client: SwtpmCtrlClient) -> Outcome {
        var out = OutcomeBuilder(command: operation.code)
        do throws(BackendError) {
            try perform(operation, client, &out)
        } catch {
            out.fail(error)
        }
        return out.build()
    }

    // swtpm_ioctl says "PTM_GET_ESTABLISHED" / "PTM_RESET_ESTABLISHED" when the call fails and
    // "PTM_GET_TPMESTABLISHED" / "PTM_RESET_TPMESTABLISHED" for a TPM result; "ioctl PTM_…"
    // for the hash and state-blob calls.
    private static func transportName(_ op: Operation, _ code: SwtpmCtrl.CommandCode) -> String {
        switch op {
        case .getEstablished: "PTM_GET_ESTABLISHED"
        case .resetEstablished: "PTM_RESET_ESTABLISHED"
        case .hash, .save, .load: "ioctl " + code.ioctlName
        default: code.ioctlName
        }
    }

    /// One ctrl call with swtpm_ioctl's two failure messages.
    private static func call<R: SwtpmCtrlRequest>(_ op: Operation, _ client: SwtpmCtrlClient, _ request: R,
                                                   _ out: inout OutcomeBuilder,
                                                   accept: (UInt32) -> Bool = { $0 == 0 }) throws(BackendError) -> R.Response {
        let response: R.Response
        do throws(BackendError) {
            response = try client.transact(request)
        } catch {
            out.stderr += "Could not execute \(transportName(op, R.code)): \(error.message)\n"
            throw error
        }
        guard accept(response.result) else {
            out.stderr += "TPM result from \(R.code.ioctlName): 0x\(String(response.result, radix: 16))\n"
            out.json["tpmResult"] = .int(Int64(response.result))
            throw SwtpmCtrlClient.failure(R.code, response.result)
        }
        return response
    }

    private static func perform(_ op: Operation, _ client: SwtpmCtrlClient, _ out: inout OutcomeBuilder) throws(BackendError) {
        switch op {
        case .getCapability:
            let r = try call(op, client, SwtpmCtrl.GetCapability(), &out, accept: { _ in true })
            out.stdout += "ptm capability is 0x\(String(r.rawValue64, radix: 16))\n"
            out.json["capabilities"] = .int(Int64(bitPattern: r.rawValue64))
            out.json["names"] = .array(r.capabilities.names.map { .string($0) })
        case .initialize:
            _ = try call(op, client, SwtpmCtrl.Initialize(flags: .deleteVolatile), &out)
        case .stop:
            _ = try call(op, client, SwtpmCtrl.Stop(), &out)
        case .shutdown:
            _ = try call(op, client, SwtpmCtrl.Shutdown(), &out)
        case .getEstablished:
            let r = try call(op, client, SwtpmCtrl.GetTPMEstablished(), &out)
            out.stdout += "tpmEstablished is \(r.bit)\n"
            out.json["established"] = .bool(r.isEstablished)
        case .resetEstablished(let loc):
            _ = try call(op, client, SwtpmCtrl.ResetTPMEstablished(locality: loc), &out)
            out.json["locality"] = .int(Int64(loc))
        case .storeVolatile:
            _ = try call(op, client, SwtpmCtrl.StoreVolatile(), &out)
        case .cancel:
            _ = try call(op, client, SwtpmCtrl.CancelTPMCommand(), &out)
        case .setLocality(let loc):
            _ = try call(op, client, SwtpmCtrl.SetLocality(locality: loc), &out)
            out.json["locality"] = .int(Int64(loc))
        case .hash(let data):
            out.command = .hashStart
            _ = try call(op, client, SwtpmCtrl.HashStart(), &out)
            out.command = .hashData
            var i = 0
            repeat {
                let end = min(i + SwtpmCtrl.hashDataChunk, data.count)
                _ = try call(op, client, SwtpmCtrl.HashData(data: Array(data[i..<end])), &out)
                i = end
            } while i < data.count
            out.command = .hashEnd
            _ = try call(op, client, SwtpmCtrl.HashEnd(), &out)
            out.json["bytes"] = .int(Int64(data.count))
        case .save(let type, let file):
            try save(op, type, file, client, &out)
        case .load(let type, let file):
            try load(op, type, file, client, &out)
        case .getConfig:
            let r = try call(op, client, SwtpmCtrl.GetConfig(), &out)
            out.stdout += "ptm configuration flags: 0x\(String(r.flags.rawValue, radix: 16))\n"
            out.json["flags"] = .int(Int64(r.flags.rawValue))
            out.json["fileKey"] = .bool(r.flags.contains(.fileKey))
            out.json["migrationKey"] = .bool(r.flags.contains(.migrationKey))
        case .setBufferSize(let size):
            let r = try call(op, client, SwtpmCtrl.SetBufferSize(size: size), &out)
            out.stdout += "TPM buffersize: \(r.bufferSize)\nminimum size  : \(r.minimumSize)\nmaximum size  : \(r.maximumSize)\n"
            out.json["bufferSize"] = .int(Int64(r.bufferSize))
            out.json["minimumSize"] = .int(Int64(r.minimumSize))
            out.json["maximumSize"] = .int(Int64(r.maximumSize))
        case .info(let flags):
            var bytes: [UInt8] = []
            var total = Int.max
            while bytes.count < total {
                let r = try call(op, client, SwtpmCtrl.GetInfo(flags: SwtpmCtrl.InfoFlags(rawValue: flags), offset: UInt32(bytes.count)), &out)
                total = min(Int(r.totalLength), SwtpmCtrl.getInfoTotalLimit)
                if r.chunk.isEmpty { break }
                bytes += r.chunk
                if r.chunk.last == 0 { break }
            }
            if let nul = bytes.firstIndex(of: 0) { bytes.removeSubrange(nul...) }
            let text = String(decoding: bytes, as: UTF8.self)
            out.stdout += text + "\n"
            out.json["info"] = .string(text)
        case .lockStorage(let retries):
            _ = try call(op, client, SwtpmCtrl.LockStorage(retries: retries), &out)
            out.json["retries"] = .int(Int64(retries))
        }
    }

    /// swtpm_ioctl `do_save_state_blob`: the file is created (0600, truncated) before the
    /// request, so a failed save leaves an empty file, as swtpm_ioctl does.
    private static func save(_ op: Operation, _ type: TPMStateBlobType, _ file: String,
                             _ client: SwtpmCtrlClient, _ out: inout OutcomeBuilder) throws(BackendError) {
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let e = lastErrno()
            out.stderr += "Could not open file '\(file)' for writing: \(errnoString(e))\n"
            throw BackendError(.io, "cannot open \(file)", operation: op.code.name, blobType: type, errno: e)
        }
        defer { _ = close(fd) }
        let r = try call(op, client, SwtpmCtrl.GetStateBlob(type: type, flags: .decrypted), &out,
                         accept: { $0 == 0 || $0 & SwtpmCtrl.Result.nonFatal != 0 })
        let data = r.result == 0 ? r.data : []
        var written = 0
        while written < data.count {
            let n = data.withUnsafeBytes { buf -> Int in
                guard let base = buf.baseAddress else { return 0 }
                return write(fd, base + written, buf.count - written)
            }
            if n < 0 && lastErrno() == EINTR { continue }
            guard n > 0 else {
                let e = lastErrno()
                out.stderr += "Could not write to file '\(file)': \(errnoString(e))\n"
                throw BackendError(.io, "cannot write \(file)", operation: op.code.name, blobType: type, errno: e)
            }
            written += n
        }
        out.json["blobType"] = .string(type.description)
        out.json["file"] = .string(file)
        out.json["bytes"] = .int(Int64(data.count))
        out.json["stateFlags"] = .int(Int64(r.stateFlags.rawValue))
    }

    /// swtpm_ioctl `do_load_state_blob` over a socket: header with the file's length and
    /// state_flags 0, the file's bytes, then the result.
    private static func load(_ op: Operation, _ type: TPMStateBlobType, _ file: String,
                             _ client: SwtpmCtrlClient, _ out: inout OutcomeBuilder) throws(BackendError) {
        let data: [UInt8]
        do throws(BackendError) {
            data = try readFile(file, limit: SwtpmBlob.maximumSize)
        } catch {
            out.stderr += "Could not open file '\(file)' for reading: \(error.errno.map(errnoString) ?? error.message)\n"
            throw error
        }
        _ = try call(op, client, SwtpmCtrl.SetStateBlob(type: type, flags: [], data: data), &out)
        out.json["blobType"] = .string(type.description)
        out.json["file"] = .string(file)
        out.json["bytes"] = .int(Int64(data.count))
    }

    /// Reads a whole file, refusing one above `limit` bytes before reading it.
    static func readFile(_ path: String, limit: Int) throws(BackendError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = lastErrno()
            throw BackendError(.io, "cannot open \(path): \(errnoString(e))", errno: e)
        }
        defer { _ = close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = lastErrno()
            throw BackendError(.io, "cannot stat \(path): \(errnoString(e))", errno: e)
        }
        guard Int(st.st_size) <= limit else {
            throw BackendError(.stateBlob, "\(path) has \(st.st_size) bytes, above the limit \(limit)", errno: EFBIG)
        }
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        var got = 0
        while got < out.count {
            let n = out.withUnsafeMutableBytes { buf -> Int in
                guard let base = buf.baseAddress else { return 0 }
                return read(fd, base + got, buf.count - got)
            }
            if n < 0 && lastErrno() == EINTR { continue }
            if n < 0 {
                let e = lastErrno()
                throw BackendError(.io, "cannot read \(path): \(errnoString(e))", errno: e)
            }
            if n == 0 { break }
            got += n
        }
        return Array(out.prefix(got))
    }
}

// MARK: - Output

/// A minimal JSON value for deterministic `--json` output (keys in insertion order).
enum IoctlJSON: Sendable, Equatable {
    case int(Int64)
    case bool(Bool)
    case string(String)
    case array([IoctlJSON])

    var text: String {
        switch self {
        case .int(let v): String(v)
        case .bool(let b): b ? "true" : "false"
        case .string(let s): JSONString.quote(s)
        case .array(let a): "[" + a.map(\.text).joined(separator: ",") + "]"
        }
    }

}

struct OrderedJSON: Sendable {
    private(set) var keys: [String] = []
    private var values: [String: IoctlJSON] = [:]

    subscript(key: String) -> IoctlJSON? {
        get { values[key] }
        set {
            if values[key] == nil, newValue != nil { keys.append(key) }
            if newValue == nil { keys.removeAll { $0 == key } }
            values[key] = newValue
        }
    }

    var text: String {
        "{" + keys.compactMap { k in values[k].map { JSONString.quote(k) + ":" + $0.text } }.joined(separator: ",") + "}"
    }
}

struct OutcomeBuilder {
    var command: SwtpmCtrl.CommandCode
    var stdout = ""
    var stderr = ""
    var json = OrderedJSON()
    var error: BackendError? = nil

    init(command: SwtpmCtrl.CommandCode) { self.command = command }

    mutating func fail(_ e: BackendError) { error = e }

    func build() -> SwtpmIoctl.Outcome {
        var j = OrderedJSON()
        j["command"] = .string(command.name)
        j["ok"] = .bool(error == nil)
        for k in json.keys { j[k] = json[k] }
        if let error {
            j["error"] = .string(error.description)
            j["code"] = .string(error.code.rawValue)
            if j["tpmResult"] == nil, let r = error.tpmResult { j["tpmResult"] = .int(Int64(r)) }
        }
        return SwtpmIoctl.Outcome(exitCode: error == nil ? 0 : 1, standardOutput: stdout, standardError: stderr, json: j.text)
    }
}
