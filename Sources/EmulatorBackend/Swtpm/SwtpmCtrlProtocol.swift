import WireFormat

/// swtpm's control protocol ("ctrl channel", swtpm `include/swtpm/tpm_ioctl.h`, QEMU
/// `backends/tpm/tpm_ioctl.h`): constants and the typed requests and responses of all 19
/// commands, with pure encode/decode. Every integer on the socket is big-endian.
///
/// A request is the be32 command code followed by its body, in one write (SET_STATEBLOB sends
/// its data as a second write). A response starts with the be32 result; the rest is read only
/// when the result says there is a rest (`readsPayload(result:)`), as QEMU ≥ 9.2 and
/// cloud-hypervisor do, because swtpm answers every early error with the 4-byte result alone.
public enum SwtpmCtrl {
    /// The command codes (`CMD_*`). No code above 0x13 exists.
    public enum CommandCode: UInt32, Sendable, CaseIterable, CustomStringConvertible {
        case getCapability = 0x01
        case initialize = 0x02
        case shutdown = 0x03
        case getTPMEstablished = 0x04
        case setLocality = 0x05
        case hashStart = 0x06
        case hashData = 0x07
        case hashEnd = 0x08
        case cancelTPMCommand = 0x09
        case storeVolatile = 0x0A
        case resetTPMEstablished = 0x0B
        case getStateBlob = 0x0C
        case setStateBlob = 0x0D
        case stop = 0x0E
        case getConfig = 0x0F
        case setDataFD = 0x10
        case setBufferSize = 0x11
        case getInfo = 0x12
        case lockStorage = 0x13

        /// The C name, used as `BackendError.operation` ("CMD_GET_STATEBLOB").
        public var name: String {
            switch self {
            case .getCapability: "CMD_GET_CAPABILITY"
            case .initialize: "CMD_INIT"
            case .shutdown: "CMD_SHUTDOWN"
            case .getTPMEstablished: "CMD_GET_TPMESTABLISHED"
            case .setLocality: "CMD_SET_LOCALITY"
            case .hashStart: "CMD_HASH_START"
            case .hashData: "CMD_HASH_DATA"
            case .hashEnd: "CMD_HASH_END"
            case .cancelTPMCommand: "CMD_CANCEL_TPM_CMD"
            case .storeVolatile: "CMD_STORE_VOLATILE"
            case .resetTPMEstablished: "CMD_RESET_TPMESTABLISHED"
            case .getStateBlob: "CMD_GET_STATEBLOB"
            case .setStateBlob: "CMD_SET_STATEBLOB"
            case .stop: "CMD_STOP"
            case .getConfig: "CMD_GET_CONFIG"
            case .setDataFD: "CMD_SET_DATAFD"
            case .setBufferSize: "CMD_SET_BUFFERSIZE"
            case .getInfo: "CMD_GET_INFO"
            case .lockStorage: "CMD_LOCK_STORAGE"
            }
        }

        /// The ioctl name swtpm_ioctl prints in its messages ("PTM_GET_STATEBLOB").
        public var ioctlName: String { "PTM_" + name.dropFirst(4) }

        public var description: String { name }
    }

    /// `PTM_CAP_*`: what a swtpm implements (CMD_GET_CAPABILITY). swtpm ≤ 0.9 sends them as one
    /// be64; ≥ 0.10 as `{be32 result = 0, be32 caps}`; the bytes are the same.
    public struct Capabilities: OptionSet, Sendable, Hashable, CustomStringConvertible {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }

        public static let initialize = Capabilities(rawValue: 1 << 0)
        public static let shutdown = Capabilities(rawValue: 1 << 1)
        public static let getTPMEstablished = Capabilities(rawValue: 1 << 2)
        public static let setLocality = Capabilities(rawValue: 1 << 3)
        /// HASH_START / HASH_DATA / HASH_END.
        public static let hashing = Capabilities(rawValue: 1 << 4)
        public static let cancelTPMCommand = Capabilities(rawValue: 1 << 5)
        public static let storeVolatile = Capabilities(rawValue: 1 << 6)
        public static let resetTPMEstablished = Capabilities(rawValue: 1 << 7)
        public static let getStateBlob = Capabilities(rawValue: 1 << 8)
        public static let setStateBlob = Capabilities(rawValue: 1 << 9)
        public static let stop = Capabilities(rawValue: 1 << 10)
        public static let getConfig = Capabilities(rawValue: 1 << 11)
        public static let setDataFD = Capabilities(rawValue: 1 << 12)
        public static let setBufferSize = Capabilities(rawValue: 1 << 13)
        public static let getInfo = Capabilities(rawValue: 1 << 14)
        /// The data channel accepts the mssim TPM_SEND_COMMAND prefix (TPM 2 only).
        public static let sendCommandHeader = Capabilities(rawValue: 1 << 15)
        /// CMD_LOCK_STORAGE (swtpm 0.8+).
        public static let lockStorage = Capabilities(rawValue: 1 << 16)

