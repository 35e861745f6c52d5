import EmulatorBackend

/// Device configuration: properties in QEMU, never migrated.
public struct TISConfiguration: Sendable, Equatable {
    /// The ISA IRQ the device reports in INT_VECTOR (QEMU property `irq`, default 5, 0...15).
    public var irqNumber: UInt32
    /// QEMU 8.1 (commit bbadfb2e0a) lets every locality write INT_ENABLE and INT_STATUS; 7.2 only
    /// the active one. Off: QEMU 7.2, the oracle.
    public var interruptRegistersWritableFromAnyLocality: Bool
    /// The PPI region at 0xFED45000 (QEMU property `ppi`, default on for ISA tpm-tis).
    public var ppiEnabled: Bool

    public init(irqNumber: UInt32 = TISConstants.defaultIRQ, interruptRegistersWritableFromAnyLocality: Bool = false,
                ppiEnabled: Bool = true) {
        self.irqNumber = irqNumber & 0xF
        self.interruptRegistersWritableFromAnyLocality = interruptRegistersWritableFromAnyLocality
        self.ppiEnabled = ppiEnabled
    }

    /// QEMU 7.2's behaviour.
    public static let qemu72 = TISConfiguration()
    /// QEMU 8.1 and newer (INT_ENABLE / INT_STATUS writable from any locality).
    public static let qemu81 = TISConfiguration(interruptRegistersWritableFromAnyLocality: true)
}

/// What a register access asks of the world outside the core, done by `TISDevice` after it
/// releases its lock.
public struct TISEffects: Sendable {
    /// tpmGo: a command to hand to the backend (QEMU `tpm_tis_tpm_send`).
    public var deliver: TPMBackendCommand? = nil
    /// commandCancel, or an abort while a command executes (QEMU `tpm_backend_cancel_cmd`).
    public var cancel = false
    /// resetEstablishmentBit written from locality 3 (QEMU `tpm_backend_reset_tpm_established_flag`).
    public var resetEstablished: UInt8? = nil

    public init() {}
    public var isEmpty: Bool { deliver == nil && !cancel && resetEstablished == nil }
}

/// Something observable that happened in the device, named after QEMU's trace events
/// (hw/tpm/trace-events) plus the invalid accesses QEMU ignores silently.
public enum TISEvent: Sendable, Equatable {
    /// `tpm_tis_mmio_write_locty4`: a write to locality 4, dropped.
    case writeLocality4Dropped(offset: UInt16, size: Int, value: UInt32)
    /// A read or write of an offset that holds no register (reads 0xFFFFFFFF, writes ignored).
    case unassignedOffset(offset: UInt16, isWrite: Bool)
    /// A write to a read-only or non-active-locality register that QEMU ignores.
    case ignoredWrite(locality: UInt8, register: String, value: UInt32)
    /// An access with a width other than 1, 2 or 4, or outside the region; rejected.
    case invalidAccess(offset: UInt64, size: Int, isWrite: Bool)
    /// Accesses while the backend had a startup error (reads 0, writes ignored).
    case startupErrorAccess(offset: UInt16, isWrite: Bool)
    /// `tpm_tis_new_active_locality`.
    case newActiveLocality(UInt8)
    /// `tpm_tis_abort`.
    case abort(nextLocality: UInt8)
    /// `tpm_tis_raise_irq`.
    case raiseIRQ(locality: UInt8, mask: UInt32)
    /// `tpm_tis_mmio_write_lowering_irq`.
    case lowerIRQ
    /// `tpm_tis_mmio_write_locty_seized`.
    case seized(locality: UInt8, previous: UInt8)
    /// A locality state transition.
    case transition(locality: UInt8, from: TISLocalityState, to: TISLocalityState)
    /// tpmGo delivered a command.
    case commandSent(locality: UInt8, length: Int)
    /// The backend completed a command.
    case commandCompleted(locality: UInt8, length: Int, failed: Bool)
    /// `tpm_backend_deliver_request` refused: "There is a TPM request pending".
    case requestPending(locality: UInt8)
    /// A FIFO write found the buffer full; the rest of the command is dropped.
    case bufferFull(locality: UInt8)
}

