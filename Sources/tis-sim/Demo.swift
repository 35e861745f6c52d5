import ArgumentParser
import EmulatorBackend
import Foundation
import TIS
import TISDriver
import WireFormat

/// `tis-sim demo`: an embedded TPM 2.0 driven through the TIS registers, end to end.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Drive an in-process TPM 2.0 (libtpms) through the TIS registers: Startup, GetRandom, PCR_Extend(16), PCR_Read(16).")

    @Flag(help: "Print the result as JSON.")
    var json = false

    @Option(help: "Keep the TPM's NV state in this directory (swtpm's file names); default: a temporary directory.")
    var stateDir: String?

    @Option(help: "The locality to send the commands from (0-3).")
    var locality: UInt8 = 0

    func validate() throws {
        guard locality <= 3 else { throw ValidationError("--locality must be 0...3 (locality 4 writes are dropped by the TIS)") }
    }

    func run() throws {
        let dir: String
        var temporary = false
        if let stateDir {
            dir = URL(fileURLWithPath: stateDir).standardizedFileURL.path
        } else {
            dir = FileManager.default.temporaryDirectory.appendingPathComponent("tis-sim-demo-\(getpid())").path
            temporary = true
        }
        defer { if temporary { try? FileManager.default.removeItem(atPath: dir) } }

        let backend = try LibtpmsBackend(version: .tpm20, stateDirectory: dir)
        defer { backend.shutdown() }
        let device = try TISDevice(backend: backend, mode: .worker)
        let bus = TISMachineBus(device: device)
        let driver = TISDriver(bus: bus)
        driver.recording = true

        let l = locality
        let startup = try driver.transmit(TPM2.startup(), locality: l)
        let handshake = driver.transcript
        driver.recording = false
        let startupRC = TPM2.responseCode(startup) ?? 0xFFFF_FFFF

        let random = try TPM2.randomBytes(try driver.transmit(TPM2.getRandom(16), locality: l))

        let digest = Crypto.sha256(Array("swift-tpm-frontend".utf8))
        let extend = try driver.transmit(TPM2.pcrExtendSHA256(pcr: 16, digest: digest), locality: l)
        let extendRC = TPM2.responseCode(extend) ?? 0xFFFF_FFFF
        let pcr = try TPM2.pcrDigest(try driver.transmit(TPM2.pcrReadSHA256(pcr: 16), locality: l, relinquish: true))
        let expected = Crypto.pcrExtendSHA256([digest])
        let regs = DemoRegisters(access: try driver.access(l), sts: try driver.status(l))
        let version = LibtpmsBackend.libraryVersion

        if json {
            let obj: [String: Any] = [
                "tpm": "2.0", "backend": "libtpms",
                "libtpmsVersion": "\(version >> 16).\((version >> 8) & 0xFF).\(version & 0xFF)",
                "tisBase": "0xfed40000", "locality": Int(l),
                "handshake": handshake,
                "startup": ["responseCode": Int(startupRC)],
                "getRandom": random.hexString,
                "pcrExtend": ["pcr": 16, "digest": digest.hexString, "responseCode": Int(extendRC)],
                "pcr16": pcr.hexString,
                "expectedPcr16": expected.hexString,
                "match": pcr == expected,
                "stateDir": temporary ? NSNull() : dir as Any,
                "afterRelinquish": ["access": String(format: "0x%02x", regs.access), "sts": String(format: "0x%08x", regs.sts)],
            ]
            let data = try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print("TPM 2.0 (libtpms \(version >> 16).\((version >> 8) & 0xFF).\(version & 0xFF), in process) behind a TIS at 0xfed40000, locality \(l)")
            print("Handshake of the first command (TPM2_Startup):")
            for line in handshake { print("  " + line) }
            print("TPM2_Startup(SU_CLEAR)   -> rc 0x\(String(startupRC, radix: 16))" + (startupRC == 0x100 ? " (already initialized)" : ""))
            print("TPM2_GetRandom(16)       -> \(random.hexString)")
            print("TPM2_PCR_Extend(16)      -> rc 0x\(String(extendRC, radix: 16)), digest sha256(\"swift-tpm-frontend\") = \(digest.hexString)")
            print("TPM2_PCR_Read(16)        -> \(pcr.hexString)")
            print("sha256(0^32 || digest)   =  \(expected.hexString)  \(pcr == expected ? "match" : "MISMATCH")")
            print("after relinquish: ACCESS 0x\(String(regs.access, radix: 16)), STS 0x\(String(regs.sts, radix: 16))")
            print(temporary ? "NV state: temporary (use --state-dir DIR to keep it)" : "NV state kept in \(dir)")
        }
        if pcr != expected || extendRC != 0 {
            throw ExitCode(1)
        }
    }
}

struct DemoRegisters {
    var access: UInt8
    var sts: UInt32
}