        /// QEMU `tpm_emulator_check_caps`, TPM 1.2: 0x340F.
        public static let qemuMinimumTPM12: Capabilities = [.initialize, .shutdown, .getTPMEstablished, .setLocality,
                                                            .setDataFD, .stop, .setBufferSize]
        /// QEMU `tpm_emulator_check_caps`, TPM 2.0: 0x348F.
        public static let qemuMinimumTPM20: Capabilities = qemuMinimumTPM12.union(.resetTPMEstablished)
        /// Without all of these QEMU installs a migration blocker (0x700).
        public static let migration: Capabilities = [.getStateBlob, .setStateBlob, .stop]

        static let names: [(Capabilities, String)] = [
            (.initialize, "INIT"), (.shutdown, "SHUTDOWN"), (.getTPMEstablished, "GET_TPMESTABLISHED"),
            (.setLocality, "SET_LOCALITY"), (.hashing, "HASHING"), (.cancelTPMCommand, "CANCEL_TPM_CMD"),
            (.storeVolatile, "STORE_VOLATILE"), (.resetTPMEstablished, "RESET_TPMESTABLISHED"),
            (.getStateBlob, "GET_STATEBLOB"), (.setStateBlob, "SET_STATEBLOB"), (.stop, "STOP"),
            (.getConfig, "GET_CONFIG"), (.setDataFD, "SET_DATAFD"), (.setBufferSize, "SET_BUFFERSIZE"),
            (.getInfo, "GET_INFO"), (.sendCommandHeader, "SEND_COMMAND_HEADER"), (.lockStorage, "LOCK_STORAGE"),
        ]

        /// The `PTM_CAP_*` names of the bits set, lowest first.
        public var names: [String] { Self.names.filter { contains($0.0) }.map(\.1) }

        public var description: String { "0x" + String(rawValue, radix: 16) + " [" + names.joined(separator: ",") + "]" }
    }

    /// `PTM_INIT_FLAG_*`.
    public struct InitFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Delete the volatile state after libtpms has started (having resumed from it).
        public static let deleteVolatile = InitFlags(rawValue: 1)
    }

    /// `PTM_STATE_FLAG_*` of GET/SET_STATEBLOB.
    public struct StateFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Request: return the blob without the state-key (`--key`) encryption.
        public static let decrypted = StateFlags(rawValue: 1)
        /// Response / SET: the blob still carries the state-key encryption.
        public static let encrypted = StateFlags(rawValue: 2)
    }

    /// `PTM_CONFIG_FLAG_*` of CMD_GET_CONFIG.
    public struct ConfigFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// A state key (`--key`) is set.
        public static let fileKey = ConfigFlags(rawValue: 1)
        /// A migration key (`--migration-key`) is set.
        public static let migrationKey = ConfigFlags(rawValue: 2)
    }

    /// `SWTPM_INFO_*` of CMD_GET_INFO. swtpm 0.7.1 knows 0x1, 0x2 and 0x4; newer flags yield `{}`.
    public struct InfoFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let tpmSpecification = InfoFlags(rawValue: 0x1)
        public static let tpmAttributes = InfoFlags(rawValue: 0x2)
        public static let tpmFeatures = InfoFlags(rawValue: 0x4)
        public static let runtimeAlgorithms = InfoFlags(rawValue: 0x8)
        public static let runtimeCommands = InfoFlags(rawValue: 0x10)
        public static let activeProfile = InfoFlags(rawValue: 0x20)
        public static let availableProfiles = InfoFlags(rawValue: 0x40)
        public static let runtimeAttributes = InfoFlags(rawValue: 0x80)
    }

    /// TPM result codes the ctrl channel produces (TPM 1.2 `TPM_RESULT` values).
    public enum Result {
        public static let success: UInt32 = 0x00
        public static let badParameter: UInt32 = 0x03
        public static let fail: UInt32 = 0x09
        public static let badOrdinal: UInt32 = 0x0A
        public static let ioError: UInt32 = 0x1F
        public static let badLocality: UInt32 = 0x3D
        /// `TPM_NON_FATAL`: GET_STATEBLOB's "no such state" (TPM_RETRY); QEMU tolerates any
        /// result with this bit and stores an empty blob.
        public static let nonFatal: UInt32 = 0x800
    }

    /// swtpm's GET_INFO buffer (`PTM_GETINFO_SIZE`, 3 KiB); a larger reply chunk is refused.
    public static let getInfoChunkLimit = 3 * 1024
    /// Larger GET_INFO strings are refused (newer swtpm's profile JSON is a few KiB).
    public static let getInfoTotalLimit = 1 << 20
    /// swtpm_ioctl's chunk for HASH_DATA (`ptm_hdata.u.req.data`); larger data is split.
    public static let hashDataChunk = 4096
}

