import Testing
import WireFormat
@testable import EmulatorBackend

/// The ctrl protocol's wire format, byte for byte (swtpm tpm_ioctl.h, qemu-tpm.md §5.1).
@Suite("swtpm ctrl codec")
struct SwtpmCodecTests {
    struct RequestCase: CustomTestStringConvertible, Sendable {
        let name: String
        let encoded: [UInt8]
        let trailing: [UInt8]
        let expected: String   // hex of the first write
        var testDescription: String { name }
        init<R: SwtpmCtrlRequest>(_ r: R, _ expected: String) {
            name = R.code.name
            encoded = r.encoded()
            trailing = r.trailingData
            self.expected = expected.filter { $0 != " " }
        }
    }

    static let requests: [RequestCase] = [
        RequestCase(SwtpmCtrl.GetCapability(), "00000001"),
        RequestCase(SwtpmCtrl.Initialize(flags: .deleteVolatile), "00000002 00000001"),
        RequestCase(SwtpmCtrl.Shutdown(), "00000003"),
        RequestCase(SwtpmCtrl.GetTPMEstablished(), "00000004"),
        RequestCase(SwtpmCtrl.SetLocality(locality: 3), "00000005 03000000"),
        RequestCase(SwtpmCtrl.HashStart(), "00000006"),
        RequestCase(SwtpmCtrl.HashData(data: [0xAA, 0xBB]), "00000007 00000002 aabb"),
        RequestCase(SwtpmCtrl.HashEnd(), "00000008"),
        RequestCase(SwtpmCtrl.CancelTPMCommand(), "00000009"),
        RequestCase(SwtpmCtrl.StoreVolatile(), "0000000a"),
        RequestCase(SwtpmCtrl.ResetTPMEstablished(locality: 4), "0000000b 04000000"),
        RequestCase(SwtpmCtrl.GetStateBlob(type: .volatile), "0000000c 00000001 00000002 00000000"),
        RequestCase(SwtpmCtrl.SetStateBlob(type: .permanent, flags: .encrypted, data: [1, 2, 3]), "0000000d 00000002 00000001 00000003"),
        RequestCase(SwtpmCtrl.Stop(), "0000000e"),
        RequestCase(SwtpmCtrl.GetConfig(), "0000000f"),
        RequestCase(SwtpmCtrl.SetDataFD(), "00000010"),
        RequestCase(SwtpmCtrl.SetBufferSize(size: 4096), "00000011 00001000"),
        RequestCase(SwtpmCtrl.GetInfo(flags: [.tpmSpecification, .tpmAttributes], offset: 5), "00000012 0000000000000003 00000005 00000000"),
        RequestCase(SwtpmCtrl.LockStorage(retries: 300), "00000013 0000012c"),
    ]

    @Test("request encoding", arguments: requests)
    func requestEncoding(_ c: RequestCase) {
        #expect(c.encoded.hexString == c.expected)
        #expect(c.trailing == (c.name == "CMD_SET_STATEBLOB" ? [1, 2, 3] : []))
    }

    @Test func allNineteenCommandCodes() {
        #expect(SwtpmCtrl.CommandCode.allCases.map(\.rawValue) == Array(1...0x13))
        #expect(Set(Self.requests.map(\.name)).count == 19)
        #expect(SwtpmCtrl.CommandCode.getStateBlob.ioctlName == "PTM_GET_STATEBLOB")
        #expect(SwtpmCtrl.CommandCode.cancelTPMCommand.name == "CMD_CANCEL_TPM_CMD")
    }

    @Test func capabilityBitsMatchQEMU() {
        #expect(SwtpmCtrl.Capabilities.qemuMinimumTPM12.rawValue == 0x340F)
        #expect(SwtpmCtrl.Capabilities.qemuMinimumTPM20.rawValue == 0x348F)
        #expect(SwtpmCtrl.Capabilities.migration.rawValue == 0x700)
        #expect(SwtpmCtrl.Capabilities.lockStorage.rawValue == 0x10000)
        #expect(SwtpmCtrl.Capabilities(rawValue: 0xFFFF).names.count == 16)
        #expect(SwtpmCtrl.Capabilities(rawValue: 0x21).names == ["INIT", "CANCEL_TPM_CMD"])
    }

    // MARK: Responses: round trips

