import COpenSSL
#if canImport(Glibc)
import Glibc
#endif

/// Why a migration key could not be read, or a blob could not be decrypted with it.
public struct KeyError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What went wrong; callers switch on it.
    public enum Code: String, Sendable, Equatable {
        /// The option string is malformed (unknown parameter, bad mode or format).
        case badOption
        /// The key file could not be read.
        case io
        /// The key file's content is not a key of the expected form and size.
        case badKey
        /// The key's size is not the one the blob was encrypted with (swtpm: 0x28 "Wrong
        /// decryption key. Need N bit key").
        case keySizeMismatch
        /// The HMAC-SHA256 over ciphertext ‖ IV does not verify (swtpm: "Verification of HMAC
        /// failed. Data integrity is compromised", TPM_DECRYPT_ERROR 0x21).
        case hmacMismatch
        /// The ciphertext, IV or padding is malformed.
        case malformed
        /// OpenSSL refused an operation.
        case openssl
    }

    /// What went wrong.
    public var code: Code
    /// In words.
    public var message: String

    /// An error with `code`.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}

/// A key as swtpm's `--migration-key` (and `--key`) takes it (swtpm `SWTPM_ParseKey`,
/// `swtpm_key.c`): `file=` with `format=hex` (32 or 64 hex digits, optional `0x`, trailing
/// whitespace) or `format=binary` (exactly 16 or 32 bytes); or `pwdfile=` with `kdf=pbkdf2`
/// (PBKDF2-HMAC-SHA512, salt "swtpm", 1000 iterations) or `kdf=sha512`; `mode=aes-cbc`
/// (= aes-128-cbc) or `aes-256-cbc`.
public struct MigrationKey: Sendable, Equatable {
    /// The cipher (`mode=`).
    public enum Mode: String, Sendable, Equatable {
        case aes128CBC = "aes-128-cbc"
        case aes256CBC = "aes-256-cbc"
        /// Key length in bytes.
        public var keyLength: Int { self == .aes128CBC ? 16 : 32 }
        /// Key length in bits (swtpm's messages and the blob flag 0x10 speak in bits).
        public var bits: Int { keyLength * 8 }
    }

    /// The raw AES key.
    public var key: [UInt8]
    /// The cipher.
    public var mode: Mode

    /// A key of the right length for `mode`.
    public init(key: [UInt8], mode: Mode) throws(KeyError) {
        guard key.count == mode.keyLength else {
            throw KeyError(.badKey, "\(mode.rawValue) needs a \(mode.keyLength)-byte key, got \(key.count) bytes")
        }
        self.key = key
        self.mode = mode
    }

