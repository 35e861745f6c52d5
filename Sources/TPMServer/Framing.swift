import EmulatorBackend
import WireFormat

/// The protocols the server speaks, one per listening port.
public enum ServerProtocol: String, Sendable, CaseIterable {
    /// swtpm's data channel (`--server type=tcp`): raw TPM commands, or the mssim
    /// TPM_SEND_COMMAND prefix (swtpm's `PTM_CAP_SEND_COMMAND_HEADER`, TPM 2 only).
    case data
    /// swtpm's ctrl channel (`--ctrl type=tcp`): `CMD_*` requests.
    case ctrl
    /// The mssim TPM port (tcti-mssim, the MS reference simulator's `TpmServer`).
    case mssimTPM
    /// The mssim platform port (power, NV, cancel signals).
    case mssimPlatform
}

/// One request framed from a connection's bytes.
enum Frame: Equatable, Sendable {
    /// A TPM command; `locality` is set when the framing carries one (mssim), else the ctrl
    /// channel's current locality applies.
    case tpmCommand([UInt8], locality: UInt8?, mssimReply: Bool)
    /// A ctrl request (bytes as received; decoded by the engine, which answers decode errors).
    case ctrl([UInt8])
    /// mssim TPM port: TPM_REMOTE_HANDSHAKE with the client's version.
    case mssimHandshake(UInt32)
    /// mssim TPM_SESSION_END or TPM_STOP: close without a reply.
    case mssimSessionEnd
    /// mssim platform port signal (`TPM_SIGNAL_*`).
    case platform(UInt32)
}

/// Why bytes were refused before they reached the TPM.
enum Refusal: Equatable, Sendable {
    /// The header's size is below 10 or the prefix length below 10.
    case commandSizeTooSmall(Int)
    /// The command is larger than the TIS buffer (4096).
    case commandTooLarge(Int)
    /// A ctrl request longer than the server takes.
    case ctrlTooLarge(Int)
    /// The command stopped arriving before it was complete (EOF or timeout).
    case truncated(have: Int, need: Int?)
    /// An mssim code this server does not implement.
    case unknownCode(UInt32)
}

enum FrameResult: Equatable, Sendable {
    /// Not enough bytes to decide.
    case needMore
    /// A request, and how many buffered bytes it used (ctrl requests take all that arrived with
    /// them, as swtpm's greedy read does).
    case complete(Frame, consumed: Int)
    case refuse(Refusal)
}

/// Pure framing: bytes in, a request or a refusal out. The limits are checked on the length
/// fields before any body is awaited, so no connection buffers more than `maxCommandSize` plus
/// a header.
struct Framer: Sendable {
    var proto: ServerProtocol
    /// The TIS buffer: the largest command the server passes on (4096).
    var maxCommandSize: Int
    /// The data channel accepts the mssim prefix (TPM 2 only, as swtpm).
    var acceptsMssimPrefix: Bool
    /// The largest ctrl request taken, except SET_STATEBLOB.
    var maxCtrlRequest: Int = 8 * 1024
    /// The largest SET_STATEBLOB request: header + `SwtpmBlob.maximumSize`.
    var maxStateBlobRequest: Int = SwtpmCtrl.serverRequestLimit

    /// The most bytes a connection of this kind ever buffers for one request.
    var inputLimit: Int {
        switch proto {
        case .ctrl: max(maxCtrlRequest, maxStateBlobRequest)
        default: maxCommandSize + 9
        }
    }

    static func be32(_ b: [UInt8], _ i: Int) -> UInt32 {
        UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }

    func frame(_ b: [UInt8]) -> FrameResult {
        switch proto {
        case .data: frameData(b)
        case .ctrl: frameCtrl(b)
        case .mssimTPM: frameMssimTPM(b)
        case .mssimPlatform: b.count < 4 ? .needMore : .complete(.platform(Self.be32(b, 0)), consumed: 4)
        }
    }

    /// swtpm's data channel: a TPM 2 tag (0x8001/0x8002) means a raw command; otherwise a first
    /// be32 of 8 (TPM_SEND_COMMAND) means the 9-byte mssim prefix; anything else is raw.
    func frameData(_ b: [UInt8]) -> FrameResult {
        guard b.count >= 4 else { return .needMore }
        let tag = UInt16(b[0]) << 8 | UInt16(b[1])
        if acceptsMssimPrefix && tag != 0x8001 && tag != 0x8002 && Self.be32(b, 0) == 8 {
            return frameSendCommand(b, at: 4)
        }
        return frameRaw(b)
    }

    /// A raw TPM command: the 10-byte header's size field is the whole length.
    func frameRaw(_ b: [UInt8]) -> FrameResult {
        guard b.count >= 6 else { return .needMore }
        let size = Int(Self.be32(b, 2))
        guard size >= 10 else { return .refuse(.commandSizeTooSmall(size)) }
        guard size <= maxCommandSize else { return .refuse(.commandTooLarge(size)) }
        guard b.count >= size else { return .needMore }
        return .complete(.tpmCommand(Array(b[0..<size]), locality: nil, mssimReply: false), consumed: size)
    }

