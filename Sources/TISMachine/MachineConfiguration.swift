import EmulatorBackend

/// What `tis-sim machine` was asked to be, parsed from the TPM-relevant subset of QEMU 7.2's
/// command line (`qemu-options.hx`), in QEMU's syntax.
public struct MachineConfiguration: Sendable, Equatable {
    /// `-machine pc|q35`: the machine type a migration stream's configuration section names.
    public enum MachineType: String, Sendable, Equatable, CaseIterable {
        /// `-machine pc`: i440FX.
        case pc = "pc-i440fx-7.2"
        /// `-machine q35`: ICH9.
        case q35 = "pc-q35-7.2"

        /// Section ids QEMU 7.2 gives `tpm-emulator` and `tpm-tis` on this machine
        /// (runs-on-this-machine.md §3); a destination matches by idstr, the ids only make our
        /// streams look like QEMU's.
        public var sectionIDs: (emulator: UInt32, tis: UInt32) {
            switch self {
            case .pc: (4, 40)
            case .q35: (4, 39)
            }
        }
    }

    /// The TPM behind the device.
    public enum Backend: Sendable, Equatable {
        /// `-tpmdev emulator,chardev=ID` on `-chardev socket,id=ID,path=PATH`: swtpm's ctrl socket.
        case emulator(ctrlSocket: String)
        /// `-tpmdev libtpms,state=DIR[,version=2.0|1.2]` (ours): libtpms in process, NV state in DIR.
        case libtpms(stateDirectory: String, version: TPMVersion)
    }

    /// Where the qtest protocol runs.
    public enum QTestEndpoint: Sendable, Equatable {
        /// `-qtest unix:PATH`: the machine connects to PATH, as QEMU does.
        case unix(String)
        /// `-qtest stdio`.
        case stdio
    }

    /// `-machine`.
    public var machineType: MachineType = .pc
    /// `-tpmdev` (with its `-chardev`).
    public var backend: Backend
    /// `-device tpm-tis,tpmdev=ID`.
    public var tpmdevID: String
    /// `-qtest`; nil: no qtest channel.
    public var qtest: QTestEndpoint?
    /// `-qmp unix:PATH,server=on[,wait=on|off]`.
    public var qmpSocket: String?
    /// `wait=on`: start only once a QMP client has connected.
    public var qmpWait = false
    /// `-chardev socket,id=ID,path=PATH -mon chardev=ID,mode=control` (libqtest's way): the
    /// machine connects to PATH and speaks QMP there.
    public var qmpConnect: String?
    /// `-incoming URI` or `-incoming defer`.
    public var incoming: String?
    /// `-S`: do not start the guest (run state `prelaunch`; `cont` starts it).
    public var startPaused = false
    /// Options accepted and ignored, in order (`-display none`...), for `--verbose`.
    public var ignoredOptions: [String] = []

    /// A machine with nothing but the TPM configured (no qtest, no QMP, no incoming).
    public init(machineType: MachineType = .pc, backend: Backend, tpmdevID: String = "tpm0") {
        self.machineType = machineType
        self.backend = backend
        self.tpmdevID = tpmdevID
    }

    /// Options that take a value and do not concern the TPM: accepted, ignored.
    public static let ignoredWithValue: Set<String> = ["display", "accel", "bios", "m", "qtest-log", "name"]
    /// Flags that do not concern the TPM: accepted, ignored.
    public static let ignoredFlags: Set<String> = ["nodefaults", "nographic"]