/// The pure TIS device: QEMU's hw/tpm/tpm_tis_common.c as a value. No locks, no backend, no
/// threads: register accesses in, register values and `TISEffects` out.
///
/// `read`/`write` take one access as QEMU's `tpm_tis_mmio_read` / `tpm_tis_mmio_write`
/// receive it: an offset in the 0x5000-byte region and a size of 1, 2 or 4.
public struct TISCore: Sendable {
    // The migrated state, held field by field (localities inline, no copy-on-write checks on
    // the MMIO path); `state` assembles and takes apart the `TISState` value.
    var buffer = InlineArray<4096, UInt8>(repeating: 0)
    var rwOffset: UInt16 = 0
    var activeLocality: UInt8 = TISGeometry.noLocality
    var abortingLocality: UInt8 = TISGeometry.noLocality
    var nextLocality: UInt8 = TISGeometry.noLocality
    var loc = InlineArray<5, TISLocality>(repeating: TISLocality())

    /// The migrated state (QEMU's `tpm-tis` vmstate fields).
    public var state: TISState {
        get {
            var locs: [TISLocality] = []
            locs.reserveCapacity(TISGeometry.localityCount)
            for i in 0..<TISGeometry.localityCount { locs.append(loc[i]) }
            // Through a span: in a debug build `buffer[i]` copies the whole 4 KiB array per element.
            let source = buffer.span
            var bytes = [UInt8](repeating: 0, count: TISGeometry.bufferSize)
            for i in 0..<TISGeometry.bufferSize { bytes[i] = source[i] }
            return TISState(buffer: bytes, rwOffset: rwOffset, activeLocality: activeLocality,
                            abortingLocality: abortingLocality, nextLocality: nextLocality, localities: locs)
        }
        set {
            var target = buffer.mutableSpan
            for i in 0..<TISGeometry.bufferSize { target[i] = i < newValue.buffer.count ? newValue.buffer[i] : 0 }
            rwOffset = newValue.rwOffset
            activeLocality = newValue.activeLocality
            abortingLocality = newValue.abortingLocality
            nextLocality = newValue.nextLocality
            for i in 0..<TISGeometry.localityCount {
                loc[i] = i < newValue.localities.count ? newValue.localities[i] : TISLocality()
            }
        }
    }
    /// `be_buffer_size`: min(backend buffer size, 4096), recomputed at reset.
    public private(set) var bufferSize: Int
    /// `be_tpm_version`, recomputed at reset.
    public private(set) var version: TPMVersion
    public let configuration: TISConfiguration
    /// Level of the IRQ line as QEMU drives it (raised, lowered; never pulsed).
    public private(set) var irqLevel = false
    /// The backend's TPM-established flag as last read (ACCESS bit 0 is its inverse).
    public var establishedFlag = false
    /// `tpm_backend_had_startup_error`: every read returns 0, every write is ignored.
    public var hadStartupError = false
    /// The locality of the last command sent (QEMU `s->cmd.locty`): completion goes to it.
    public private(set) var commandLocality: UInt8 = 0
    /// When true, events are collected into `events`.
    public var tracing = false
    public var events: [TISEvent] = []

    public init(version: TPMVersion, bufferSize: Int, configuration: TISConfiguration = .qemu72) {
        self.version = version
        self.bufferSize = min(max(bufferSize, 0), TISGeometry.bufferSize)
        self.configuration = configuration
        resetRegisters()
    }

    @inline(__always)
    mutating func emit(_ e: TISEvent) {
        if tracing { events.append(e) }
    }

    static func isValidLocality(_ l: UInt8) -> Bool { l < TISGeometry.localityCount }

    // MARK: Reset (tpm_tis_reset)

    /// QEMU `tpm_tis_reset`, the register part: called with the backend's version and buffer
    /// size; the buffer is not cleared and the IRQ line not lowered, as in QEMU.
    public mutating func reset(version: TPMVersion, bufferSize: Int) {
        self.version = version
        self.bufferSize = min(max(bufferSize, 0), TISGeometry.bufferSize)
        resetRegisters()
    }

