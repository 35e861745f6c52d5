import COpenSSL

/// The few primitives the library needs, from OpenSSL's libcrypto (the library libtpms already
/// links): SHA-256 for PCR arithmetic, HMAC-SHA256 and AES-CBC for swtpm's blob encryption.
public enum Crypto {
    /// SHA-256 of `data`.
    public static func sha256(_ data: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var len: UInt32 = 0
        let ok = data.withUnsafeBytes { d in
            out.withUnsafeMutableBytes { o in
                EVP_Digest(d.baseAddress, d.count, o.baseAddress?.assumingMemoryBound(to: UInt8.self), &len, EVP_sha256(), nil)
            }
        }
        return ok == 1 ? out : []
    }

    /// The value a SHA-256 PCR takes after extending `digests` in order from all zeros.
    public static func pcrExtendSHA256(_ digests: [[UInt8]], from initial: [UInt8] = [UInt8](repeating: 0, count: 32)) -> [UInt8] {
        digests.reduce(initial) { sha256($0 + $1) }
    }
}
