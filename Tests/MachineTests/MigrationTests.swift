import Foundation
import QEMUHarness
import Testing
#if canImport(Glibc)
import Glibc
#endif

extension MachineSuite {
    /// Migrations between tis-sim machines and QEMU 7.2, as in QEMU's TPM migration documentation
    /// (save to a file and restore, network migration, several in a row, fall back to the source).
    @Suite("Migration")
    struct MigrationTests {
        /// `migrate-incoming tcp:127.0.0.1:0` on a `-incoming defer` destination; the port it got.
        func listenTCP(_ vm: VM) throws -> Int {
            try vm.qmp.execute("migrate-incoming", arguments: ["uri": .string("tcp:127.0.0.1:0")])
            let info = try vm.qmp.execute("query-migrate")
            let port = info["socket-address"]?.arrayValue?.first?["port"]?.stringValue
            return try #require(port.flatMap(Int.init), "no socket-address in \(info.jsonText)")
        }

        /// Source prepared, migrated over `transport`, destination checked register for register
        /// and for PCR 16; the source is `postmigrate` and resumes with `cont`.
        func migrate(from srcKind: VMKind, to dstKind: VMKind, transport: String,
                     machine: QEMUMachineType = .pc) throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let source = try VM(srcKind, work: work, machine: machine)
            defer { source.close() }
            try prepareSource(source.bus)
            let before = try snapshot(source.bus)
            let dest: VM
            switch transport {
            case "file":
                let stream = work.file("vm.bin")
                try source.qmp.migrate(uri: "exec:cat > \(stream)")
                try source.qmp.waitForMigration(timeout: 10)
                dest = try VM(dstKind, work: work, incoming: "exec:cat < \(stream)", machine: machine)
            case "tcp":
                dest = try VM(dstKind, work: work, incoming: "defer", machine: machine)
                let port = try listenTCP(dest)
                try source.qmp.migrate(uri: "tcp:127.0.0.1:\(port)")
                try source.qmp.waitForMigration(timeout: 10)
            default:
                Issue.record("unknown transport \(transport)")
                return
            }
            defer { dest.close() }
            try dest.waitIncoming()
            #expect(try source.qmp.queryStatus() == "postmigrate")
            // The source still answers its registers.
            #expect(try snapshot(source.bus) == before)
            #expect(try snapshot(dest.bus) == before, "\(srcKind) → \(dstKind) by \(transport): registers differ")
            try checkPCR16AfterMigration(dest.bus)
            // The source's TPM kept running: cont, and it answers the same PCR.
            try source.qmp.cont()
            #expect(try source.qmp.queryStatus() == "running")
            _ = try (0..<31).map { _ in try source.bus.readb(TIS.reg(0, TIS.dataFIFO)) }
            #expect(try readPCR16(source.bus) == pcr16AfterProbe)
        }

        @Test("tis-sim → tis-sim by file (exec:cat), swtpm")
        func fileSwtpm() throws { try migrate(from: .tisSimSwtpm, to: .tisSimSwtpm, transport: "file") }

        @Test("tis-sim → tis-sim by live tcp, swtpm")
        func tcpSwtpm() throws { try migrate(from: .tisSimSwtpm, to: .tisSimSwtpm, transport: "tcp") }

        @Test("tis-sim → tis-sim by file, libtpms")
        func fileLibtpms() throws { try migrate(from: .tisSimLibtpms, to: .tisSimLibtpms, transport: "file") }

        @Test("tis-sim (libtpms) → tis-sim (swtpm) by live tcp")
        func libtpmsToSwtpm() throws { try migrate(from: .tisSimLibtpms, to: .tisSimSwtpm, transport: "tcp") }

        @Test("tis-sim → QEMU 7.2 by file")
        func toQEMU() throws { try migrate(from: .tisSimSwtpm, to: .qemu, transport: "file") }

        @Test("tis-sim (libtpms) → QEMU 7.2 by live tcp")
        func libtpmsToQEMU() throws { try migrate(from: .tisSimLibtpms, to: .qemu, transport: "tcp") }

        @Test("QEMU 7.2 → tis-sim by live tcp (the whole stream: RAM and every device)")
        func fromQEMUtcp() throws { try migrate(from: .qemu, to: .tisSimSwtpm, transport: "tcp") }

        @Test("QEMU 7.2 → tis-sim (libtpms) by file")
        func fromQEMUFile() throws { try migrate(from: .qemu, to: .tisSimLibtpms, transport: "file") }

