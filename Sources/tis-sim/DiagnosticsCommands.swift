import ArgumentParser
import EmulatorBackend
import TPMDiagnostics
import VMState
#if canImport(Glibc)
import Glibc
#endif

/// Writes to a descriptor without buffering (reports can be long; stderr carries progress).
private func emit(_ fd: Int32, _ s: String) {
    let bytes = Array(s.utf8)
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { p -> Int in
            guard let base = p.baseAddress else { return 0 }
            return write(fd, base + done, p.count - done)
        }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        done += n
    }
}

/// A progress line on stderr, only when stderr is a terminal.
private final class Progress {
    let enabled = isatty(2) == 1
    let total: Int?
    var shown = false
    init(total: Int?) { self.total = total }
    func update(_ bytes: Int) {
        guard enabled else { return }
        shown = true
        if let total, total > 0 {
            emit(2, "\r\(bytes >> 20) / \(total >> 20) MiB (\(bytes * 100 / total)%)   ")
        } else {
            emit(2, "\r\(bytes >> 20) MiB   ")
        }
    }
    func finish() { if shown { emit(2, "\r\u{1B}[K") } }
}

/// Walks the stream named on the command line, with a progress indicator for large files.
private func inspect(_ argument: String) throws(StreamError) -> StreamInspection {
    var total: Int?
    if argument != "-" {
        var st = stat()
        if stat(argument, &st) == 0 { total = Int(st.st_size) }
    }
    let p = Progress(total: total)
    defer { p.finish() }
    let big = (total ?? Int.max) > 64 << 20
    return try StreamInspection.walk(StreamInspection.source(argument), name: argument,
                                     progress: big ? { p.update($0) } : nil)
}

/// `tis-sim inspect`: what a QEMU migration stream holds, section by section, as
/// analyze-migration.py decodes it, with the TPM sections spelled out.
struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what a QEMU migration stream holds: RAM, every device section, the TPM sections field by field.",
        discussion: """
            Walks the whole stream (a file, or - for standard input) in bounded memory. RAM is \
            summarised (blocks, page counts by kind); device sections are decoded through the \
            stream's vmdesc as QEMU's analyze-migration.py decodes them; tpm-tis, tpm-crb and \
            tpm-emulator are shown field by field with what each value means, and the swtpm \
            state blobs layer by layer (swtpm header and TLVs, encryption, libtpms headers).

            --json prints one JSON object: "sections" is keyed and formatted as \
            analyze-migration.py's dump ("tpm-tis (40)": {"state.rw_offset": "0x0000", ...}); \
            "tpm" lists the TPM fields with QEMU's names (state.loc[0].sts, \
            state_blobs.permanent.size, ...), their stream offsets and meanings.

            A progress indicator is written to stderr for streams over 64 MiB when stderr is a terminal.

            Exit status: 0 the whole stream was read; 1 it stopped early (truncated or corrupt; \
            what was read is shown); 2 not a migration stream, or unreadable.
            """)

    @Argument(help: "The stream: a file, or - for standard input.")
    var stream: String

    @Flag(help: "Print one JSON object with QEMU's section and field names.")
    var json = false

    @Option(help: "Show only this section (idstr such as tpm-tis, 'idstr (id)', ram, or tpm for all TPM sections).")
    var section: String?

    @Option(help: "A migration key to decrypt the blobs with: FILE[,format=hex|binary][,mode=aes-cbc|aes-256-cbc].")
    var migrationKey: String?

    func run() throws {
        let key: MigrationKey?
        do { key = try migrationKey.map { o throws(KeyError) in try MigrationKey.load(option: o) } } catch {
            emit(2, "tis-sim inspect: --migration-key: \(error.message)\n")
            throw ExitCode(2)
        }
        let s: StreamInspection
        do { s = try inspect(stream) } catch {
            emit(2, "tis-sim inspect: \(stream): \(error)\n")
            throw ExitCode(2)
        }
        emit(1, json ? JSONText.pretty(InspectRenderer.json(s, only: section, key: key)) : InspectRenderer.text(s, only: section, key: key))
        if s.isUnreadable { throw ExitCode(2) }
        if s.error != nil { throw ExitCode(1) }
    }
}

