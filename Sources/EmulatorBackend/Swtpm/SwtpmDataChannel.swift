import Synchronization
import WireFormat

/// The data channel to swtpm: raw TPM command bytes out, one TPM response back. Mirrors QEMU's
/// `tpm_emulator_unix_tx_bufs`: write the command in one write (swtpm reads it with a single
/// `read`), read the 10-byte header, then `size - 10` more bytes. Unlike QEMU (open hazard
/// §9.20) the size is checked first, and nothing larger than the frontend's buffer is ever
/// handed back:
/// - `size < 10` or `size > maximumResponseSize` cannot be a TPM response: refused, and the
///   channel is shut down (it is out of step);
/// - `maxResponseSize < size ≤ maximumResponseSize` is a real response the frontend cannot
///   take: its body is read and dropped, so the channel stays in step, and the exchange throws
///   `.protocolViolation` (the runner then gives the guest QEMU's fatal response).
///
/// After any other failure (timeout, EOF) the channel is out of step (a late reply may still
/// arrive), so it is shut down and later exchanges fail at once with `.connectionClosed`.
final class SwtpmDataChannel: @unchecked Sendable {
    private let socket: SwtpmSocket
    /// The first failure, if any; held across the exchange (one command in flight).
    private let state = Mutex<BackendError?>(nil)

    init(socket: SwtpmSocket) {
        self.socket = socket
    }

    deinit { socket.close() }

    static let headerSize = 10
    /// No TPM response is larger (libtpms' buffer is at most 4096 bytes; this leaves room for
    /// any frontend): a bigger size is garbage, refused before anything is allocated.
    static let maximumResponseSize = 64 * 1024

    /// Sends `command`, returns the whole response.
    func exchange(_ command: [UInt8], maxResponseSize: Int, timeout: Double, operation: String) throws(BackendError) -> [UInt8] {
        try state.withLock { broken throws(BackendError) -> [UInt8] in
            if let broken {
                throw BackendError(.connectionClosed, "data channel unusable after an earlier failure: \(broken.message)",
                                   operation: operation)
            }
            do {
                return try roundTrip(command, maxResponseSize: maxResponseSize, timeout: timeout, operation: operation)
            } catch let e as StillInStep {
                throw e.error
            } catch let e as BackendError {
                broken = e
                socket.shutdownBoth()
                throw e
            } catch {
                let e = BackendError(.io, "\(error)", operation: operation)
                broken = e
                socket.shutdownBoth()
                throw e
            }
        }
    }

    private struct OversizedResponse: Error { var size: Int; var limit: Int }
    private struct StillInStep: Error { var error: BackendError }

    private func roundTrip(_ command: [UInt8], maxResponseSize: Int, timeout: Double, operation: String) throws -> [UInt8] {
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
            guard size <= Self.maximumResponseSize else {
                throw WireError(.lengthOverLimit, field: "responseSize", offset: 2,
                                detail: "size \(size) exceeds any TPM response (\(Self.maximumResponseSize) bytes)")
            }
            let body = try socket.readExactly(size - Self.headerSize, timeout: max(0.001, deadline - monotonicNow()),
                                              operation: operation, field: "response body")
            guard size <= maxResponseSize else {
                throw OversizedResponse(size: size, limit: maxResponseSize)
            }
            response += body
        } catch let e as OversizedResponse {
            // In step: the whole response was consumed. Not recorded as a channel failure.
            throw StillInStep(error: BackendError(.protocolViolation,
                                                  "the TPM response of \(e.size) bytes exceeds the frontend's buffer of \(e.limit) bytes; dropped",
                                                  operation: operation))
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
