import EmulatorBackend
import Foundation
import QEMUHarness
import TPMDiagnostics
import Testing
import VMState
import WireFormat

/// `tis-sim validate` on streams made by the real QEMU 7.2 + swtpm 0.7.1 in these tests.
@Suite("Troubleshooter on real QEMU 7.2 + swtpm 0.7.1 streams")
struct ValidateTests {
    @Test("a clean stream validates clean", arguments: [QEMUMachineType.pc, .q35])
    func clean(_ machine: QEMUMachineType) async throws {
        let p = try RealStreams.path(StreamSpec(machine: machine))
        let (s, r) = try await troubleshoot(.path(p), name: p,
                                            DestinationOptions(tpmFamily: .tpm20, frontend: "tpm-tis", machine: machine.rawValue))
        #expect(s.error == nil && s.sawEOF && s.vmDescription != nil)
        #expect(r.findings.isEmpty, "\(r.findings)")
        #expect(r.exitStatus == 0)
        #expect(r.sourceFamily == .tpm20)
        #expect(r.libtpmsResult == 0)
        #expect(r.blobs.map(\.libtpms?.kind) == [.tpm2Permanent, .tpm2Volatile, nil])
        #expect(r.blobs[0].libtpms?.version == 3 && r.blobs[0].libtpms?.compileConstantsCount == 120)
        #expect(r.blobs[1].libtpms?.integrityValid == true)
    }

    /// How the destination's key relates to the source swtpm's `--migration-key`.
    struct KeyCase: Sendable, CustomTestStringConvertible {
        var name: String
        /// The key file's bytes and the option suffix; nil: no key given.
        var file: [UInt8]?
        var option: String
        var expected: Finding.Code?
        var testDescription: String { name }
    }

    static let keyCases: [KeyCase] = [
        KeyCase(name: "the right key (hex file)", file: Array((Keys.right128 + "\n").utf8), option: "", expected: nil),
        KeyCase(name: "the right key (binary file, mode=aes-cbc)", file: [UInt8](hexString: Keys.right128),
                option: ",format=binary,mode=aes-cbc", expected: nil),
        KeyCase(name: "a wrong key", file: Array(Keys.wrong128.utf8), option: ",format=hex", expected: .wrongMigrationKey),
        KeyCase(name: "no key", file: nil, option: "", expected: .needsMigrationKey),
        KeyCase(name: "a 256-bit key", file: Array(Keys.right256.utf8), option: ",mode=aes-256-cbc", expected: .migrationKeySize),
    ]