/// `tis-sim validate`: the migration troubleshooter.
struct Validate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Say why a TPM migration will fail, before it fails.",
        discussion: """
            Checks a QEMU migration stream (a file, or - for standard input) against a \
            destination: TPM family of the state blobs (--tpm2 / --tpm1.2), blob versions \
            against this host's libtpms (TPMLIB_SetState + TPMLIB_ValidateState: downgrades, \
            compile-time options), swtpm's blob container, migration-key encryption (with \
            --migration-key the HMAC is verified and the blobs decrypted, as the destination \
            swtpm would), an empty permanent blob, truncated or corrupt sections, the frontend \
            (--frontend tis|crb) and the machine type (--machine pc|q35).

            Each finding has a stable code (TPM-FAMILY-MISMATCH, BLOB-NEWER-THAN-LIBTPMS, \
            COMPILE-OPTIONS, WRONG-MIGRATION-KEY, NEEDS-MIGRATION-KEY, MIGRATION-KEY-SIZE, \
            NEEDS-STATE-KEY, EMPTY-PERMANENT-BLOB, NO-TPM-STATE, TRUNCATED-STREAM, \
            CORRUPT-STREAM, CORRUPT-BLOB, VOLATILE-CORRUPT, FRONTEND-MISMATCH, MACHINE-TYPE, \
            STATE-REFUSED, ...), a severity, one sentence, the evidence (section, field, \
            stream offset) and the fix in the words of QEMU's troubleshooting list.

            Exit status: 0 clean (no finding, or informational ones only); 1 findings; 2 the \
            stream is unreadable or not a QEMU migration stream, or an option is invalid.
            """)

    @Argument(help: "The stream: a file, or - for standard input.")
    var stream: String

    @Flag(name: .customLong("tpm2"), help: "The destination swtpm runs a TPM 2.0 (swtpm --tpm2).")
    var tpm2 = false

    @Flag(name: .customLong("tpm1.2"), help: "The destination swtpm runs a TPM 1.2.")
    var tpm12 = false

    @Option(help: "The destination's migration key: FILE[,format=hex|binary][,mode=aes-cbc|aes-256-cbc] (swtpm's file=/pwdfile= spellings also work).")
    var migrationKey: String?

    @Option(help: "The destination's TPM device: tis or crb.")
    var frontend: String?

    @Option(help: "The destination's machine: pc, q35, or a machine type such as pc-q35-7.2.")
    var machine: String?

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        if tpm2 && tpm12 { throw ValidationError("--tpm2 and --tpm1.2 exclude each other") }
        if let frontend, frontend != "tis" && frontend != "crb" { throw ValidationError("--frontend must be tis or crb") }
    }

    func run() throws {
        var d = DestinationOptions()
        d.tpmFamily = tpm2 ? .tpm20 : tpm12 ? .tpm12 : nil
        d.frontend = frontend.map { "tpm-" + $0 }
        d.machine = machine
        do { d.migrationKey = try migrationKey.map { o throws(KeyError) in try MigrationKey.load(option: o) } } catch {
            emit(2, "tis-sim validate: --migration-key: \(error.message)\n")
            throw ExitCode(2)
        }
        let s: StreamInspection
        do { s = try inspect(stream) } catch {
            emit(2, "tis-sim validate: \(stream): \(error)\n")
            throw ExitCode(2)
        }
        if s.isUnreadable {
            let why = s.error.map { "\($0)" } ?? "unreadable"
            if json {
                emit(1, JSONText.pretty(.object([("stream", .string(stream)), ("unreadable", .string(why)), ("exit_status", .integer(2))])))
            } else {
                emit(2, "tis-sim validate: \(stream): not a readable QEMU migration stream: \(why)\n")
            }
            throw ExitCode(2)
        }
        let r = Troubleshooter.check(s, destination: d)
        emit(1, json ? JSONText.pretty(ReportRenderer.json(r, s)) : ReportRenderer.text(r, s))
        if r.exitStatus != 0 { throw ExitCode(r.exitStatus) }
    }
}
