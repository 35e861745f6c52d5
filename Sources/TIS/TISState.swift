/// The state of a locality's command/response machine (QEMU `TPMTISState`); the raw values are
/// those QEMU migrates.
public enum TISLocalityState: UInt32, Sendable, Equatable, CaseIterable, CustomStringConvertible {
    case idle = 0
    case ready = 1
    case completion = 2
    case execution = 3
    case reception = 4

    public var description: String {
        switch self {
        case .idle: "IDLE"
        case .ready: "READY"
        case .completion: "COMPLETION"
        case .execution: "EXECUTION"
        case .reception: "RECEPTION"
        }
    }
}

/// One locality's registers (QEMU `TPMLocality`), in the order of the `tpm-tis/locty` vmstate.
public struct TISLocality: Equatable, Sendable {
    public var state: TISLocalityState
    public var inte: UInt32
    public var ints: UInt32
    /// Stored ACCESS byte; pendingRequest and tpmEstablishment are computed on read, Seize is
    /// kept here but never read back.
    public var access: UInt8
    /// Stored STS flags; the burst count is computed on read.
    public var sts: UInt32
    public var ifaceID: UInt32

    public init(state: TISLocalityState = .idle, inte: UInt32 = TISInterrupts.polarityLowLevel.rawValue, ints: UInt32 = 0,
                access: UInt8 = TISAccess.tpmRegValidSts.rawValue, sts: UInt32 = 0, ifaceID: UInt32 = 0) {
        self.state = state
        self.inte = inte
        self.ints = ints
        self.access = access
        self.sts = sts
        self.ifaceID = ifaceID
    }
}

/// Exactly the fields QEMU migrates in the `tpm-tis` vmstate section
/// (hw/tpm/tpm_tis_isa.c `vmstate_tpm_tis_isa`), nothing more. Everything else a TIS device
/// holds (backend buffer size, TPM version, IRQ number) is configuration, recomputed at reset
/// on the destination as QEMU does.
public struct TISState: Equatable, Sendable {
    /// `state.buffer`: the shared 4 KiB command/response buffer, never cleared.
    public var buffer: [UInt8]
    /// `state.rw_offset`.
    public var rwOffset: UInt16
    /// `state.active_locty` (0xFF: none).
    public var activeLocality: UInt8
    /// `state.aborting_locty`.
    public var abortingLocality: UInt8
    /// `state.next_locty`.
    public var nextLocality: UInt8
    /// `state.loc[5]`.
    public var localities: [TISLocality]

    public init(buffer: [UInt8] = [UInt8](repeating: 0, count: TISGeometry.bufferSize), rwOffset: UInt16 = 0,
                activeLocality: UInt8 = TISGeometry.noLocality, abortingLocality: UInt8 = TISGeometry.noLocality,
                nextLocality: UInt8 = TISGeometry.noLocality,
                localities: [TISLocality] = Array(repeating: TISLocality(), count: TISGeometry.localityCount)) {
        self.buffer = buffer
        self.rwOffset = rwOffset
        self.activeLocality = activeLocality
        self.abortingLocality = abortingLocality
        self.nextLocality = nextLocality
        self.localities = localities
    }
}

/// Why a saved `TISState` was refused.
public struct TISStateError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        case bufferSize
        case rwOffsetOutOfRange
        case localityOutOfRange
        case localityCount
        case unknownState
    }
    public var code: Code
    /// The vmstate field name (`state.rw_offset`, `state.loc[2].state`).
    public var field: String
    public var message: String

    public init(_ code: Code, field: String, _ message: String) {
        self.code = code
        self.field = field
        self.message = message
    }

    public var description: String { "\(field): \(message)" }
}

extension TISState {
    /// Checks what QEMU's vmstate load does not (QEMU trusts rw_offset and the locality bytes
    /// and would index past its arrays): the buffer is 4096 bytes, rw_offset within it, every
    /// locality byte 0...4 or 0xFF, five localities. EXECUTION and a pending abort are
    /// accepted: QEMU saves them when a command was refused as "pending" (the locality then
    /// stays stuck in QEMU too), and neither can make the model index out of bounds.
    public func validate(bufferSize: Int = TISGeometry.bufferSize) throws(TISStateError) {
        guard buffer.count == TISGeometry.bufferSize else {
            throw TISStateError(.bufferSize, field: "state.buffer", "is \(buffer.count) bytes, not \(TISGeometry.bufferSize)")
        }
        guard Int(rwOffset) <= TISGeometry.bufferSize else {
            throw TISStateError(.rwOffsetOutOfRange, field: "state.rw_offset",
                                "\(rwOffset) is past the \(TISGeometry.bufferSize)-byte buffer")
        }
        for (name, l) in [("state.active_locty", activeLocality), ("state.aborting_locty", abortingLocality),
                          ("state.next_locty", nextLocality)] {
            guard l < TISGeometry.localityCount || l == TISGeometry.noLocality else {
                throw TISStateError(.localityOutOfRange, field: name, "locality \(l) is not 0...4 or 0xFF (none)")
            }
        }
        guard localities.count == TISGeometry.localityCount else {
            throw TISStateError(.localityCount, field: "state.loc", "\(localities.count) localities, not 5")
        }
    }
}