    @Test("swtpm --migration-key: right key clean, wrong key, no key, other key size", arguments: keyCases)
    func migrationKey(_ c: KeyCase) async throws {
        let p = try RealStreams.path(StreamSpec(migrationKeyHex: Keys.right128))
        var d = DestinationOptions(tpmFamily: .tpm20)
        if let file = c.file {
            let keyPath = try RealStreams.keyFile(file, name: "key-\(abs(c.name.hashValue)).bin")
            d.migrationKey = try MigrationKey.load(option: keyPath + c.option)
        }
        let (s, r) = try await troubleshoot(.path(p), name: p, d)
        #expect(s.error == nil)
        // swtpm encrypted what left through GET_STATEBLOB: header flags MIGRATION_DATA|MIGRATION_ENCRYPTED,
        // TLVs ENCRYPTED_MIGRATION_DATA, HMAC, IVEC_ENCRYPTED_MIGRATION_DATA.
        let perm = try #require(r.blobs.first)
        #expect(perm.header?.flags == [.migrationData, .migrationEncrypted])
        #expect(perm.tlvs.map(\.tag) == [5, 3, 7])
        if let code = c.expected {
            #expect(codes(r).first == code, "\(r.findings)")
            #expect(r.exitStatus == 1)
            let f = try #require(r.findings.first)
            #expect(f.evidence.section == "tpm-emulator")
            #expect(f.evidence.field.hasPrefix("state_blobs.permanent.buffer:swtpm."))
            #expect((f.evidence.offset ?? 0) > perm.streamOffset)
            #expect(f.fix.contains(code == .needsMigrationKey ? "swtpm command line parameters should be identical"
                                                                 : "different migration keys are used on the source and destination side"))
        } else {
            #expect(r.findings.isEmpty, "\(r.findings)")
            #expect(perm.decryption == .decrypted(bits: 128))
            #expect(perm.libtpms?.kind == .tpm2Permanent)
            #expect(r.libtpmsResult == 0)
        }
    }

    @Test("swtpm --migration-key mode=aes-256-cbc: the right key decrypts (swtpm pads to 32 bytes), a 128-bit key is the wrong size")
    func migrationKey256() async throws {
        let p = try RealStreams.path(StreamSpec(migrationKeyHex: Keys.right256, mode: "aes-256-cbc"))
        let right = try MigrationKey(key: [UInt8](hexString: Keys.right256) ?? [], mode: .aes256CBC)
        let (_, r) = try await troubleshoot(.path(p), name: p, DestinationOptions(tpmFamily: .tpm20, migrationKey: right))
        #expect(r.findings.isEmpty, "\(r.findings)")
        #expect(r.blobs[0].header?.flags == [.migrationData, .migrationEncrypted, .migration256BitKey])
        #expect(r.blobs[0].decryption == .decrypted(bits: 256) && r.blobs[1].decryption == .decrypted(bits: 256))
        #expect(r.libtpmsResult == 0)
        let small = try MigrationKey(key: [UInt8](hexString: Keys.right128) ?? [], mode: .aes128CBC)
        let (_, r2) = try await troubleshoot(.path(p), name: p, DestinationOptions(tpmFamily: .tpm20, migrationKey: small))
        #expect(codes(r2).first == .migrationKeySize)
        #expect(r2.findings.first?.message.contains("Need 256 bit key") == true)
    }

    @Test("a TPM 1.2 stream: family mismatch for a TPM 2.0 destination, clean for a TPM 1.2 one")
    func tpm12() async throws {
        let p = try RealStreams.path(StreamSpec(tpm: .tpm12))
        let (_, r2) = try await troubleshoot(.path(p), name: p, DestinationOptions(tpmFamily: .tpm20))
        #expect(r2.sourceFamily == .tpm12)
        #expect(codes(r2) == [.tpmFamilyMismatch], "\(r2.findings)")
        let f = try #require(r2.findings.first)
        #expect(f.message.contains("TPM 1.2 state") && f.message.contains("0x1e"))
        #expect(f.fix.hasPrefix("swtpm command line parameters should be identical"))
        #expect(f.evidence.field == "state_blobs.permanent.buffer:libtpms.magic")
        #expect(r2.blobs[0].libtpms?.kind == .tpm12Permanent)

        let (_, r12) = try await troubleshoot(.path(p), name: p, DestinationOptions(tpmFamily: .tpm12, frontend: "tpm-tis"))
        #expect(r12.findings.isEmpty, "\(r12.findings)")
        #expect(r12.libtpmsResult == 0)
        let (_, crb) = try await troubleshoot(.path(p), name: p, DestinationOptions(tpmFamily: .tpm12, frontend: "tpm-crb"))
        #expect(Set(codes(crb)) == [.frontendMismatch])
    }

    @Test("a TPM 2.0 stream for a TPM 1.2 destination: family mismatch (0x43)")
    func tpm2ForTPM12() async throws {
        let p = try RealStreams.path(StreamSpec())
        let (_, r) = try await troubleshoot(.path(p), name: p, DestinationOptions(tpmFamily: .tpm12))
        #expect(codes(r) == [.tpmFamilyMismatch])
        #expect(r.findings.first?.message.contains("0x43") == true)
    }

    /// A change made to a real blob in place (same size, so swtpm's container stays valid).
    enum BlobMutation: String, CaseIterable, Sendable {
        /// PERSISTENT_ALL version and min_version 3 → 4, as libtpms 0.10 with a profile writes.
        case persistentAllV4
        /// PERSISTENT_DATA version and min_version 4 → 5 (StateFormatLevel ≥ 3).
        case persistentDataV5
        /// One compile-time constant changed: a libtpms built with other options.
        case compileConstant
        /// One byte of the volatile state flipped in transit.
        case volatileByte

        var expected: Finding.Code {
            switch self {
            case .persistentAllV4, .persistentDataV5: .blobNewerThanLibtpms
            case .compileConstant: .compileOptions
            case .volatileByte: .volatileCorrupt
            }
        }
    }

    @Test("libtpms refusals from real blobs changed in place", arguments: BlobMutation.allCases)
    func refusals(_ m: BlobMutation) async throws {
        var bytes = try RealStreams.bytes(StreamSpec())
        let s = try StreamInspection.walk(.bytes(bytes), name: "clean")
        let blobs = TPMStateBlobType.allCases.map { BlobAnalysis.analyze($0, s.emulatorBlobs?[$0] ?? .empty, streamOffset: s.blobOffset($0) ?? -1, key: nil) }
        let perm = try #require(Troubleshooter.plainOffsetForTests(blobs[0]))
        let vol = try #require(Troubleshooter.plainOffsetForTests(blobs[1]))
        let info = try #require(blobs[0].libtpms)
        #expect(Array(bytes[perm..<(perm + 8)]) == [0x00, 0x03, 0xAB, 0x36, 0x47, 0x23, 0x00, 0x03])
        switch m {
        case .persistentAllV4:
            bytes[perm + 1] = 4
            bytes[perm + 7] = 4
        case .persistentDataV5:
            let plain = try #require(blobs[0].plain)
            let at = try #require((0..<(plain.count - 4)).first { plain[$0..<($0 + 4)] == [0x12, 0x21, 0x34, 0x43] })
            #expect(plain[at - 1] == 4 && plain[at + 5] == 4)
            bytes[perm + at - 1] = 5
            bytes[perm + at + 5] = 5
        case .compileConstant:
            let first = try #require(info.compileConstantsOffset) + 4
            bytes[perm + first + 3] ^= 0x40
        case .volatileByte:
            bytes[vol + 100] ^= 0x01
        }
        let (_, r) = try await troubleshoot(.bytes(bytes), name: m.rawValue, DestinationOptions(tpmFamily: .tpm20))
        #expect(codes(r) == [m.expected], "\(r.findings)")
        let f = try #require(r.findings.first)
        #expect(f.evidence.section == "tpm-emulator")
        switch m.expected {
        case .blobNewerThanLibtpms:
            #expect(r.libtpmsResult == 0x2E)
            #expect(f.fix.contains("downgrading of TPM state may not be supported"))
            // libtpms' own words travel in the evidence.
            #expect(f.evidence.detail.contains("higher than implementation version"), "\(f.evidence.detail)")
        case .compileOptions:
            #expect(r.libtpmsResult == 0x03)
            #expect(f.fix.contains("compiled with different compile-time options"))
            #expect(f.evidence.detail.contains("Unexpected value for"), "\(f.evidence.detail)")
        default:
            #expect(f.evidence.field.contains("volatil"))
        }
    }

    @Test("an empty permanent blob (the source had no permall)")
    func emptyPermanent() async throws {
        var state = try TPMMigrationState(source: .path(RealStreams.path(StreamSpec())))
        state.emulatorBlobs?.permanent = .empty
        let (_, r) = try await troubleshoot(.bytes(try state.encodedStream()), name: "empty")
        #expect(codes(r) == [.emptyPermanentBlob], "\(r.findings)")
        #expect(r.findings.first?.evidence.field == "state_blobs.permanent.size")
    }

    @Test("frontend and machine type against the destination's")
    func frontendAndMachine() async throws {
        let p = try RealStreams.path(StreamSpec(machine: .q35))
        let (_, r) = try await troubleshoot(.path(p), name: p, DestinationOptions(frontend: "tpm-crb", machine: "pc"))
        #expect(Set(codes(r)) == [.frontendMismatch, .machineType], "\(r.findings)")
        let machine = try #require(r.findings.first { $0.code == .machineType })
        #expect(machine.evidence.offset == 8 && machine.evidence.detail == "pc-q35-7.2")
        #expect(machine.fix.hasPrefix("QEMU command line parameters should be identical apart from the '-incoming' option"))
        let (_, full) = try await troubleshoot(.path(p), name: p, DestinationOptions(frontend: "tpm-tis", machine: "pc-q35-7.2"))
        #expect(full.findings.isEmpty)
        let crbPath = try RealStreams.path(StreamSpec(machine: .q35, device: .crb))
        let (s, crb) = try await troubleshoot(.path(crbPath), name: crbPath, DestinationOptions(frontend: "tpm-tis"))
        #expect(s.frontend == "tpm-crb" && s.crbRegisters?.count == 32)
        #expect(codes(crb) == [.frontendMismatch])
    }
}

