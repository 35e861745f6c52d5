import Dispatch
import EmulatorBackend
import Synchronization

/// A TPM backend whose commands complete only when the script says so: `execute` (on the
/// runner's worker thread, `.worker` mode as in QEMU's thread pool) blocks until `complete(_:)`
/// hands it a response or a failure. So a fuzzer decides exactly which guest accesses happen
/// while a command is in flight, and when and how it ends.
public final class ScriptedBackend: TPMBackend, @unchecked Sendable {
    /// How the command in flight ends.
    public enum Completion: Sendable, Equatable {
        case respond([UInt8], selftestDone: Bool)
        /// The backend fails (a dead swtpm): the runner gives the guest QEMU's fatal response.
        case fail(BackendError.Code)
    }

    public let tpmVersion: TPMVersion
    private let size: Int
    private struct State {
        var established = false
        var failStartup = false
        var failRestore = false
        var blobs = TPMStateBlobs()
        var decision: Completion?
        var executing = 0
        var executed = 0
        var cancels = 0
    }
    private let state = Mutex(State())
    private let go = DispatchSemaphore(value: 0)

    public init(version: TPMVersion = .tpm20, bufferSize: Int = 4096, established: Bool = false) {
        self.tpmVersion = version
        self.size = bufferSize
        state.withLock { $0.established = established }
    }

    public func bufferSize() -> Int { size }

    public func startup(bufferSize: Int, incoming: Bool) throws(BackendError) {
        if state.withLock({ $0.failStartup }) {
            throw BackendError(.process, "scripted startup failure", operation: "CMD_INIT")
        }
    }

    public func execute(_ command: TPMBackendCommand) throws(BackendError) -> TPMBackendResponse {
        state.withLock { $0.executing += 1 }
        go.wait()
        let d = state.withLock { s -> Completion? in
            s.executing -= 1
            s.executed += 1
            defer { s.decision = nil }
            return s.decision
        }
        switch d ?? .fail(.io) {
        case .respond(let bytes, let selftestDone):
            return TPMBackendResponse(bytes: bytes, selftestDone: selftestDone)
        case .fail(let code):
            throw BackendError(code, "scripted backend failure", operation: "TPM command")
        }
    }

    /// Lets the command in flight finish with `completion`. Call only while the runner is busy;
    /// then wait with `BackendRunner.finishSync()`.
    public func complete(_ completion: Completion) {
        state.withLock { $0.decision = completion }
        go.signal()
    }

    public func cancelCommand() { state.withLock { $0.cancels += 1 } }
    public func establishedFlag() throws(BackendError) -> Bool { state.withLock { $0.established } }
    public func resetEstablishedFlag(locality: UInt8) throws(BackendError) { state.withLock { $0.established = false } }
    public func saveState() throws(BackendError) -> TPMStateBlobs { state.withLock { $0.blobs } }
    public func restoreState(_ blobs: TPMStateBlobs) throws(BackendError) {
        let fail = state.withLock { s -> Bool in
            if !s.failRestore { s.blobs = blobs }
            return s.failRestore
        }
        if fail { throw BackendError(.ctrlCommandFailed, "scripted SET_STATEBLOB refusal", operation: "CMD_SET_STATEBLOB", tpmResult: 0x03) }
    }
    public func shutdown() {}

    public var established: Bool {
        get { state.withLock { $0.established } }
        set { state.withLock { $0.established = newValue } }
    }
    public func setFailStartup(_ v: Bool) { state.withLock { $0.failStartup = v } }
    public func setFailRestore(_ v: Bool) { state.withLock { $0.failRestore = v } }
    public func setBlobs(_ b: TPMStateBlobs) { state.withLock { $0.blobs = b } }
    public var cancels: Int { state.withLock { $0.cancels } }
    public var executed: Int { state.withLock { $0.executed } }
}
