import EmulatorBackend
import Foundation
import QEMUHarness
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The issue's command line, verbatim, with `BIN` = qemu-system-x86_64 and `BIN` = tis-sim
/// machine, driven over raw sockets (no harness): the qtest socket listened on before the start
/// (BIN connects), QMP connected to after.
struct ExactLine {
    let work: WorkDirectory
    let name: String
    let swtpm: SwtpmProcess
    let child: ChildProcess
    let qtest: Int32
    let qmp: Int32

    /// `BIN -machine pc -accel tcg -bios W/halt.bin -nodefaults -display none -m 128
    ///  -chardev socket,id=chrtpm,path=W/swtpm/ctrl.sock -tpmdev emulator,id=tpm0,chardev=chrtpm
    ///  -device tpm-tis,tpmdev=tpm0 -qtest unix:W/qtest.sock -qmp unix:W/qmp.sock,server=on,wait=off
    ///  -qtest-log /dev/null [-incoming URI]`
    init(bin: String, work: WorkDirectory, name: String, incoming: String? = nil) throws {
        self.work = work
        self.name = name
        let w = try work.subdirectory(name)
        try HaltBIOS.write(to: w + "/halt.bin")
        let state = try work.subdirectory("\(name)/swtpm")
        var o = SwtpmProcess.Options(stateDirectory: state)
        o.ctrlSocketPath = state + "/ctrl.sock"
        swtpm = try SwtpmProcess.launch(o)
        var args = ["-machine", "pc", "-accel", "tcg", "-bios", "\(w)/halt.bin", "-nodefaults", "-display", "none", "-m", "128",
                    "-chardev", "socket,id=chrtpm,path=\(w)/swtpm/ctrl.sock", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                    "-device", "tpm-tis,tpmdev=tpm0", "-qtest", "unix:\(w)/qtest.sock",
                    "-qmp", "unix:\(w)/qmp.sock,server=on,wait=off", "-qtest-log", "/dev/null"]
        if let incoming { args += ["-incoming", incoming] }
        let listener = try Self.listen(w + "/qtest.sock")
        defer { Glibc.close(listener) }
        child = try ChildProcess(executable: bin, arguments: args, outputPath: w + "/out.log")
        var pfd = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        try #require(poll(&pfd, 1, 10_000) == 1, "\(bin) did not connect to the qtest socket: \(child.outputTail())")
        qtest = accept(listener, nil, nil)
        var fd: Int32 = -1
        for _ in 0..<1000 {
            fd = Self.connect(w + "/qmp.sock")
            if fd >= 0 { break }
            usleep(5_000)
        }
        try #require(fd >= 0, "no QMP socket: \(child.outputTail())")
        qmp = fd
        for s in [qtest, qmp] {
            var tv = timeval(tv_sec: 10, tv_usec: 0)
            setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
    }

    static func listen(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &a.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let ok = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(ok == 0 && Glibc.listen(fd, 1) == 0)
        return fd
    }

    static func connect(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &a.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 { Glibc.close(fd); return -1 }
        return fd
    }

    /// One line from `fd` (a byte at a time: the sockets carry little).
    static func line(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var c: UInt8 = 0
        while read(fd, &c, 1) == 1 {
            if c == 0x0A { break }
            bytes.append(c)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func send(_ fd: Int32, _ text: String) {
        _ = Array((text + "\n").utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }

    func qt(_ request: String) -> String {
        Self.send(qtest, request)
        return Self.line(qtest)
    }

    /// A QMP command's answer line, skipping events.
    func qmpAnswer(_ request: String) -> String {
        Self.send(qmp, request)
        while true {
            let l = Self.line(qmp)
            if !l.hasPrefix("{\"timestamp\"") { return l }
        }
    }

    func close() {
        _ = qmpAnswer(#"{"execute":"quit"}"#)
        Glibc.close(qtest)
        Glibc.close(qmp)
        if !child.waitForExit(timeout: 5) { child.terminate(grace: 1) }
        swtpm.terminate(timeout: 2)
    }
}

extension MachineSuite {
    @Suite("The issue's exact command line")
    struct ExactCommandLineTests {
        @Test("BIN = qemu-system-x86_64 and BIN = tis-sim machine: same answers, and a migration between them")
        func exactLine() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let qemu = try QEMUProcess.findExecutable()
            let tisSim = try tisSimMachineExecutable(in: work)
            var transcripts: [[String]] = []
            for (i, bin) in [qemu, tisSim].enumerated() {
                let m = try ExactLine(bin: bin, work: work, name: "m\(i)")
                defer { m.close() }
                var t: [String] = []
                t.append(String(Self.line(m.qmp).prefix(35)))   // the greeting's start (versions differ)
                t.append(m.qmpAnswer(#"{"execute":"qmp_capabilities"}"#))
                t.append(m.qmpAnswer(#"{"execute":"query-status"}"#))
                for r in ["readl 0xfed40f00", "readb 0xfed40000", "writeb 0xfed40000 0x02", "readb 0xfed40000",
                          "readl 0xfed40018", "writeb 0xfed40018 0x40", "readl 0xfed40018", "readq 0xfed40000",
                          "nonesuch"] {
                    t.append("\(r) → \(m.qt(r))")
                }
                transcripts.append(t)
            }
            #expect(transcripts[0] == transcripts[1])
            #expect(transcripts[0].contains("readl 0xfed40018 → OK 0x0000000004100040"))

            // [-incoming URI]: tis-sim saves with the exact line, QEMU loads with it, and back.
            let src = try ExactLine(bin: tisSim, work: work, name: "src")
            _ = Self.line(src.qmp)
            _ = src.qmpAnswer(#"{"execute":"qmp_capabilities"}"#)
            _ = src.qt("writeb 0xfed40000 0x02")
            _ = src.qt("writeb 0xfed40018 0x40")
            let stream = work.file("exact.bin")
            #expect(src.qmpAnswer(#"{"execute":"migrate","arguments":{"uri":"exec:cat > \#(stream)"}}"#) == "{\"return\": {}}\r")
            var status = ""
            for _ in 0..<500 where !status.contains("completed") {
                status = src.qmpAnswer(#"{"execute":"query-migrate"}"#)
                usleep(5_000)
            }
            #expect(status.contains("\"status\": \"completed\""))
            src.close()
            for (i, bin) in [qemu, tisSim].enumerated() {
                let dst = try ExactLine(bin: bin, work: work, name: "dst\(i)", incoming: "exec:cat < \(stream)")
                defer { dst.close() }
                _ = Self.line(dst.qmp)
                _ = dst.qmpAnswer(#"{"execute":"qmp_capabilities"}"#)
                var s = ""
                for _ in 0..<500 where !s.contains("\"status\": \"running\"") {
                    s = dst.qmpAnswer(#"{"execute":"query-status"}"#)
                    usleep(5_000)
                }
                #expect(s.contains("\"status\": \"running\""), "\(bin): \(s)")
                #expect(dst.qt("readb 0xfed40000") == "OK 0x00000000000000a1", "\(bin)")
                #expect(dst.qt("readl 0xfed40018") == "OK 0x0000000004100040", "\(bin)")
            }
        }

        static func line(_ fd: Int32) -> String { ExactLine.line(fd) }
    }
}

extension MachineSuite.ExactCommandLineTests {
    /// libqtest (QEMU 7.2 tests/qtest/libqtest.c) starts `BIN -qtest unix:Q -qtest-log /dev/null
    /// -chardev socket,path=M,id=char0 -mon chardev=char0,mode=control -display none ARGS
    /// -accel qtest` and listens on both Q and M; QEMU's TPM tests add
    /// `-M pc -chardev socket,id=chr,path=CTRL -tpmdev emulator,id=dev,chardev=chr -device tpm-tis,tpmdev=dev`.
    /// (Debian's QEMU has no qtest accelerator, so only tis-sim runs this line here.)
    @Test("libqtest's command line: QMP on a client chardev through -mon, -accel qtest ignored")
    func libqtestLine() throws {
        let work = try QEMUMachine.makeWorkDirectory()
        defer { work.remove() }
        let state = try work.subdirectory("swtpm")
        var o = SwtpmProcess.Options(stateDirectory: state)
        o.ctrlSocketPath = state + "/ctrl.sock"
        let swtpm = try SwtpmProcess.launch(o)
        defer { swtpm.terminate(timeout: 2) }
        let qtestPath = work.file("qtest.sock"), qmpPath = work.file("qmp.sock")
        let ql = try ExactLine.listen(qtestPath), ml = try ExactLine.listen(qmpPath)
        defer { Glibc.close(ql); Glibc.close(ml) }
        let child = try ChildProcess(executable: try tisSimBinary(), arguments: [
            "machine", "-qtest", "unix:\(qtestPath)", "-qtest-log", "/dev/null", "-chardev", "socket,path=\(qmpPath),id=char0",
            "-mon", "chardev=char0,mode=control", "-display", "none",
            "-M", "pc", "-chardev", "socket,id=chr,path=\(state)/ctrl.sock", "-tpmdev", "emulator,id=dev,chardev=chr",
            "-device", "tpm-tis,tpmdev=dev", "-accel", "qtest"], outputPath: work.file("out.log"))
        defer { if !child.waitForExit(timeout: 3) { child.terminate(grace: 1) } }
        for fd in [ql, ml] {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            try #require(poll(&pfd, 1, 10_000) == 1, "tis-sim did not connect: \(child.outputTail())")
        }
        let qt = accept(ql, nil, nil), qmp = accept(ml, nil, nil)
        defer { Glibc.close(qt); Glibc.close(qmp) }
        #expect(ExactLine.line(qmp).hasPrefix(#"{"QMP": {"version": {"qemu": "#))
        ExactLine.send(qmp, #"{"execute":"qmp_capabilities"}"#)
        #expect(ExactLine.line(qmp) == "{\"return\": {}}\r")
        ExactLine.send(qt, "endianness")
        #expect(ExactLine.line(qt) == "OK little")
        ExactLine.send(qt, "readl 0xfed40f00")
        #expect(ExactLine.line(qt) == "OK 0x0000000000011014")
        ExactLine.send(qmp, #"{"execute":"quit"}"#)
        #expect(ExactLine.line(qmp) == "{\"return\": {}}\r")
        #expect(child.waitForExit(timeout: 5))
        #expect(child.exitDescription == "exit 0")
    }
}
