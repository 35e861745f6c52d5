#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WireFormat

/// A TPM state directory laid out as swtpm's `dir://` backend lays it out
/// (swtpm `swtpm_nvstore_dir.c`): `tpm2-00.permall`, `tpm2-00.volatilestate`,
/// `tpm2-00.savestate` (prefix `tpm-00.` for TPM 1.2), each an swtpm header + TLV(DATA) file,
/// so swtpm and this library can open each other's state.
///
/// Every write goes to a temporary file (`TMP2-00.<name>`, swtpm's name), is fsynced, renamed
/// over the target and the directory fsynced: a crash at any point leaves either the old or the
/// new file, never a torn one.
public struct StateDirectory: Sendable {
    public let path: String
    public let version: TPMVersion

    public init(path: String, version: TPMVersion) {
        self.path = path
        self.version = version
    }

    var prefix: String { version == .tpm12 ? "tpm-00." : "tpm2-00." }
    var tmpPrefix: String { version == .tpm12 ? "TMP-00." : "TMP2-00." }

    public func filePath(_ name: String) -> String { path + "/" + prefix + name }

    /// Creates the directory if it does not exist (mode 0700, as swtpm_setup does).
    public func create() throws(BackendError) {
        if mkdir(path, 0o700) != 0 && Glibc.errno != EEXIST {
            throw BackendError(.stateDirectory, "cannot create state directory \(path)", errno: Glibc.errno)
        }
    }

    /// The plain libtpms state stored under `name`, or nil if there is no such file.
    public func load(_ name: String) throws(BackendError) -> [UInt8]? {
        let file = filePath(name)
        guard let bytes = try Self.readFile(file, limit: SwtpmBlob.maximumSize) else { return nil }
        let blob: SwtpmBlob
        do { blob = try SwtpmBlob.decode(bytes, field: prefix + name) } catch {
            throw BackendError(.stateDirectory, "\(file) is not an swtpm state file: \(error)")
        }
        let plain: [UInt8]?
        do { plain = try blob.plainState() } catch {
            throw BackendError(.stateDirectory, "\(file): \(error)")
        }
        guard let plain else {
            throw BackendError(.stateDirectory, "\(file) is encrypted with a state key (--key); not supported by the embedded backend")
        }
        return plain
    }

    /// Atomically replaces `name` with the plain libtpms state `state`.
    public func store(_ name: String, _ state: [UInt8]) throws(BackendError) {
        try Self.writeFileAtomically(path: path, name: prefix + name, tmpName: tmpPrefix + name,
                                     bytes: SwtpmBlob.file(wrapping: state).encoded())
    }

    /// Removes `name`; returns false if it did not exist.
    @discardableResult
    public func delete(_ name: String) throws(BackendError) -> Bool {
        if unlink(filePath(name)) == 0 {
            Self.syncDirectory(path)
            return true
        }
        if Glibc.errno == ENOENT { return false }
        throw BackendError(.stateDirectory, "cannot remove \(filePath(name))", errno: Glibc.errno)
    }

    // MARK: File primitives

    /// Reads a whole file; nil if it does not exist; refuses files over `limit` bytes.
    public static func readFile(_ path: String, limit: Int) throws(BackendError) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if Glibc.errno == ENOENT { return nil }
            throw BackendError(.stateDirectory, "cannot open \(path)", errno: Glibc.errno)
        }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw BackendError(.stateDirectory, "cannot read \(path)", errno: Glibc.errno)
            }
            if n == 0 { break }
            out.append(contentsOf: chunk[0..<n])
            if out.count > limit {
                throw BackendError(.stateDirectory, "\(path) is larger than \(limit) bytes")
            }
        }
        return out
    }

    /// temporary file, fsync, rename, fsync of the directory.
    public static func writeFileAtomically(path dir: String, name: String, tmpName: String, bytes: [UInt8]) throws(BackendError) {
        let tmp = dir + "/" + tmpName
        let target = dir + "/" + name
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard fd >= 0 else {
            throw BackendError(.stateDirectory, "cannot create \(tmp)", errno: Glibc.errno)
        }
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, bytes.count - written) }
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                let e = Glibc.errno
                close(fd); unlink(tmp)
                throw BackendError(.stateDirectory, "cannot write \(tmp)", errno: e)
            }
            written += n
        }
        if fsync(fd) != 0 {
            let e = Glibc.errno
            close(fd); unlink(tmp)
            throw BackendError(.stateDirectory, "cannot fsync \(tmp)", errno: e)
        }
        close(fd)
        if rename(tmp, target) != 0 {
            let e = Glibc.errno
            unlink(tmp)
            throw BackendError(.stateDirectory, "cannot rename \(tmp) to \(target)", errno: e)
        }
        syncDirectory(dir)
    }

    static func syncDirectory(_ dir: String) {
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 {
            _ = fsync(dfd)
            close(dfd)
        }
    }
}
