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

private final class ThreadBody {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

/// Runs `body` on a thread of its own (not Dispatch's pool nor the cooperative pool, which have
/// as many threads as cores: a blocked fake peer there would starve the other tests).
func startThread(_ body: @escaping @Sendable () -> Void) {
    let arg = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var attr = pthread_attr_t()
    pthread_attr_init(&attr)
    pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
    var tid = pthread_t()
    let rc = pthread_create(&tid, &attr, { raw in
        if let raw { Unmanaged<ThreadBody>.fromOpaque(raw).takeRetainedValue().body() }
        return nil
    }, arg)
    pthread_attr_destroy(&attr)
    if rc != 0 { Unmanaged<ThreadBody>.fromOpaque(arg).takeRetainedValue().body() }
}