    /// Parses `FILE[,format=hex|binary][,mode=aes-cbc|aes-128-cbc|aes-256-cbc]`, or swtpm's own
    /// spelling (`file=FILE,…`, `pwdfile=FILE[,kdf=pbkdf2|sha512]`), and reads the key. Without
    /// `mode=` the key's length picks it (16 bytes AES-128, 32 bytes AES-256); a passphrase
    /// without `mode=` derives an AES-128 key, as swtpm does.
    public static func load(option: String) throws(KeyError) -> MigrationKey {
        var path: String?
        var passphrase: String?
        var format = "hex"
        var mode: Mode?
        var kdf = "pbkdf2"
        for (i, part) in option.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            if kv.count == 1 {
                guard i == 0, !kv[0].isEmpty else { throw KeyError(.badOption, "unexpected '\(part)' in '\(option)'") }
                path = kv[0]
                continue
            }
            switch kv[0] {
            case "file": path = kv[1]
            case "pwdfile": passphrase = kv[1]
            case "format":
                guard kv[1] == "hex" || kv[1] == "binary" else { throw KeyError(.badOption, "format must be hex or binary, not '\(kv[1])'") }
                format = kv[1]
            case "mode":
                switch kv[1] {
                case "aes-cbc", "aes-128-cbc": mode = .aes128CBC
                case "aes-256-cbc": mode = .aes256CBC
                default: throw KeyError(.badOption, "mode must be aes-cbc, aes-128-cbc or aes-256-cbc, not '\(kv[1])'")
                }
            case "kdf", "pdf":
                guard kv[1] == "pbkdf2" || kv[1] == "sha512" else { throw KeyError(.badOption, "kdf must be pbkdf2 or sha512") }
                kdf = kv[1]
            case "remove": break
            default: throw KeyError(.badOption, "unknown parameter '\(kv[0])' in '\(option)'")
            }
        }
        if let passphrase {
            let pwd = try readFile(passphrase, limit: 4096)
            let m = mode ?? .aes128CBC
            return try MigrationKey(key: kdf == "sha512" ? Array(sha512(pwd).prefix(m.keyLength)) : pbkdf2(pwd, length: m.keyLength), mode: m)
        }
        guard let path else { throw KeyError(.badOption, "no key file in '\(option)'") }
        let bytes = try readFile(path, limit: 4096)
        let key = format == "binary" ? bytes : try parseHex(bytes)
        guard key.count == 16 || key.count == 32 else {
            throw KeyError(.badKey, "\(path): a key has 16 or 32 bytes (32 or 64 hex digits), this one has \(key.count)")
        }
        return try MigrationKey(key: key, mode: mode ?? (key.count == 32 ? .aes256CBC : .aes128CBC))
    }

    /// swtpm's hex key: optional `0x`, 32 or 64 hex digits, then only whitespace.
    static func parseHex(_ bytes: [UInt8]) throws(KeyError) -> [UInt8] {
        var s = Substring(String(decoding: bytes, as: UTF8.self))
        if s.hasPrefix("0x") || s.hasPrefix("0X") { s = s.dropFirst(2) }
        let digits = s.prefix { $0.isHexDigit }
        guard s.dropFirst(digits.count).allSatisfy({ $0.isWhitespace }), digits.count % 2 == 0 else {
            throw KeyError(.badKey, "not a hex key (32 or 64 hex digits, optional 0x, trailing whitespace)")
        }
        var out: [UInt8] = []
        var it = digits.makeIterator()
        while let h = it.next(), let l = it.next() {
            guard let v = UInt8(String([h, l]), radix: 16) else { throw KeyError(.badKey, "not a hex key") }
            out.append(v)
        }
        return out
    }

    static func readFile(_ path: String, limit: Int) throws(KeyError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw KeyError(.io, "\(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while out.count <= limit {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw KeyError(.io, "\(path): \(String(cString: strerror(errno)))") }
            if n == 0 { return out }
            out += chunk[..<n]
        }
        throw KeyError(.badKey, "\(path): longer than \(limit) bytes")
    }

    // MARK: Crypto (OpenSSL EVP, as swtpm's SWTPM_SymmetricKeyData_Encrypt/Decrypt)

    /// `SWTPM_CheckHMAC` + `SWTPM_SymmetricKeyData_Decrypt`: verifies HMAC-SHA256(key,
    /// ciphertext ‖ iv) against `hmac` in constant time, decrypts with AES-CBC (OpenSSL padding
    /// off; the first 16 IV bytes feed CBC), then removes swtpm's padding (PKCS#7-style to a
    /// multiple of the *key* length: the last byte says how many, 1…keylen, all equal).
    public func decrypt(ciphertext: [UInt8], iv: [UInt8], hmac: [UInt8]) throws(KeyError) -> [UInt8] {
        let expected = try Self.hmacSHA256(key: key, ciphertext + iv)
        guard hmac.count == expected.count, Self.constantTimeEqual(hmac, expected) else {
            throw KeyError(.hmacMismatch, "Verification of HMAC failed. Data integrity is compromised")
        }
        guard iv.count >= 16 else { throw KeyError(.malformed, "IV of \(iv.count) bytes") }
        guard !ciphertext.isEmpty, ciphertext.count % 16 == 0 else {
            throw KeyError(.malformed, "ciphertext of \(ciphertext.count) bytes is not a multiple of the AES block")
        }
        let plain = try cipher(ciphertext, iv: Array(iv.prefix(16)), encrypt: false)
        guard let pad = plain.last, pad >= 1, Int(pad) <= key.count, Int(pad) <= plain.count,
              plain.suffix(Int(pad)).allSatisfy({ $0 == pad }) else {
            throw KeyError(.malformed, "bad padding after decryption")
        }
        return Array(plain.dropLast(Int(pad)))
    }

    /// `SWTPM_SymmetricKeyData_Encrypt` + HMAC: pads to a multiple of the key length, encrypts
    /// with AES-CBC and returns the ciphertext and HMAC-SHA256(key, ciphertext ‖ iv). `iv` is
    /// key-length bytes, as swtpm stores it.
    public func encrypt(_ plain: [UInt8], iv: [UInt8]) throws(KeyError) -> (ciphertext: [UInt8], hmac: [UInt8]) {
        guard iv.count >= 16 else { throw KeyError(.malformed, "IV of \(iv.count) bytes") }
        let pad = key.count - plain.count % key.count
        let ct = try cipher(plain + [UInt8](repeating: UInt8(pad), count: pad), iv: Array(iv.prefix(16)), encrypt: true)
        return (ct, try Self.hmacSHA256(key: key, ct + iv))
    }

    private func cipher(_ input: [UInt8], iv: [UInt8], encrypt: Bool) throws(KeyError) -> [UInt8] {
        guard let ctx = EVP_CIPHER_CTX_new() else { throw KeyError(.openssl, "EVP_CIPHER_CTX_new failed") }
        defer { EVP_CIPHER_CTX_free(ctx) }
        let evp = mode == .aes128CBC ? EVP_aes_128_cbc() : EVP_aes_256_cbc()
        var out = [UInt8](repeating: 0, count: input.count + 32)
        var total: Int32 = 0
        let ok: Bool = key.withUnsafeBufferPointer { k in
            iv.withUnsafeBufferPointer { v in
                input.withUnsafeBufferPointer { i in
                    out.withUnsafeMutableBufferPointer { o in
                        guard EVP_CipherInit_ex(ctx, evp, nil, k.baseAddress, v.baseAddress, encrypt ? 1 : 0) == 1,
                              EVP_CIPHER_CTX_set_padding(ctx, 0) == 1, let op = o.baseAddress else { return false }
                        var n: Int32 = 0
                        guard EVP_CipherUpdate(ctx, op, &n, i.baseAddress, Int32(i.count)) == 1 else { return false }
                        var f: Int32 = 0
                        guard EVP_CipherFinal_ex(ctx, op + Int(n), &f) == 1 else { return false }
                        total = n + f
                        return true
                    }
                }
            }
        }
        guard ok else { throw KeyError(.openssl, "AES-CBC \(encrypt ? "encryption" : "decryption") failed") }
        return Array(out.prefix(Int(total)))
    }

    /// HMAC-SHA256 through OpenSSL's one-shot `HMAC()`.
    static func hmacSHA256(key: [UInt8], _ data: [UInt8]) throws(KeyError) -> [UInt8] {
        var md = [UInt8](repeating: 0, count: 32)
        var len: UInt32 = 0
        let p = key.withUnsafeBytes { k in
            data.withUnsafeBufferPointer { d in
                md.withUnsafeMutableBufferPointer { m in
                    HMAC(EVP_sha256(), k.baseAddress, Int32(k.count), d.baseAddress, d.count, m.baseAddress, &len)
                }
            }
        }
        guard p != nil, len == 32 else { throw KeyError(.openssl, "HMAC-SHA256 failed") }
        return md
    }

    /// OpenSSL's `CRYPTO_memcmp` (as swtpm's `SWTPM_CheckHMAC`): time depends on the length only.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        guard !a.isEmpty else { return true }
        return a.withUnsafeBytes { x in b.withUnsafeBytes { y in CRYPTO_memcmp(x.baseAddress, y.baseAddress, x.count) == 0 } }
    }

    static func sha512(_ data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 64)
        var len: UInt32 = 0
        _ = data.withUnsafeBytes { d in
            out.withUnsafeMutableBufferPointer { o in EVP_Digest(d.baseAddress, d.count, o.baseAddress, &len, EVP_sha512(), nil) }
        }
        return out
    }

    /// swtpm's default passphrase KDF: PBKDF2-HMAC-SHA512, salt "swtpm", 1000 iterations.
    static func pbkdf2(_ pwd: [UInt8], length: Int) throws(KeyError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: length)
        let salt = Array("swtpm".utf8)
        let ok = pwd.withUnsafeBytes { p in
            salt.withUnsafeBufferPointer { s in
                out.withUnsafeMutableBufferPointer { o in
                    PKCS5_PBKDF2_HMAC(p.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(p.count), s.baseAddress, Int32(s.count),
                                      1000, EVP_sha512(), Int32(length), o.baseAddress)
                }
            }
        }
        guard ok == 1 else { throw KeyError(.openssl, "PBKDF2 failed") }
        return out
    }

    /// SHA-1, for libtpms' trailing integrity digests.
    static func sha1(_ data: ArraySlice<UInt8>) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 20)
        var len: UInt32 = 0
        _ = data.withUnsafeBytes { d in
            out.withUnsafeMutableBufferPointer { o in EVP_Digest(d.baseAddress, d.count, o.baseAddress, &len, EVP_sha1(), nil) }
        }
        return out
    }
}
