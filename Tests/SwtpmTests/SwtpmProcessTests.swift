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

    @Test func socketPathTooLongFailsAtOnce() throws {
        let dir = try TempDir("long")
        var o = SwtpmProcess.Options(stateDirectory: dir.path)
        o.ctrlSocketPath = dir.path + "/" + String(repeating: "c", count: 120)
        let t = elapsed {
            expectBackendError(.process) { _ = try SwtpmProcess.launch(o) }
        }
        #expect(t < 0.5)
    }

    @Test func commandLineMirrorsTheOptions() {
        var o = SwtpmProcess.Options(stateDirectory: "/s")
        o.dataSocketPath = "/s/data.sock"
        o.flags = ["not-need-init", "startup-clear"]
        o.key = "pwdfile=/k"
        o.migrationKey = "pwdfile=/m"
        o.logFile = "/s/log"
        o.logLevel = 20
        o.extraArguments = ["--locality", "reject-locality-4"]
        let r = SwtpmProcess.resolved(o)
        #expect(SwtpmProcess.commandLine(r, executable: "swtpm") == [
            "swtpm", "socket", "--tpm2", "--tpmstate", "dir=/s", "--ctrl", "type=unixio,path=/s/ctrl.sock",
            "--server", "type=unixio,path=/s/data.sock", "--flags", "not-need-init,startup-clear",
            "--key", "pwdfile=/k", "--migration-key", "pwdfile=/m", "--log", "file=/s/log,level=20",
            "--locality", "reject-locality-4",
        ])
        var t = SwtpmProcess.Options(stateDirectory: "/s")
        t.version = .tpm12
        t.tcpDataPort = 2321
        #expect(SwtpmProcess.commandLine(SwtpmProcess.resolved(t), executable: "swtpm") == [
            "swtpm", "socket", "--tpmstate", "dir=/s", "--ctrl", "type=tcp,port=2322,bindaddr=127.0.0.1",
            "--server", "type=tcp,port=2321,bindaddr=127.0.0.1",
        ])
    }

    /// The child gets stdin, stdout, stderr and nothing else of ours (close-on-exec everywhere,
    /// closefrom(3) in the child): the swtpm's own descriptors are all it holds.
    @Test func childInheritsNoDescriptors() throws {
        let dir = try TempDir("fds")
        // A descriptor of ours that is deliberately not close-on-exec.
        let leaky = open("/dev/null", O_RDONLY)
        defer { close(leaky) }
        let p = try SwtpmProcess.launch(SwtpmProcess.Options(stateDirectory: dir.path))
        defer { p.terminate() }
        var targets: [String] = []
        if let d = opendir("/proc/\(p.pid)/fd") {
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard let n = Int(name), n > 2 else { continue }
                var buf = [CChar](repeating: 0, count: 4096)
                let len = readlink("/proc/\(p.pid)/fd/\(n)", &buf, buf.count - 1)
                if len > 0 { targets.append(String(decoding: buf.prefix(len).map { UInt8(bitPattern: $0) }, as: UTF8.self)) }
            }
            closedir(d)
        }
        #expect(!targets.isEmpty)
        #expect(!targets.contains("/dev/null"))
        // swtpm's own: its ctrl socket, its notify pipe, the data socket.
        #expect(targets.allSatisfy { $0.hasPrefix("socket:") || $0.hasPrefix("pipe:") || $0.hasPrefix(dir.path) }, "\(targets)")
    }

    /// A missing swtpm is an error (so every test that needs swtpm fails rather than skips).
    @Test func missingSwtpmIsAnError() throws {
        let dir = try TempDir("missing")
        var o = SwtpmProcess.Options(stateDirectory: dir.path)
        o.executable = "/nonexistent/swtpm"
        expectBackendError(.process) { _ = try SwtpmProcess.launch(o, timeout: 2) }
    }
}