        /// The ctrl commands a source and a destination send to swtpm over their lifetime.
        func ctrlSequences(_ kind: VMKind) throws -> (source: [UInt32], destination: [UInt32]) {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            // A driver reads ACCESS first. QEMU asks swtpm for the established flag on the first
            // ACCESS read (then caches it); TISDevice asks right after INIT / the restore, off the
            // MMIO path. With ACCESS read before the first command both orders are the same.
            let source = try VM(kind, work: work, swtpmLog: true)
            _ = try source.bus.readb(TIS.reg(0, TIS.access))
            try prepareSource(source.bus)
            let stream = work.file("vm.bin")
            try source.qmp.migrate(uri: "exec:cat > \(stream)")
            try source.qmp.waitForMigration()
            source.close()
            let dest = try VM(kind, work: work, incoming: "exec:cat < \(stream)", swtpmLog: true)
            try dest.waitIncoming()
            _ = try dest.bus.readb(TIS.reg(0, TIS.access))
            try checkPCR16AfterMigration(dest.bus)
            dest.close()
            return (try source.swtpmCtrlCommands(), try dest.swtpmCtrlCommands())
        }

        @Test("swtpm sees the same ctrl commands from tis-sim as from QEMU 7.2 (start, commands, save, load, quit)")
        func sameCtrlSequences() throws {
            let qemu = try ctrlSequences(.qemu)
            let tisSim = try ctrlSequences(.tisSimSwtpm)
            // Source: probe, SET_DATAFD, GET_CAPABILITY, STOP, SET_BUFFERSIZE, STOP, SET_BUFFERSIZE,
            // INIT, GET_TPMESTABLISHED, SET_LOCALITY, GET_STATEBLOB ×3, SHUTDOWN; destination: the
            // same start without INIT, STOP, SET_STATEBLOB ×2, INIT(1), GET_TPMESTABLISHED,
            // SET_LOCALITY, SHUTDOWN (runs-on-this-machine.md §1).
            #expect(qemu.source == [0x01, 0x10, 0x01, 0x0E, 0x11, 0x0E, 0x11, 0x02, 0x04, 0x05, 0x0C, 0x0C, 0x0C, 0x03])
            #expect(qemu.destination == [0x01, 0x10, 0x01, 0x0E, 0x11, 0x0E, 0x11, 0x0E, 0x0D, 0x0D, 0x02, 0x04, 0x05, 0x03])
            #expect(qemu.source.contains(0x0C) && qemu.destination.contains(0x0D))
            #expect(tisSim.source == qemu.source, "source: QEMU \(qemu.source) tis-sim \(tisSim.source)")
            #expect(tisSim.destination == qemu.destination, "destination: QEMU \(qemu.destination) tis-sim \(tisSim.destination)")
        }

        @Test("q35: tis-sim → QEMU 7.2 by file, QEMU 7.2 → tis-sim (libtpms) by tcp")
        func q35() throws {
            try migrate(from: .tisSimSwtpm, to: .qemu, transport: "file", machine: .q35)
            try migrate(from: .qemu, to: .tisSimLibtpms, transport: "tcp", machine: .q35)
        }

