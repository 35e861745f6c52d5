import EmulatorBackend
import TIS
import VMState

/// What the destination of the migration looks like; every field left nil is not checked.
public struct DestinationOptions: Sendable {
    /// The destination swtpm's TPM family (`--tpm2` or not). Nil: the blobs' own family.
    public var tpmFamily: TPMVersion?
    /// The destination swtpm's `--migration-key`.
    public var migrationKey: MigrationKey?
    /// The destination's frontend device: `tpm-tis` or `tpm-crb`.
    public var frontend: String?
    /// The destination's machine: `pc`, `q35`, or a full machine type (`pc-q35-7.2`).
    public var machine: String?
    /// Run the blobs through this host's libtpms (`TPMLIB_SetState` + `TPMLIB_ValidateState`).
    public var validateWithLibtpms = true

    /// Nothing known about the destination.
    public init(tpmFamily: TPMVersion? = nil, migrationKey: MigrationKey? = nil, frontend: String? = nil,
                machine: String? = nil, validateWithLibtpms: Bool = true) {
        self.tpmFamily = tpmFamily
        self.migrationKey = migrationKey
        self.frontend = frontend
        self.machine = machine
        self.validateWithLibtpms = validateWithLibtpms
    }
}

/// The troubleshooter's verdict on one stream.
public struct TroubleshootReport: Sendable {
    /// The findings, most severe first (stream order within a severity).
    public var findings: [Finding]
    /// The blobs taken apart (empty without a `tpm-emulator` section).
    public var blobs: [BlobAnalysis]
    /// The TPM family of the permanent blob, if recognised.
    public var sourceFamily: TPMVersion?
    /// The family validated against.
    public var destinationFamily: TPMVersion?
    /// This host's libtpms (`TPMLIB_GetVersion`), e.g. `0.9.2`.
    public var libtpmsVersion: String
    /// The TPM result libtpms gave the blobs (0 accepted; nil not validated).
    public var libtpmsResult: UInt32?

    /// 0 clean (info findings only), 1 findings.
    public var exitStatus: Int32 { findings.contains { $0.severity != .info } ? 1 : 0 }
}

/// `tis-sim validate`: the checks of swtpm-libtpms-peers.md §3.6, in its order, offline from the
/// stream (plus the key when given, plus this host's libtpms):
///
/// 1. the stream itself: truncated or corrupt, machine type, frontend, vmdesc;
/// 2. the `tpm-emulator` records: present, permanent blob not empty;
/// 3. swtpm's container (header checks of `SWTPM_NVRAM_CheckHeader`);
/// 4. encryption: migration key needed, size, HMAC (the check the destination does only at
///    SET_STATEBLOB), state-key encryption;
/// 5. libtpms: TPM family from the magic, versions from the NV headers, volatile integrity;
/// 6. `TPMLIB_SetState` + `TPMLIB_ValidateState` on this host's libtpms: downgrade (0x2E),
///    compile-time options (0x03), other refusals.
public enum Troubleshooter {
    /// This host's libtpms version as `major.minor.micro`.
    public static var libtpmsVersion: String {
        let v = LibtpmsBackend.libraryVersion
        return "\(v >> 16 & 0xFF).\(v >> 8 & 0xFF).\(v & 0xFF)"
    }

