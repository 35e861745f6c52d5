/// Geometry of the TIS MMIO region (QEMU include/hw/acpi/tpm.h, TCG PC Client PTP §6.5.2).
public enum TISGeometry {
    /// `TPM_TIS_ADDR_BASE`.
    public static let baseAddress: UInt64 = 0xFED4_0000
    /// `TPM_TIS_NUM_LOCALITIES`.
    public static let localityCount = 5
    /// `TPM_TIS_LOCALITY_SHIFT`: each locality owns a 4 KiB page.
    public static let localityShift = 12
    /// The whole region: 5 localities of 0x1000 bytes.
    public static let regionSize: UInt64 = 0x5000
    /// `TPM_TIS_BUFFER_MAX`.
    public static let bufferSize = 4096
    /// `TPM_TIS_NO_LOCALITY`.
    public static let noLocality: UInt8 = 0xFF
}

/// The registers of one locality page, by dword offset (`TPM_TIS_REG_*`).
public enum TISRegister: Equatable, Sendable {
    case access             // 0x00
    case intEnable          // 0x08
    case intVector          // 0x0C
    case intStatus          // 0x10
    case intfCapability     // 0x14
    case sts                // 0x18
    case dataFIFO           // 0x24
    case interfaceID        // 0x30
    case xdataFIFO          // 0x80 ... 0xBC
    case didVid             // 0xF00
    case rid                // 0xF04
    case debug              // 0xF90
    case unassigned(UInt16)

    /// Decodes the dword offset `offset & 0xFFC` of a locality page.
    public init(dwordOffset offset: UInt16) {
        switch offset {
        case 0x00: self = .access
        case 0x08: self = .intEnable
        case 0x0C: self = .intVector
        case 0x10: self = .intStatus
        case 0x14: self = .intfCapability
        case 0x18: self = .sts
        case 0x24: self = .dataFIFO
        case 0x30: self = .interfaceID
        case 0x80...0xBC: self = .xdataFIFO
        case 0xF00: self = .didVid
        case 0xF04: self = .rid
        case 0xF90: self = .debug
        default: self = .unassigned(offset)
        }
    }

    public static let accessOffset: UInt16 = 0x00
    public static let intEnableOffset: UInt16 = 0x08
    public static let intVectorOffset: UInt16 = 0x0C
    public static let intStatusOffset: UInt16 = 0x10
    public static let intfCapabilityOffset: UInt16 = 0x14
    public static let stsOffset: UInt16 = 0x18
    public static let dataFIFOOffset: UInt16 = 0x24
    public static let interfaceIDOffset: UInt16 = 0x30
    public static let xdataFIFOOffset: UInt16 = 0x80
    public static let didVidOffset: UInt16 = 0xF00
    public static let ridOffset: UInt16 = 0xF04
    public static let debugOffset: UInt16 = 0xF90
}

/// TPM_ACCESS_x (PTP §6.5.2.3; QEMU `TPM_TIS_ACCESS_*`).
public struct TISAccess: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// tpmEstablishment (computed on read as the inverse of the backend's flag).
    public static let tpmEstablishment = TISAccess(rawValue: 0x01)
    /// requestUse (`TPM_TIS_ACCESS_REQUEST_USE`).
    public static let requestUse = TISAccess(rawValue: 0x02)
    /// pendingRequest (computed on read; `TPM_TIS_ACCESS_PENDING_REQUEST`).
    public static let pendingRequest = TISAccess(rawValue: 0x04)
    /// Seize (write-only; QEMU keeps it internally, `TPM_TIS_ACCESS_SEIZE`).
    public static let seize = TISAccess(rawValue: 0x08)
    /// beenSeized (`TPM_TIS_ACCESS_BEEN_SEIZED`).
    public static let beenSeized = TISAccess(rawValue: 0x10)
    /// activeLocality (`TPM_TIS_ACCESS_ACTIVE_LOCALITY`).
    public static let activeLocality = TISAccess(rawValue: 0x20)
    /// tpmRegValidSts (`TPM_TIS_ACCESS_TPM_REG_VALID_STS`).
    public static let tpmRegValidSts = TISAccess(rawValue: 0x80)
}