    private mutating func resetRegisters() {
        activeLocality = TISGeometry.noLocality
        nextLocality = TISGeometry.noLocality
        abortingLocality = TISGeometry.noLocality
        for c in 0..<TISGeometry.localityCount {
            loc[c].access = TISAccess.tpmRegValidSts.rawValue
            switch version {
            case .unspecified:
                break
            case .tpm12:
                loc[c].sts = 0
                loc[c].ifaceID = TISConstants.interfaceID12
            case .tpm20:
                loc[c].sts = TISStatus.family20.rawValue
                loc[c].ifaceID = TISConstants.interfaceID20
            }
            loc[c].inte = TISInterrupts.polarityLowLevel.rawValue
            loc[c].ints = 0
            loc[c].state = .idle
        }
        rwOffset = 0
    }

    /// Replaces the migrated state (after `TISState.validate()`); the IRQ level is recomputed
    /// from INT_STATUS: high while some locality has a status bit recorded.
    public mutating func restore(_ s: TISState) {
        state = s
        irqLevel = s.localities.contains { $0.ints != 0 }
    }

    // MARK: Helpers

    /// `tpm_tis_sts_set`: keep selfTestDone and the family bits, replace the rest.
    @inline(__always)
    mutating func setSTS(_ l: Int, _ flags: TISStatus) {
        loc[l].sts &= (TISStatus.selfTestDone.rawValue | TISStatus.familyMask.rawValue)
        loc[l].sts |= flags.rawValue
    }

    mutating func setState(_ l: Int, _ s: TISLocalityState) {
        let from = loc[l].state
        loc[l].state = s
        if from != s { emit(.transition(locality: UInt8(l), from: from, to: s)) }
    }

    /// `tpm_cmd_get_size`: the be32 size field of the header in the buffer.
    @inline(__always)
    var bufferHeaderSize: UInt32 {
        UInt32(buffer[2]) << 24 | UInt32(buffer[3]) << 16 | UInt32(buffer[4]) << 8 | UInt32(buffer[5])
    }

    /// `tpm_tis_raise_irq`.
    mutating func raiseIRQ(_ locty: UInt8, _ mask: TISInterrupts) {
        guard Self.isValidLocality(locty) else { return }
        let l = Int(locty)
        let inte = loc[l].inte
        if inte & TISInterrupts.globalEnable.rawValue != 0, inte & mask.rawValue != 0 {
            emit(.raiseIRQ(locality: locty, mask: mask.rawValue))
            irqLevel = true
            loc[l].ints |= mask.rawValue
        }
    }

    /// `tpm_tis_check_request_use_except`.
    func otherLocalityRequestsUse(_ locty: Int) -> Bool {
        for l in 0..<TISGeometry.localityCount where l != locty {
            if loc[l].access & TISAccess.requestUse.rawValue != 0 { return true }
        }
        return false
    }

    /// `tpm_tis_new_active_locality`.
    mutating func newActiveLocality(_ new: UInt8) {
        let change = activeLocality != new
        let old = activeLocality
        if change && Self.isValidLocality(old) {
            let isSeize = Self.isValidLocality(new) && loc[Int(new)].access & TISAccess.seize.rawValue != 0
            let mask: UInt8 = isSeize ? ~TISAccess.activeLocality.rawValue
                : ~(TISAccess.activeLocality.rawValue | TISAccess.requestUse.rawValue)
            loc[Int(old)].access &= mask
            if isSeize {
                loc[Int(old)].access |= TISAccess.beenSeized.rawValue
            }
        }
        activeLocality = new
        emit(.newActiveLocality(new))
        if Self.isValidLocality(new) {
            loc[Int(new)].access |= TISAccess.activeLocality.rawValue
            loc[Int(new)].access &= ~(TISAccess.requestUse.rawValue | TISAccess.seize.rawValue)
        }
        if change {
            raiseIRQ(activeLocality, .localityChanged)
        }
    }

    /// `tpm_tis_abort`.
    mutating func abort() {
        rwOffset = 0
        emit(.abort(nextLocality: nextLocality))
        let aborting = abortingLocality
        if aborting == nextLocality && Self.isValidLocality(aborting) {
            setState(Int(aborting), .ready)
            setSTS(Int(aborting), .commandReady)
            raiseIRQ(aborting, .commandReady)
        }
        newActiveLocality(nextLocality)
        nextLocality = TISGeometry.noLocality
        abortingLocality = TISGeometry.noLocality
    }

