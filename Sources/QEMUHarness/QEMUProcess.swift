import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The x86 machine types the project targets (QEMU 7.2: `pc-i440fx-7.2`, `pc-q35-7.2`).
public enum QEMUMachineType: String, Sendable, CaseIterable {
    case pc
    case q35
}

/// The TPM frontend device on the QEMU command line.
public enum TPMInterface: String, Sendable, CaseIterable {
    /// `-device tpm-tis` (ISA, 0xFED40000, IRQ 5).
    case tis = "tpm-tis"
    /// `-device tpm-crb`.
    case crb = "tpm-crb"
}

/// How to start one QEMU.
public struct QEMUOptions: Sendable {
    public var machine: QEMUMachineType = .pc
    /// The TPM device; nil starts QEMU without a TPM (then `tpmCtrlSocket` is ignored).
    public var device: TPMInterface? = .tis
    /// swtpm's ctrl socket (absolute), for `-chardev socket,path=... -tpmdev emulator`.
    public var tpmCtrlSocket: String?
    /// `-incoming URI`, passed as one argv element (`exec:cat < /ABS/FILE`, `defer`, `unix:...`).
    public var incoming: String?
    /// Appended to the command line as given.
    public var extraArguments: [String] = []
    /// Prefix of this instance's files in the work directory (`<name>.qtest.sock`...), so two
    /// QEMUs (a migration's source and destination) can share one directory.
    public var name: String = "qemu"
    /// The binary; nil = `$QEMU`, else `qemu-system-x86_64` on `PATH`.
    public var executable: String?
    /// How long to wait for the qtest connection and the QMP socket.
    public var startTimeout: Double = 10
    /// How long one qtest or QMP request may take.
    public var requestTimeout: Double = 5
    /// Whether `-qtest-log` records to `<name>.qtest.log` (else /dev/null). Without
    /// `-qtest-log` QEMU would log every qtest request to stderr.
    public var qtestLog: Bool = true

    public init(machine: QEMUMachineType = .pc, device: TPMInterface? = .tis, tpmCtrlSocket: String? = nil,
                incoming: String? = nil, extraArguments: [String] = []) {
        self.machine = machine
        self.device = device
        self.tpmCtrlSocket = tpmCtrlSocket
        self.incoming = incoming
        self.extraArguments = extraArguments
    }
}

/// A QEMU 7.2 `qemu-system-x86_64` started as a direct child with TCG and `halt.bin`, driven
/// through qtest (`QTestBus`, QEMU connects to our listening socket, as libqtest does) and QMP
/// (`QMPClient`, QEMU listens). `close()` quits, kills if needed, reaps and removes sockets.
public final class QEMUProcess {
    /// The program that failed to be found is named in the error with the fix.
    public static let installHint = "run scripts/install-deps.sh"

    public let options: QEMUOptions
    /// The command line spawned, argv[0] first.
    public let arguments: [String]
    public let process: ChildProcess
    /// The guest-physical bus over qtest.
    public let qtest: QTestBus
    /// The monitor.
    public let qmp: QMPClient
    /// Seconds from spawn until qtest was accepted and QMP negotiated.
    public let startupSeconds: Double
    /// The directory holding the sockets, logs and halt.bin (kept alive by this object).
    public let workDirectory: WorkDirectory
    public let qtestSocketPath: String
    public let qmpSocketPath: String
    /// QEMU's stdout and stderr.
    public let logPath: String
    public let qtestLogPath: String
    private var closed = false

    /// The binary `options.executable`, `$QEMU` or `qemu-system-x86_64` on `PATH`.
    public static func findExecutable(_ explicit: String? = nil) throws(HarnessError) -> String {
        if let explicit {
            guard let p = ChildProcess.which(explicit) else {
                throw HarnessError(.notInstalled, "\(explicit) is not executable: \(installHint)")
            }
            return p
        }
        if let env = ProcessInfo.processInfo.environment["QEMU"], !env.isEmpty {
            guard let p = ChildProcess.which(env) else {
                throw HarnessError(.notInstalled, "$QEMU=\(env) is not executable: \(installHint)")
            }
            return p
        }
        guard let p = ChildProcess.which("qemu-system-x86_64") else {
            throw HarnessError(.notInstalled, "qemu-system-x86_64 not found in PATH: \(installHint)")
        }
        return p
    }

    /// `qemu-system-x86_64 --version`, first line (`QEMU emulator version 7.2.22 (...)`).
    public static func version(executable: String? = nil) throws(HarnessError) -> String {
        let exe = try findExecutable(executable)
        let work = try WorkDirectory(prefix: "qemu-version")
        let out = work.file("version.txt")
        let child = try ChildProcess(executable: exe, arguments: ["--version"], outputPath: out)
        guard child.waitForExit(timeout: 10) else {
            child.terminate(grace: 0.1)
            throw HarnessError(.timeout, "\(exe) --version did not exit", operation: "qemu --version")
        }
        let text = child.outputTail()
        guard let first = text.split(separator: "\n").first, first.contains("QEMU") else {
            throw HarnessError(.spawn, "\(exe) --version said: \(text)", operation: "qemu --version")
        }
        return String(first)
    }

    /// QEMU's `,`-separated option syntax escapes a comma as `,,`.
    static func escapeOption(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }

