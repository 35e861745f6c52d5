import ArgumentParser

@main
struct TisSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tis-sim",
        abstract: "A TPM TIS frontend the way QEMU gives it to a guest: demo, ctrl client, migration tools.",
        subcommands: [Demo.self, NV.self, Ctrl.self, Serve.self, Inspect.self, Validate.self, MachineCommand.self])
}
