#if canImport(Glibc)
import Glibc
#endif

/// Entry points for the hostile-reply fuzzers (`Sources/Fuzzing`): a ctrl client and a data
/// channel over a descriptor the caller owns the other end of, so any byte string can play
/// swtpm's part. `package` access: visible to this package's targets only, not public API.
package enum SwtpmReplyHarness {
    /// A ctrl client adopting `descriptor` (one end of a socketpair); it closes it.
    package static func ctrlClient(adopting descriptor: Int32, timeout: Double) -> SwtpmCtrlClient {
        SwtpmCtrlClient(socket: SwtpmSocket(adopting: descriptor, label: "fuzz ctrl channel"), timeout: timeout)
    }

    /// Runs `commands` in order through a data channel adopting `descriptor` (QEMU
    /// `tpm_emulator_unix_tx_bufs` framing, `SwtpmDataChannel.exchange`); one result each.
    package static func dataExchanges(adopting descriptor: Int32, commands: [[UInt8]], maxResponseSize: Int,
                                      timeout: Double) -> [Result<[UInt8], BackendError>] {
        let channel = SwtpmDataChannel(socket: SwtpmSocket(adopting: descriptor, label: "fuzz data channel"))
        defer { channel.close() }
        return commands.map { command in
            do throws(BackendError) {
                return .success(try channel.exchange(command, maxResponseSize: maxResponseSize, timeout: timeout,
                                                     operation: "fuzz"))
            } catch {
                return .failure(error)
            }
        }
    }

    /// The largest response the data channel reads before refusing (`SwtpmDataChannel`).
    package static var maximumDataResponseSize: Int { SwtpmDataChannel.maximumResponseSize }
}
