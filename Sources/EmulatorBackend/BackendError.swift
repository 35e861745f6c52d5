import WireFormat

/// A host-side failure of a TPM backend: typed, with the context that names what failed.
public struct BackendError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Equatable {
        /// libtpms returned a non-zero TPM_RESULT from a library call.
        case libtpmsCall
        /// Another LibtpmsBackend is live in this process; libtpms holds one TPM per process.
        case libtpmsInUse
        /// The backend is not running (not started, or shut down).
        case notRunning
        /// A ctrl command returned a non-zero result.
        case ctrlCommandFailed
        /// The peer's reply broke the protocol (short, oversize, garbage).
        case protocolViolation
        /// The peer did not answer in time.
        case timeout
        /// A socket, file or process operation failed (errno in `errno`).
        case io
        /// The peer closed the connection.
        case connectionClosed
        /// The backend lacks a capability the operation needs.
        case unsupported
        /// A state blob was refused or could not be produced.
        case stateBlob
        /// The command could not be delivered (malformed, too large).
        case badCommand
        /// A process (swtpm) could not be started or died.
        case process
        /// The state directory could not be read or written.
        case stateDirectory
    }

    public var code: Code
    public var message: String
    /// The ctrl command involved (`CMD_GET_STATEBLOB`), the libtpms call (`TPMLIB_SetState`).
    public var operation: String?
    /// The TPM result code the peer returned, if any.
    public var tpmResult: UInt32?
    /// The blob type involved, if any.
    public var blobType: TPMStateBlobType?
    /// errno of a failed system call, if any.
    public var errno: Int32?

    public init(_ code: Code, _ message: String, operation: String? = nil, tpmResult: UInt32? = nil,
                blobType: TPMStateBlobType? = nil, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.operation = operation
        self.tpmResult = tpmResult
        self.blobType = blobType
        self.errno = errno
    }

    public init(wire: WireError, operation: String) {
        self.init(.protocolViolation, wire.description, operation: operation)
    }

    public var description: String {
        var s = "\(code.rawValue): \(message)"
        if let operation { s += " [\(operation)]" }
        if let tpmResult { s += " [TPM result 0x\(String(tpmResult, radix: 16))]" }
        if let blobType { s += " [blob \(blobType)]" }
        if let errno { s += " [errno \(errno)]" }
        return s
    }
}
