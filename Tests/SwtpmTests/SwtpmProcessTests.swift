import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import EmulatorBackend

@Suite("SwtpmProcess")
struct SwtpmProcessTests {
    @Test func launchWaitsForCtrlSocketAndTerminateReaps() throws {
        let dir = try TempDir("proc")
        let p = try SwtpmProcess.launch(SwtpmProcess.Options(stateDirectory: dir.path))
        #expect(p.isRunning)
        #expect(p.ctrlSocketPath == dir.path + "/ctrl.sock")
        #expect(p.arguments.contains("--tpm2"))
        let s = try SwtpmSocket.connect(to: p.ctrlEndpoint, timeout: 1, label: "ctrl")
        s.close()
        p.terminate()
        #expect(!p.isRunning)
        #expect(Glibc.kill(p.pid, 0) != 0)   // reaped: the pid is gone
        p.terminate()                          // idempotent
        p.kill()
    }

    @Test func relativeStateDirectoryIsMadeAbsolute() throws {
        let o = SwtpmProcess.resolved(SwtpmProcess.Options(stateDirectory: "rel/dir/"))
        #expect(o.stateDirectory.hasPrefix("/"))
        #expect(o.stateDirectory.hasSuffix("/rel/dir"))
        #expect(o.ctrlSocketPath == o.stateDirectory + "/ctrl.sock")
    }

    @Test func badArgumentsFailWithSwtpmsOwnMessage() throws {
        let dir = try TempDir("badargs")
        var o = SwtpmProcess.Options(stateDirectory: dir.path)
        o.extraArguments = ["--no-such-option"]
        #expect {
            _ = try SwtpmProcess.launch(o, timeout: 5)
        } throws: { e in
            guard let e = e as? BackendError else { return false }
            return e.code == .process
        }
    }
}