    /// `tpm_tis_prep_abort`.
    mutating func prepAbort(_ locty: UInt8, _ newLocty: UInt8, _ fx: inout TISEffects) {
        // QEMU asserts newlocty is valid; every caller passes a valid one.
        guard Self.isValidLocality(newLocty) else { return }
        abortingLocality = locty
        nextLocality = newLocty
        for l in 0..<TISGeometry.localityCount where loc[l].state == .execution {
            // The abort completes in requestCompleted, when the backend returns.
            fx.cancel = true
            return
        }
        abort()
    }

    // MARK: Completion (tpm_tis_request_completed)

    /// QEMU `tpm_tis_request_completed`. `response` is what the backend wrote into the buffer;
    /// at most `bufferSize` bytes are taken (QEMU trusts swtpm's length here; we do not).
    public mutating func requestCompleted(response: [UInt8], selftestDone: Bool, failed: Bool = false) {
        let locty = commandLocality
        guard Self.isValidLocality(locty) else { return }
        let n = min(response.count, bufferSize, buffer.count)
        for i in 0..<n { buffer[i] = response[i] }
        emit(.commandCompleted(locality: locty, length: n, failed: failed))
        if selftestDone {
            for l in 0..<TISGeometry.localityCount {
                loc[l].sts |= TISStatus.selfTestDone.rawValue
            }
        }
        setSTS(Int(locty), [.valid, .dataAvailable])
        setState(Int(locty), .completion)
        rwOffset = 0
        if Self.isValidLocality(nextLocality) {
            abort()
        }
        raiseIRQ(locty, [.dataAvailable, .stsValid])
    }

    // MARK: Read (tpm_tis_mmio_read)

    /// QEMU `tpm_tis_mmio_read` for one access of `size` bytes (1, 2 or 4) at `offset` in the
    /// region. The value is as QEMU returns it before the memory core truncates it to `size`.
    public mutating func read(offset: UInt16, size: Int) -> UInt32 {
        if hadStartupError {
            emit(.startupErrorAccess(offset: offset, isWrite: false))
            return 0
        }
        let reg = offset & 0xFFC
        var shift = UInt32(offset & 3) * 8
        let locty = Int((offset >> 12) & 7)
        guard locty < TISGeometry.localityCount else {
            emit(.invalidAccess(offset: UInt64(offset), size: size, isWrite: false))
            return 0xFFFF_FFFF
        }
        var val: UInt32 = 0xFFFF_FFFF
        switch TISRegister(dwordOffset: reg) {
        case .access:
            val = UInt32(loc[locty].access & ~TISAccess.seize.rawValue)
            if otherLocalityRequestsUse(locty) { val |= UInt32(TISAccess.pendingRequest.rawValue) }
            if !establishedFlag { val |= UInt32(TISAccess.tpmEstablishment.rawValue) }
        case .intEnable:
            val = loc[locty].inte
        case .intVector:
            val = configuration.irqNumber
        case .intStatus:
            val = loc[locty].ints
        case .intfCapability:
            switch version {
            case .unspecified: val = 0
            case .tpm12: val = TISConstants.capabilities12
            case .tpm20: val = TISConstants.capabilities20
            }
        case .sts:
            if Int(activeLocality) == locty {
                let sts = loc[locty].sts
                if sts & TISStatus.dataAvailable.rawValue != 0 {
                    let len = min(bufferHeaderSize, UInt32(bufferSize))
                    // QEMU computes this in uint32_t and shifts without masking.
                    val = (len &- UInt32(rwOffset)) &<< 8 | sts
                } else {
                    var avail = UInt32(bufferSize) &- UInt32(rwOffset)
                    // Byte-sized reads must not show 0x00 for 0x100 free bytes.
                    if size == 1 && avail > 0xFF { avail = 0xFF }
                    val = avail &<< 8 | sts
                }
            }
        case .dataFIFO, .xdataFIFO:
            if Int(activeLocality) == locty {
                let n = min(size, 4 - Int(offset & 3))
                val = 0
                for i in 0..<max(n, 0) {
                    let v: UInt8 = loc[locty].state == .completion ? dataRead(locty) : TISConstants.noDataByte
                    val |= UInt32(v) << (8 * UInt32(i))
                }
                shift = 0
            }
        case .interfaceID:
            val = loc[locty].ifaceID
        case .didVid:
            val = TISConstants.didVid
        case .rid:
            val = TISConstants.rid
        case .debug:
            // QEMU prints a register dump to stdout here (DEBUG_TIS is tested with #ifdef) and
            // returns 0xFFFFFFFF; the dump is left out.
            break
        case .unassigned(let o):
            emit(.unassignedOffset(offset: o, isWrite: false))
        }
        return shift != 0 ? val >> shift : val
    }

