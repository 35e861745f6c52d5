import Foundation

/// QEMU's QMP dispatcher (qapi/qmp-dispatch.c, monitor/qmp.c) for the commands this machine
/// has, with QEMU 7.2's error classes and descriptions for malformed input, unknown commands
/// and bad arguments (captured from qemu-system-x86_64 7.2.22 on this machine).
enum QMPCommands {
    struct Failure: Error {
        var errorClass: String
        var desc: String
        init(_ desc: String, class errorClass: String = "GenericError") {
            self.errorClass = errorClass
            self.desc = desc
        }
    }

    static func error(_ errorClass: String, _ desc: String, id: QMPValue?) -> QMPValue {
        var m: [(String, QMPValue)] = [("error", .object([("class", .string(errorClass)), ("desc", .string(desc))]))]
        if let id { m.append(("id", id)) }
        return .object(m)
    }

    /// The commands, for `query-commands`.
    static let names = ["qmp_capabilities", "query-status", "stop", "cont", "quit", "query-version", "query-commands",
                        "migrate", "migrate-incoming", "query-migrate", "migrate_cancel", "migrate-set-capabilities",
                        "query-migrate-capabilities", "migrate-set-parameters", "query-migrate-parameters"]

    /// One message → (reply, negotiated after it, whether it was `quit`).
    static func handle(_ bytes: [UInt8], negotiated: Bool, machine: Machine) -> (QMPValue, Bool, Bool) {
        let value: QMPValue
        do throws(QMPJSONParser.Failure) {
            value = try QMPJSONParser.parse(bytes)
        } catch {
            return (Self.error("GenericError", error.message, id: nil), negotiated, false)
        }
        guard case .object(let members) = value else {
            return (Self.error("GenericError", "QMP input must be a JSON object", id: nil), negotiated, false)
        }
        let id = value["id"]
        for (k, _) in members where !["execute", "arguments", "id", "exec-oob"].contains(k) {
            return (Self.error("GenericError", "QMP input member '\(k)' is unexpected", id: id), negotiated, false)
        }
        guard let exec = value["execute"] ?? value["exec-oob"] else {
            return (Self.error("GenericError", "QMP input lacks member 'execute'", id: id), negotiated, false)
        }
        guard let name = exec.stringValue else {
            return (Self.error("GenericError", "QMP input member 'execute' must be a string", id: id), negotiated, false)
        }
        var args: [(String, QMPValue)] = []
        if let a = value["arguments"] {
            guard let m = a.objectMembers else {
                return (Self.error("GenericError", "QMP input member 'arguments' must be an object", id: id), negotiated, false)
            }
            args = m
        }
        if !negotiated && name != "qmp_capabilities" {
            return (Self.error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", id: id), false, false)
        }
        if negotiated && name == "qmp_capabilities" {
            return (Self.error("CommandNotFound", "Capabilities negotiation is already complete, command ignored", id: id), true, false)
        }
        guard names.contains(name) else {
            return (Self.error("CommandNotFound", "The command \(name) has not been found", id: id), negotiated, false)
        }
        do throws(Failure) {
            let result = try run(name, Arguments(args), machine: machine)
            var m: [(String, QMPValue)] = [("return", result)]
            if let id { m.append(("id", id)) }
            return (.object(m), true, name == "quit")
        } catch {
            return (Self.error(error.errorClass, error.desc, id: id), negotiated, false)
        }
    }

    /// Argument checking as QEMU's generated visitors do it.
    struct Arguments {
        let members: [(String, QMPValue)]
        private var used: Set<String> = []
        init(_ m: [(String, QMPValue)]) { members = m }

        mutating func string(_ k: String, required: Bool = false) throws(Failure) -> String? {
            used.insert(k)
            guard let v = members.first(where: { $0.0 == k })?.1 else {
                if required { throw Failure("Parameter '\(k)' is missing") }
                return nil
            }
            guard let s = v.stringValue else { throw Failure("Invalid parameter type for '\(k)', expected: string") }
            return s
        }

        mutating func bool(_ k: String) throws(Failure) -> Bool? {
            used.insert(k)
            guard let v = members.first(where: { $0.0 == k })?.1 else { return nil }
            guard let b = v.boolValue else { throw Failure("Invalid parameter type for '\(k)', expected: boolean") }
            return b
        }

        mutating func int(_ k: String) throws(Failure) -> Int64? {
            used.insert(k)
            guard let v = members.first(where: { $0.0 == k })?.1 else { return nil }
            guard let i = v.intValue else { throw Failure("Invalid parameter type for '\(k)', expected: integer") }
            return i
        }

        mutating func any(_ k: String) -> QMPValue? {
            used.insert(k)
            return members.first(where: { $0.0 == k })?.1
        }

        /// QEMU checks for unexpected members after visiting the known ones.
        func finish() throws(Failure) {
            for (k, _) in members where !used.contains(k) { throw Failure("Parameter '\(k)' is unexpected") }
        }
    }

    static func run(_ name: String, _ a: Arguments, machine m: Machine) throws(Failure) -> QMPValue {
        var a = a
        switch name {
        case "qmp_capabilities":
            _ = a.any("enable")
            try a.finish()
            return .object([])
        case "query-status":
            try a.finish()
            let s = m.runState
            return .object([("status", .string(s.rawValue)), ("singlestep", .bool(false)), ("running", .bool(s.isRunning))])
        case "query-version":
            try a.finish()
            return QMPServer.greeting["QMP"]?["version"] ?? .object([])
        case "query-commands":
            try a.finish()
            return .array(names.map { .object([("name", .string($0))]) })
        case "stop":
            try a.finish()
            m.stop()
            return .object([])
        case "cont":
            try a.finish()
            m.cont()
            return .object([])
        case "quit":
            try a.finish()
            return .object([])
        case "migrate":
            let uri = try a.string("uri", required: true) ?? ""
            _ = try a.bool("blk")
            _ = try a.bool("inc")
            _ = try a.bool("detach")
            if try a.bool("resume") == true { throw Failure("Migration resume is only supported for postcopy") }
            try a.finish()
            try m.migrate(uri: uri)
            return .object([])
        case "migrate-incoming":
            let uri = try a.string("uri", required: true) ?? ""
            // QEMU 9.1+: `exit-on-error: false` keeps the destination alive after a failed load.
            let exitOnError = try a.bool("exit-on-error") ?? true
            try a.finish()
            try m.migrateIncoming(uri: uri, exitOnError: exitOnError)
            return .object([])
        case "query-migrate":
            try a.finish()
            return m.migrationInfo()
        case "migrate_cancel":
            try a.finish()
            m.cancelMigration()
            return .object([])
        case "migrate-set-capabilities":
            guard let list = a.any("capabilities") else { throw Failure("Parameter 'capabilities' is missing") }
            try a.finish()
            guard case .array(let items) = list else { throw Failure("Invalid parameter type for 'capabilities', expected: array") }
            var changes: [(String, Bool)] = []
            for (i, item) in items.enumerated() {
                guard let cap = item["capability"]?.stringValue else { throw Failure("Parameter 'capabilities[\(i)].capability' is missing") }
                guard let state = item["state"]?.boolValue else { throw Failure("Parameter 'capabilities[\(i)].state' is missing") }
                guard Machine.migrationCapabilityNames.contains(cap) else {
                    throw Failure("Parameter 'capabilities[\(i)].capability' does not accept value '\(cap)'")
                }
                changes.append((cap, state))
            }
            try m.setCapabilities(changes)
            return .object([])
        case "query-migrate-capabilities":
            try a.finish()
            return m.capabilityList()
        case "migrate-set-parameters":
            var bandwidth: Int64?
            for (k, v) in a.members {
                guard MigrationParameters.names.contains(k) else { throw Failure("Parameter '\(k)' is unexpected") }
                if k == "max-bandwidth" {
                    guard let i = v.intValue, i >= 0 else { throw Failure("Invalid parameter type for 'max-bandwidth', expected: integer") }
                    bandwidth = i
                }
            }
            if let bandwidth { m.setMaxBandwidth(bandwidth) }
            return .object([])
        case "query-migrate-parameters":
            try a.finish()
            return m.parameterList()
        default:
            throw Failure("The command \(name) has not been found", class: "CommandNotFound")
        }
    }
}