    /// Writes halt.bin if missing, listens on the qtest socket, spawns QEMU, accepts its qtest
    /// connection and connects to QMP. On failure everything started is torn down and the
    /// error carries QEMU's stderr.
    public static func launch(_ options: QEMUOptions, in work: WorkDirectory) throws(HarnessError) -> QEMUProcess {
        let exe = try findExecutable(options.executable)
        guard !options.name.isEmpty, !options.name.contains("/") else {
            throw HarnessError(.invalidArgument, "bad instance name: \(options.name)")
        }
        let bios = work.file("halt.bin")
        if !FileManager.default.fileExists(atPath: bios) { try HaltBIOS.write(to: bios) }
        let qtestPath = work.file("\(options.name).qtest.sock")
        let qmpPath = work.file("\(options.name).qmp.sock")
        let logPath = work.file("\(options.name).log")
        let qtestLogPath = options.qtestLog ? work.file("\(options.name).qtest.log") : "/dev/null"
        unlink(qmpPath)

        var args = ["-machine", options.machine.rawValue, "-accel", "tcg",
                    "-qtest", "unix:\(escapeOption(qtestPath))", "-qtest-log", qtestLogPath,
                    "-nodefaults", "-display", "none"]
        if let device = options.device {
            guard let ctrl = options.tpmCtrlSocket, ctrl.hasPrefix("/") else {
                throw HarnessError(.invalidArgument, "a TPM device needs an absolute swtpm ctrl socket path")
            }
            args += ["-chardev", "socket,id=chrtpm,path=\(escapeOption(ctrl))",
                     "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                     "-device", "\(device.rawValue),tpmdev=tpm0"]
        }
        args += ["-qmp", "unix:\(escapeOption(qmpPath)),server=on,wait=off", "-bios", bios]
        if let incoming = options.incoming { args += ["-incoming", incoming] }
        args += options.extraArguments

        let listener = try UnixSocket.listen(path: qtestPath)
        defer {
            Glibc.close(listener)
            unlink(qtestPath)
        }
        let started = Deadline.now()
        let child = try ChildProcess(executable: exe, arguments: args, outputPath: logPath)
        let deadline = Deadline(seconds: options.startTimeout)
        let alive: () throws(HarnessError) -> Void = { () throws(HarnessError) -> Void in
            if !child.isRunning {
                throw HarnessError(.processExited, "QEMU exited during start-up (\(child.exitDescription))",
                                   operation: "start QEMU", processOutput: child.outputTail())
            }
        }
        do throws(HarnessError) {
            let fd = try UnixSocket.accept(listener: listener, deadline: deadline, stillWaiting: alive)
            let bus = QTestBus(fd: fd, timeout: options.requestTimeout)
            bus.diagnostics = { [weak child] in child?.outputTail() }
            let remaining = max(0.1, Double(deadline.remainingMilliseconds) / 1000)
            let qmp: QMPClient
            do throws(HarnessError) {
                qmp = try QMPClient.connect(path: qmpPath, timeout: remaining, stillWaiting: alive)
            } catch {
                bus.close()
                throw error
            }
            qmp.timeout = options.requestTimeout
            qmp.diagnostics = { [weak child] in child?.outputTail() }
            let seconds = Double(Deadline.now() - started) / 1e9
            return QEMUProcess(options: options, arguments: [exe] + args, process: child, qtest: bus, qmp: qmp,
                               startupSeconds: seconds, workDirectory: work, qtestSocketPath: qtestPath,
                               qmpSocketPath: qmpPath, logPath: logPath, qtestLogPath: qtestLogPath)
        } catch {
            var e = error
            // A socket that closed or timed out during start-up usually means QEMU is exiting
            // on a bad command line: say so, with its reason from stderr.
            if e.code != .processExited && child.waitForExit(timeout: 0.5) {
                e = HarnessError(.processExited,
                                 "QEMU exited during start-up (\(child.exitDescription)) after: \(e.message)",
                                 operation: e.operation, errno: e.errno)
            }
            child.terminate(grace: 0.5)
            unlink(qmpPath)
            e = e.with(output: child.outputTail())
            if e.operation == nil { e.operation = "start QEMU" }
            e.message += " (command: \(([exe] + args).joined(separator: " ")))"
            throw e
        }
    }

    private init(options: QEMUOptions, arguments: [String], process: ChildProcess, qtest: QTestBus, qmp: QMPClient,
                 startupSeconds: Double, workDirectory: WorkDirectory, qtestSocketPath: String,
                 qmpSocketPath: String, logPath: String, qtestLogPath: String) {
        self.options = options
        self.arguments = arguments
        self.process = process
        self.qtest = qtest
        self.qmp = qmp
        self.startupSeconds = startupSeconds
        self.workDirectory = workDirectory
        self.qtestSocketPath = qtestSocketPath
        self.qmpSocketPath = qmpSocketPath
        self.logPath = logPath
        self.qtestLogPath = qtestLogPath
    }

    /// QEMU's stdout and stderr so far (the last `limit` bytes).
    public func output(limit: Int = 16384) -> String { process.outputTail(limit: limit) }

    /// Whether QEMU is still running.
    public var isRunning: Bool { process.isRunning }

    /// Ends QEMU: QMP `quit` (QEMU then sends CMD_SHUTDOWN to swtpm), up to `grace` seconds
    /// to exit, then SIGTERM and SIGKILL; always reaped; sockets removed. Idempotent.
    public func close(grace: Double = 3) {
        guard !closed else { return }
        closed = true
        if process.isRunning && qmp.isOpen {
            try? qmp.quit(timeout: min(grace, 2))
        }
        qtest.close()
        qmp.close()
        if !process.waitForExit(timeout: grace) {
            process.terminate(grace: 1)
        }
        unlink(qmpSocketPath)
        unlink(qtestSocketPath)
    }

    /// SIGKILL at once (a crash, as the backend sees it), then reap and clean up. Idempotent.
    public func kill() {
        guard !closed else { return }
        closed = true
        process.signal(SIGKILL)
        process.terminate(grace: 1)
        qtest.close()
        qmp.close()
        unlink(qmpSocketPath)
        unlink(qtestSocketPath)
    }

    deinit { close(grace: 1) }
}
