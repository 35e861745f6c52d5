import Synchronization
import WireFormat

/// The data channel to swtpm: raw TPM command bytes out, one TPM response back. Mirrors QEMU's
/// `tpm_emulator_unix_tx_bufs`: write the command in one write (swtpm reads it with a single
/// `read`), read the 10-byte header, then `size - 10` more bytes. Unlike QEMU (open hazard
/// §9.20) the size is checked first: `10 ≤ size ≤ maxResponseSize`, else the reply is refused.
///
/// After any failure the channel is out of step (a late or oversized reply may still arrive),
/// so it is shut down and later exchanges fail at once with `.connectionClosed`.
final class SwtpmDataChannel: @unchecked Sendable {
    private let socket: SwtpmSocket
    /// The first failure, if any; held across the exchange (one command in flight).
    private let state = Mutex<BackendError?>(nil)

    init(socket: SwtpmSocket) {
        self.socket = socket
    }

    deinit { socket.close() }

    static let headerSize = 10

    /// Sends `command`, returns the whole response.
    func exchange(_ command: [UInt8], maxResponseSize: Int, timeout: Double, operation: String) throws(BackendError) -> [UInt8] {
        try state.withLock { broken throws(BackendError) -> [UInt8] in
            if let broken {
                throw BackendError(.connectionClosed, "data channel unusable after an earlier failure: \(broken.message)",
                                   operation: operation)
            }
            do throws(BackendError) {
                return try roundTrip(command, maxResponseSize: maxResponseSize, timeout: timeout, operation: operation)
            } catch {
                broken = error
                socket.shutdownBoth()
                throw error
            }
        }
    }

    private func roundTrip(_ command: [UInt8], maxResponseSize: Int, timeout: Double, operation: String) throws(BackendError) -> [UInt8] {
        let deadline = monotonicNow() + timeout
        try socket.sendAll(command, timeout: timeout, operation: operation)
        var response = try socket.readExactly(Self.headerSize, timeout: max(0.001, deadline - monotonicNow()),
                                              operation: operation, field: "response header")
        var r = ByteReader(response)
        do {
            try r.skip(2, "tag")
            let size = Int(try r.readBigEndianUInt32("responseSize"))
            guard size >= Self.headerSize else {
                throw WireError(.invalidValue, field: "responseSize", offset: 2, detail: "size \(size) is below the 10-byte header")
            }
            guard size <= maxResponseSize else {
                throw WireError(.lengthOverLimit, field: "responseSize", offset: 2,
                                detail: "size \(size) exceeds the frontend's buffer of \(maxResponseSize) bytes")
            }
            response += try socket.readExactly(size - Self.headerSize, timeout: max(0.001, deadline - monotonicNow()),
                                               operation: operation, field: "response body")
        } catch let e as WireError {
            throw BackendError(wire: e, operation: operation)
        } catch let e as BackendError {
            throw e
        } catch {
            throw BackendError(.io, "\(error)", operation: operation)
        }
        return response
    }

    /// Makes a blocked exchange return at once; from any thread.
    func abort() { socket.shutdownBoth() }

    func close() {
        abort()
        state.withLock { broken in
            if broken == nil { broken = BackendError(.connectionClosed, "the data channel was closed") }
            socket.close()
        }
    }
}
