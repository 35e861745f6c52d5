/// A failure of the QEMU test harness: typed, with the context that names what failed.
///
/// Every error raised while QEMU runs carries the tail of QEMU's stderr, because that is where
/// QEMU explains itself (`invalid accelerator`, `tpm-emulator: ...`, a migration error).
public struct HarnessError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Equatable {
        /// A program the harness needs (qemu-system-x86_64, swtpm) is not installed.
        case notInstalled
        /// A file or directory operation in the work directory failed.
        case workDirectory
        /// A child process could not be started.
        case spawn
        /// A child process exited while the harness still needed it.
        case processExited
        /// A socket call failed (errno in `errno`).
        case socket
        /// The peer did not answer in time.
        case timeout
        /// The peer closed the connection.
        case connectionClosed
        /// The peer's bytes broke the protocol (qtest line, QMP JSON).
        case protocolViolation
        /// qtest answered `FAIL ...` or `ERR ...`.
        case qtestFailure
        /// QMP answered with an `error` object (class in `qmpClass`).
        case qmpError
        /// A migration ended in `failed` or `cancelled`.
        case migrationFailed
        /// The caller passed an argument the harness cannot send (bad width, bad path).
        case invalidArgument
        /// The swtpm launcher failed (its `BackendError` is in `message`).
        case swtpm
    }

    public var code: Code
    public var message: String
    /// What was being done: `qtest readl 0xfed40000`, `QMP migrate`, `accept qtest`.
    public var operation: String?
    /// errno of a failed system call, if any.
    public var errno: Int32?
    /// The QMP error class (`GenericError`, `CommandNotFound`), if any.
    public var qmpClass: String?
    /// The last part of QEMU's stderr at the time of the failure, if QEMU was involved.
    public var processOutput: String?

    public init(_ code: Code, _ message: String, operation: String? = nil, errno: Int32? = nil,
                qmpClass: String? = nil, processOutput: String? = nil) {
        self.code = code
        self.message = message
        self.operation = operation
        self.errno = errno
        self.qmpClass = qmpClass
        self.processOutput = processOutput
    }

    public var description: String {
        var s = "\(code.rawValue): \(message)"
        if let operation { s += " [\(operation)]" }
        if let errno { s += " [errno \(errno)]" }
        if let qmpClass { s += " [QMP \(qmpClass)]" }
        if let processOutput, !processOutput.isEmpty { s += "\n--- stderr ---\n\(processOutput)" }
        return s
    }

    /// The same error with the process output attached (kept if already present).
    func with(output: String?) -> HarnessError {
        var e = self
        if e.processOutput == nil || e.processOutput?.isEmpty == true { e.processOutput = output }
        return e
    }
}
