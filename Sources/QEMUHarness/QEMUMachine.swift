import EmulatorBackend
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Everything a QEMU-backed test needs, started together and torn down together: a work
/// directory, a swtpm (unless an external one is used), QEMU 7.2 with TCG and halt.bin, the
/// qtest bus and the QMP client.
///
/// `close()` (or deinit) quits QEMU, terminates swtpm, reaps both and removes the work
/// directory (unless it was passed in, or `QEMU_HARNESS_KEEP=1` is set for a post-mortem).
public final class QEMUMachine {
    public let workDirectory: WorkDirectory
    /// The swtpm this machine started; nil when QEMU uses an external ctrl socket.
    public let swtpm: SwtpmProcess?
    public let qemu: QEMUProcess
    /// The instance name: prefix of this machine's files in the work directory.
    public let name: String
    /// swtpm's state directory (`--tpmstate dir=`), when this machine started swtpm.
    public let swtpmStateDirectory: String?
    /// The ctrl socket QEMU's `-tpmdev emulator` connects to.
    public let ctrlSocketPath: String?
    /// Seconds spent starting swtpm (until its ctrl socket accepted a probe connection).
    public let swtpmStartupSeconds: Double
    private var closed = false

    /// The guest-physical bus (qtest).
    public var bus: QTestBus { qemu.qtest }
    /// The monitor.
    public var qmp: QMPClient { qemu.qmp }
    /// swtpm start + QEMU start, in seconds.
    public var startupSeconds: Double { swtpmStartupSeconds + qemu.startupSeconds }

    private static let counter = InstanceCounter()

    /// Starts swtpm (state in `swtpmStateDir`, or a fresh `<name>.swtpm` directory in the work
    /// directory) and QEMU with `-device tpm-tis`/`tpm-crb` on it.
    ///
    /// - Parameters:
    ///   - incoming: `-incoming URI` (one argv element), e.g. `exec:cat < /ABS/vm.bin`.
    ///   - workDirectory: share one directory between a migration's source and destination
    ///     (each machine's files get a unique prefix); nil creates a fresh `/tmp` directory.
    ///   - swtpmLogLevel: swtpm `--log level=` (20 dumps every ctrl command and data byte)
    ///     into `<name>.swtpm.log`; nil for no log.
    ///   - executable: the binary in QEMU's place (`QEMUOptions.executable`); nil = `$QEMU` or
    ///     `qemu-system-x86_64`.
    public static func start(machine: QEMUMachineType = .pc, device: TPMInterface = .tis,
                             incoming: String? = nil, swtpmStateDir: String? = nil,
                             tpmVersion: TPMVersion = .tpm20, extraArguments: [String] = [],
                             workDirectory: WorkDirectory? = nil, swtpmLogLevel: Int? = 20,
                             timeout: Double = 10, executable: String? = nil) throws(HarnessError) -> QEMUMachine {
        let work: WorkDirectory
        if let workDirectory { work = workDirectory } else { work = try makeWorkDirectory() }
        let name = "vm\(counter.next())"
        guard SwtpmProcess.findExecutable() != nil else {
            throw HarnessError(.notInstalled, "swtpm not found in PATH: \(QEMUProcess.installHint)")
        }
        _ = try QEMUProcess.findExecutable(executable)

        let stateDir: String
        if let swtpmStateDir {
            guard swtpmStateDir.hasPrefix("/") else {
                throw HarnessError(.invalidArgument, "swtpm state directory must be absolute: \(swtpmStateDir)")
            }
            stateDir = swtpmStateDir
        } else {
            stateDir = try work.subdirectory("\(name).swtpm")
        }
        var options = SwtpmProcess.Options(stateDirectory: stateDir)
        options.version = tpmVersion
        // Beside the other sockets, not in a caller's state directory (which may be long).
        options.ctrlSocketPath = work.file("\(name).ctrl.sock")
        if let swtpmLogLevel {
            options.logFile = work.file("\(name).swtpm.log")
            options.logLevel = swtpmLogLevel
        }
        let t0 = Deadline.now()
        let swtpm: SwtpmProcess
        do throws(BackendError) {
            swtpm = try SwtpmProcess.launch(options, timeout: timeout)
        } catch {
            throw HarnessError(error.code == .timeout ? .timeout : .swtpm, "swtpm did not start: \(error)",
                               operation: "start swtpm")
        }
        let swtpmSeconds = Double(Deadline.now() - t0) / 1e9

        var qopts = QEMUOptions(machine: machine, device: device, tpmCtrlSocket: swtpm.ctrlSocketPath,
                                incoming: incoming, extraArguments: extraArguments)
        qopts.name = name
        qopts.startTimeout = timeout
        qopts.executable = executable
        let qemu: QEMUProcess
        do throws(HarnessError) {
            qemu = try QEMUProcess.launch(qopts, in: work)
        } catch {
            var e = error
            let said = swtpm.diagnosticOutput()
            if !said.isEmpty { e.message += "; swtpm said: \(said.suffix(2000))" }
            swtpm.terminate(timeout: 1)
            if workDirectory == nil { work.remove() }
            throw e
        }
        return QEMUMachine(work: work, ownsWork: workDirectory == nil, swtpm: swtpm, qemu: qemu, name: name,
                           stateDir: stateDir, ctrl: swtpm.ctrlSocketPath, swtpmSeconds: swtpmSeconds)
    }