    /// `tpm_tis_data_read`.
    mutating func dataRead(_ locty: Int) -> UInt8 {
        guard loc[locty].sts & TISStatus.dataAvailable.rawValue != 0 else {
            return TISConstants.noDataByte
        }
        let len = min(bufferHeaderSize, UInt32(bufferSize))
        let off = Int(rwOffset)
        // QEMU indexes without a check; a restored rw_offset is validated, this is the net.
        let ret = off < buffer.count ? buffer[off] : TISConstants.noDataByte
        rwOffset &+= 1
        if UInt32(rwOffset) >= len {
            setSTS(locty, .valid)
            raiseIRQ(UInt8(locty), .stsValid)
        }
        return ret
    }

    // MARK: Write (tpm_tis_mmio_write)

    /// QEMU `tpm_tis_mmio_write` for one access of `size` bytes (1, 2 or 4) at `offset`.
    public mutating func write(offset: UInt16, size: Int, value: UInt32, effects fx: inout TISEffects) {
        let reg = offset & 0xFFC
        let shift = UInt32(offset & 3) * 8
        let locty = Int((offset >> 12) & 7)
        if locty == 4 {
            emit(.writeLocality4Dropped(offset: offset, size: size, value: value))
            return
        }
        guard locty < TISGeometry.localityCount else {
            emit(.invalidAccess(offset: UInt64(offset), size: size, isWrite: true))
            return
        }
        if hadStartupError {
            emit(.startupErrorAccess(offset: offset, isWrite: true))
            return
        }
        // The hot path of a command upload: a FIFO write of the active locality.
        if reg == TISRegister.dataFIFOOffset && UInt8(locty) == activeLocality {
            let v = (size == 4 ? value : value & (size == 1 ? 0xFF : 0xFFFF)) << shift
            writeFIFO(locty, offset: offset, size: size, value: v >> shift)
            return
        }
        var mask: UInt32 = size == 1 ? 0xFF : (size == 2 ? 0xFFFF : 0xFFFF_FFFF)
        var val = value & mask
        if shift != 0 {
            val = val &<< shift
            mask = mask &<< shift
        }
        mask ^= 0xFFFF_FFFF
        let l8 = UInt8(locty)

        switch TISRegister(dwordOffset: reg) {
        case .access:
            writeAccess(locty, UInt8(truncatingIfNeeded: val), &fx)
        case .intEnable:
            guard Int(activeLocality) == locty || configuration.interruptRegistersWritableFromAnyLocality else {
                emit(.ignoredWrite(locality: l8, register: "INT_ENABLE", value: val))
                break
            }
            loc[locty].inte &= mask
            loc[locty].inte |= val & TISInterrupts.writableEnable.rawValue
        case .intVector:
            emit(.ignoredWrite(locality: l8, register: "INT_VECTOR", value: val))
        case .intStatus:
            guard Int(activeLocality) == locty || configuration.interruptRegistersWritableFromAnyLocality else {
                emit(.ignoredWrite(locality: l8, register: "INT_STATUS", value: val))
                break
            }
            let supported = TISInterrupts.supported.rawValue
            if val & supported != 0 && loc[locty].ints & supported != 0 {
                loc[locty].ints &= ~val
                if loc[locty].ints == 0 {
                    irqLevel = false
                    emit(.lowerIRQ)
                }
            }
            loc[locty].ints &= ~(val & supported)
        case .sts:
            guard Int(activeLocality) == locty else {
                emit(.ignoredWrite(locality: l8, register: "STS", value: val))
                break
            }
            writeSTS(locty, val, &fx)
        case .dataFIFO, .xdataFIFO:
            guard Int(activeLocality) == locty else {
                emit(.ignoredWrite(locality: l8, register: "DATA_FIFO", value: val))
                break
            }
            writeFIFO(locty, offset: offset, size: size, value: val >> shift)
        case .interfaceID:
            if val & TISConstants.interfaceSelectorLock != 0 {
                for l in 0..<TISGeometry.localityCount {
                    loc[l].ifaceID |= TISConstants.interfaceSelectorLock
                }
            }
        case .intfCapability, .didVid, .rid, .debug:
            emit(.ignoredWrite(locality: l8, register: "read-only", value: val))
        case .unassigned(let o):
            emit(.unassignedOffset(offset: o, isWrite: true))
        }
    }

