/// QEMU's `RunState` (qapi/run-state.json), the subset this machine passes through.
public enum RunState: String, Sendable, Equatable {
    case prelaunch
    case running
    case paused
    case inmigrate
    case finishMigrate = "finish-migrate"
    case postmigrate
    case shutdown

    /// `query-status`'s `running`.
    public var isRunning: Bool { self == .running }
}

/// QEMU's `MigrationStatus` names (qapi/migration.json) as `query-migrate` and the
/// MIGRATION event report them.
public enum MigrationStatus: String, Sendable, Equatable {
    case none
    case setup
    case active
    case completed
    case failed
    case cancelled
}