    /// Starts QEMU with `-tpmdev emulator` on an externally started swtpm's ctrl socket
    /// (`ctrlSocket`, absolute). The harness neither starts nor stops that swtpm (QEMU's
    /// `quit` still sends it CMD_SHUTDOWN, as QEMU does).
    public static func start(externalCtrlSocket ctrlSocket: String, machine: QEMUMachineType = .pc,
                             device: TPMInterface = .tis, incoming: String? = nil,
                             extraArguments: [String] = [], workDirectory: WorkDirectory? = nil,
                             timeout: Double = 10) throws(HarnessError) -> QEMUMachine {
        guard ctrlSocket.hasPrefix("/") else {
            throw HarnessError(.invalidArgument, "ctrl socket path must be absolute: \(ctrlSocket)")
        }
        let work: WorkDirectory
        if let workDirectory { work = workDirectory } else { work = try makeWorkDirectory() }
        let name = "vm\(counter.next())"
        var qopts = QEMUOptions(machine: machine, device: device, tpmCtrlSocket: ctrlSocket,
                                incoming: incoming, extraArguments: extraArguments)
        qopts.name = name
        qopts.startTimeout = timeout
        let qemu: QEMUProcess
        do throws(HarnessError) {
            qemu = try QEMUProcess.launch(qopts, in: work)
        } catch {
            if workDirectory == nil { work.remove() }
            throw error
        }
        return QEMUMachine(work: work, ownsWork: workDirectory == nil, swtpm: nil, qemu: qemu, name: name,
                           stateDir: nil, ctrl: ctrlSocket, swtpmSeconds: 0)
    }

    /// A fresh `/tmp/qemu-harness-XXXXXX`, kept after close when `QEMU_HARNESS_KEEP=1`.
    public static func makeWorkDirectory() throws(HarnessError) -> WorkDirectory {
        let keep = ProcessInfo.processInfo.environment["QEMU_HARNESS_KEEP"] == "1"
        return try WorkDirectory(prefix: "qemu-harness", removeOnClose: !keep)
    }

    private let ownsWork: Bool

    private init(work: WorkDirectory, ownsWork: Bool, swtpm: SwtpmProcess?, qemu: QEMUProcess, name: String,
                 stateDir: String?, ctrl: String?, swtpmSeconds: Double) {
        self.workDirectory = work
        self.ownsWork = ownsWork
        self.swtpm = swtpm
        self.qemu = qemu
        self.name = name
        self.swtpmStateDirectory = stateDir
        self.ctrlSocketPath = ctrl
        self.swtpmStartupSeconds = swtpmSeconds
    }

    /// An absolute path for a file of this machine in the work directory (`<name>.<suffix>`).
    public func file(_ suffix: String) -> String { workDirectory.file("\(name).\(suffix)") }

    /// QEMU's output, then swtpm's, for failure messages.
    public func diagnostics() -> String {
        var s = "--- QEMU (\(qemu.process.exitDescription)) ---\n" + qemu.output()
        if let swtpm { s += "\n--- swtpm ---\n" + swtpm.diagnosticOutput() }
        return s
    }

    /// Quits QEMU, terminates swtpm, reaps both, removes sockets and (if this machine created
    /// it) the work directory. Idempotent.
    public func close() {
        guard !closed else { return }
        closed = true
        qemu.close()
        if let swtpm {
            // QEMU's quit sent CMD_SHUTDOWN; give swtpm a moment before SIGTERM.
            var waited = 0
            while swtpm.isRunning && waited < 100 {
                usleep(10_000)
                waited += 1
            }
            swtpm.terminate(timeout: 1)
            if let ctrl = ctrlSocketPath { unlink(ctrl) }
        }
        if ownsWork { workDirectory.remove() }
    }

    /// Kills QEMU and swtpm at once (SIGKILL), reaps them, cleans up. Idempotent.
    public func kill() {
        guard !closed else { return }
        closed = true
        qemu.kill()
        swtpm?.kill()
        if swtpm != nil, let ctrl = ctrlSocketPath { unlink(ctrl) }
        if ownsWork { workDirectory.remove() }
    }

    deinit { close() }
}

/// Unique instance names within this test process.
final class InstanceCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func next() -> Int {
        lock.lock()
        defer { lock.unlock() }
        value += 1
        return value
    }
}