    /// The ACCESS write: locality arbitration (QEMU `tpm_tis_mmio_write`, case ACCESS).
    mutating func writeAccess(_ locty: Int, _ written: UInt8, _ fx: inout TISEffects) {
        var val = written
        let l8 = UInt8(locty)
        if val & TISAccess.seize.rawValue != 0 {
            val &= ~(TISAccess.requestUse.rawValue | TISAccess.activeLocality.rawValue)
        }
        var newActive = activeLocality
        var setNew = true

        if val & TISAccess.activeLocality.rawValue != 0 {
            if Int(activeLocality) == locty {
                // Give up the locality: the highest locality requesting use gets it.
                var next = TISGeometry.noLocality
                for c in stride(from: TISGeometry.localityCount - 1, through: 0, by: -1)
                where loc[c].access & TISAccess.requestUse.rawValue != 0 {
                    next = UInt8(c)
                    break
                }
                if Self.isValidLocality(next) {
                    setNew = false
                    prepAbort(l8, next, &fx)
                } else {
                    newActive = TISGeometry.noLocality
                }
            } else {
                // Not the owner: withdraw a pending request.
                loc[locty].access &= ~TISAccess.requestUse.rawValue
            }
        }

        if val & TISAccess.beenSeized.rawValue != 0 {
            loc[locty].access &= ~TISAccess.beenSeized.rawValue
        }

        if val & TISAccess.seize.rawValue != 0 {
            let active = activeLocality
            // Seize is allowed with no active locality, or by a higher one than the active.
            if !Self.isValidLocality(active) || l8 > active {
                let alreadyPending = loc[locty].access & TISAccess.seize.rawValue != 0
                let higherSeize = ((locty + 1)..<TISGeometry.localityCount).contains {
                    loc[$0].access & TISAccess.seize.rawValue != 0
                }
                if !alreadyPending && !higherSeize {
                    // Cancel any seize by a lower locality (all l < L: QEMU commit 37b55d67c0).
                    for l in 0..<locty { loc[l].access &= ~TISAccess.seize.rawValue }
                    loc[locty].access |= TISAccess.seize.rawValue
                    emit(.seized(locality: l8, previous: active))
                    setNew = false
                    prepAbort(active, l8, &fx)
                }
            }
        }

        if val & TISAccess.requestUse.rawValue != 0 {
            if Int(activeLocality) != locty {
                if Self.isValidLocality(activeLocality) {
                    loc[locty].access |= TISAccess.requestUse.rawValue
                } else {
                    newActive = l8
                }
            }
        }

        if setNew {
            newActiveLocality(newActive)
        }
    }

