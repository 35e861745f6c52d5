import Foundation
import QEMUHarness
import Testing
import TISConformance
import TISMachine
#if canImport(Glibc)
import Glibc
#endif

/// Runs `tis-sim machine ARGS` and returns its exit status and stderr.
func runMachine(_ args: [String], timeout: Double = 10) throws -> (status: Int32, stderr: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: try tisSimBinary())
    p.arguments = ["machine"] + args
    let err = Pipe()
    p.standardError = err
    p.standardOutput = FileHandle.nullDevice
    try p.run()
    let end = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < end { usleep(5_000) }
    if p.isRunning { p.terminate() }
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
}

extension MachineSuite {
    @Suite("Bad input")
    struct BadInputTests {
        @Test("a bad command line exits 1 naming the option", arguments: [
            (["-machine", "pc", "-usb"], "-usb"),
            (["-machine", "pc", "-tpmdev", "passthrough,id=t,path=/dev/tpm0", "-device", "tpm-tis,tpmdev=t"], "-tpmdev passthrough"),
            (["-tpmdev", "libtpms,id=t,state=/tmp/x", "-device", "tpm-crb,tpmdev=t"], "-device tpm-crb"),
            (["-tpmdev", "libtpms,id=t", "-device", "tpm-tis,tpmdev=t"], "missing state=DIR"),
            (["-tpmdev", "emulator,id=t,chardev=nope", "-device", "tpm-tis,tpmdev=t"], "tpm chardev 'nope' not found"),
            (["-chardev", "socket,id=c,path=/nonexistent/ctrl.sock", "-tpmdev", "emulator,id=t,chardev=c", "-device", "tpm-tis,tpmdev=t"],
             "Failed to connect"),
            (["-machine", "microvm", "-tpmdev", "libtpms,id=t,state=/tmp/x", "-device", "tpm-tis,tpmdev=t"], "-machine microvm"),
            (["-m"], "-m: requires an argument"),
        ])
        func badCommandLine(args: [String], mentions: String) throws {
            let r = try runMachine(args)
            #expect(r.status == 1)
            #expect(r.stderr.hasPrefix("tis-sim machine: "), "\(r.stderr)")
            #expect(r.stderr.contains(mentions), "\(r.stderr)")
        }

        @Test("--verbose lists the options accepted and ignored")
        func verbose() throws {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tis-sim-verbose-\(getpid())").path
            defer { try? FileManager.default.removeItem(atPath: dir) }
            // -qtest stdio with stdin at EOF: the machine starts, lists, and ends.
            let r = try runMachine(["--verbose", "-machine", "q35", "-nodefaults", "-display", "none", "-m", "128",
                                    "-tpmdev", "libtpms,id=t,state=\(dir)", "-device", "tpm-tis,tpmdev=t", "-qtest", "stdio"])
            #expect(r.status == 0, "\(r.stderr)")
            #expect(r.stderr.contains("pc-q35-7.2"))
            for o in ["ignored -nodefaults", "ignored -display none", "ignored -m 128"] {
                #expect(r.stderr.contains(o), "\(r.stderr)")
            }
        }

        @Test("a bad qtest line is answered FAIL and the machine keeps answering")
        func badQTestLine() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let vm = try VM(.tisSimSwtpm, work: work)
            defer { vm.close() }
            for line in ["readb", "readl zz", "writeb 0xfed40000", "nonesuch", "write 0xfed45000 2 0"] {
                #expect(throws: HarnessError.self) { try vm.bus.command(line) }
            }
            #expect(try vm.bus.readb(TIS.reg(0, TIS.access)) == 0x81)
            #expect(try vm.qmp.queryStatus() == "running")
        }

