// QEMU harness: test support (not a product) that drives the oracle, QEMU 7.2.
//
// - `QEMUMachine.start(...)`: work dir + swtpm (`SwtpmProcess`) + QEMU + qtest + QMP, one call;
//   `start(externalCtrlSocket:)` for a swtpm the test started itself. `close()`/deinit tears
//   everything down (QMP quit, SIGTERM, SIGKILL, reap, sockets, directory).
// - `QEMUProcess`: one `qemu-system-x86_64 -accel tcg -bios halt.bin -qtest unix:...` child.
//   Debian's QEMU has no qtest accelerator; `HaltBIOS` makes TCG harmless (the CPU halts at the
//   reset vector, so no firmware touches the TPM).
// - `QTestBus`: the `MMIOBus` of a real QEMU (qtest `readb`..`readq`, `writeb`..`writeq`), with
//   `irq_intercept_in ioapic` and the recorded level of GSI 5.
// - `QMPClient`: commands with typed QMP errors, an event queue, status/migration helpers.
// - `HarnessError`: every failure, typed, with the tail of QEMU's stderr.
//
// Environment: `QEMU` / `SWTPM` pick binaries; `QEMU_HARNESS_KEEP=1` keeps work directories.
// Missing programs fail with "run scripts/install-deps.sh"; nothing is skipped.