    /// The STS write of the active locality (QEMU `tpm_tis_mmio_write`, case STS).
    mutating func writeSTS(_ locty: Int, _ written: UInt32, _ fx: inout TISEffects) {
        let l8 = UInt8(locty)
        if version == .tpm20 {
            if written & TISStatus.commandCancel.rawValue != 0 && loc[locty].state == .execution {
                fx.cancel = true
            }
            if written & TISStatus.resetEstablishment.rawValue != 0 && (locty == 3 || locty == 4) {
                fx.resetEstablished = l8
            }
        }
        let val = written & (TISStatus.commandReady.rawValue | TISStatus.tpmGo.rawValue | TISStatus.responseRetry.rawValue)
        switch val {
        case TISStatus.commandReady.rawValue:
            switch loc[locty].state {
            case .ready:
                rwOffset = 0
            case .idle:
                setSTS(locty, .commandReady)
                setState(locty, .ready)
                raiseIRQ(l8, .commandReady)
            case .execution, .reception:
                prepAbort(l8, l8, &fx)
            case .completion:
                rwOffset = 0
                setState(locty, .ready)
                if loc[locty].sts & TISStatus.commandReady.rawValue == 0 {
                    setSTS(locty, .commandReady)
                    raiseIRQ(l8, .commandReady)
                }
                loc[locty].sts &= ~TISStatus.dataAvailable.rawValue
            }
        case TISStatus.tpmGo.rawValue:
            if loc[locty].state == .reception
                && loc[locty].sts & TISStatus.expect.rawValue == 0 {
                tpmSend(locty, &fx)
            }
        case TISStatus.responseRetry.rawValue:
            if loc[locty].state == .completion {
                rwOffset = 0
                setSTS(locty, [.valid, .dataAvailable])
            }
        default:
            break
        }
    }

    /// `tpm_tis_tpm_send`.
    mutating func tpmSend(_ locty: Int, _ fx: inout TISEffects) {
        setState(locty, .execution)
        commandLocality = UInt8(locty)
        let n = min(Int(rwOffset), buffer.count)
        var bytes = [UInt8](repeating: 0, count: n)
        for i in 0..<n { bytes[i] = buffer[i] }
        fx.deliver = TPMBackendCommand(locality: UInt8(locty), bytes: bytes, maxResponseSize: bufferSize)
        emit(.commandSent(locality: UInt8(locty), length: n))
    }

    /// The FIFO write of the active locality (QEMU `tpm_tis_mmio_write`, case DATA_FIFO).
    /// `value` has the lane shift already undone. The hot path of a command upload: the
    /// locality is read and written back once.
    mutating func writeFIFO(_ locty: Int, offset: UInt16, size: Int, value: UInt32) {
        var l = loc[locty]
        let keep = TISStatus.selfTestDone.rawValue | TISStatus.familyMask.rawValue
        let expect = TISStatus.expect.rawValue
        let valid = TISStatus.valid.rawValue
        switch l.state {
        case .idle, .execution, .completion:
            return  // the bytes are dropped
        case .ready:
            l.state = .reception
            l.sts = (l.sts & keep) | expect | valid
            if tracing { emit(.transition(locality: UInt8(locty), from: .ready, to: .reception)) }
        case .reception:
            break
        }
        // QEMU stores byte by byte while Expect is set; once the buffer is full it sets
        // stsValid alone (clearing Expect) and the rest of the write is lost. The same, at once.
        let n = max(0, min(size, 4 - Int(offset & 3)))
        if n > 0 && l.sts & expect != 0 {
            let off = Int(rwOffset)
            let room = max(0, min(bufferSize, buffer.count) - off)
            let k = min(n, room)
            if k > 0 {
                var v = value
                for i in off..<(off + k) {
                    buffer[i] = UInt8(truncatingIfNeeded: v)
                    v >>= 8
                }
                rwOffset &+= UInt16(k)
            }
            if k < n {
                if tracing { emit(.bufferFull(locality: UInt8(locty))) }
                l.sts = (l.sts & keep) | valid
            }
        }
        var needIRQ = false
        if rwOffset > 5 && l.sts & expect != 0 {
            // The header size is known: see whether the whole command is in. QEMU holds the
            // size in a uint16_t here: a header size of 0x80010000 reads as 0 and completes the
            // command (seen against QEMU 7.2 by the random differential).
            needIRQ = l.sts & valid == 0
            let len = UInt16(truncatingIfNeeded: bufferHeaderSize)
            l.sts = (l.sts & keep) | (len > rwOffset ? expect | valid : valid)
        }
        loc[locty] = l
        if needIRQ {
            raiseIRQ(UInt8(locty), .stsValid)
        }
    }
}
