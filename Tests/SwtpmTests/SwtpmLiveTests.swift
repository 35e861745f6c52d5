import Testing
#if canImport(Glibc)
import Glibc
#endif
import WireFormat
@testable import EmulatorBackend

@Suite("swtpm 0.7.1, live")
struct SwtpmLiveTests {
    @Test func startupGetRandomPCR() throws {
        let dir = try TempDir("live")
        let p = try SwtpmProcess.launch(SwtpmProcess.Options(stateDirectory: dir.path))
        defer { p.terminate() }
        let be = try SwtpmBackend(process: p)
        #expect(be.tpmVersion == .tpm20)
        let size = be.bufferSize()
        #expect(size == 4096)
        let runner = BackendRunner(backend: be, mode: .inline)
        try runner.startup(bufferSize: size)
        let r = try run(runner, TPM2.startup())
        #expect(TPM2.responseCode(r) == 0)
        let g = try run(runner, TPM2.getRandom(16))
        #expect(try TPM2.randomBytes(g).count == 16)
        be.shutdown()
    }
}

func run(_ runner: BackendRunner, _ bytes: [UInt8], locality: UInt8 = 0) throws -> [UInt8] {
    let box = ResultBox()
    let ok = runner.deliver(TPMBackendCommand(locality: locality, bytes: bytes, maxResponseSize: 4096)) { resp, err in
        box.set(resp.bytes, err)
    }
    #expect(ok)
    runner.finishSync()
    if let e = box.error { throw e }
    return box.bytes
}

final class ResultBox: @unchecked Sendable {
    private let lock = NSLockish()
    private var _bytes: [UInt8] = []
    private var _error: BackendError? = nil
    func set(_ b: [UInt8], _ e: BackendError?) { lock.locked { _bytes = b; _error = e } }
    var bytes: [UInt8] { lock.locked { _bytes } }
    var error: BackendError? { lock.locked { _error } }
}

final class Collector<T: Sendable>: @unchecked Sendable {
    private let lock = NSLockish()
    private var _values: [T] = []
    func append(_ v: T) { lock.locked { _values.append(v) } }
    var values: [T] { lock.locked { _values } }
}

final class NSLockish: @unchecked Sendable {
    private var m = pthread_mutex_t()
    init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    func locked<T>(_ f: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&m); defer { pthread_mutex_unlock(&m) }
        return try f()
    }
}
