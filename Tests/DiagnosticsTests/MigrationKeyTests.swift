import Foundation
import TPMDiagnostics
import Testing

/// swtpm's key formats and its encryption layer, without swtpm (the live check is in
/// ValidateTests).
@Suite("Migration keys")
struct MigrationKeyTests {
    struct Spelling: Sendable, CustomTestStringConvertible {
        var content: [UInt8]
        var option: String
        var mode: MigrationKey.Mode?
        var testDescription: String { option.isEmpty ? String(decoding: content.prefix(12), as: UTF8.self) : option }
    }

    static let spellings: [Spelling] = [
        Spelling(content: Array("00112233445566778899aabbccddeeff".utf8), option: "", mode: .aes128CBC),
        Spelling(content: Array("0x00112233445566778899AABBCCDDEEFF\n  ".utf8), option: ",format=hex", mode: .aes128CBC),
        Spelling(content: Array(repeating: 0x41, count: 32), option: ",format=binary", mode: .aes256CBC),
        Spelling(content: Array(repeating: 0x41, count: 16), option: ",format=binary,mode=aes-cbc", mode: .aes128CBC),
        Spelling(content: Array(repeating: 0x41, count: 16), option: ",format=binary,mode=aes-256-cbc", mode: nil),
        Spelling(content: Array("0011".utf8), option: "", mode: nil),
        Spelling(content: Array("zz112233445566778899aabbccddeeff".utf8), option: "", mode: nil),
        Spelling(content: Array("00112233445566778899aabbccddeeff".utf8), option: ",mode=des", mode: nil),
        Spelling(content: Array("00112233445566778899aabbccddeeff".utf8), option: ",colour=blue", mode: nil),
    ]

    @Test("key files as swtpm reads them", arguments: spellings)
    func spelling(_ s: Spelling) throws {
        let path = try RealStreams.keyFile(s.content, name: "spelling-\(abs(s.testDescription.hashValue)).key")
        if let mode = s.mode {
            let k = try MigrationKey.load(option: path + s.option)
            #expect(k.mode == mode && k.key.count == mode.keyLength)
            let k2 = try MigrationKey.load(option: "file=" + path + s.option)
            #expect(k2 == k)
        } else {
            #expect(throws: KeyError.self) { try MigrationKey.load(option: path + s.option) }
        }
    }

    @Test("encrypt-then-MAC round trip; swtpm's padding to the key length; a wrong key fails the HMAC",
          arguments: [MigrationKey.Mode.aes128CBC, .aes256CBC], [0, 1, 15, 16, 31, 32, 1000])
    func roundTrip(_ mode: MigrationKey.Mode, _ length: Int) throws {
        let key = try MigrationKey(key: (0..<mode.keyLength).map { UInt8($0 * 3) }, mode: mode)
        let iv = (0..<mode.keyLength).map { UInt8(0xA0 + $0) }
        let plain = (0..<length).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let (ct, mac) = try key.encrypt(plain, iv: iv)
        #expect(ct.count % mode.keyLength == 0 && ct.count > plain.count)
        #expect(try key.decrypt(ciphertext: ct, iv: iv, hmac: mac) == plain)
        let other = try MigrationKey(key: [UInt8](repeating: 1, count: mode.keyLength), mode: mode)
        #expect(throws: KeyError(.hmacMismatch, "Verification of HMAC failed. Data integrity is compromised")) {
            try other.decrypt(ciphertext: ct, iv: iv, hmac: mac)
        }
        var bad = mac
        bad[0] ^= 1
        #expect(throws: KeyError.self) { try key.decrypt(ciphertext: ct, iv: iv, hmac: bad) }
    }

    @Test("passphrase keys: PBKDF2-HMAC-SHA512 (salt swtpm, 1000 iterations) and SHA-512")
    func passphrase() throws {
        let path = try RealStreams.keyFile(Array("secret passphrase\n".utf8), name: "pwd.txt")
        let pbkdf2 = try MigrationKey.load(option: "pwdfile=\(path)")
        let sha = try MigrationKey.load(option: "pwdfile=\(path),kdf=sha512,mode=aes-256-cbc")
        #expect(pbkdf2.mode == .aes128CBC && pbkdf2.key.count == 16)
        #expect(sha.mode == .aes256CBC && sha.key.count == 32)
        #expect(pbkdf2.key != Array(sha.key.prefix(16)))
    }
}
