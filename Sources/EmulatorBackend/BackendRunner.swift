import Dispatch
import Synchronization

/// How a frontend's commands reach its backend.
public enum ExecutionMode: Sendable, Equatable {
    /// On a worker thread of the runner, as QEMU's thread pool does: MMIO never waits for a
    /// command; completion arrives later through the completion handler.
    case worker
    /// On the caller's thread, inside the tpmGo write. The guest sees dataAvail on its first
    /// poll. For single-threaded VMMs, tests and benchmarks; a long command (RSA key
    /// generation) blocks the vCPU that issued tpmGo for its whole duration.
    case inline
}

/// The generic half of a TPM backend: one command in flight at a time, delivered to a worker,
/// completed back to the frontend, a way to wait for it, and the startup-error flag. Mirrors
/// QEMU's backends/tpm/tpm_backend.c (`tpm_backend_deliver_request`,
/// `tpm_backend_finish_sync`, `tpm_backend_had_startup_error`).
public final class BackendRunner: Sendable {
    public let backend: any TPMBackend
    public let mode: ExecutionMode

    private struct State {
        /// A command is delivered and its response not yet produced.
        var inFlight = false
        /// Completion handlers running (the response is being applied to the frontend).
        var completing = 0
        var hadStartupError = false
        var waiters = 0
        var isIdle: Bool { !inFlight && completing == 0 }
    }
    private let state = Mutex(State())
    private let queue: DispatchQueue
    private let idle = DispatchSemaphore(value: 0)
    /// Called with every failure the runner sees (a command that failed and got the fatal
    /// response, a startup that failed); for logs. Not called with the device lock held.
    public let onError: (@Sendable (BackendError) -> Void)?

    public init(backend: any TPMBackend, mode: ExecutionMode = .worker, onError: (@Sendable (BackendError) -> Void)? = nil) {
        self.backend = backend
        self.mode = mode
        self.onError = onError
        self.queue = DispatchQueue(label: "tpm-backend-runner")
    }

    /// QEMU `tpm_backend_had_startup_error`.
    public var hadStartupError: Bool { state.withLock { $0.hadStartupError } }

    /// True while a command is delivered and not yet completed.
    public var isBusy: Bool { state.withLock { !$0.isIdle } }

    /// QEMU `tpm_backend_startup_tpm`: waits for an in-flight command, then starts the TPM;
    /// records the startup error the device then reports (all reads 0, writes ignored).
    public func startup(bufferSize: Int, incoming: Bool = false) throws(BackendError) {
        finishSync()
        do {
            try backend.startup(bufferSize: bufferSize, incoming: incoming)
            state.withLock { $0.hadStartupError = false }
        } catch {
            state.withLock { $0.hadStartupError = true }
            onError?(error)
            throw error
        }
    }

    /// QEMU `tpm_backend_reset`: waits for an in-flight command, clears the startup error.
    public func reset() {
        finishSync()
        state.withLock { $0.hadStartupError = false }
    }

    /// Marks the backend as failed to start without calling it (a device built over a backend
    /// that could not be reached).
    public func markStartupError() {
        state.withLock { $0.hadStartupError = true }
    }

    /// QEMU `tpm_backend_deliver_request`. Returns false, doing nothing, if a command is already
    /// in flight ("There is a TPM request pending"). `completion` receives the response; on a
    /// backend failure it receives QEMU's fatal-error response
    /// (`tpm_util_write_fatal_error_response`) and the error.
    public func deliver(_ command: TPMBackendCommand,
                        completion: @escaping @Sendable (TPMBackendResponse, BackendError?) -> Void) -> Bool {
        let accepted = state.withLock { s -> Bool in
            if s.inFlight { return false }
            s.inFlight = true
            return true
        }
        guard accepted else { return false }
        switch mode {
        case .inline:
            run(command, completion)
        case .worker:
            queue.async { self.run(command, completion) }
        }
        return true
    }

    private func run(_ command: TPMBackendCommand,
                     _ completion: @escaping @Sendable (TPMBackendResponse, BackendError?) -> Void) {
        var response: TPMBackendResponse
        var failure: BackendError? = nil
        do {
            response = try backend.execute(command)
        } catch {
            failure = error
            response = TPMBackendResponse(bytes: command.maxResponseSize >= 10 ? TPMResponses.fatalError : [])
        }
        if let failure { onError?(failure) }
        // QEMU clears `b->cmd` right after `request_completed`, both under the BQL, so a guest
        // never sees the response before the backend takes a new request. Without that lock the
        // order must be: accept new requests first, then show the response; `finishSync` still
        // waits for the handler.
        state.withLock { s in
            s.inFlight = false
            s.completing += 1
        }
        completion(response, failure)
        let waiters = state.withLock { s -> Int in
            s.completing -= 1
            guard s.isIdle else { return 0 }
            let w = s.waiters
            s.waiters = 0
            return w
        }
        for _ in 0..<waiters { idle.signal() }
    }

    /// QEMU `tpm_backend_finish_sync`: returns once no command is in flight. The completion
    /// handler of the in-flight command has run when this returns.
    public func finishSync() {
        let mustWait = state.withLock { s -> Bool in
            guard !s.isIdle else { return false }
            s.waiters += 1
            return true
        }
        if mustWait { idle.wait() }
    }

    /// QEMU `tpm_backend_cancel_cmd`.
    public func cancel() {
        backend.cancelCommand()
    }
}

/// Canonical response bytes.
public enum TPMResponses {
    /// QEMU `tpm_util_write_fatal_error_response`: tag 0xC4 (TPM 1.2 TPM_TAG_RSP_COMMAND),
    /// size 10, TPM_FAIL. QEMU writes these same bytes for TPM 2.0 backends too.
    public static let fatalError: [UInt8] = [0x00, 0xC4, 0x00, 0x00, 0x00, 0x0A, 0x00, 0x00, 0x00, 0x09]
}

/// QEMU backends/tpm/tpm_util.c helpers.
public enum TPMUtil {
    /// QEMU `tpm_util_is_selftest` + the response check of `tpm_emulator_unix_tx_bufs`: the
    /// command was TPM 1.2 TPM_ORD_ContinueSelfTest (0x53) and the response code is 0.
    public static func isSelftestDone(command: [UInt8], response: [UInt8]) -> Bool {
        guard command.count >= 10, response.count >= 10 else { return false }
        let ordinal = UInt32(command[6]) << 24 | UInt32(command[7]) << 16 | UInt32(command[8]) << 8 | UInt32(command[9])
        let rc = UInt32(response[6]) << 24 | UInt32(response[7]) << 16 | UInt32(response[8]) << 8 | UInt32(response[9])
        return ordinal == 0x53 && rc == 0
    }
}