    /// Parses QEMU-style arguments (`-opt value`, also `--opt value`). Errors name the option
    /// as QEMU does (`-tpmdev foo: …`); an unknown option is `unknownOption`.
    public static func parse(_ arguments: [String]) throws(MachineError) -> MachineConfiguration {
        var machine: MachineType = .pc
        /// id → (path, server).
        var chardevs: [String: (path: String, server: Bool, wait: Bool)] = [:]
        var monitor: (chardev: String, option: String)?
        var tpmdev: (id: String, backend: Backend?, chardev: String?, option: String)?
        var deviceTPM: (id: String, option: String)?
        var qtest: QTestEndpoint?
        var qmp: (path: String, wait: Bool)?
        var incoming: String?
        var paused = false
        var ignored: [String] = []

        var i = 0
        while i < arguments.count {
            let raw = arguments[i]
            guard raw.hasPrefix("-"), raw.count > 1 else {
                throw MachineError(.invalidOption, "unexpected argument '\(raw)' (QEMU options start with '-')", option: raw)
            }
            let name = raw.hasPrefix("--") ? String(raw.dropFirst(2)) : String(raw.dropFirst())
            i += 1
            func value() throws(MachineError) -> String {
                guard i < arguments.count else {
                    throw MachineError(.invalidOption, "requires an argument", option: raw)
                }
                defer { i += 1 }
                return arguments[i]
            }
            switch name {
            case "machine", "M":
                let v = try value()
                let opts = try QEMUOptionList.parse(v, impliedKey: "type", option: "-machine \(v)")
                switch opts.first(where: { $0.key == "type" })?.value ?? "pc" {
                case "pc", "pc-i440fx-7.2": machine = .pc
                case "q35", "pc-q35-7.2": machine = .q35
                case let other:
                    throw MachineError(.invalidOption, "unsupported machine type '\(other)' (tis-sim machine models pc and q35 as pc-i440fx-7.2 / pc-q35-7.2)",
                                       option: "-machine \(v)")
                }
                for o in opts where o.key != "type" { ignored.append("-machine …,\(o.key)=\(o.value)") }
            case "chardev":
                let v = try value()
                let o = "-chardev \(v)"
                let opts = try QEMUOptionList.parse(v, impliedKey: "backend", option: o)
                guard let kind = opts.value("backend") else { throw MachineError(.invalidOption, "chardev backend required", option: o) }
                guard kind == "socket" else {
                    throw MachineError(.invalidOption, "chardev backend '\(kind)' is not supported by tis-sim machine (only socket,path=…)", option: o)
                }
                guard let id = opts.value("id") else { throw MachineError(.invalidOption, "Parameter 'id' is missing", option: o) }
                guard let path = opts.value("path") else {
                    throw MachineError(.invalidOption, "tis-sim machine needs a UNIX socket chardev (path=…)", option: o)
                }
                var server = false
                var wait = true
                for opt in opts where !["backend", "id", "path"].contains(opt.key) {
                    switch (opt.key, opt.value) {
                    case ("server", "on"), ("server", ""): server = true
                    case ("server", "off"): server = false
                    case ("wait", "on"), ("wait", ""): wait = true
                    case ("wait", "off"), ("nowait", ""): wait = false
                    default: throw MachineError(.invalidOption, "Invalid parameter '\(opt.key)'", option: o)
                    }
                }
                chardevs[id] = (path, server, wait)
            case "tpmdev":
                let v = try value()
                let o = "-tpmdev \(v)"
                guard tpmdev == nil else { throw MachineError(.invalidOption, "tis-sim machine models one TPM", option: o) }
                let opts = try QEMUOptionList.parse(v, impliedKey: "type", option: o)
                guard let id = opts.value("id") else { throw MachineError(.invalidOption, "Parameter 'id' is missing", option: o) }
                switch opts.value("type") {
                case "emulator":
                    guard let cd = opts.value("chardev") else { throw MachineError(.invalidOption, "tpm-emulator: missing chardev", option: o) }
                    for k in opts.map(\.key) where !["type", "id", "chardev"].contains(k) {
                        throw MachineError(.invalidOption, "Invalid parameter '\(k)'", option: o)
                    }
                    tpmdev = (id, nil, cd, o)
                case "libtpms":
                    guard let dir = opts.value("state"), !dir.isEmpty else {
                        throw MachineError(.invalidOption, "libtpms: missing state=DIR (the TPM's NV state directory)", option: o)
                    }
                    var version = TPMVersion.tpm20
                    switch opts.value("version") {
                    case nil, "2", "2.0": break
                    case "1.2": version = .tpm12
                    case let other?: throw MachineError(.invalidOption, "libtpms: version must be 2.0 or 1.2, not '\(other)'", option: o)
                    }
                    for k in opts.map(\.key) where !["type", "id", "state", "version"].contains(k) {
                        throw MachineError(.invalidOption, "Invalid parameter '\(k)'", option: o)
                    }
                    tpmdev = (id, .libtpms(stateDirectory: dir, version: version), nil, o)
                case let other:
                    throw MachineError(.invalidOption, "Parameter 'type' expects a TPM backend type (tis-sim machine: emulator or libtpms, not '\(other ?? "")')", option: o)
                }
            case "device":
                let v = try value()
                let o = "-device \(v)"
                let opts = try QEMUOptionList.parse(v, impliedKey: "driver", option: o)
                guard opts.value("driver") == "tpm-tis" else {
                    throw MachineError(.invalidOption, "tis-sim machine models only -device tpm-tis, not '\(opts.value("driver") ?? "")'", option: o)
                }
                guard deviceTPM == nil else { throw MachineError(.invalidOption, "tis-sim machine models one TPM", option: o) }
                guard let id = opts.value("tpmdev") else { throw MachineError(.invalidOption, "tpm-tis: parameter 'tpmdev' is missing", option: o) }
                for k in opts.map(\.key) where !["driver", "tpmdev", "id"].contains(k) {
                    throw MachineError(.invalidOption, "Property 'tpm-tis.\(k)' not supported by tis-sim machine", option: o)
                }
                deviceTPM = (id, o)
            case "qtest":
                let v = try value()
                if v == "stdio" {
                    qtest = .stdio
                } else if v.hasPrefix("unix:") {
                    let spec = try QEMUOptionList.parse(String(v.dropFirst(5)), impliedKey: "path", option: "-qtest \(v)")
                    guard let p = spec.value("path"), !p.isEmpty else { throw MachineError(.invalidOption, "missing socket path", option: "-qtest \(v)") }
                    if let s = spec.value("server"), s == "on" || s.isEmpty {
                        throw MachineError(.invalidOption, "tis-sim machine connects to the qtest socket as QEMU does; server mode is not supported", option: "-qtest \(v)")
                    }
                    qtest = .unix(p)
                } else {
                    throw MachineError(.invalidOption, "tis-sim machine supports -qtest unix:PATH and -qtest stdio", option: "-qtest \(v)")
                }
            case "qmp":
                let v = try value()
                guard v.hasPrefix("unix:") else {
                    throw MachineError(.invalidOption, "tis-sim machine supports -qmp unix:PATH,server=on,wait=off", option: "-qmp \(v)")
                }
                let spec = try QEMUOptionList.parse(String(v.dropFirst(5)), impliedKey: "path", option: "-qmp \(v)")
                guard let p = spec.value("path"), !p.isEmpty else { throw MachineError(.invalidOption, "missing socket path", option: "-qmp \(v)") }
                var server = false
                var wait = true
                for o in spec where o.key != "path" {
                    switch (o.key, o.value) {
                    case ("server", "on"), ("server", ""): server = true
                    case ("server", "off"): server = false
                    case ("wait", "on"), ("wait", ""): wait = true
                    case ("wait", "off"), ("nowait", ""): wait = false
                    default: throw MachineError(.invalidOption, "Invalid parameter '\(o.key)'", option: "-qmp \(v)")
                    }
                }
                guard server else {
                    throw MachineError(.invalidOption, "tis-sim machine serves QMP (server=on); connecting out is not supported", option: "-qmp \(v)")
                }
                qmp = (p, wait)
            case "mon":
                let v = try value()
                let o = "-mon \(v)"
                let opts = try QEMUOptionList.parse(v, impliedKey: "chardev", option: o)
                guard let cd = opts.value("chardev") else { throw MachineError(.invalidOption, "Parameter 'chardev' is missing", option: o) }
                guard opts.value("mode") == "control" else {
                    throw MachineError(.invalidOption, "tis-sim machine has a QMP monitor only (mode=control), no HMP", option: o)
                }
                for k in opts.map(\.key) where !["chardev", "mode", "pretty", "id"].contains(k) {
                    throw MachineError(.invalidOption, "Invalid parameter '\(k)'", option: o)
                }
                monitor = (cd, o)
            case "incoming":
                incoming = try value()
            case "S":
                paused = true
            default:
                if ignoredWithValue.contains(name) {
                    ignored.append("\(raw) \(try value())")
                } else if ignoredFlags.contains(name) {
                    ignored.append(raw)
                } else {
                    throw MachineError(.unknownOption, "invalid option (tis-sim machine accepts -machine, -chardev, -tpmdev, -device tpm-tis, -qtest, -qmp, -mon, -incoming, -S, and ignores \((ignoredWithValue.union(ignoredFlags)).sorted().map { "-" + $0 }.joined(separator: " ")))",
                                       option: raw)
                }
            }
        }

        guard let tpmdev else {
            throw MachineError(.invalidOption, "tis-sim machine needs a TPM: -tpmdev emulator,id=…,chardev=… or -tpmdev libtpms,id=…,state=DIR", option: "-tpmdev")
        }
        guard let deviceTPM else {
            throw MachineError(.invalidOption, "tis-sim machine needs -device tpm-tis,tpmdev=\(tpmdev.id)", option: "-device")
        }
        guard deviceTPM.id == tpmdev.id else {
            throw MachineError(.invalidOption, "Property 'tpm-tis.tpmdev' can't find value '\(deviceTPM.id)'", option: deviceTPM.option)
        }
        let backend: Backend
        if let b = tpmdev.backend {
            backend = b
        } else {
            let cd = tpmdev.chardev ?? ""
            guard let chardev = chardevs[cd] else {
                throw MachineError(.invalidOption, "tpm-emulator: tpm chardev '\(cd)' not found", option: tpmdev.option)
            }
            guard !chardev.server else {
                throw MachineError(.invalidOption, "tpm-emulator: the chardev must connect to swtpm's ctrl socket (server=off)", option: tpmdev.option)
            }
            backend = .emulator(ctrlSocket: chardev.path)
        }
        var qmpConnect: String?
        if let monitor {
            guard let chardev = chardevs[monitor.chardev] else {
                throw MachineError(.invalidOption, "chardev \"\(monitor.chardev)\" not found", option: monitor.option)
            }
            guard qmp == nil else { throw MachineError(.invalidOption, "tis-sim machine has one QMP monitor", option: monitor.option) }
            if chardev.server { qmp = (chardev.path, chardev.wait) } else { qmpConnect = chardev.path }
        }
        var c = MachineConfiguration(machineType: machine, backend: backend, tpmdevID: tpmdev.id)
        c.qtest = qtest
        c.qmpSocket = qmp?.path
        c.qmpWait = qmp?.wait ?? false
        c.qmpConnect = qmpConnect
        c.incoming = incoming
        c.startPaused = paused
        c.ignoredOptions = ignored
        return c
    }
}

