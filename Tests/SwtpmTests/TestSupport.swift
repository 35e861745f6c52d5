#if canImport(Glibc)
import Glibc
#endif
@testable import EmulatorBackend

/// A fresh directory under /tmp (absolute path), removed with its content on deinit.
final class TempDir: @unchecked Sendable {
    let path: String
    init(_ tag: String) throws {
        var template = Array("/tmp/swtpmtests-\(tag)-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw BackendError(.io, "mkdtemp failed", errno: Glibc.errno)
        }
        path = String(cString: p)
    }
    deinit { removeTree(path) }
}

func removeTree(_ path: String) {
    guard let d = opendir(path) else { _ = unlink(path); return }
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name == "." || name == ".." { continue }
        let child = path + "/" + name
        var st = stat()
        if lstat(child, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR { removeTree(child) } else { _ = unlink(child) }
    }
    closedir(d)
    _ = rmdir(path)
}