extension Troubleshooter {
    /// Stream offset of a blob's plain libtpms bytes (header + TLV 4 + TLV 1).
    static func plainOffsetForTests(_ a: BlobAnalysis) -> Int? {
        guard let t = a.tlvs.first, t.tag == 4, let o = t.offset else { return nil }
        return a.streamOffset + o + 12
    }
}

extension ValidateTests {
    /// A change to swtpm's 10-byte header of the permanent blob, made in place in a real stream.
    enum HeaderDamage: String, CaseIterable, Sendable {
        case totlen, hdrsize, minVersion

        var expectedResult: String {
            switch self {
            case .totlen: "0x3"
            case .hdrsize: "0x2b"
            case .minVersion: "0x2e"
            }
        }
    }

    @Test("swtpm's blob header checks (SWTPM_NVRAM_CheckHeader): CORRUPT-BLOB with swtpm's result", arguments: HeaderDamage.allCases)
    func header(_ d: HeaderDamage) async throws {
        var bytes = try RealStreams.bytes(StreamSpec())
        let s = try StreamInspection.walk(.bytes(bytes), name: "clean")
        let at = try #require(s.blobOffset(.permanent))
        switch d {
        case .totlen: bytes[at + 9] ^= 0x01
        case .hdrsize: bytes[at + 3] = 12
        case .minVersion: bytes[at + 1] = 3
        }
        let (_, r) = try await troubleshoot(.bytes(bytes), name: d.rawValue, DestinationOptions(tpmFamily: .tpm20))
        #expect(codes(r) == [.corruptBlob], "\(r.findings)")
        let f = try #require(r.findings.first)
        #expect(f.message.contains("SET_STATEBLOB \(d.expectedResult)"), "\(f.message)")
        #expect(f.evidence.field.hasPrefix("state_blobs.permanent.buffer:swtpm."))
        #expect((f.evidence.offset ?? 0) >= at && (f.evidence.offset ?? 0) < at + 10)
    }

