import EmulatorBackend
import Testing
import WireFormat
@testable import TPMServer

/// The pure framers: bytes in, a request or a refusal out, with the limits checked on the
/// length fields before a body is awaited.
@Suite struct FramingTests {
    static let getRandom8: [UInt8] = TPM2.getRandom(8)

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var proto: ServerProtocol
        var bytes: [UInt8]
        var expected: FrameResult
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "data: 3 bytes need more", proto: .data, bytes: [0x80, 0x01, 0x00], expected: .needMore),
        Case(name: "data: header only needs the body", proto: .data, bytes: Array(getRandom8.prefix(10)), expected: .needMore),
        Case(name: "data: whole raw command", proto: .data, bytes: getRandom8,
             expected: .complete(.tpmCommand(getRandom8, locality: nil, mssimReply: false), consumed: 12)),
        Case(name: "data: two commands back to back take one", proto: .data, bytes: getRandom8 + getRandom8,
             expected: .complete(.tpmCommand(getRandom8, locality: nil, mssimReply: false), consumed: 12)),
        Case(name: "data: size field 9 refused", proto: .data, bytes: [0x80, 0x01, 0, 0, 0, 9, 0, 0],
             expected: .refuse(.commandSizeTooSmall(9))),
        Case(name: "data: size field 4097 refused before the body", proto: .data, bytes: [0x80, 0x01, 0, 0, 0x10, 0x01],
             expected: .refuse(.commandTooLarge(4097))),
        Case(name: "data: size field 2^32-1 refused", proto: .data, bytes: [0x80, 0x01, 0xFF, 0xFF, 0xFF, 0xFF],
             expected: .refuse(.commandTooLarge(0xFFFF_FFFF))),
        Case(name: "data: mssim prefix carries the locality", proto: .data,
             bytes: [0, 0, 0, 8, 2, 0, 0, 0, 12] + getRandom8,
             expected: .complete(.tpmCommand(getRandom8, locality: 2, mssimReply: true), consumed: 21)),
        Case(name: "data: mssim prefix with an oversize length", proto: .data, bytes: [0, 0, 0, 8, 0, 0, 1, 0, 0],
             expected: .refuse(.commandTooLarge(65536))),
        Case(name: "mssim TPM: handshake", proto: .mssimTPM, bytes: [0, 0, 0, 15, 0, 0, 0, 1],
             expected: .complete(.mssimHandshake(1), consumed: 8)),
        Case(name: "mssim TPM: session end", proto: .mssimTPM, bytes: [0, 0, 0, 20],
             expected: .complete(.mssimSessionEnd, consumed: 4)),
        Case(name: "mssim TPM: unknown code refused", proto: .mssimTPM, bytes: [0, 0, 0, 99],
             expected: .refuse(.unknownCode(99))),
        Case(name: "mssim platform: one signal", proto: .mssimPlatform, bytes: [0, 0, 0, 1],
             expected: .complete(.platform(1), consumed: 4)),
        Case(name: "ctrl: SET_LOCALITY as tcti-swtpm sends it (1 byte)", proto: .ctrl, bytes: [0, 0, 0, 5, 3],
             expected: .complete(.ctrl([0, 0, 0, 5, 3]), consumed: 5)),
        Case(name: "ctrl: SET_LOCALITY as QEMU sends it (4 bytes, taken whole)", proto: .ctrl, bytes: [0, 0, 0, 5, 3, 0, 0, 0],
             expected: .complete(.ctrl([0, 0, 0, 5, 3, 0, 0, 0]), consumed: 8)),
        Case(name: "ctrl: INIT needs its 4-byte body", proto: .ctrl, bytes: [0, 0, 0, 2, 0, 0], expected: .needMore),
        Case(name: "ctrl: GET_INFO needs 16 bytes", proto: .ctrl, bytes: [0, 0, 0, 0x12, 0, 0, 0, 0], expected: .needMore),
        Case(name: "ctrl: GET_CONFIG alone", proto: .ctrl,
             bytes: [0, 0, 0, 0x0F], expected: .complete(.ctrl([0, 0, 0, 0x0F]), consumed: 4)),
        Case(name: "ctrl: SET_STATEBLOB of 20 KiB waits for its data", proto: .ctrl,
             bytes: [0, 0, 0, 0x0D, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x50, 0], expected: .needMore),
        Case(name: "ctrl: SET_STATEBLOB of 1 MiB refused by its length", proto: .ctrl,
             bytes: [0, 0, 0, 0x0D, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x10, 0, 0],
             expected: .refuse(.ctrlTooLarge(16 + 0x100000))),
        Case(name: "ctrl: HASH_DATA of 64 KiB refused by its length", proto: .ctrl,
             bytes: [0, 0, 0, 0x07, 0, 1, 0, 0], expected: .refuse(.ctrlTooLarge(8 + 0x10000))),
        Case(name: "ctrl: unknown code is whole at 4 bytes", proto: .ctrl, bytes: [0, 0, 0, 0x77],
             expected: .complete(.ctrl([0, 0, 0, 0x77]), consumed: 4)),
    ]

    @Test(arguments: cases)
    func frame(_ c: Case) {
        let f = Framer(proto: c.proto, maxCommandSize: 4096, acceptsMssimPrefix: true)
        #expect(f.frame(c.bytes) == c.expected)
    }

    /// A TPM 1.2 data channel has no mssim prefix: a first be32 of 8 is a raw header.
    @Test func tpm12DataChannelIsRawOnly() {
        let f = Framer(proto: .data, maxCommandSize: 4096, acceptsMssimPrefix: false)
        #expect(f.frame([0, 0, 0, 8, 2, 0, 0, 0, 12]) == .refuse(.commandTooLarge(0x0008_0200)))
    }

    /// Every request the client codec encodes decodes back to itself on the server side.
    @Test func ctrlRequestsRoundTrip() throws {
        let requests: [([UInt8], SwtpmCtrl.AnyRequest)] = [
            (SwtpmCtrl.GetCapability().encoded(), .getCapability),
            (SwtpmCtrl.Initialize(flags: .deleteVolatile).encoded(), .initialize(SwtpmCtrl.Initialize(flags: .deleteVolatile))),
            (SwtpmCtrl.SetLocality(locality: 3).encoded(), .setLocality(SwtpmCtrl.SetLocality(locality: 3))),
            (SwtpmCtrl.ResetTPMEstablished(locality: 3).encoded(), .resetTPMEstablished(SwtpmCtrl.ResetTPMEstablished(locality: 3))),
            (SwtpmCtrl.GetStateBlob(type: .volatile).encoded(), .getStateBlob(SwtpmCtrl.GetStateBlob(type: .volatile))),
            (SwtpmCtrl.SetBufferSize(size: 4096).encoded(), .setBufferSize(SwtpmCtrl.SetBufferSize(size: 4096))),
            (SwtpmCtrl.GetInfo(flags: [.tpmSpecification], offset: 5).encoded(), .getInfo(SwtpmCtrl.GetInfo(flags: [.tpmSpecification], offset: 5))),
            (SwtpmCtrl.LockStorage(retries: 300).encoded(), .lockStorage(SwtpmCtrl.LockStorage(retries: 300))),
            (SwtpmCtrl.HashData(data: [1, 2, 3]).encoded(), .hashData(SwtpmCtrl.HashData(data: [1, 2, 3]))),
            (SwtpmCtrl.Stop().encoded(), .stop),
            (SwtpmCtrl.Shutdown().encoded(), .shutdown),
            ([0, 0, 0, 0x42], .unknown(code: 0x42)),
        ]
        for (bytes, expected) in requests {
            // SET_LOCALITY / RESET_TPMESTABLISHED need 1 body byte; the client codec sends 4 as QEMU does.
            #expect(SwtpmCtrl.requestLength(bytes).map { $0 <= bytes.count && $0 >= bytes.count - 3 } == true, "\(expected)")
            #expect(try SwtpmCtrl.AnyRequest.decode(bytes) == expected)
        }
        let set = SwtpmCtrl.SetStateBlob(type: .permanent, data: [9, 9])
        #expect(try SwtpmCtrl.AnyRequest.decode(set.encoded() + set.trailingData) == .setStateBlob(set))
        #expect(SwtpmCtrl.requestLength(set.encoded()) == 18)
        // A short body is a typed truncation (the server answers TPM_BAD_PARAMETER).
        let e = #expect(throws: WireError.self) { try SwtpmCtrl.AnyRequest.decode([0, 0, 0, 2, 0]) }
        #expect(e?.code == .truncated)
    }
}