    @Test func responseRoundTrips() throws {
        let res = SwtpmCtrl.ResultResponse(result: 0)
        #expect(try SwtpmCtrl.ResultResponse.decode(res.encoded()) == res)
        let cap = SwtpmCtrl.CapabilityResponse(capabilities: SwtpmCtrl.Capabilities(rawValue: 0xFFFF))
        #expect(cap.encoded().hexString == "000000000000ffff")
        #expect(try SwtpmCtrl.CapabilityResponse.decode(cap.encoded()) == cap)
        #expect(cap.rawValue64 == 0xFFFF)
        let est = SwtpmCtrl.EstablishedResponse(bit: 1)
        #expect(est.encoded().hexString == "0000000001000000")
        #expect(try SwtpmCtrl.EstablishedResponse.decode(est.encoded()) == est)
        let blob = SwtpmCtrl.GetStateBlobResponse(stateFlags: .encrypted, data: Array(0..<200).map { UInt8($0) })
        #expect(try SwtpmCtrl.GetStateBlobResponse.decode(blob.encoded()) == blob)
        let cfg = SwtpmCtrl.GetConfigResponse(flags: [.fileKey, .migrationKey])
        #expect(try SwtpmCtrl.GetConfigResponse.decode(cfg.encoded()) == cfg)
        let buf = SwtpmCtrl.SetBufferSizeResponse(bufferSize: 4096, minimumSize: 2808, maximumSize: 4096)
        #expect(buf.encoded().hexString == "00000000" + "00001000" + "00000af8" + "00001000")
        #expect(try SwtpmCtrl.SetBufferSizeResponse.decode(buf.encoded()) == buf)
        let info = SwtpmCtrl.GetInfoResponse(totalLength: 3, chunk: Array("{}\0".utf8))
        #expect(try SwtpmCtrl.GetInfoResponse.decode(info.encoded()) == info)
    }

    /// swtpm answers every early error with the 4-byte result alone; the decoder must not ask
    /// for more.
    @Test func errorResultsCarryNoPayload() throws {
        let four: [UInt8] = [0, 0, 0, 0x0A]
        #expect(try SwtpmCtrl.GetStateBlobResponse.decode(four).result == 0x0A)
        #expect(try SwtpmCtrl.SetBufferSizeResponse.decode(four).bufferSize == 0)
        #expect(try SwtpmCtrl.GetInfoResponse.decode([0, 0, 0, 3]).chunk.isEmpty)
        #expect(try SwtpmCtrl.EstablishedResponse.decode(four + [1, 0, 0, 0]).bit == 0)   // 0.7.1 sends the struct; ignored
    }

    /// GET_STATEBLOB with TPM_RETRY (0x800): the 16-byte header follows; QEMU keeps an empty blob.
    @Test func stateBlobRetryReadsHeader() throws {
        #expect(SwtpmCtrl.GetStateBlobResponse.readsPayload(result: 0x800))
        #expect(!SwtpmCtrl.GetStateBlobResponse.readsPayload(result: 0x0A))
        let r = try SwtpmCtrl.GetStateBlobResponse.decode([0, 0, 8, 0] + [UInt8](repeating: 0, count: 12))
        #expect(r.result == 0x800 && r.data.isEmpty)
    }

    // MARK: Responses: malformed

    struct Malformed: CustomTestStringConvertible, Sendable {
        let name: String
        let decode: @Sendable () throws -> Void
        let code: WireError.Code
        var testDescription: String { name }
    }

    static let malformed: [Malformed] = [
        Malformed(name: "empty", decode: { _ = try SwtpmCtrl.ResultResponse.decode([]) }, code: .truncated),
        Malformed(name: "3-byte result", decode: { _ = try SwtpmCtrl.ResultResponse.decode([0, 0, 0]) }, code: .truncated),
        Malformed(name: "capability without caps", decode: { _ = try SwtpmCtrl.CapabilityResponse.decode([0, 0, 0, 0, 0xFF]) }, code: .truncated),
        Malformed(name: "buffersize short", decode: { _ = try SwtpmCtrl.SetBufferSizeResponse.decode([0, 0, 0, 0, 0, 0, 0x10, 0]) }, code: .truncated),
        Malformed(name: "blob totlength != length", decode: {
            _ = try SwtpmCtrl.GetStateBlobResponse.decode([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 4, 1, 2, 3, 4])
        }, code: .invalidValue),
        Malformed(name: "blob beyond the limit", decode: {
            _ = try SwtpmCtrl.GetStateBlobResponse.decode([0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF])
        }, code: .lengthOverLimit),
        Malformed(name: "blob shorter than announced", decode: {
            _ = try SwtpmCtrl.GetStateBlobResponse.decode([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 9, 1])
        }, code: .truncated),
        Malformed(name: "info chunk beyond the buffer", decode: {
            _ = try SwtpmCtrl.GetInfoResponse.decode([0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0])
        }, code: .lengthOverLimit),
        Malformed(name: "info length above totlength", decode: {
            _ = try SwtpmCtrl.GetInfoResponse.decode([0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0x7B, 0x7D])
        }, code: .invalidValue),
        Malformed(name: "trailing garbage after success", decode: {
            _ = try SwtpmCtrl.ResultResponse.decode([0, 0, 0, 0, 0xDE, 0xAD])
        }, code: .invalidValue),
    ]

    @Test("malformed replies are refused", arguments: malformed)
    func malformedReply(_ m: Malformed) {
        #expect(throws: WireError.self) { try m.decode() }
        do { try m.decode() } catch let e as WireError { #expect(e.code == m.code) } catch { Issue.record("\(error)") }
    }
}