    @Test("a blob still encrypted with the source's state key (--key, fetched without DECRYPTED): NEEDS-STATE-KEY")
    func stateKey() async throws {
        var state = try TPMMigrationState(source: .path(RealStreams.path(StreamSpec())))
        let blobs = try #require(state.emulatorBlobs)
        let plain = try #require(try SwtpmBlob.decode(blobs.permanent.data).plainState())
        // swtpm's on-disk --key form inside the migration wrapper: TLV(2, ct) TLV(3, hmac) TLV(6, iv).
        let key = try MigrationKey(key: [UInt8](repeating: 0x5A, count: 16), mode: .aes128CBC)
        let iv = [UInt8](repeating: 0x11, count: 16)
        let (ct, mac) = try key.encrypt(plain, iv: iv)
        var inner = ByteWriter()
        for (tag, value) in [(UInt16(2), ct), (3, mac), (6, iv)] {
            inner.writeBigEndianUInt16(tag)
            inner.writeBigEndianUInt32(UInt32(value.count))
            inner.writeBytes(value)
        }
        let wrapped = SwtpmBlob(flags: [.migrationData, .encrypted], tlvs: [.init(tag: 4, value: inner.bytes)]).encoded()
        state.emulatorBlobs?.permanent = TPMStateBlob(flags: 2, data: wrapped)
        let (_, r) = try await troubleshoot(.bytes(try state.encodedStream()), name: "state-key", DestinationOptions(tpmFamily: .tpm20))
        #expect(codes(r) == [.needsStateKey], "\(r.findings)")
        #expect(r.findings.first?.evidence.field == "state_blobs.permanent_flags")
        #expect(r.blobs[0].innerTLVs?.map(\.tag) == [2, 3, 6])
    }
}

extension ValidateTests {
    @Test("no tpm-emulator section: NO-TPM-STATE (an error with a TPM device, a warning without)", arguments: [true, false])
    func noTPMState(_ withDevice: Bool) async throws {
        var state = try TPMMigrationState(source: .path(RealStreams.path(StreamSpec())))
        state.emulatorBlobs = nil
        state.ppi = nil
        if !withDevice { state.tis = nil }
        let (s, r) = try await troubleshoot(.bytes(try state.encodedStream()), name: "no-tpm")
        #expect(s.error == nil && s.sawEOF)
        #expect(codes(r) == [.noTPMState], "\(r.findings)")
        #expect(r.findings.first?.severity == (withDevice ? .error : .warning))
        #expect(r.exitStatus == 1)
    }
}