/// TPM_STS_x (PTP §6.5.2.7; QEMU `TPM_TIS_STS_*`). The burst count (bits 23:8) is not stored;
/// it is computed on read.
public struct TISStatus: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// responseRetry (write-only).
    public static let responseRetry = TISStatus(rawValue: 0x02)
    /// selfTestDone (`TPM_TIS_STS_SELFTEST_DONE`), TPM 1.2 only in practice.
    public static let selfTestDone = TISStatus(rawValue: 0x04)
    /// Expect.
    public static let expect = TISStatus(rawValue: 0x08)
    /// dataAvail.
    public static let dataAvailable = TISStatus(rawValue: 0x10)
    /// tpmGo (write-only).
    public static let tpmGo = TISStatus(rawValue: 0x20)
    /// commandReady.
    public static let commandReady = TISStatus(rawValue: 0x40)
    /// stsValid.
    public static let valid = TISStatus(rawValue: 0x80)
    /// commandCancel (write-only, TPM 2.0).
    public static let commandCancel = TISStatus(rawValue: 0x0100_0000)
    /// resetEstablishmentBit (write-only, TPM 2.0).
    public static let resetEstablishment = TISStatus(rawValue: 0x0200_0000)
    /// tpmFamily 2.0 (`TPM_TIS_STS_TPM_FAMILY2_0`); family 1.2 is 0.
    public static let family20 = TISStatus(rawValue: 0x0400_0000)
    /// `TPM_TIS_STS_TPM_FAMILY_MASK`.
    public static let familyMask = TISStatus(rawValue: 0x0C00_0000)
}

/// TPM_INT_ENABLE_x / TPM_INT_STATUS_x (PTP §6.5.2.5–6; QEMU `TPM_TIS_INT_*`).
public struct TISInterrupts: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let dataAvailable = TISInterrupts(rawValue: 0x01)
    public static let stsValid = TISInterrupts(rawValue: 0x02)
    public static let localityChanged = TISInterrupts(rawValue: 0x04)
    /// typePolarity "low level" (bits 4:3 = 01), the reset value of INT_ENABLE.
    public static let polarityLowLevel = TISInterrupts(rawValue: 0x08)
    /// `TPM_TIS_INT_POLARITY_MASK`.
    public static let polarityMask = TISInterrupts(rawValue: 0x18)
    public static let commandReady = TISInterrupts(rawValue: 0x80)
    /// globalIntEnable (INT_ENABLE only).
    public static let globalEnable = TISInterrupts(rawValue: 0x8000_0000)
    /// `TPM_TIS_INTERRUPTS_SUPPORTED` = 0x87.
    public static let supported: TISInterrupts = [.dataAvailable, .stsValid, .localityChanged, .commandReady]
    /// Bits an INT_ENABLE write may set: 0x8000009F.
    public static let writableEnable: TISInterrupts = [.globalEnable, .polarityMask, .supported]
}

/// Constant register values (QEMU tpm_tis.h / include/hw/acpi/tpm.h).
public enum TISConstants {
    /// INTF_CAPABILITY for TPM 1.2 (`TPM_TIS_CAPABILITIES_SUPPORTED1_3`): interface version 1.3,
    /// 64-byte transfers, low-level interrupts, the supported interrupts.
    public static let capabilities12: UInt32 = 0x2000_0697
    /// INTF_CAPABILITY for TPM 2.0 (`TPM_TIS_CAPABILITIES_SUPPORTED2_0`).
    public static let capabilities20: UInt32 = 0x3000_0697
    /// INTERFACE_ID for TPM 1.2 (`TPM_TIS_IFACE_ID_SUPPORTED_FLAGS1_3`): "TIS 1.3", all else
    /// don't-care.
    public static let interfaceID12: UInt32 = 0xFFFF_FFFF
    /// INTERFACE_ID for TPM 2.0 (`TPM_TIS_IFACE_ID_SUPPORTED_FLAGS2_0`): FIFO, 5 localities,
    /// TIS supported.
    public static let interfaceID20: UInt32 = 0x0000_2100
    /// IntfSelLock (`TPM_TIS_IFACE_ID_INT_SEL_LOCK`).
    public static let interfaceSelectorLock: UInt32 = 0x0008_0000
    /// DID_VID: DID 0x0001, VID 0x1014 (IBM).
    public static let didVid: UInt32 = 0x0001_1014
    /// RID (`TPM_TIS_TPM_RID`).
    public static let rid: UInt32 = 0x01
    /// `TPM_TIS_NO_DATA_BYTE`: what a FIFO read returns with no response to give.
    public static let noDataByte: UInt8 = 0xFF
    /// The default ISA IRQ number (`TPM_TIS_IRQ`).
    public static let defaultIRQ: UInt32 = 5
}