        @Test("tis-sim → tis-sim → tis-sim, then file: and unix: transports")
        func chain() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let a = try VM(.tisSimSwtpm, work: work)
            defer { a.close() }
            try prepareSource(a.bus)
            let before = try snapshot(a.bus)
            // a → b over a UNIX socket.
            let b = try VM(.tisSimSwtpm, work: work, incoming: "defer")
            defer { b.close() }
            let sock = work.file("b.mig.sock")
            try b.qmp.execute("migrate-incoming", arguments: ["uri": .string("unix:\(sock)")])
            try a.qmp.migrate(uri: "unix:\(sock)")
            try a.qmp.waitForMigration()
            try b.waitIncoming()
            #expect(try snapshot(b.bus) == before)
            // b → c through a file: URI.
            let stream = work.file("b.bin")
            try b.qmp.migrate(uri: "file:\(stream)")
            try b.qmp.waitForMigration()
            let c = try VM(.tisSimLibtpms, work: work, incoming: "file:\(stream)")
            defer { c.close() }
            try c.waitIncoming()
            #expect(try snapshot(c.bus) == before)
            try checkPCR16AfterMigration(c.bus)
            // and c migrates again, after running.
            let stream2 = work.file("c.bin")
            try c.qmp.migrate(uri: "exec:cat > \(stream2)")
            try c.qmp.waitForMigration()
            let d = try VM(.tisSimSwtpm, work: work, incoming: "exec:cat < \(stream2)")
            defer { d.close() }
            try d.waitIncoming()
            #expect(try readPCR16(d.bus) == pcr16AfterProbe)
        }

        /// A TCP listener on 127.0.0.1 that accepts and then reads `limit` bytes (nil: never
        /// reads) before closing; `done` is signalled when it has closed.
        func stalledDestination(readLimit limit: Int?) throws -> (port: UInt16, listener: Int32, done: DispatchSemaphore) {
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            try withUnsafeMutablePointer(to: &addr) { p in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    try #require(bind(listener, sa, len) == 0 && listen(listener, 1) == 0)
                    try #require(getsockname(listener, sa, &len) == 0)
                }
            }
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                let fd = accept(listener, nil, nil)
                if let limit {
                    var buf = [UInt8](repeating: 0, count: limit)
                    var got = 0
                    while got < limit {
                        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, limit - got) }
                        if n <= 0 { break }
                        got += n
                    }
                } else {
                    usleep(3_000_000)
                }
                close(fd)
                done.signal()
            }
            return (UInt16(bigEndian: addr.sin_port), listener, done)
        }

        @Test("migrate_cancel: the source is cancelled and runs on")
        func cancel() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let source = try VM(.tisSimLibtpms, work: work)
            defer { source.close() }
            try prepareSource(source.bus)
            let before = try snapshot(source.bus)
            let (port, listener, _) = try stalledDestination(readLimit: nil)
            defer { close(listener) }
            try source.qmp.setMaxBandwidth(20_000)
            try source.qmp.migrate(uri: "tcp:127.0.0.1:\(port)")
            usleep(150_000)
            try source.qmp.execute("migrate_cancel")
            #expect(throws: HarnessError.self) { try source.qmp.waitForMigration(timeout: 5) }
            #expect(try source.qmp.queryMigrate().status == "cancelled")
            #expect(try source.qmp.waitForEvent("RESUME", timeout: 3) != nil)
            #expect(try source.qmp.queryStatus() == "running")
            #expect(try snapshot(source.bus) == before)
        }

        @Test("a destination that goes away mid-stream: the source runs on, cont, same PCR 16")
        func destinationGoesAway() throws {
            let work = try QEMUMachine.makeWorkDirectory()
            defer { work.remove() }
            let source = try VM(.tisSimSwtpm, work: work)
            defer { source.close() }
            try prepareSource(source.bus)
            let before = try snapshot(source.bus)

            // A destination that reads the first 512 bytes and dies (unread data: RST).
            let (port, listener, done) = try stalledDestination(readLimit: 512)
            defer { close(listener) }
            // Slow enough (2 KB per 100 ms) that most of the stream is still to be written.
            try source.qmp.setMaxBandwidth(20_000)
            try source.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array([
                .object(["capability": .string("events"), "state": .bool(true)])])])
            try source.qmp.migrate(uri: "tcp:127.0.0.1:\(port)")
            #expect(done.wait(timeout: .now() + 10) == .success)
            do {
                try source.qmp.waitForMigration(timeout: 10)
                Issue.record("the migration completed although its destination went away")
            } catch {
                #expect(error.code == .migrationFailed)
            }
            let info = try source.qmp.queryMigrate()
            #expect(info.status == "failed")
            #expect(info.errorDescription?.contains("Unable to write to socket") == true, "\(info.raw.jsonText)")
            // QEMU restarts a source whose migration failed (RESUME); cont is then a no-op.
            #expect(try source.qmp.waitForEvent("RESUME", timeout: 3) != nil)
            try source.qmp.cont()
            #expect(try source.qmp.queryStatus() == "running")
            #expect(try snapshot(source.bus) == before)
            _ = try (0..<31).map { _ in try source.bus.readb(TIS.reg(0, TIS.dataFIFO)) }
            #expect(try readPCR16(source.bus) == pcr16AfterProbe)
            // And it can migrate again, this time completely.
            try source.qmp.setMaxBandwidth(32 << 20)
            let stream = work.file("retry.bin")
            try source.qmp.migrate(uri: "exec:cat > \(stream)")
            try source.qmp.waitForMigration()
            let dest = try VM(.tisSimSwtpm, work: work, incoming: "exec:cat < \(stream)")
            defer { dest.close() }
            try dest.waitIncoming()
            #expect(try readPCR16(dest.bus) == pcr16AfterProbe)
        }
    }
}