    /// mssim TPM_SEND_COMMAND after its code: u8 locality, be32 length, the command.
    func frameSendCommand(_ b: [UInt8], at i: Int) -> FrameResult {
        guard b.count >= i + 5 else { return .needMore }
        let locality = b[i]
        let size = Int(Self.be32(b, i + 1))
        guard size >= 10 else { return .refuse(.commandSizeTooSmall(size)) }
        guard size <= maxCommandSize else { return .refuse(.commandTooLarge(size)) }
        guard b.count >= i + 5 + size else { return .needMore }
        return .complete(.tpmCommand(Array(b[(i + 5)..<(i + 5 + size)]), locality: locality, mssimReply: true),
                         consumed: i + 5 + size)
    }

    /// The mssim TPM port (TpmTcpProtocol.h): 8 SEND_COMMAND, 15 REMOTE_HANDSHAKE,
    /// 20 SESSION_END, 21 STOP; other codes are refused.
    func frameMssimTPM(_ b: [UInt8]) -> FrameResult {
        guard b.count >= 4 else { return .needMore }
        let code = Self.be32(b, 0)
        switch code {
        case MssimCode.sendCommand:
            return frameSendCommand(b, at: 4)
        case MssimCode.remoteHandshake:
            guard b.count >= 8 else { return .needMore }
            return .complete(.mssimHandshake(Self.be32(b, 4)), consumed: 8)
        case MssimCode.sessionEnd, MssimCode.stop:
            return .complete(.mssimSessionEnd, consumed: 4)
        default:
            return .refuse(.unknownCode(code))
        }
    }

    /// swtpm's ctrl channel: the length from `SwtpmCtrl.requestLength`; all bytes that came
    /// with the request are taken with it.
    func frameCtrl(_ b: [UInt8]) -> FrameResult {
        guard let need = SwtpmCtrl.requestLength(b) else { return .needMore }
        let isStateBlob = Self.be32(b, 0) == SwtpmCtrl.CommandCode.setStateBlob.rawValue
        guard need <= (isStateBlob ? maxStateBlobRequest : maxCtrlRequest) else { return .refuse(.ctrlTooLarge(need)) }
        guard b.count >= need else { return .needMore }
        return .complete(.ctrl(b), consumed: b.count)
    }

    /// What the bytes of an incomplete request still need, for messages.
    func needed(_ b: [UInt8]) -> Int? {
        switch proto {
        case .ctrl: return SwtpmCtrl.requestLength(b)
        case .data, .mssimTPM:
            if b.count >= 9, Self.be32(b, 0) == 8, proto == .mssimTPM || acceptsMssimPrefix { return 9 + Int(Self.be32(b, 5)) }
            return b.count >= 6 ? Int(Self.be32(b, 2)) : nil
        case .mssimPlatform: return 4
        }
    }
}

/// mssim codes (libtpms `TpmTcpProtocol.h`, ms-tpm-20-ref `TcpServer.c`).
public enum MssimCode {
    /// `TPM_SIGNAL_POWER_ON`.
    public static let powerOn: UInt32 = 1
    /// `TPM_SIGNAL_POWER_OFF`.
    public static let powerOff: UInt32 = 2
    /// `TPM_SIGNAL_PHYS_PRES_ON`.
    public static let physicalPresenceOn: UInt32 = 3
    /// `TPM_SIGNAL_PHYS_PRES_OFF`.
    public static let physicalPresenceOff: UInt32 = 4
    /// `TPM_SEND_COMMAND (TPM port)`.
    public static let sendCommand: UInt32 = 8
    /// `TPM_SIGNAL_CANCEL_ON`.
    public static let cancelOn: UInt32 = 9
    /// `TPM_SIGNAL_CANCEL_OFF`.
    public static let cancelOff: UInt32 = 10
    /// `TPM_SIGNAL_NV_ON`.
    public static let nvOn: UInt32 = 11
    /// `TPM_SIGNAL_NV_OFF`.
    public static let nvOff: UInt32 = 12
    /// `TPM_SIGNAL_KEY_CACHE_ON`.
    public static let keyCacheOn: UInt32 = 13
    /// `TPM_SIGNAL_KEY_CACHE_OFF`.
    public static let keyCacheOff: UInt32 = 14
    /// `TPM_REMOTE_HANDSHAKE (TPM port)`.
    public static let remoteHandshake: UInt32 = 15
    /// `TPM_SIGNAL_RESET`.
    public static let reset: UInt32 = 17
    /// `TPM_SIGNAL_RESTART`.
    public static let restart: UInt32 = 18
    /// `TPM_SESSION_END`.
    public static let sessionEnd: UInt32 = 20
    /// `TPM_STOP`.
    public static let stop: UInt32 = 21
    /// `tpmPlatformAvailable | tpmInRawMode | tpmSupportsPP` for TPM_REMOTE_HANDSHAKE.
    public static let handshakeFlags: UInt32 = 0x01 | 0x04 | 0x08
}