    /// Checks an inspected stream against a destination.
    public static func check(_ s: StreamInspection, destination: DestinationOptions = DestinationOptions()) -> TroubleshootReport {
        var f: [Finding] = []
        var report = TroubleshootReport(findings: [], blobs: [], libtpmsVersion: libtpmsVersion)

        // 1. The stream.
        if let e = s.error { f.append(streamFinding(e, s)) }
        if let want = destination.machine, let c = s.configuration, !machineMatches(c.machineType, want) {
            f.append(Finding(.machineType, .error,
                             "The stream was saved by a '\(c.machineType)' machine and the destination is '\(want)'; QEMU refuses it (\"Machine type received is '\(c.machineType)' and local is '\(want)'\").",
                             evidence: .init(section: "configuration", field: "name", offset: c.offset, detail: c.machineType),
                             fix: QEMUAdvice.identicalQEMU + ": start the destination with -machine \(c.machineType)."))
        }
        if let want = destination.frontend, let have = s.frontend, have != want {
            let sec = s.sections.first { $0.idstr == have }
            f.append(Finding(.frontendMismatch, .error,
                             "The stream carries a \(have) device but the destination has \(want); QEMU refuses the \(have) section (\"Unknown savevm section or instance '\(have)' 0\").",
                             evidence: .init(section: have, field: "idstr", offset: sec?.offset, detail: "section \(sec?.key ?? have)"),
                             fix: QEMUAdvice.identicalQEMU + ": use -device \(have),tpmdev=… on the destination as on the source."))
        }
        if s.error == nil && s.sawEOF && s.vmDescription == nil {
            f.append(Finding(.noVMDescription, .info,
                             "The stream has no vmdesc trailer; QEMU loads it anyway (\"Expected vmdescription section, but got 0\"), but device sections other than the TPM's cannot be decoded.",
                             evidence: .init(section: "vmdesc", field: "type", offset: s.eofOffset.map { $0 + 1 }, detail: "nothing after EOF"),
                             fix: "Nothing to do for the TPM."))
        }

        // 2. The tpm-emulator records.
        guard let blobs = s.emulatorBlobs else {
            if s.error == nil {
                f.append(Finding(.noTPMState, s.frontend == nil ? .warning : .error,
                                 s.frontend == nil ? "The stream has no TPM: no tpm-emulator section and no TPM frontend."
                                     : "The stream has a \(s.frontend ?? "TPM") device but no tpm-emulator section: the source did not use -tpmdev emulator (swtpm), so no TPM state travels with the VM.",
                                 evidence: .init(section: "tpm-emulator", field: "idstr", offset: nil, detail: "no such section"),
                                 fix: QEMUAdvice.identicalQEMU + ": migration with a TPM needs -tpmdev emulator (swtpm) on both sides."))
            }
            report.findings = sorted(f)
            return report
        }
        if s.frontend == nil && s.error == nil {
            f.append(Finding(.noTPMFrontend, .warning,
                             "The stream has TPM state (tpm-emulator) but no tpm-tis or tpm-crb section; the destination's TPM device keeps its reset state.",
                             evidence: .init(section: "tpm-tis", field: "idstr", offset: nil, detail: "no tpm-tis or tpm-crb section"),
                             fix: QEMUAdvice.identicalQEMU + "."))
        }
        let analyses = TPMStateBlobType.allCases.map { t in
            BlobAnalysis.analyze(t, blobs[t], streamOffset: s.blobOffset(t) ?? -1, key: destination.migrationKey)
        }
        report.blobs = analyses
        let perm = analyses[0]
        let permName = "state_blobs.permanent"
        if perm.size == 0 {
            f.append(Finding(.emptyPermanentBlob, .error,
                             "The permanent TPM state is empty: the source swtpm had no permall (a state directory never initialised, or wiped on shared storage), so the destination gets no TPM or a factory-fresh one (volatile SET_STATEBLOB then fails with 0x800).",
                             evidence: .init(section: EmulatorSection.idstr, field: "\(permName).size", offset: s.emulatorFieldOffset(.permanent, "size"), detail: "0"),
                             fix: QEMUAdvice.directories + "; check that the source swtpm's --tpmstate dir holds tpm2-00.permall (tpm-00.permall for TPM 1.2) before migrating."))
        }

        // 3–5. Each blob, layer by layer.
        var plainBlobs: [(TPMStateBlobType, [UInt8])] = []
        var blocked = false
        for a in analyses where a.size > 0 {
            let name = "state_blobs.\(StreamInspection.qemuBlobName(a.type))"
            let field = "\(name).buffer"
            if let p = a.containerProblem {
                f.append(Finding(.corruptBlob, .error,
                                 "The \(a.type) blob's swtpm container is unusable (\(p.message)); the destination swtpm refuses it (SET_STATEBLOB 0x\(String(p.tpmResult, radix: 16))).",
                                 evidence: .init(section: EmulatorSection.idstr, field: "\(field):swtpm.\(p.field)", offset: a.streamOffset + p.offset, detail: p.message),
                                 fix: p.tpmResult == 0x2E ? QEMUAdvice.downgrade + "." : "The stream was damaged in transit or on disk: migrate again; " + QEMUAdvice.sameVersions + "."))
                blocked = true
                continue
            }
            let flagsAt = a.streamOffset + 4
            switch a.decryption {
            case .notEncrypted, .decrypted: break
            case .noKey(let bits):
                f.append(Finding(.needsMigrationKey, .warning,
                                 "The \(a.type) blob is encrypted with swtpm's --migration-key (AES-\(bits)-CBC): the destination swtpm needs the same key (without one SET_STATEBLOB fails with 0x0D), and this check needs it to look inside.",
                                 evidence: .init(section: EmulatorSection.idstr, field: "\(field):swtpm.flags", offset: flagsAt, detail: flagText(a.header?.flags)),
                                 fix: QEMUAdvice.identicalSwtpm + ": start the destination swtpm with the source's --migration-key, and pass the same key file here with --migration-key FILE."))
                blocked = true
            case .keySizeMismatch(let blobBits, let keyBits):
                f.append(Finding(.migrationKeySize, .error,
                                 "The \(a.type) blob was encrypted with a \(blobBits)-bit migration key and the key given is \(keyBits)-bit; the destination swtpm refuses it (\"Wrong decryption key. Need \(blobBits) bit key\", 0x28).",
                                 evidence: .init(section: EmulatorSection.idstr, field: "\(field):swtpm.flags", offset: flagsAt, detail: flagText(a.header?.flags)),
                                 fix: QEMUAdvice.keys + ": use the source's key and mode (mode=\(blobBits == 256 ? "aes-256-cbc" : "aes-cbc"))."))
                blocked = true
            case .hmacMismatch:
                let tlv = a.tlvs.first { $0.tag == SwtpmBlob.Tag.hmac.rawValue }
                f.append(Finding(.wrongMigrationKey, .error,
                                 "The migration key given does not verify the \(a.type) blob's HMAC: a destination swtpm with this key refuses the state (\"Setting the stateblob (type \(a.type.rawValue)) failed with a TPM error 0x21 decryption error\").",
                                 evidence: .init(section: EmulatorSection.idstr, field: "\(field):swtpm.tlv(HMAC)", offset: tlv?.offset.map { a.streamOffset + $0 }, detail: "HMAC-SHA256(key, ciphertext ‖ iv) differs"),
                                 fix: QEMUAdvice.keys + ": give the destination swtpm the same --migration-key as the source (with libvirt, the same secret value on both hosts)."))
                blocked = true
            case .malformed(let why):
                f.append(Finding(.corruptBlob, .error,
                                 "The \(a.type) blob's encrypted payload is malformed (\(why)); the destination swtpm refuses it.",
                                 evidence: .init(section: EmulatorSection.idstr, field: "\(field):swtpm.tlv(ENCRYPTED_MIGRATION_DATA)", offset: a.streamOffset, detail: why),
                                 fix: "The stream was damaged in transit or on disk: migrate again."))
                blocked = true
            }
            if a.stateKeyEncrypted {
                f.append(Finding(.needsStateKey, .warning,
                                 "The \(a.type) blob is still encrypted with the source swtpm's state key (--key): it was fetched without the DECRYPTED flag, so the destination swtpm needs the same --key (else 0x0D or 0x21).",
                                 evidence: .init(section: EmulatorSection.idstr, field: "\(name)_flags", offset: s.emulatorFieldOffset(a.type, "flags"), detail: "flags \(a.recordFlags), swtpm \(flagText(a.header?.flags))"),
                                 fix: QEMUAdvice.identicalSwtpm + ": start the destination swtpm with the source's --key."))
                blocked = true
            }
            if let p = a.plain { plainBlobs.append((a.type, p)) }
        }

        // Family, versions, integrity from the libtpms headers.
        let permInfo = perm.libtpms
        let source = permInfo?.kind.family ?? analyses.compactMap { $0.libtpms?.kind.family }.first { $0 != .unspecified }
        report.sourceFamily = source == .unspecified ? nil : source
        let dest = destination.tpmFamily ?? report.sourceFamily
        report.destinationFamily = dest
        var familyMismatch = false
        if let src = report.sourceFamily, let dest, src != dest {
            familyMismatch = true
            let rc: UInt32 = dest == .tpm20 ? 0x1E : 0x43
            let a = analyses.first { $0.libtpms?.kind.family == src } ?? perm
            f.append(Finding(.tpmFamilyMismatch, .error,
                             "The stream holds TPM \(src) state but the destination runs a TPM \(dest)\(dest == .tpm20 ? " (swtpm --tpm2)" : " (swtpm without --tpm2)"); its swtpm refuses the state (SET_STATEBLOB 0x\(String(rc, radix: 16))\(dest == .tpm20 ? " TPM_RC_BAD_TAG, \"Invalid magic\"" : " TPM_INVALID_STRUCTURE")).",
                             evidence: .init(section: EmulatorSection.idstr, field: "state_blobs.\(StreamInspection.qemuBlobName(a.type)).buffer:libtpms.magic",
                                             offset: plainOffset(a), detail: a.libtpms.map { describe($0) } ?? "?"),
                             fix: QEMUAdvice.identicalSwtpm + ": start the destination swtpm \(src == .tpm20 ? "with" : "without") --tpm2, and the destination QEMU with the same TPM device" + (src == .tpm12 ? " (tpm-tis; tpm-crb is TPM 2.0 only)." : ".")))
        }
        if let want = destination.frontend, want == CRBSection.idstr, report.sourceFamily == .tpm12, !familyMismatch {
            f.append(Finding(.frontendMismatch, .error,
                             "The stream holds TPM 1.2 state but the destination has tpm-crb, which QEMU offers for TPM 2.0 only.",
                             evidence: .init(section: EmulatorSection.idstr, field: "\(permName).buffer:libtpms.magic", offset: plainOffset(perm), detail: permInfo.map { describe($0) } ?? "?"),
                             fix: QEMUAdvice.identicalQEMU + ": use -device tpm-tis on the destination."))
        }
        for a in analyses {
            if let info = a.libtpms, info.kind == .tpm2Volatile, info.integrityValid == false {
                f.append(Finding(.volatileCorrupt, .error,
                                 "The volatile state's SHA-1 does not match its content: it was damaged in transit; libtpms refuses it (TPM_RC_HASH 0x83) and enters failure mode.",
                                 evidence: .init(section: EmulatorSection.idstr, field: "state_blobs.volatil.buffer:libtpms.sha1", offset: plainOffset(a).map { $0 + info.size - 20 }, detail: "trailing SHA-1 mismatch"),
                                 fix: "Migrate again; " + QEMUAdvice.sameVersions + "."))
                blocked = true
            }
        }

        // 6. This host's libtpms.
        if destination.validateWithLibtpms, !blocked, let dest, dest != .unspecified,
           plainBlobs.contains(where: { $0.0 == .permanent }) {
            do throws(BackendError) {
                try LibtpmsBackend.validateState(blobs: plainBlobs, version: dest)
                report.libtpmsResult = 0
            } catch {
                report.libtpmsResult = error.tpmResult
                if let x = libtpmsFinding(error, analyses: analyses, familyMismatch: familyMismatch) { f.append(x) }
            }
        }
        report.findings = sorted(f)
        return report
    }

    /// A finding for a libtpms refusal (nil when the family mismatch already explains it).
    static func libtpmsFinding(_ e: BackendError, analyses: [BlobAnalysis], familyMismatch: Bool) -> Finding? {
        if e.code == .libtpmsInUse {
            return Finding(.libtpmsBusy, .warning,
                           "This process's libtpms is in use by a running TPM, so the blobs were not validated against it.",
                           evidence: .init(section: EmulatorSection.idstr, field: "state_blobs", offset: nil, detail: e.message),
                           fix: "Run tis-sim validate in a process of its own.")
        }
        if familyMismatch { return nil }
        let rc = e.tpmResult ?? 0
        let a = e.blobType.flatMap { t in analyses.first { $0.type == t } } ?? analyses[0]
        let name = "state_blobs.\(StreamInspection.qemuBlobName(a.type)).buffer"
        let info = a.libtpms
        var call = "\(e.operation ?? "libtpms")\(e.blobType.map { " (\($0))" } ?? "") returned 0x\(String(rc, radix: 16))"
        if let r = e.message.firstRange(of: "libtpms: ") { call += "; " + e.message[r.lowerBound...] }
        let host = libtpmsVersion
        switch rc {
        case 0x2E:
            var why = "written by a newer libtpms"
            if let info, let v = info.version {
                why = "\(info.kind.rawValue) version \(v)\(info.minVersion.map { ", min_version \($0)" } ?? "")"
                if let p = info.profile { why += ", profile \(p)" }
            }
            return Finding(.blobNewerThanLibtpms, .error,
                           "The \(a.type) state was written by a newer libtpms than this host's \(host) accepts (\(why)); a destination with this libtpms refuses it (TPM_RC_BAD_VERSION 0x2e).",
                           evidence: .init(section: EmulatorSection.idstr, field: "\(name):libtpms.min_version", offset: plainOffset(a).map { $0 + 6 }, detail: call),
                           fix: QEMUAdvice.downgrade + ": run a libtpms at least as new as the source's on the destination (\(QEMUAdvice.sameVersions)).")
        case 0x03:
            return Finding(.compileOptions, .error,
                           "This host's libtpms \(host) refuses the \(a.type) state's compile-time constants (TPM_RC_BAD_PARAMETER 0x3): the source libtpms was built with different options.",
                           evidence: .init(section: EmulatorSection.idstr, field: "\(name):libtpms.PA_COMPILE_CONSTANTS",
                                           offset: plainOffset(a).flatMap { p in info?.compileConstantsOffset.map { p + $0 } }, detail: call),
                           fix: QEMUAdvice.compileOptions + ": use the same libtpms build (the same distribution package) on both sides.")
        case 0x83:
            return Finding(.volatileCorrupt, .error,
                           "libtpms finds the \(a.type) state's integrity digest wrong (TPM_RC_HASH 0x83): it was damaged in transit.",
                           evidence: .init(section: EmulatorSection.idstr, field: name, offset: plainOffset(a), detail: call),
                           fix: "Migrate again; " + QEMUAdvice.sameVersions + ".")
        default:
            return Finding(.stateRefused, .error,
                           "This host's libtpms \(host) refuses the \(a.type) state (TPM result 0x\(String(rc, radix: 16))); the destination swtpm's SET_STATEBLOB would fail the same way.",
                           evidence: .init(section: EmulatorSection.idstr, field: name, offset: plainOffset(a), detail: call),
                           fix: QEMUAdvice.downgrade + "; " + QEMUAdvice.sameVersions + ".")
        }
    }

    /// Stream offset of the plain libtpms blob when it sits unencrypted in the stream (header +
    /// MIGRATION_DATA TLV + DATA TLV).
    static func plainOffset(_ a: BlobAnalysis) -> Int? {
        guard a.decryption == .notEncrypted, a.streamOffset >= 0 else { return nil }
        guard let outer = a.tlvs.first(where: { $0.tag == SwtpmBlob.Tag.migrationData.rawValue || $0.tag == SwtpmBlob.Tag.data.rawValue }),
              let at = outer.offset else { return nil }
        if outer.tag == SwtpmBlob.Tag.data.rawValue { return a.streamOffset + at + 6 }
        return a.streamOffset + at + 6 + 6
    }

    static func describe(_ i: LibtpmsStateInfo) -> String {
        var s = i.kind.rawValue
        if let m = i.magic { s += ", magic 0x" + String(m, radix: 16) }
        if let v = i.version { s += i.kind.family == .tpm12 ? ", tag 0x" + String(format4: v) : ", version \(v)" }
        if let m = i.minVersion { s += ", min_version \(m)" }
        return s
    }

    static func flagText(_ f: SwtpmBlob.Flags?) -> String {
        guard let f else { return "no header" }
        var names: [String] = []
        if f.contains(.encrypted) { names.append("ENCRYPTED") }
        if f.contains(.migrationEncrypted) { names.append("MIGRATION_ENCRYPTED") }
        if f.contains(.migrationData) { names.append("MIGRATION_DATA") }
        if f.contains(.encrypted256BitKey) { names.append("ENCRYPTED_256BIT_KEY") }
        if f.contains(.migration256BitKey) { names.append("MIGRATION_256BIT_KEY") }
        return "0x" + String(f.rawValue, radix: 16) + (names.isEmpty ? "" : " (" + names.joined(separator: "|") + ")")
    }

    /// QEMU compares the received machine name with its own; `pc` and `q35` stand for the
    /// i440fx and q35 families.
    static func machineMatches(_ have: String, _ want: String) -> Bool {
        switch want {
        case "pc": have.hasPrefix("pc-i440fx-") || have == "pc"
        case "q35": have.hasPrefix("pc-q35-") || have == "q35"
        default: have == want
        }
    }

    /// A truncated or corrupt stream.
    static func streamFinding(_ e: StreamError, _ s: StreamInspection) -> Finding {
        let section = e.section.isEmpty ? "stream" : e.section
        if e.code == .truncated {
            let end = s.streamLength ?? e.offset
            return Finding(.truncatedStream, .error,
                           "The stream ends at byte \(end), inside \(section == "stream" ? "the stream" : "section \(section)") (reading \(e.field) at offset \(e.offset)); the destination QEMU fails to load it.",
                           evidence: .init(section: section, field: e.field, offset: end, detail: e.detail),
                           fix: "The migration was interrupted or the file was cut: save or migrate again and copy the whole stream (VM save and restore: \(QEMUAdvice.identicalQEMU)).")
        }
        return Finding(.corruptStream, .error,
                       "The stream is corrupt at byte \(e.offset) in \(section == "stream" ? "the stream" : "section \(section)"), field \(e.field): \(e.detail.isEmpty ? e.code.rawValue : e.detail); the destination QEMU refuses it.",
                       evidence: .init(section: section, field: e.field, offset: e.offset, detail: e.code.rawValue),
                       fix: "The stream was damaged, or written by a QEMU with other devices: \(QEMUAdvice.identicalQEMU); \(QEMUAdvice.sameVersions).")
    }

    static func sorted(_ f: [Finding]) -> [Finding] {
        f.enumerated().sorted { a, b in
            a.element.severity != b.element.severity ? a.element.severity < b.element.severity : a.offset < b.offset
        }.map(\.element)
    }
}

extension String {
    /// Four lowercase hex digits.
    init(format4 v: UInt16) {
        let h = String(v, radix: 16)
        self = String(repeating: "0", count: 4 - h.count) + h
    }
}