        @Test("a broken incoming stream: failed with a clear error, and QEMU 7.2's exit(1)")
        func brokenStream() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let source = try VM(.tisSimSwtpm, work: work)
            try prepareSource(source.bus)
            let good = work.file("good.bin")
            try source.qmp.migrate(uri: "exec:cat > \(good)")
            try source.qmp.waitForMigration()
            source.close()
            let bytes = try #require(FileManager.default.contents(atPath: good))
            let cut = work.file("cut.bin")
            try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: cut))
            var flipped = [UInt8](bytes)
            flipped[0] ^= 0xFF
            let badMagic = work.file("magic.bin")
            try Data(flipped).write(to: URL(fileURLWithPath: badMagic))

            // exit-on-error false (QEMU 9.1's option): the machine stays up and says why.
            for (file, says) in [(cut, "truncated"), (badMagic, "magic")] {
                let vm = try VM(.tisSimSwtpm, work: work, incoming: "defer")
                defer { vm.close() }
                try vm.qmp.execute("migrate-incoming", arguments: ["uri": .string("file:\(file)"), "exit-on-error": .bool(false)])
                do {
                    try vm.qmp.waitForMigration(timeout: 10)
                    Issue.record("a broken stream loaded")
                } catch {
                    #expect(error.code == .migrationFailed)
                    #expect(error.message.lowercased().contains(says), "\(error.message)")
                }
                #expect(try vm.qmp.queryStatus() == "inmigrate")
                #expect(try vm.bus.readl(TIS.reg(0, TIS.didVid)) == 0x0001_1014)
            }
            // Default: as QEMU 7.2, the destination exits with status 1 and says why.
            let vm = try VM(.tisSimSwtpm, work: work, incoming: "defer")
            defer { vm.close() }
            try vm.qmp.execute("migrate-incoming", arguments: ["uri": .string("exec:cat < \(cut)")])
            #expect(vm.process.process.waitForExit(timeout: 10))
            #expect(vm.process.process.exitDescription == "exit 1", "\(vm.process.process.exitDescription)")
            #expect(vm.output.contains("load of migration failed"), "\(vm.output)")
        }

        @Test("a machine type mismatch is refused as QEMU refuses it")
        func machineTypeMismatch() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let source = try VM(.tisSimSwtpm, work: work)
            let stream = work.file("pc.bin")
            try source.qmp.migrate(uri: "exec:cat > \(stream)")
            try source.qmp.waitForMigration()
            source.close()
            let dir = try work.subdirectory("q35state")
            var o = QEMUOptions(machine: .q35, device: nil, incoming: "defer",
                                extraArguments: ["-tpmdev", "libtpms,id=t,state=\(dir)", "-device", "tpm-tis,tpmdev=t"])
            o.name = "q35"
            o.executable = try tisSimMachineExecutable(in: work)
            let q35 = try QEMUProcess.launch(o, in: work)
            defer { q35.close() }
            try q35.qmp.execute("migrate-incoming", arguments: ["uri": .string("file:\(stream)"), "exit-on-error": .bool(false)])
            #expect(throws: HarnessError.self) { try q35.qmp.waitForMigration() }
            let info = try q35.qmp.queryMigrate()
            #expect(info.errorDescription == "Machine type received is 'pc-i440fx-7.2' and local is 'pc-q35-7.2'")
        }
    }
}

/// QMP and qtest answered in process (a `Machine` on a fake backend), byte for byte against
/// what qemu-system-x86_64 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3) answered on this machine,
/// started as `qemu-system-x86_64 -machine pc -accel tcg -bios W/halt.bin -nodefaults -display none
/// -m 128 -chardev socket,id=chrtpm,path=W/a/ctrl.sock -tpmdev emulator,id=tpm0,chardev=chrtpm
/// -device tpm-tis,tpmdev=tpm0 -qtest unix:W/a.qtest -qmp unix:W/a.qmp,server=on,wait=off
/// -qtest-log /dev/null` on `swtpm socket --tpm2 --tpmstate dir=W/a --ctrl type=unixio,path=W/a/ctrl.sock`,
/// each request sent on its own line and the answer recorded (QMP lines end in `\r\n`).
@Suite("QMP and qtest in process")
struct InProcessTests {
    /// A machine with a fake TPM and a QMP socket; a raw client connected to it.
    final class Rig {
        let machine: Machine
        let fd: Int32
        let dir: String
        var buffer: [UInt8] = []