// MARK: - Request and response protocols

/// A ctrl request: pure value, encodes to the bytes of one write (code + body), plus data that
/// goes out as a separate write (SET_STATEBLOB's blob).
public protocol SwtpmCtrlRequest: Sendable, Equatable {
    associatedtype Response: SwtpmCtrlResponse
    static var code: SwtpmCtrl.CommandCode { get }
    /// The request body after the command code.
    func encodeBody(into w: inout ByteWriter)
    /// Bytes written after the first write (SET_STATEBLOB's blob); empty for the others.
    var trailingData: [UInt8] { get }
}

extension SwtpmCtrlRequest {
    public var trailingData: [UInt8] { [] }

    /// The first write: be32 code, then the body.
    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 32)
        w.writeBigEndianUInt32(Self.code.rawValue)
        encodeBody(into: &w)
        return w.bytes
    }
}

/// A ctrl response: the be32 result, then, when `readsPayload(result:)`, a fixed head of
/// `headLength` bytes and a variable tail whose length the head gives.
public protocol SwtpmCtrlResponse: Sendable, Equatable {
    /// The TPM result (0 = success).
    var result: UInt32 { get }
    /// Fixed bytes after the result word.
    static var headLength: Int { get }
    /// Whether the head (and tail) follow a result: only on success, except where swtpm
    /// documents otherwise (GET_STATEBLOB's TPM_RETRY).
    static func readsPayload(result: UInt32) -> Bool
    /// Bytes after the head, from the head; checked against a limit before anything is allocated.
    static func tailLength(result: UInt32, head: [UInt8]) throws(WireError) -> Int
    /// Builds the value from the result and what was read after it (empty if nothing).
    init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError)
}

extension SwtpmCtrlResponse {
    public static var headLength: Int { 0 }
    public static func readsPayload(result: UInt32) -> Bool { result == 0 }
    public static func tailLength(result: UInt32, head: [UInt8]) throws(WireError) -> Int { 0 }

    /// Pure decode of a complete reply. On success every byte must be accounted for; after a
    /// non-zero result the bytes swtpm 0.7.1 still sends for some commands are ignored.
    public static func decode(_ bytes: [UInt8], field: String = "ctrl") throws(WireError) -> Self {
        var r = ByteReader(bytes)
        let result = try r.readBigEndianUInt32(field + ".result")
        guard readsPayload(result: result) else {
            return try Self(result: result, head: [], tail: [])
        }
        let head = try r.readBytes(headLength, field + ".head")
        let n = try tailLength(result: result, head: head)
        let tail = try r.readBytes(n, field + ".data")
        guard r.isAtEnd || result != 0 else {
            throw WireError(.invalidValue, field: field, offset: r.offset, detail: "\(r.remaining) trailing bytes")
        }
        return try Self(result: result, head: head, tail: tail)
    }
}

// MARK: - Responses

