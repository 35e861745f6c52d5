/// Why the machine refused something on the host side: its command line, a transport, a
/// stream, the backend. `message` is worded as QEMU words the same failure where QEMU has a
/// message for it.
public struct MachineError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What kind of failure, for callers that switch on it.
    public enum Code: String, Sendable, Equatable {
        /// An option QEMU has but this machine does not model, or one QEMU does not have.
        case unknownOption
        /// An option with a missing, malformed or contradictory value.
        case invalidOption
        /// The TPM backend could not be created or started.
        case backend
        /// A socket, pipe, file or child process failed.
        case io
        /// A migration stream was refused or a migration failed.
        case migration
    }

    /// What kind of failure.
    public var code: Code
    /// What failed and why.
    public var message: String
    /// The option this error is about (`-tpmdev`, `-qtest`...), when it is about one.
    public var option: String?

    /// An error of `code` saying `message`, about `option` when given.
    public init(_ code: Code, _ message: String, option: String? = nil) {
        self.code = code
        self.message = message
        self.option = option
    }

    /// `OPTION: MESSAGE`, as QEMU reports command-line errors (`qemu-system-x86_64: -tpmdev …: …`).
    public var description: String {
        if let option { return "\(option): \(message)" }
        return message
    }
}