        init() throws {
            dir = FileManager.default.temporaryDirectory.appendingPathComponent("tis-machine-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            var c = MachineConfiguration(backend: .emulator(ctrlSocket: "/unused"))
            c.qmpSocket = dir + "/qmp.sock"
            machine = try Machine(configuration: c, backend: FakeBackend(), log: { _ in })
            try machine.start()
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                for (i, b) in (dir + "/qmp.sock").utf8.enumerated() { raw[i] = b }
            }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            try #require(rc == 0)
            var tv = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }

        func line() -> String? {
            while true {
                if let i = buffer.firstIndex(of: 0x0A) {
                    let l = String(decoding: buffer[..<i], as: UTF8.self)
                    buffer.removeSubrange(...i)
                    return l
                }
                var chunk = [UInt8](repeating: 0, count: 4096)
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, 4096) }
                if n <= 0 { return nil }
                buffer += chunk[0..<n]
            }
        }

        func send(_ text: String) -> String? {
            _ = Array((text + "\n").utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            return line()
        }

        func close() {
            Glibc.close(fd)
            machine.close()
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    @Test("QMP: greeting, negotiation, malformed input and bad arguments answered as QEMU 7.2")
    func qmpErrors() throws {
        let rig = try Rig()
        defer { rig.close() }
        let greeting = try #require(rig.line())
        #expect(greeting.hasPrefix("{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}"))
        #expect(greeting.hasSuffix("\"capabilities\": [\"oob\"]}}\r"))
        let exchanges: [(String, String)] = [
            (#"{"execute":"query-status"}"#,
             #"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#),
            (#"{"execute":"qmp_capabilities","id":1}"#, #"{"return": {}, "id": 1}"#),
            (#"{"execute":"qmp_capabilities"}"#,
             #"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#),
            (#"{"execute":"query-status","id":"x"}"#,
             #"{"return": {"status": "running", "singlestep": false, "running": true}, "id": "x"}"#),
            (#"{"execute":"query-migrate"}"#, #"{"return": {}}"#),
            (#"{"execute":"nonesuch"}"#, #"{"error": {"class": "CommandNotFound", "desc": "The command nonesuch has not been found"}}"#),
            (#"{"execute":"migrate"}"#, #"{"error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}"#),
            (#"{"execute":"migrate","arguments":{"uri":5}}"#,
             #"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'uri', expected: string"}}"#),
            (#"{"execute":"migrate","arguments":{"uri":"bogus:x"}}"#,
             #"{"error": {"class": "GenericError", "desc": "Parameter 'uri' expects a valid migration protocol"}}"#),
            (#"{"execute":"query-status","arguments":{"foo":1}}"#,
             #"{"error": {"class": "GenericError", "desc": "Parameter 'foo' is unexpected"}}"#),
            (#"{"execute":"query-status","foo":1}"#,
             #"{"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}"#),
            ("[1,2]", #"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#),
            ("{\"execute\":\n}", #"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#),
            (#""str""#, #"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#),
            (#"{"exec":"x"}"#, #"{"error": {"class": "GenericError", "desc": "QMP input member 'exec' is unexpected"}}"#),
            (#"{"execute":5}"#, #"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#),
            (#"{"execute":"cont"}"#, #"{"return": {}}"#),
            (#"{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}"#,
             #"{"error": {"class": "GenericError", "desc": "'-incoming' was not specified on the command line"}}"#),
            (#"{"execute":"query-status"}"#, #"{"return": {"status": "running", "singlestep": false, "running": true}}"#),
        ]
        for (request, expected) in exchanges {
            var answer = rig.send(request)
            // `{"execute":\n}` is one message split over two lines; QEMU answers once.
            if answer?.hasPrefix("{\"timestamp\"") == true { answer = rig.line() }
            #expect(answer == expected + "\r", "request \(request)")
        }
        // stop: the STOP event first, then the answer, as QEMU 7.2 writes them.
        let ev = rig.send(#"{"execute":"stop"}"#)
        #expect(ev?.contains(#""event": "STOP"}"#) == true, "\(ev ?? "nil")")
        #expect(rig.line() == #"{"return": {}}"# + "\r")
        #expect(rig.send(#"{"execute":"query-status"}"#) == #"{"return": {"status": "paused", "singlestep": false, "running": false}}"# + "\r")
    }

    @Test("qtest lines answered as QEMU 7.2 answered them", arguments: [
        ("readb 0xfed40000", "OK 0x0000000000000081"),
        ("readw 0xfed40000", "OK 0x0000000000000081"),
        ("readl 0xfed40000", "OK 0x0000000000000081"),
        ("readq 0xfed40000", "OK 0xffffffff00000081"),
        ("readl 0x1000", "OK 0x0000000000000000"),
        ("readb 0xfed45000", "OK 0x0000000000000000"),
        ("readl 0xfed40f00", "OK 0x0000000000011014"),
        ("read 0xfed40f00 4", "OK 0x14100100"),
        ("b64read 0xfed40f00 4", "OK FBABAA=="),
        ("endianness", "OK little"),
        ("clock_step", "FAIL Unknown command 'clock_step'"),
        ("clock_step 100", "FAIL Unknown command 'clock_step'"),
        ("nonesuch", "FAIL Unknown command 'nonesuch'"),
        ("irq_intercept_in foo", "FAIL Unknown device"),
        ("irq_intercept_in ioapic", "OK"),
        ("inb 0x80", "OK 0x00ff"),
        ("outb 0x80 0x1", "OK"),
        ("write 0xfed45000 2 0", "ERR invalid argument size"),
        ("readb", "FAIL Invalid arguments for 'readb'"),
        ("readl 0xzz", "FAIL Invalid arguments for 'readl'"),
    ])
    func qtestLines(line: String, answer: String) throws {
        var c = MachineConfiguration(backend: .emulator(ctrlSocket: "/unused"))
        c.qtest = nil
        let m = try Machine(configuration: c, backend: FakeBackend(), log: { _ in })
        defer { m.close() }
        var interpreter = QTestInterpreter()
        #expect(m.qtestAnswer(line, interpreter: &interpreter) == answer)
    }

    @Test("qtest block writes and memset reach the PPI RAM as QEMU's do")
    func qtestBlocks() throws {
        let c = MachineConfiguration(backend: .emulator(ctrlSocket: "/unused"))
        let m = try Machine(configuration: c, backend: FakeBackend(), log: { _ in })
        defer { m.close() }
        var q = QTestInterpreter()
        #expect(m.qtestAnswer("write 0xfed45000 2 0x1234", interpreter: &q) == "OK")
        #expect(m.qtestAnswer("read 0xfed45000 4", interpreter: &q) == "OK 0x12340000")
        #expect(m.qtestAnswer("memset 0xfed45000 2 0x41", interpreter: &q) == "OK")
        #expect(m.qtestAnswer("readw 0xfed45000", interpreter: &q) == "OK 0x0000000000004141")
        #expect(m.qtestAnswer("b64write 0xfed45000 3 QUJD", interpreter: &q) == "OK")
        #expect(m.qtestAnswer("read 0xfed45000 3", interpreter: &q) == "OK 0x414243")
    }

    @Test("QEMU's command line syntax", arguments: [
        (["-M", "q35", "-chardev", "socket,id=c,path=/a,,b", "-tpmdev", "emulator,id=t,chardev=c", "-device", "tpm-tis,tpmdev=t",
          "-qtest", "unix:/q.sock", "-qmp", "unix:/m.sock,server=on,wait=off", "-incoming", "defer", "-S"],
         "pc-q35-7.2 emulator(ctrlSocket: \"/a,b\") unix(\"/q.sock\") /m.sock false defer true"),
        (["-machine", "pc,accel=tcg", "-tpmdev", "libtpms,id=t,state=/s,version=1.2", "-device", "tpm-tis,tpmdev=t",
          "-qtest", "stdio", "-qmp", "unix:/m.sock,server,nowait"],
         "pc-i440fx-7.2 libtpms(stateDirectory: \"/s\", version: 1.2) stdio /m.sock false - false"),
    ])
    func commandLine(args: [String], expected: String) throws {
        let c = try MachineConfiguration.parse(args)
        let q = c.qtest.map { "\($0)" } ?? "-"
        #expect("\(c.machineType.rawValue) \(c.backend) \(q) \(c.qmpSocket ?? "-") \(c.qmpWait) \(c.incoming ?? "-") \(c.startPaused)" == expected)
    }
}