extension SwtpmCtrl {
    /// `ptm_res`: the result word only (INIT, SHUTDOWN, SET_LOCALITY, HASH_*, CANCEL_TPM_CMD,
    /// STORE_VOLATILE, RESET_TPMESTABLISHED, SET_STATEBLOB, STOP, SET_DATAFD, LOCK_STORAGE).
    public struct ResultResponse: SwtpmCtrlResponse {
        public var result: UInt32
        public init(result: UInt32) { self.result = result }
        public init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError) { self.result = result }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: 4)
            w.writeBigEndianUInt32(result)
            return w.bytes
        }
    }

    /// `ptm_cap` (8 bytes). The high word is `result` in the ≥ 0.10 declaration and the high
    /// half of the be64 in 0.7.1; it is 0 in both.
    public struct CapabilityResponse: SwtpmCtrlResponse {
        public var result: UInt32
        public var capabilities: Capabilities
        public static var headLength: Int { 4 }

        public init(result: UInt32 = 0, capabilities: Capabilities) {
            self.result = result
            self.capabilities = capabilities
        }

        public init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError) {
            self.result = result
            var r = ByteReader(head, baseOffset: 4)
            capabilities = Capabilities(rawValue: head.isEmpty ? 0 : UInt64(try r.readBigEndianUInt32("caps")))
        }

        /// The 8 bytes read as swtpm ≤ 0.9 and QEMU 7.2 read them: one be64 (what swtpm_ioctl prints).
        public var rawValue64: UInt64 { UInt64(result) << 32 | capabilities.rawValue }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: 8)
            w.writeBigEndianUInt32(result)
            w.writeBigEndianUInt32(UInt32(truncatingIfNeeded: capabilities.rawValue))
            return w.bytes
        }
    }

    /// `ptm_est` response: result, u8 bit, 3 padding bytes.
    public struct EstablishedResponse: SwtpmCtrlResponse {
        public var result: UInt32
        public var bit: UInt8
        public static var headLength: Int { 4 }

        public init(result: UInt32 = 0, bit: UInt8) {
            self.result = result
            self.bit = bit
        }

        public init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError) {
            self.result = result
            bit = head.first ?? 0
        }

        public var isEstablished: Bool { bit != 0 }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: 8)
            w.writeBigEndianUInt32(result)
            w.writeBytes([bit, 0, 0, 0])
            return w.bytes
        }
    }

    /// `ptm_getstate` response: result, state_flags, totlength, length, then `totlength` bytes.
    /// QEMU (`tpm_emulator_get_state_blob`) requires totlength == length; a blob larger than
    /// `SwtpmBlob.maximumSize` is refused before allocation.
    public struct GetStateBlobResponse: SwtpmCtrlResponse {
        public var result: UInt32
        public var stateFlags: StateFlags
        public var data: [UInt8]
        public static var headLength: Int { 12 }

        public init(result: UInt32 = 0, stateFlags: StateFlags = [], data: [UInt8]) {
            self.result = result
            self.stateFlags = stateFlags
            self.data = data
        }

        /// swtpm sends the 16-byte header for TPM_RETRY (0x800: no such state); QEMU tolerates
        /// any result with that bit and keeps an empty blob.
        public static func readsPayload(result: UInt32) -> Bool {
            result == 0 || result & Result.nonFatal != 0
        }

        public static func tailLength(result: UInt32, head: [UInt8]) throws(WireError) -> Int {
            var r = ByteReader(head, baseOffset: 4)
            _ = try r.readBigEndianUInt32("GET_STATEBLOB.state_flags")
            let total = try r.readBigEndianUInt32("GET_STATEBLOB.totlength")
            let length = try r.readBigEndianUInt32("GET_STATEBLOB.length")
            guard total == length else {
                throw WireError(.invalidValue, field: "GET_STATEBLOB.totlength", offset: 8,
                                detail: "totlength \(total) differs from length \(length)")
            }
            guard Int(total) <= SwtpmBlob.maximumSize else {
                throw WireError(.lengthOverLimit, field: "GET_STATEBLOB.totlength", offset: 8,
                                detail: "\(total) bytes exceed the limit \(SwtpmBlob.maximumSize)")
            }
            // swtpm sends blob bytes only with result 0 (ctrlchannel_return_state).
            return result == 0 ? Int(total) : 0
        }

        public init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError) {
            self.result = result
            var r = ByteReader(head, baseOffset: 4)
            stateFlags = head.isEmpty ? [] : StateFlags(rawValue: try r.readBigEndianUInt32("state_flags"))
            data = tail
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: 16 + data.count)
            w.writeBigEndianUInt32(result)
            w.writeBigEndianUInt32(stateFlags.rawValue)
            w.writeBigEndianUInt32(UInt32(data.count))
            w.writeBigEndianUInt32(UInt32(data.count))
            w.writeBytes(data)
            return w.bytes
        }
    }

    /// `ptm_getconfig` response: result, flags.
    public struct GetConfigResponse: SwtpmCtrlResponse {
        public var result: UInt32
        public var flags: ConfigFlags
        public static var headLength: Int { 4 }

        public init(result: UInt32 = 0, flags: ConfigFlags) {
            self.result = result
            self.flags = flags
        }

        public init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError) {
            self.result = result
            var r = ByteReader(head, baseOffset: 4)
            flags = head.isEmpty ? [] : ConfigFlags(rawValue: try r.readBigEndianUInt32("flags"))
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: 8)
            w.writeBigEndianUInt32(result)
            w.writeBigEndianUInt32(flags.rawValue)
            return w.bytes
        }
    }

    /// `ptm_setbuffersize` response: result, buffer size in use, minimum, maximum.
    public struct SetBufferSizeResponse: SwtpmCtrlResponse {
        public var result: UInt32
        public var bufferSize: UInt32
        public var minimumSize: UInt32
        public var maximumSize: UInt32
        public static var headLength: Int { 12 }

        public init(result: UInt32 = 0, bufferSize: UInt32, minimumSize: UInt32, maximumSize: UInt32) {
            self.result = result
            self.bufferSize = bufferSize
            self.minimumSize = minimumSize
            self.maximumSize = maximumSize
        }

        public init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError) {
            self.result = result
            if head.isEmpty {
                bufferSize = 0; minimumSize = 0; maximumSize = 0
                return
            }
            var r = ByteReader(head, baseOffset: 4)
            bufferSize = try r.readBigEndianUInt32("buffersize")
            minimumSize = try r.readBigEndianUInt32("minsize")
            maximumSize = try r.readBigEndianUInt32("maxsize")
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: 16)
            w.writeBigEndianUInt32(result)
            w.writeBigEndianUInt32(bufferSize)
            w.writeBigEndianUInt32(minimumSize)
            w.writeBigEndianUInt32(maximumSize)
            return w.bytes
        }
    }

    /// `ptm_getinfo` response: result, totlength, length, then `length` bytes of a
    /// NUL-terminated JSON string (one chunk starting at the request's offset).
    public struct GetInfoResponse: SwtpmCtrlResponse {
        public var result: UInt32
        /// The whole string's length including its NUL.
        public var totalLength: UInt32
        /// This chunk's bytes (may end with the NUL).
        public var chunk: [UInt8]
        public static var headLength: Int { 8 }

        public init(result: UInt32 = 0, totalLength: UInt32, chunk: [UInt8]) {
            self.result = result
            self.totalLength = totalLength
            self.chunk = chunk
        }

        public static func tailLength(result: UInt32, head: [UInt8]) throws(WireError) -> Int {
            var r = ByteReader(head, baseOffset: 4)
            let total = try r.readBigEndianUInt32("GET_INFO.totlength")
            let length = try r.readBigEndianUInt32("GET_INFO.length")
            guard length <= total else {
                throw WireError(.invalidValue, field: "GET_INFO.length", offset: 8,
                                detail: "length \(length) exceeds totlength \(total)")
            }
            guard Int(length) <= SwtpmCtrl.getInfoChunkLimit else {
                throw WireError(.lengthOverLimit, field: "GET_INFO.length", offset: 8,
                                detail: "\(length) bytes exceed the limit \(SwtpmCtrl.getInfoChunkLimit)")
            }
            return Int(length)
        }

        public init(result: UInt32, head: [UInt8], tail: [UInt8]) throws(WireError) {
            self.result = result
            var r = ByteReader(head, baseOffset: 4)
            totalLength = head.isEmpty ? 0 : try r.readBigEndianUInt32("totlength")
            chunk = tail
        }

        public func encoded() -> [UInt8] {
            var w = ByteWriter(capacity: 12 + chunk.count)
            w.writeBigEndianUInt32(result)
            w.writeBigEndianUInt32(totalLength)
            w.writeBigEndianUInt32(UInt32(chunk.count))
            w.writeBytes(chunk)
            return w.bytes
        }
    }
}

