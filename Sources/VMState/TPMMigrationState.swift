import EmulatorBackend
import TIS

/// The TPM part of a QEMU machine's migration state: what a VMM needs to take a TPM from a QEMU
/// stream, or to hand one to QEMU. Extracted from a whole QEMU stream (RAM and every other
/// device walked over in bounded memory), or written as a TPM-only stream that QEMU 7.2 loads
/// with `-incoming` (runs-on-this-machine.md §8).
public struct TPMMigrationState: Sendable, Equatable {
    /// The CONFIGURATION machine type (`pc-i440fx-7.2`, `pc-q35-7.2`). The destination compares
    /// it (prefix of `len` bytes) with its own.
    public var machineType: String
    /// The `tpm-tis` section, validated.
    public var tis: TISState?
    /// The `tpm-crb` section's 32 registers.
    public var crbRegisters: [UInt32]?
    /// The `tpm-crb-cmd` RAM block (the CRB command/response buffer, page-rounded).
    public var crbCommandBuffer: [UInt8]?
    /// The `tpm-emulator` section: swtpm's blobs with their flags.
    public var emulatorBlobs: TPMStateBlobs?
    /// The `tpm-ppi` RAM block (page-rounded; the guest sees the first 0x400 bytes).
    public var ppi: [UInt8]?

    /// A state to write; the parts left nil are absent from the stream.
    public init(machineType: String, tis: TISState? = nil, crbRegisters: [UInt32]? = nil,
                crbCommandBuffer: [UInt8]? = nil, emulatorBlobs: TPMStateBlobs? = nil, ppi: [UInt8]? = nil) {
        self.machineType = machineType
        self.tis = tis
        self.crbRegisters = crbRegisters
        self.crbCommandBuffer = crbCommandBuffer
        self.emulatorBlobs = emulatorBlobs
        self.ppi = ppi
    }

    /// Walks a whole stream and keeps the TPM parts. Every other section is walked (decoded with
    /// the vmdesc when there is one, else skipped per `options.unknownSections`) so that the
    /// whole stream's framing is checked. A stream without a configuration record is refused
    /// (`badConfiguration`), as QEMU refuses it.
    public init(source: MigrationStreamSource,
                options: MigrationStreamWalker.Options = MigrationStreamWalker.Options()) throws(StreamError) {
        var o = options
        o.captureRAMBlocks.formUnion([PPIBlock.name, CRBSection.commandBufferBlock])
        let walker = try MigrationStreamWalker(source: source, options: o)
        var machine: String?
        var tis: TISState?
        var crb: [UInt32]?
        var blobs: TPMStateBlobs?
        try walker.walk { (event: MigrationStreamEvent) throws(StreamError) in
            switch event {
            case .configuration(let c): machine = c.machineType
            case .section(let s):
                switch s.content {
                case .tpmTIS(let t): tis = t
                case .tpmCRB(let r): crb = r
                case .tpmEmulator(let b): blobs = b
                default: break
                }
            default: break
            }
        }
        guard let machine else {
            throw StreamError(.badConfiguration, section: "configuration", field: "name", offset: 8,
                              detail: "Configuration section missing")
        }
        func block(_ name: String) throws(StreamError) -> [UInt8]? {
            guard let c = walker.capturedRAMBlocks[name] else { return nil }
            if c.hasUndecodedPages {
                throw StreamError(.unsupported, section: "ram", field: name, offset: walker.statistics.bytesRead,
                                  detail: "a page of \(name) arrived compressed (RAM_SAVE_FLAG_COMPRESS_PAGE)")
            }
            return c.isComplete ? c.bytes : nil
        }
        self.init(machineType: machine, tis: tis, crbRegisters: crb, crbCommandBuffer: try block(CRBSection.commandBufferBlock),
                  emulatorBlobs: blobs, ppi: try block(PPIBlock.name))
    }

    /// Section ids and trailer of a TPM-only stream. Ids are arbitrary (the destination matches
    /// sections by idstr); the defaults are those QEMU 7.2 gives a `pc` machine.
    public struct StreamOptions: Sendable, Equatable {
        /// Section id of `ram` (START and END).
        public var ramSectionID: UInt32 = 2
        /// Section id of `tpm-emulator`.
        public var emulatorSectionID: UInt32 = 4
        /// Section id of `tpm-tis` (or `tpm-crb`).
        public var deviceSectionID: UInt32 = 40
        /// Append the vmdesc trailer (QEMU only warns without it).
        public var includeVMDescription = true
        /// QEMU 7.2 `pc` ids.
        public init() {}
    }

    /// A TPM-only stream as QEMU 7.2 loads it: header; configuration; when `ppi` or
    /// `crbCommandBuffer` is set a `ram` START declaring only those blocks and a `ram` END with
    /// their pages; the `tpm-emulator` FULL section; the `tpm-tis` or `tpm-crb` FULL section;
    /// EOF; the vmdesc. Sections appear in QEMU's order (RAM first, the backend before the
    /// frontend). Devices absent from the stream keep their reset state on the destination.
    public func encodedStream(_ options: StreamOptions = StreamOptions()) throws(StreamError) -> [UInt8] {
        var w = MigrationStreamWriter()
        try w.writeConfiguration(MigrationConfiguration(machineType: machineType))
        var ramBlocks: [(name: String, data: [UInt8])] = []
        if let ppi { ramBlocks.append((PPIBlock.name, ppi)) }
        if let crbCommandBuffer { ramBlocks.append((CRBSection.commandBufferBlock, crbCommandBuffer)) }
        if !ramBlocks.isEmpty {
            try w.writeRAMSetup(sectionID: options.ramSectionID,
                                blocks: ramBlocks.map { RAMBlockInfo(name: $0.name, length: UInt64($0.data.count)) })
            try w.writeRAMPages(.end, sectionID: options.ramSectionID, blocks: ramBlocks)
        }
        if let emulatorBlobs {
            try w.writeDevice(sectionID: options.emulatorSectionID, idstr: EmulatorSection.idstr,
                              description: EmulatorSection.description, object: EmulatorSection.object(emulatorBlobs))
        }
        if let tis {
            do {
                try tis.validate()
            } catch {
                throw StreamError(.invalidField, section: TISSection.idstr, field: error.field, offset: w.count,
                                  detail: error.message)
            }
            try w.writeDevice(sectionID: options.deviceSectionID, idstr: TISSection.idstr,
                              description: TISSection.description, object: TISSection.object(tis))
        }
        if let crbRegisters {
            try w.writeDevice(sectionID: options.deviceSectionID &+ (tis == nil ? 0 : 1), idstr: CRBSection.idstr,
                              description: CRBSection.description, object: CRBSection.object(crbRegisters))
        }
        w.writeEOF()
        if options.includeVMDescription { w.writeVMDescription() }
        return w.bytes
    }
}
