import EmulatorBackend
import Testing
import WireFormat

@Suite struct SwtpmBlobTests {
    /// The first bytes of a blob swtpm_ioctl --save permanent wrote on this machine kind
    /// (runs-on-this-machine.md §7): header, TLV 4, TLV 1, the libtpms magic.
    @Test func decodesSwtpmMigrationHeader() throws {
        let state: [UInt8] = [0x00, 0x03, 0xAB, 0x36, 0x47, 0x23] + [UInt8](repeating: 7, count: 0x513 - 6)
        let blob = SwtpmBlob.migration(wrapping: state).encoded()
        #expect(blob.count == 0x529)
        #expect(Array(blob.prefix(26)) == [0x02, 0x01, 0x00, 0x0A, 0x00, 0x04, 0x00, 0x00, 0x05, 0x29,
                                           0x00, 0x04, 0x00, 0x00, 0x05, 0x19, 0x00, 0x01, 0x00, 0x00, 0x05, 0x13,
                                           0x00, 0x03, 0xAB, 0x36])
        let d = try SwtpmBlob.decode(blob)
        #expect(d.flags == .migrationData)
        #expect(try d.plainState() == state)
        #expect(!d.isEncrypted)
        #expect(d.encoded() == blob)
    }

    @Test(arguments: [
        ([UInt8]([2, 1, 0, 10, 0, 0, 0, 0]), "blob.totlen"),                 // shorter than a header
        ([2, 1, 0, 10, 0, 0, 0, 0, 0, 99], "blob.totlen"),                    // totlen lies
        ([2, 3, 0, 10, 0, 0, 0, 0, 0, 10], "blob.min_version"),               // too new
        ([2, 1, 0, 12, 0, 0, 0, 0, 0, 10], "blob.hdrsize"),
        ([2, 1, 0, 10, 0, 0, 0, 0, 0, 14, 0, 1, 0, 0], "blob.tlv.length"),    // truncated TLV
        ([2, 1, 0, 10, 0, 0, 0, 0, 0, 16, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF], "blob.tlv(1).value"),
    ])
    func refusesMalformed(bytes: [UInt8], field: String) {
        do throws(WireError) {
            _ = try SwtpmBlob.decode(bytes)
            Issue.record("accepted \(bytes)")
        } catch {
            #expect(error.field == field)
        }
    }
}