// MARK: - Requests

extension SwtpmCtrl {
    /// CMD_GET_CAPABILITY: no body.
    public struct GetCapability: SwtpmCtrlRequest {
        public typealias Response = CapabilityResponse
        public static var code: CommandCode { .getCapability }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_INIT: be32 init_flags (exactly 4 bytes).
    public struct Initialize: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .initialize }
        public var flags: InitFlags
        public init(flags: InitFlags = []) { self.flags = flags }
        public func encodeBody(into w: inout ByteWriter) { w.writeBigEndianUInt32(flags.rawValue) }
    }

    /// CMD_SHUTDOWN: no body; swtpm exits after answering.
    public struct Shutdown: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .shutdown }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_GET_TPMESTABLISHED: no body; needs a running TPM.
    public struct GetTPMEstablished: SwtpmCtrlRequest {
        public typealias Response = EstablishedResponse
        public static var code: CommandCode { .getTPMEstablished }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_SET_LOCALITY: u8 locality + 3 zero bytes (as QEMU sends it).
    public struct SetLocality: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .setLocality }
        public var locality: UInt8
        public init(locality: UInt8) { self.locality = locality }
        public func encodeBody(into w: inout ByteWriter) { w.writeBytes([locality, 0, 0, 0]) }
    }

    /// CMD_HASH_START: no body.
    public struct HashStart: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .hashStart }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_HASH_DATA: be32 length + data. Callers split data into `hashDataChunk` pieces.
    public struct HashData: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .hashData }
        public var data: [UInt8]
        public init(data: [UInt8]) { self.data = data }
        public func encodeBody(into w: inout ByteWriter) {
            w.writeBigEndianUInt32(UInt32(truncatingIfNeeded: data.count))
            w.writeBytes(data)
        }
    }

    /// CMD_HASH_END: no body.
    public struct HashEnd: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .hashEnd }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_CANCEL_TPM_CMD: no body.
    public struct CancelTPMCommand: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .cancelTPMCommand }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_STORE_VOLATILE: no body.
    public struct StoreVolatile: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .storeVolatile }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_RESET_TPMESTABLISHED: u8 locality + 3 pad bytes (QEMU leaves them uninitialised;
    /// we send zeros).
    public struct ResetTPMEstablished: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .resetTPMEstablished }
        public var locality: UInt8
        public init(locality: UInt8) { self.locality = locality }
        public func encodeBody(into w: inout ByteWriter) { w.writeBytes([locality, 0, 0, 0]) }
    }

    /// CMD_GET_STATEBLOB: be32 state_flags, be32 type, be32 offset (always 0 on sockets:
    /// each request rebuilds the blob, so chunks would not be consistent).
    public struct GetStateBlob: SwtpmCtrlRequest {
        public typealias Response = GetStateBlobResponse
        public static var code: CommandCode { .getStateBlob }
        public var type: TPMStateBlobType
        public var flags: StateFlags
        public var offset: UInt32
        public init(type: TPMStateBlobType, flags: StateFlags = .decrypted, offset: UInt32 = 0) {
            self.type = type
            self.flags = flags
            self.offset = offset
        }
        public func encodeBody(into w: inout ByteWriter) {
            w.writeBigEndianUInt32(flags.rawValue)
            w.writeBigEndianUInt32(type.rawValue)
            w.writeBigEndianUInt32(offset)
        }
    }

    /// CMD_SET_STATEBLOB: be32 state_flags, be32 type, be32 length, then the blob as a second
    /// write (QEMU `tpm_emulator_set_state_blob`); the result comes after the whole blob.
    public struct SetStateBlob: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .setStateBlob }
        public var type: TPMStateBlobType
        public var flags: StateFlags
        public var data: [UInt8]
        public init(type: TPMStateBlobType, flags: StateFlags = [], data: [UInt8]) {
            self.type = type
            self.flags = flags
            self.data = data
        }
        public func encodeBody(into w: inout ByteWriter) {
            w.writeBigEndianUInt32(flags.rawValue)
            w.writeBigEndianUInt32(type.rawValue)
            w.writeBigEndianUInt32(UInt32(truncatingIfNeeded: data.count))
        }
        public var trailingData: [UInt8] { data }
    }

    /// CMD_STOP: no body.
    public struct Stop: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .stop }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_GET_CONFIG: no body.
    public struct GetConfig: SwtpmCtrlRequest {
        public typealias Response = GetConfigResponse
        public static var code: CommandCode { .getConfig }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_SET_DATAFD: no body; the descriptor travels as SCM_RIGHTS with the same sendmsg.
    public struct SetDataFD: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .setDataFD }
        public init() {}
        public func encodeBody(into w: inout ByteWriter) {}
    }

    /// CMD_SET_BUFFERSIZE: be32 size; 0 queries (allowed while running), otherwise the TPM
    /// must be stopped.
    public struct SetBufferSize: SwtpmCtrlRequest {
        public typealias Response = SetBufferSizeResponse
        public static var code: CommandCode { .setBufferSize }
        public var size: UInt32
        public init(size: UInt32) { self.size = size }
        public func encodeBody(into w: inout ByteWriter) { w.writeBigEndianUInt32(size) }
    }

    /// CMD_GET_INFO: be64 flags, be32 offset, be32 pad.
    public struct GetInfo: SwtpmCtrlRequest {
        public typealias Response = GetInfoResponse
        public static var code: CommandCode { .getInfo }
        public var flags: InfoFlags
        public var offset: UInt32
        public init(flags: InfoFlags, offset: UInt32 = 0) {
            self.flags = flags
            self.offset = offset
        }
        public func encodeBody(into w: inout ByteWriter) {
            w.writeBigEndianUInt64(flags.rawValue)
            w.writeBigEndianUInt32(offset)
            w.writeBigEndianUInt32(0)
        }
    }

    /// CMD_LOCK_STORAGE (swtpm 0.8+): be32 retries, each 10 ms.
    public struct LockStorage: SwtpmCtrlRequest {
        public typealias Response = ResultResponse
        public static var code: CommandCode { .lockStorage }
        public var retries: UInt32
        public init(retries: UInt32) { self.retries = retries }
        public func encodeBody(into w: inout ByteWriter) { w.writeBigEndianUInt32(retries) }
    }
}

