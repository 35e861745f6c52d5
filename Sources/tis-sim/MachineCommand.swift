import ArgumentParser
import Foundation
import TISMachine

/// `tis-sim machine`: a drop-in for `qemu-system-x86_64` in register-level TPM test scripts.
/// Takes QEMU's own options (single dash), which swift-argument-parser cannot parse, so every
/// argument after `machine` is handed to `MachineConfiguration.parse`.
struct MachineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "machine",
        abstract: "A QEMU 7.2 stand-in with one tpm-tis, driven over qtest and QMP; migrates to and from QEMU.",
        discussion: """
        Accepts QEMU's TPM options in QEMU's syntax:
          -machine pc|q35   -chardev socket,id=ID,path=CTRL.sock   -tpmdev emulator,id=T,chardev=ID
          -tpmdev libtpms,id=T,state=DIR[,version=2.0|1.2]   -device tpm-tis,tpmdev=T
          -qtest unix:PATH | stdio   -qmp unix:PATH,server=on,wait=off   -incoming URI|defer   -S
          -chardev socket,id=M,path=PATH -mon chardev=M,mode=control   (libqtest's QMP: the machine connects)
        Ignored (listed with --verbose): -nodefaults -nographic -display -accel -bios -m -qtest-log -name.
        Example: tis-sim machine -machine pc -tpmdev libtpms,id=tpm0,state=/tmp/s -device tpm-tis,tpmdev=tpm0 -qtest stdio
        """)

    @Flag(name: .customLong("verbose"), help: "List the options accepted and ignored, and the machine's setup, on stderr.")
    var verbose = false

    @Argument(parsing: .allUnrecognized, help: "QEMU options.")
    var qemuArguments: [String] = []

    /// `tis-sim machine: OPTION: MESSAGE`, as QEMU prefixes its own name.
    static func report(_ error: MachineError) {
        FileHandle.standardError.write(Data("tis-sim machine: \(error)\n".utf8))
    }

    func run() throws {
        let parsed = Result { () throws(MachineError) -> MachineConfiguration in try MachineConfiguration.parse(qemuArguments) }
        guard case .success(let config) = parsed else {
            if case .failure(let error) = parsed { Self.report(error) }
            throw ExitCode(1)
        }
        if verbose {
            let lines = ["tis-sim machine: \(config.machineType.rawValue), tpm-tis on \(config.backend)"]
                + config.ignoredOptions.map { "tis-sim machine: ignored \($0)" }
            FileHandle.standardError.write(Data((lines.joined(separator: "\n") + "\n").utf8))
        }
        let started = Result { () throws(MachineError) -> Machine in
            let m = try Machine(configuration: config)
            try m.start()
            return m
        }
        guard case .success(let machine) = started else {
            if case .failure(let error) = started { Self.report(error) }
            throw ExitCode(1)
        }
        let status = machine.run()
        if status != 0 { throw ExitCode(status) }
    }
}
