import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One asynchronous QMP event (`{"event": NAME, "data": {...}, "timestamp": {...}}`).
public struct QMPEvent: Equatable, Sendable, CustomStringConvertible {
    /// `STOP`, `RESUME`, `MIGRATION`, `SHUTDOWN`...
    public var name: String
    /// The `data` member, `.null` when absent.
    public var data: JSONValue
    /// QEMU's timestamp in microseconds since the epoch, when present.
    public var timestampMicroseconds: Int64?

    public init(name: String, data: JSONValue, timestampMicroseconds: Int64?) {
        self.name = name
        self.data = data
        self.timestampMicroseconds = timestampMicroseconds
    }

    public var description: String { "\(name) \(data.jsonText)" }
}

/// What `query-migrate` says.
public struct MigrationInfo: Equatable, Sendable {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`...
    public var status: String
    /// `error-desc`, present when the migration failed.
    public var errorDescription: String?
    /// The whole answer.
    public var raw: JSONValue

    public init(raw: JSONValue) {
        self.raw = raw
        self.status = raw["status"]?.stringValue ?? "none"
        self.errorDescription = raw["error-desc"]?.stringValue
    }
}

/// A QMP client for QEMU's monitor socket (`-qmp unix:PATH,server=on,wait=off`).
///
/// Requests carry an `id`; answers are matched by it; events that arrive in between are
/// queued in `events`. Not thread-safe: one test drives one client.
public final class QMPClient {
    private let connection: LineConnection
    private var nextID = 1
    /// How long one command may wait for its answer.
    public var timeout: Double
    /// Events not yet taken, oldest first.
    public private(set) var events: [QMPEvent] = []
    /// The greeting's `QMP` member (version, capabilities).
    public let greeting: JSONValue
    /// Supplies QEMU's stderr for error messages.
    var diagnostics: () -> String? = { nil }

    /// Connects to `path`, retrying until `timeout` (QEMU creates the socket during start-up),
    /// reads the greeting and negotiates capabilities (`qmp_capabilities`).
    /// `stillWaiting` is consulted between attempts and throws if QEMU has died.
    public static func connect(path: String, timeout: Double = 10,
                               stillWaiting: () throws(HarnessError) -> Void = {}) throws(HarnessError) -> QMPClient {
        let deadline = Deadline(seconds: timeout)
        var fd: Int32 = -1
        while true {
            if let connected = try UnixSocket.tryConnect(path: path) {
                fd = connected
                break
            }
            try stillWaiting()
            if deadline.expired {
                throw HarnessError(.timeout, "QMP socket \(path) did not accept a connection in \(timeout) s",
                                   operation: "QMP connect")
            }
            usleep(5_000)
        }
        let connection = LineConnection(fd: fd, name: "QMP", maxLineLength: 64 << 20)
        let greetingLine = try connection.readLine(deadline: deadline)
        guard let greeting = JSONValue.parse(greetingLine), let qmp = greeting["QMP"] else {
            connection.close()
            throw HarnessError(.protocolViolation, "not a QMP greeting: \(greetingLine.prefix(200))",
                               operation: "QMP greeting")
        }
        let client = QMPClient(connection: connection, greeting: qmp, timeout: timeout)
        try client.execute("qmp_capabilities")
        return client
    }

    private init(connection: LineConnection, greeting: JSONValue, timeout: Double) {
        self.connection = connection
        self.greeting = greeting
        self.timeout = timeout
    }

    /// Closes the socket.
    public func close() { connection.close() }

    /// Whether the socket is still open.
    public var isOpen: Bool { connection.isOpen }

    /// Runs a command and returns its `return` member; a QMP `error` throws `.qmpError`
    /// with the error's class and description.
    @discardableResult
    public func execute(_ command: String, arguments: [String: JSONValue]? = nil,
                        timeout: Double? = nil) throws(HarnessError) -> JSONValue {
        let id = nextID
        nextID += 1
        var request: [String: JSONValue] = ["execute": .string(command), "id": .int(Int64(id))]
        if let arguments { request["arguments"] = .object(arguments) }
        let deadline = Deadline(seconds: timeout ?? self.timeout)
        let operation = "QMP \(command)"
        do throws(HarnessError) {
            try connection.write(JSONValue.object(request).jsonText + "\n", deadline: deadline)
            while true {
                let line = try connection.readLine(deadline: deadline)
                guard let message = JSONValue.parse(line) else {
                    throw HarnessError(.protocolViolation, "QMP sent invalid JSON: \(line.prefix(200))")
                }
                if record(message) { continue }
                if let answerID = message["id"], answerID != .int(Int64(id)) {
                    // An answer to an earlier request that timed out: drop it.
                    continue
                }
                if let result = message["return"] { return result }
                if let error = message["error"] {
                    throw HarnessError(.qmpError, error["desc"]?.stringValue ?? error.jsonText,
                                       qmpClass: error["class"]?.stringValue)
                }
                throw HarnessError(.protocolViolation, "unexpected QMP message: \(line.prefix(200))")
            }
        } catch {
            var e = error.with(output: diagnostics())
            if e.operation == nil { e.operation = operation }
            throw e
        }
    }

    /// Queues an event message; false if `message` is not an event.
    private func record(_ message: JSONValue) -> Bool {
        guard let name = message["event"]?.stringValue else { return false }
        var micros: Int64?
        if let ts = message["timestamp"], let s = ts["seconds"]?.intValue, let us = ts["microseconds"]?.intValue {
            micros = s * 1_000_000 + us
        }
        events.append(QMPEvent(name: name, data: message["data"] ?? .null, timestampMicroseconds: micros))
        return true
    }

    /// Reads events that arrive within `waiting` seconds, without sending anything.
    public func pollEvents(waiting: Double = 0) throws(HarnessError) {
        let deadline = Deadline(seconds: waiting)
        while true {
            let line: String?
            do throws(HarnessError) {
                line = try connection.readLineIfAvailable(deadline: deadline)
            } catch {
                throw error.with(output: diagnostics())
            }
            guard let line else { return }
            guard let message = JSONValue.parse(line), record(message) else {
                throw HarnessError(.protocolViolation, "unsolicited QMP message: \(line.prefix(200))",
                                   processOutput: diagnostics())
            }
        }
    }

    /// Removes and returns the queued events.
    public func takeEvents() -> [QMPEvent] {
        defer { events.removeAll() }
        return events
    }

    /// Waits up to `timeout` for an event named `name` (already queued or arriving), removes
    /// it from the queue and returns it; nil at the deadline.
    public func waitForEvent(_ name: String, timeout: Double = 5) throws(HarnessError) -> QMPEvent? {
        let deadline = Deadline(seconds: timeout)
        while true {
            if let i = events.firstIndex(where: { $0.name == name }) {
                return events.remove(at: i)
            }
            if deadline.expired { return nil }
            try pollEvents(waiting: min(Double(deadline.remainingMilliseconds) / 1000, 0.05))
        }
    }

    // MARK: helpers

    /// `query-status` → the run state (`running`, `paused`, `postmigrate`, `inmigrate`...).
    public func queryStatus() throws(HarnessError) -> String {
        let r = try execute("query-status")
        guard let status = r["status"]?.stringValue else {
            throw HarnessError(.protocolViolation, "query-status without status: \(r.jsonText)", operation: "QMP query-status")
        }
        return status
    }

    /// `stop`.
    public func stop() throws(HarnessError) { try execute("stop") }

    /// `cont`.
    public func cont() throws(HarnessError) { try execute("cont") }

    /// `migrate` to `uri` (`exec:cat > /ABS/FILE`, `unix:/ABS/SOCK`, `tcp:...`); returns at once.
    public func migrate(uri: String) throws(HarnessError) {
        try execute("migrate", arguments: ["uri": .string(uri)])
    }

    /// `query-migrate`.
    public func queryMigrate() throws(HarnessError) -> MigrationInfo {
        MigrationInfo(raw: try execute("query-migrate"))
    }

    /// `migrate-set-parameters` with `max-bandwidth` in bytes per second (QEMU 7.2's
    /// default is 32 MiB/s).
    public func setMaxBandwidth(_ bytesPerSecond: Int64) throws(HarnessError) {
        try execute("migrate-set-parameters", arguments: ["max-bandwidth": .int(bytesPerSecond)])
    }

    /// Polls `query-migrate` until `completed` (returned) or `failed`/`cancelled` (thrown as
    /// `.migrationFailed` with QEMU's `error-desc`), or until `timeout` (`.timeout`).
    @discardableResult
    public func waitForMigration(timeout: Double = 10, pollInterval: Double = 0.005) throws(HarnessError) -> MigrationInfo {
        let deadline = Deadline(seconds: timeout)
        var last = MigrationInfo(raw: .null)
        while true {
            last = try queryMigrate()
            switch last.status {
            case "completed":
                return last
            case "failed", "cancelled":
                throw HarnessError(.migrationFailed,
                                   "migration \(last.status): \(last.errorDescription ?? last.raw.jsonText)",
                                   operation: "QMP query-migrate", processOutput: diagnostics())
            default:
                break
            }
            if deadline.expired {
                throw HarnessError(.timeout, "migration still \(last.status) after \(timeout) s: \(last.raw.jsonText)",
                                   operation: "QMP query-migrate", processOutput: diagnostics())
            }
            usleep(useconds_t(max(0, pollInterval) * 1e6))
        }
    }

    /// `quit`: QEMU answers, sends CMD_SHUTDOWN to swtpm, and exits. A connection closed
    /// before the answer arrives counts as success.
    public func quit(timeout: Double = 5) throws(HarnessError) {
        do throws(HarnessError) {
            try execute("quit", timeout: timeout)
        } catch where error.code == .connectionClosed {
            return
        }
    }
}