// MARK: - Server side: framing and decoding requests

extension SwtpmCtrl {
    /// The largest SET_STATEBLOB or HASH_DATA request a server takes in one piece (code, header,
    /// data): larger announced lengths are refused before anything is allocated.
    public static let serverRequestLimit = 16 + SwtpmBlob.maximumSize

    /// How many bytes (code included) the request starting with `prefix` needs, as swtpm's
    /// `ctrlchannel_recv_cmd` computes it: a fixed body per code, plus the announced length for
    /// HASH_DATA and SET_STATEBLOB. Nil while `prefix` is too short to tell. Unknown codes need
    /// only the code (swtpm answers them with TPM_BAD_ORDINAL).
    ///
    /// swtpm reads greedily: bytes that arrive with a request beyond its length (QEMU sends
    /// SET_LOCALITY with 3 padding bytes) belong to that request, not to the next one.
    public static func requestLength(_ prefix: [UInt8]) -> Int? {
        var r = ByteReader(prefix)
        guard let raw = try? r.readBigEndianUInt32("cmd") else { return nil }
        guard let code = CommandCode(rawValue: raw) else { return 4 }
        switch code {
        case .getCapability, .shutdown, .getTPMEstablished, .hashStart, .hashEnd, .cancelTPMCommand,
             .storeVolatile, .stop, .getConfig, .setDataFD:
            return 4
        case .setLocality, .resetTPMEstablished:
            return 4 + 1
        case .initialize, .setBufferSize, .lockStorage:
            return 4 + 4
        case .getStateBlob:
            return 4 + 12
        case .getInfo:
            return 4 + 16
        case .hashData:
            guard let n = try? r.readBigEndianUInt32("length") else { return nil }
            return 8 + Int(n)
        case .setStateBlob:
            guard (try? r.skip(8, "state_flags, type")) != nil, let n = try? r.readBigEndianUInt32("length") else { return nil }
            return 16 + Int(n)
        }
    }

