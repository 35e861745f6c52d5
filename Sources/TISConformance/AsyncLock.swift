import EmulatorBackend

/// A FIFO lock for async code that never blocks a thread: Swift Testing runs tests in parallel
/// on a small pool, and libtpms holds one TPM per process, so every test that creates a
/// `LibtpmsBackend` goes through `LibtpmsTestLock.run`.
public actor AsyncLock {
    private var held = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    public init() {}

    public func lock() async {
        if !held { held = true; return }
        await withCheckedContinuation { waiters.append($0) }
    }

    public func unlock() {
        if waiters.isEmpty { held = false } else { waiters.removeFirst().resume() }
    }
}

/// Serializes the tests that use the process-wide libtpms.
public enum LibtpmsTestLock {
    public static let shared = AsyncLock()

    /// Runs `body` while no other test holds libtpms.
    public static func run<T>(_ body: () async throws -> T) async rethrows -> T {
        await shared.lock()
        do {
            let r = try await body()
            await shared.unlock()
            return r
        } catch {
            await shared.unlock()
            throw error
        }
    }
}
