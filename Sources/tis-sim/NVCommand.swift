import ArgumentParser
import EmulatorBackend
import Foundation
import TIS
import TISDriver
import WireFormat

/// `tis-sim nv`: define, write and read a TPM 2.0 NV index of the embedded TPM through the TIS,
/// on a state directory that persists between runs (and that swtpm can open too).
struct NV: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Define, write or read an NV index of the embedded TPM 2.0 through the TIS registers.")

    enum Action: String, ExpressibleByArgument, CaseIterable { case define, write, read, undefine }

    @Argument(help: "define | write | read | undefine")
    var action: Action

    @Option(help: "The TPM state directory (swtpm's file names).")
    var stateDir: String

    @Option(help: "The NV index handle (hex).", transform: { s in
        guard let v = UInt32(s.hasPrefix("0x") ? String(s.dropFirst(2)) : s, radix: 16) else { throw ValidationError("bad index \(s)") }
        return v
    })
    var index: UInt32 = 0x0150_0001

    @Option(help: "Size for define; bytes to read.")
    var size: UInt16 = 32

    @Option(help: "Data to write, as hex.")
    var data: String?

    func run() throws {
        let dir = URL(fileURLWithPath: stateDir).standardizedFileURL.path
        let backend = try LibtpmsBackend(version: .tpm20, stateDirectory: dir)
        defer { backend.shutdown() }
        let device = try TISDevice(backend: backend, mode: .inline)
        let driver = TISDriver(bus: TISMachineBus(device: device))
        let startup = TPM2.responseCode(try driver.transmit(TPM2.startup())) ?? 0xFFFF_FFFF
        guard startup == 0 || startup == 0x100 else { throw NVError("TPM2_Startup failed: 0x\(String(startup, radix: 16))") }
        let response: [UInt8]
        switch action {
        case .define: response = try driver.transmit(TPM2.nvDefineSpace(index: index, size: size))
        case .undefine: response = try driver.transmit(TPM2.nvUndefineSpace(index: index))
        case .write:
            guard let data, let bytes = [UInt8](hexString: data) else { throw ValidationError("--data HEX is required for write") }
            response = try driver.transmit(TPM2.nvWrite(index: index, data: bytes))
        case .read: response = try driver.transmit(TPM2.nvRead(index: index, size: size))
        }
        let rc = TPM2.responseCode(response) ?? 0xFFFF_FFFF
        guard rc == 0 else { throw NVError("TPM2_NV_\(action.rawValue) failed: TPM rc 0x\(String(rc, radix: 16))") }
        if action == .read { print(try TPM2.nvReadData(response).hexString) }
        // A clean TPM2_Shutdown, as an OS does before power-off.
        _ = try driver.transmit(TPM2.shutdown(TPM2.suClear))
    }
}

struct NVError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}
