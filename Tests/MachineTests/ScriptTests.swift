import Foundation
import QEMUHarness
import Testing

extension MachineSuite {
    /// The same register-level qtest script against qemu-system-x86_64 7.2 and against
    /// `tis-sim machine`, through the same harness with only the binary swapped.
    @Suite("One qtest script, QEMU or tis-sim")
    struct ScriptTests {
        @Test("the register-level script gives identical answers on QEMU 7.2, tis-sim+swtpm and tis-sim+libtpms")
        func identicalAnswers() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            var transcripts: [VMKind: [String]] = [:]
            for kind in VMKind.allCases {
                let vm = try VM(kind, work: work)
                defer { vm.close() }
                transcripts[kind] = try registerLevelScript(vm.bus)
            }
            let reference = try #require(transcripts[.qemu])
            #expect(reference.contains("PCR16 matches sha256(0^32 ‖ digest): true"))
            #expect(reference.count > 100)
            for kind in [VMKind.tisSimSwtpm, .tisSimLibtpms] {
                let t = try #require(transcripts[kind])
                let diff = zip(reference, t).enumerated().filter { $0.element.0 != $0.element.1 }
                    .map { "line \($0.offset): QEMU \($0.element.0) / \(kind) \($0.element.1)" }
                #expect(t == reference, "\(kind) differs from QEMU 7.2: \(diff.prefix(10))")
            }
        }

        @Test("the issue's exact command line starts tis-sim machine, and QMP answers as QEMU's")
        func exactCommandLine() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let vm = try VM(.tisSimSwtpm, work: work)
            defer { vm.close() }
            let args = vm.process.arguments
            for needed in ["-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-qtest-log",
                           "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"] {
                #expect(args.contains(needed))
            }
            #expect(vm.qmp.greeting["version"]?["qemu"]?["major"] == .int(7))
            #expect(try vm.qmp.queryStatus() == "running")
            #expect(try vm.bus.readl(TIS.reg(0, TIS.didVid)) == 0x0001_1014)
            try vm.qmp.stop()
            #expect(try vm.qmp.waitForEvent("STOP", timeout: 2) != nil)
            #expect(try vm.qmp.queryStatus() == "paused")
            try vm.qmp.cont()
            #expect(try vm.qmp.waitForEvent("RESUME", timeout: 2) != nil)
            #expect(try vm.qmp.queryStatus() == "running")
        }
    }
}