/// QEMU's `QemuOpts` syntax: `value,key=value,key=value`, the first element's key implied,
/// `,,` an escaped comma, a bare `key` meaning `key=` (QEMU's `on` for booleans).
struct QEMUOptionList {
    struct Option: Equatable { var key: String; var value: String }

    static func parse(_ text: String, impliedKey: String, option: String) throws(MachineError) -> [Option] {
        var parts: [String] = []
        var cur = ""
        var chars = Array(text)
        var i = 0
        while i < chars.count {
            if chars[i] == "," {
                if i + 1 < chars.count && chars[i + 1] == "," {
                    cur.append(",")
                    i += 2
                    continue
                }
                parts.append(cur)
                cur = ""
            } else {
                cur.append(chars[i])
            }
            i += 1
        }
        parts.append(cur)
        chars.removeAll()
        var out: [Option] = []
        for (n, p) in parts.enumerated() {
            if let eq = p.firstIndex(of: "=") {
                out.append(Option(key: String(p[..<eq]), value: String(p[p.index(after: eq)...])))
            } else if n == 0 {
                out.append(Option(key: impliedKey, value: p))
            } else if !p.isEmpty {
                out.append(Option(key: p, value: ""))
            }
        }
        var seen: Set<String> = []
        for o in out where !seen.insert(o.key).inserted {
            throw MachineError(.invalidOption, "Parameter '\(o.key)' given twice", option: option)
        }
        return out
    }
}

extension Array where Element == QEMUOptionList.Option {
    func value(_ key: String) -> String? { first { $0.key == key }?.value }
}
