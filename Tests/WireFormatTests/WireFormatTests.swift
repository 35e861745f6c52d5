import Testing
import WireFormat

@Suite struct WireFormatTests {
    @Test func bigEndianRoundTrip() throws {
        var w = ByteWriter()
        w.writeUInt8(0x7E)
        w.writeBigEndianUInt16(0x1234)
        w.writeBigEndianUInt32(0xDEAD_BEEF)
        w.writeBigEndianUInt64(0x0102_0304_0506_0708)
        w.writeLittleEndianUInt32(0x1122_3344)
        w.writeUInt8PrefixedString("tpm-tis")
        #expect(w.bytes.prefix(7) == [0x7E, 0x12, 0x34, 0xDE, 0xAD, 0xBE, 0xEF])
        var r = ByteReader(w.bytes)
        #expect(try r.readUInt8() == 0x7E)
        #expect(try r.readBigEndianUInt16() == 0x1234)
        #expect(try r.readBigEndianUInt32() == 0xDEAD_BEEF)
        #expect(try r.readBigEndianUInt64() == 0x0102_0304_0506_0708)
        #expect(try r.readLittleEndianUInt32() == 0x1122_3344)
        #expect(try r.readUInt8PrefixedString() == "tpm-tis")
        #expect(r.isAtEnd)
    }

    @Test func truncationNamesFieldAndOffset() {
        var r = ByteReader([1, 2, 3], baseOffset: 100)
        _ = try? r.readUInt8()
        do {
            _ = try r.readBigEndianUInt32("state.sts")
            Issue.record("read past the end")
        } catch {
            #expect(error == WireError(.truncated, field: "state.sts", offset: 101, detail: "needs 4 bytes, 2 remain"))
        }
    }

    @Test func lengthLimitCheckedBeforeAllocation() {
        var r = ByteReader([0, 0, 0])
        #expect(throws: WireError.self) { try r.readBytes(1 << 40, "blob", limit: 1 << 20) }
        #expect(throws: WireError.self) { try r.readBytes(-1, "negative") }
        #expect(r.remaining == 3)
    }

    @Test func backPatch() {
        var w = ByteWriter()
        let at = w.reserveBigEndianUInt32()
        w.writeBytes([1, 2, 3])
        w.patchBigEndianUInt32(at: at, UInt32(w.count))
        #expect(w.bytes == [0, 0, 0, 7, 1, 2, 3])
    }

    @Test(arguments: ["00ff10", "00 FF 10", "zz", "abc"])
    func hex(_ s: String) {
        let v = [UInt8](hexString: s)
        if s == "zz" || s == "abc" { #expect(v == nil) } else { #expect(v == [0, 0xFF, 0x10]) }
    }
}
