/// QEMU's `RunState` (qapi/run-state.json), the subset this machine passes through.
public enum RunState: String, Sendable, Equatable {
    /// `-S`: not started yet.
    case prelaunch
    /// The guest runs.
    case running
    /// `stop`.
    case paused
    /// Waiting for or loading an incoming migration.
    case inmigrate
    /// An outgoing migration saves the device state.
    case finishMigrate = "finish-migrate"
    /// After a completed outgoing migration; `cont` runs the guest again.
    case postmigrate
    /// After `quit`.
    case shutdown

    /// `query-status`'s `running`.
    public var isRunning: Bool { self == .running }
}

/// QEMU's `MigrationStatus` names (qapi/migration.json) as `query-migrate` and the
/// MIGRATION event report them.
public enum MigrationStatus: String, Sendable, Equatable {
    /// No migration yet.
    case none
    /// Connecting / listening.
    case setup
    /// Streaming.
    case active
    /// Done.
    case completed
    /// Failed (`error-desc` says why).
    case failed
    /// `migrate_cancel`.
    case cancelled
}