    /// Any ctrl request, decoded from the bytes a client sent (the server side of the codec).
    public enum AnyRequest: Sendable, Equatable {
        case getCapability
        case initialize(Initialize)
        case shutdown
        case getTPMEstablished
        case setLocality(SetLocality)
        case hashStart
        case hashData(HashData)
        case hashEnd
        case cancelTPMCommand
        case storeVolatile
        case resetTPMEstablished(ResetTPMEstablished)
        case getStateBlob(GetStateBlob)
        case setStateBlob(SetStateBlob)
        case stop
        case getConfig
        case setDataFD
        case setBufferSize(SetBufferSize)
        case getInfo(GetInfo)
        case lockStorage(LockStorage)
        /// A code swtpm does not know (answered with TPM_BAD_ORDINAL).
        case unknown(code: UInt32)

        /// The command code, nil for `.unknown`.
        public var code: CommandCode? {
            switch self {
            case .getCapability: .getCapability
            case .initialize: .initialize
            case .shutdown: .shutdown
            case .getTPMEstablished: .getTPMEstablished
            case .setLocality: .setLocality
            case .hashStart: .hashStart
            case .hashData: .hashData
            case .hashEnd: .hashEnd
            case .cancelTPMCommand: .cancelTPMCommand
            case .storeVolatile: .storeVolatile
            case .resetTPMEstablished: .resetTPMEstablished
            case .getStateBlob: .getStateBlob
            case .setStateBlob: .setStateBlob
            case .stop: .stop
            case .getConfig: .getConfig
            case .setDataFD: .setDataFD
            case .setBufferSize: .setBufferSize
            case .getInfo: .getInfo
            case .lockStorage: .lockStorage
            case .unknown: nil
            }
        }

