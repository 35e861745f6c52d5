import EmulatorBackend
import Foundation
import QEMUHarness
import Testing

extension QEMUSuite {
    /// The harness itself: halt.bin, start-up, clean-up, errors.
    @Suite("QEMU harness")
    struct HarnessTests {
        @Test("halt.bin: 64 KiB of hlt with cli; hlt; jmp back at the reset vector")
        func haltImage() throws {
            let image = HaltBIOS.image
            #expect(image.count == 65_536)
            #expect(Array(image[0xFFF0..<0xFFF4]) == [0xFA, 0xF4, 0xEB, 0xFD])
            #expect(image[..<0xFFF0].allSatisfy { $0 == 0xF4 })
            #expect(image[0xFFF4...].allSatisfy { $0 == 0xF4 })
            let work = try WorkDirectory(prefix: "halt-test")
            defer { work.remove() }
            let path = try HaltBIOS.write(to: work.file("halt.bin"))
            #expect(FileManager.default.contents(atPath: path) == Data(image))
        }

        @Test("The installed QEMU is 7.2, the oracle this project targets")
        func qemuVersion() throws {
            let version = try QEMUProcess.version()
            #expect(version.contains("version 7.2."), "\(version)")
        }

        @Test("JSON from QMP keeps booleans, integers and strings apart")
        func jsonValues() throws {
            let v = try #require(JSONValue.parse(#"{"a":true,"b":0,"c":1,"d":"x","e":[null,2.5],"f":-3}"#))
            #expect(v["a"] == .bool(true))
            #expect(v["b"] == .int(0))
            #expect(v["c"] == .int(1))
            #expect(v["d"] == .string("x"))
            #expect(v["e"] == .array([.null, .double(2.5)]))
            #expect(v["f"] == .int(-3))
            #expect(JSONValue.parse(v.jsonText) == v)
        }

        @Test("Start, close: no process, socket or directory is left behind")
        func cleanUp() throws {
            let m = try QEMUMachine.start()
            let qemuPID = m.qemu.process.pid
            let swtpmPID = try #require(m.swtpm?.pid)
            let dir = m.workDirectory.path
            #expect(processExists(qemuPID))
            #expect(processExists(swtpmPID))
            #expect(m.startupSeconds < 5, "startup took \(m.startupSeconds) s")
            m.close()
            #expect(!processExists(qemuPID))
            #expect(!processExists(swtpmPID))
            #expect(!FileManager.default.fileExists(atPath: dir))
            m.close()  // idempotent
        }

        @Test("kill() reaps both processes at once")
        func killNow() throws {
            let m = try QEMUMachine.start(machine: .q35)
            let qemuPID = m.qemu.process.pid
            let swtpmPID = try #require(m.swtpm?.pid)
            m.kill()
            #expect(!processExists(qemuPID))
            #expect(!processExists(swtpmPID))
        }

        @Test("A QEMU that refuses its command line fails fast with its stderr")
        func badCommandLine() throws {
            let start = Date()
            let error = try #require(throws: HarnessError.self) {
                let m = try QEMUMachine.start(extraArguments: ["-device", "no-such-device-xyz"])
                m.close()
            }
            #expect(error.code == .processExited)
            #expect(error.processOutput?.contains("no-such-device-xyz") == true, "\(error)")
            #expect(Date().timeIntervalSince(start) < 5)
        }

