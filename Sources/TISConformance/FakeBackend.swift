import EmulatorBackend
import Synchronization

/// An in-memory TPM backend for unit tests of one piece, shaped after QEMU's
/// tests/qtest/tpm-emu.c: every command gets a fixed 10-byte reply (TPM2
/// `80 01 00 00 00 0A 00 00 01 01`, TPM 1.2 `00 C4 00 00 00 0A 00 00 00 09`) unless a
/// responder is given. Acceptance tests use libtpms and swtpm; this is for the device alone.
public final class FakeBackend: TPMBackend, @unchecked Sendable {
    public let tpmVersion: TPMVersion
    private struct State {
        var established = false
        var commands: [TPMBackendCommand] = []
        var cancels = 0
        var resets: [UInt8] = []
        var blobs = TPMStateBlobs()
        var failStartup = false
        var failExecute = false
        var startups = 0
    }
    private let state = Mutex(State())
    private let size: Int
    public let responder: (@Sendable (TPMBackendCommand) -> [UInt8])?

    public init(version: TPMVersion = .tpm20, bufferSize: Int = 4096, established: Bool = false,
                responder: (@Sendable (TPMBackendCommand) -> [UInt8])? = nil) {
        self.tpmVersion = version
        self.size = bufferSize
        self.responder = responder
        state.withLock { $0.established = established }
    }

    public static let tpm2Reply: [UInt8] = [0x80, 0x01, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x01, 0x01]
    public static let tpm12Reply: [UInt8] = [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x09]

    public func bufferSize() -> Int { size }

    public func startup(bufferSize: Int, incoming: Bool) throws(BackendError) {
        let fail = state.withLock { s -> Bool in s.startups += 1; return s.failStartup }
        if fail { throw BackendError(.process, "fake startup failure", operation: "CMD_INIT") }
    }

    public func execute(_ command: TPMBackendCommand) throws(BackendError) -> TPMBackendResponse {
        let fail = state.withLock { s -> Bool in s.commands.append(command); return s.failExecute }
        if fail { throw BackendError(.connectionClosed, "fake backend died", operation: "data channel") }
        let reply = responder?(command) ?? (tpmVersion == .tpm12 ? Self.tpm12Reply : Self.tpm2Reply)
        return TPMBackendResponse(bytes: reply, selftestDone: TPMUtil.isSelftestDone(command: command.bytes, response: reply))
    }

    public func cancelCommand() { state.withLock { $0.cancels += 1 } }
    public func establishedFlag() throws(BackendError) -> Bool { state.withLock { $0.established } }
    public func resetEstablishedFlag(locality: UInt8) throws(BackendError) {
        state.withLock { $0.resets.append(locality); $0.established = false }
    }
    public func saveState() throws(BackendError) -> TPMStateBlobs { state.withLock { $0.blobs } }
    public func restoreState(_ blobs: TPMStateBlobs) throws(BackendError) { state.withLock { $0.blobs = blobs } }
    public func shutdown() {}

    public var commands: [TPMBackendCommand] { state.withLock { $0.commands } }
    public var cancels: Int { state.withLock { $0.cancels } }
    public var establishedResets: [UInt8] { state.withLock { $0.resets } }
    public var startups: Int { state.withLock { $0.startups } }
    public func setEstablished(_ v: Bool) { state.withLock { $0.established = v } }
    public func setFailStartup(_ v: Bool) { state.withLock { $0.failStartup = v } }
    public func setFailExecute(_ v: Bool) { state.withLock { $0.failExecute = v } }
}