        /// Decodes one whole request (`requestLength` bytes or more; the excess is ignored as
        /// swtpm ignores it). A body shorter than the code needs throws `.truncated` (swtpm
        /// answers TPM_BAD_PARAMETER); a state blob or hash length above
        /// `serverRequestLimit` throws `.lengthOverLimit`.
        public static func decode(_ bytes: [UInt8]) throws(WireError) -> AnyRequest {
            var r = ByteReader(bytes)
            let raw = try r.readBigEndianUInt32("cmd")
            guard let code = CommandCode(rawValue: raw) else { return .unknown(code: raw) }
            let f = code.name
            switch code {
            case .getCapability: return .getCapability
            case .initialize:
                return .initialize(Initialize(flags: InitFlags(rawValue: try r.readBigEndianUInt32(f + ".init_flags"))))
            case .shutdown: return .shutdown
            case .getTPMEstablished: return .getTPMEstablished
            case .setLocality: return .setLocality(SetLocality(locality: try r.readUInt8(f + ".loc")))
            case .hashStart: return .hashStart
            case .hashData:
                let n = try r.readBigEndianUInt32(f + ".length")
                return .hashData(HashData(data: try r.readBytes(Int(n), f + ".data", limit: serverRequestLimit)))
            case .hashEnd: return .hashEnd
            case .cancelTPMCommand: return .cancelTPMCommand
            case .storeVolatile: return .storeVolatile
            case .resetTPMEstablished:
                return .resetTPMEstablished(ResetTPMEstablished(locality: try r.readUInt8(f + ".loc")))
            case .getStateBlob:
                let flags = StateFlags(rawValue: try r.readBigEndianUInt32(f + ".state_flags"))
                let t = try r.readBigEndianUInt32(f + ".type")
                let offset = try r.readBigEndianUInt32(f + ".offset")
                guard let type = TPMStateBlobType(rawValue: t) else {
                    throw WireError(.invalidValue, field: f + ".type", offset: 8, detail: "blob type \(t)")
                }
                return .getStateBlob(GetStateBlob(type: type, flags: flags, offset: offset))
            case .setStateBlob:
                let flags = StateFlags(rawValue: try r.readBigEndianUInt32(f + ".state_flags"))
                let t = try r.readBigEndianUInt32(f + ".type")
                let n = try r.readBigEndianUInt32(f + ".length")
                guard let type = TPMStateBlobType(rawValue: t) else {
                    throw WireError(.invalidValue, field: f + ".type", offset: 8, detail: "blob type \(t)")
                }
                return .setStateBlob(SetStateBlob(type: type, flags: flags,
                                                  data: try r.readBytes(Int(n), f + ".data", limit: serverRequestLimit)))
            case .stop: return .stop
            case .getConfig: return .getConfig
            case .setDataFD: return .setDataFD
            case .setBufferSize: return .setBufferSize(SetBufferSize(size: try r.readBigEndianUInt32(f + ".buffersize")))
            case .getInfo:
                let flags = InfoFlags(rawValue: try r.readBigEndianUInt64(f + ".flags"))
                let offset = try r.readBigEndianUInt32(f + ".offset")
                return .getInfo(GetInfo(flags: flags, offset: offset))
            case .lockStorage: return .lockStorage(LockStorage(retries: try r.readBigEndianUInt32(f + ".retries")))
            }
        }
    }
}