        @Test("A missing QEMU binary names the fix")
        func notInstalled() throws {
            var options = QEMUOptions(device: nil)
            options.executable = "/nonexistent/qemu-system-x86_64"
            let work = try WorkDirectory(prefix: "qemu-missing")
            defer { work.remove() }
            let error = try #require(throws: HarnessError.self) {
                let q = try QEMUProcess.launch(options, in: work)
                q.close()
            }
            #expect(error.code == .notInstalled)
            #expect(error.message.contains("scripts/install-deps.sh"))
        }

        @Test("QEMU on an externally started swtpm's ctrl socket")
        func externalSwtpm() throws {
            let work = try WorkDirectory(prefix: "qemu-external")
            defer { work.remove() }
            var options = SwtpmProcess.Options(stateDirectory: try work.subdirectory("tpm"))
            options.ctrlSocketPath = work.file("ctrl.sock")
            let swtpm = try SwtpmProcess.launch(options, timeout: 5)
            defer { swtpm.terminate(timeout: 1) }
            try {
                let m = try QEMUMachine.start(externalCtrlSocket: swtpm.ctrlSocketPath, machine: .q35, workDirectory: work)
                defer { m.close() }
                #expect(m.swtpm == nil)
                #expect(try m.bus.readl(TIS.reg(0, TIS.didVid)) == 0x0001_1014)
                #expect(try m.bus.readb(TIS.reg(0, TIS.access)) == 0x81)
            }()
            // QEMU's quit sends CMD_SHUTDOWN: swtpm exits by itself.
            var waited = 0
            while swtpm.isRunning && waited < 200 {
                usleep(10_000)
                waited += 1
            }
            #expect(!swtpm.isRunning)
        }

        @Test("qtest FAIL answers are typed errors; the bus stays usable")
        func qtestFailure() throws {
            let m = try startMachine()
            defer { m.close() }
            let error = try #require(throws: HarnessError.self) {
                try m.bus.command("irq_intercept_in /machine/no-such-device")
            }
            #expect(error.code == .qtestFailure)
            #expect(error.message.hasPrefix("FAIL"))
            #expect(try m.bus.readl(TIS.reg(0, TIS.didVid)) == 0x0001_1014)
        }

        @Test("QMP errors carry their class")
        func qmpError() throws {
            let m = try startMachine()
            defer { m.close() }
            let error = try #require(throws: HarnessError.self) {
                try m.qmp.execute("no-such-command")
            }
            #expect(error.code == .qmpError)
            #expect(error.qmpClass == "CommandNotFound")
            #expect(try m.qmp.queryStatus() == "running")
        }
    }
}

extension QEMUSuite {
    /// Failure paths of a running QEMU: hangs become timeouts, deaths become closed connections,
    /// forgotten machines are cleaned up by deinit.
    @Suite("QEMU harness failure paths")
    struct HarnessFailureTests {
        @Test("A stopped QEMU makes qtest and QMP requests time out")
        func hungQEMU() throws {
            let m = try startMachine()
            defer {
                m.qemu.process.signal(SIGCONT)
                m.close()
            }
            m.qemu.process.signal(SIGSTOP)
            m.bus.timeout = 0.3
            m.qmp.timeout = 0.3
            let start = Date()
            let e1 = try #require(throws: HarnessError.self) { try m.bus.readl(TIS.reg(0, TIS.didVid)) }
            #expect(e1.code == .timeout)
            let e2 = try #require(throws: HarnessError.self) { try m.qmp.queryStatus() }
            #expect(e2.code == .timeout)
            #expect(Date().timeIntervalSince(start) < 2)
        }

        @Test("A killed QEMU closes the qtest connection")
        func killedQEMU() throws {
            let m = try startMachine()
            defer { m.close() }
            m.qemu.process.signal(SIGKILL)
            let error = try #require(throws: HarnessError.self) {
                for _ in 0..<100 { _ = try m.bus.readl(TIS.reg(0, TIS.didVid)); usleep(1000) }
            }
            #expect(error.code == .connectionClosed)
        }

        @Test("A machine dropped without close() is cleaned up by deinit")
        func deinitCleansUp() throws {
            var pids: (Int32, Int32) = (0, 0)
            var dir = ""
            do {
                let m = try startMachine()
                pids = (m.qemu.process.pid, m.swtpm?.pid ?? 0)
                dir = m.workDirectory.path
                #expect(try m.bus.readb(TIS.reg(0, TIS.access)) == 0x81)
            }
            #expect(pids.0 > 0 && pids.1 > 0)
            #expect(!processExists(pids.0))
            #expect(!processExists(pids.1))
            #expect(!FileManager.default.fileExists(atPath: dir))
        }
    }
}
