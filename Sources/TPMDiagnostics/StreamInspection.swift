import EmulatorBackend
import TIS
import VMState

/// One device section as inspected: header, place in the stream, and its fields decoded the way
/// analyze-migration.py decodes them (through the vmdesc, or the built-in TPM descriptions).
public struct InspectedSection: Sendable {
    /// The `idstr`.
    public var idstr: String
    /// `instance_id`.
    public var instanceID: UInt32
    /// `version_id`.
    public var versionID: UInt32
    /// `section_id`.
    public var sectionID: UInt32
    /// Stream offset of the section type byte.
    public var offset: Int
    /// Stream offset of the first body byte.
    public var bodyOffset: Int
    /// Body length (footer excluded).
    public var bodyLength: Int
    /// The description the body was decoded with, and the decoded tree; nil when the section
    /// was skipped to its footer (no vmdesc entry).
    public var decoded: (description: VMStateDescription, object: VMStateObject)?

    /// analyze-migration.py's key for the section: `"idstr (section_id)"`.
    public var key: String { "\(idstr) (\(sectionID))" }
}

/// The RAM of a stream, summed over its `ram` sections (pages counted, never kept).
public struct RAMInspection: Sendable, Equatable {
    /// The `ram` section id.
    public var sectionID: UInt32?
    /// The MEM_SIZE total.
    public var totalSize: UInt64 = 0
    /// The blocks declared, in order.
    public var blocks: [RAMBlockInfo] = []
    /// RAM_SAVE_FLAG_PAGE records.
    public var pages = 0
    /// RAM_SAVE_FLAG_ZERO records.
    public var zeroPages = 0
    /// RAM_SAVE_FLAG_XBZRLE records.
    public var xbzrlePages = 0
    /// RAM_SAVE_FLAG_COMPRESS_PAGE records.
    public var compressedPages = 0
    /// `ram` sections (START, PART, END).
    public var sections = 0
    /// Bytes of the stream inside `ram` sections.
    public var bytes = 0
}

/// Everything one walk of a whole stream found: framing, configuration, RAM, every device
/// section, the TPM sections, and — if the walk stopped early — the error and where the stream
/// ended. The walk never keeps RAM pages: memory is bounded by the device sections' size.
public struct StreamInspection: Sendable {
    /// Where the stream came from (a path, or `-`).
    public var name: String
    /// Stream bytes consumed.
    public var bytesRead = 0
    /// For a regular file, its length; for a pipe, known only once its end was reached.
    public var streamLength: Int?
    /// The CONFIGURATION record.
    public var configuration: MigrationConfiguration?
    /// RAM summary.
    public var ram = RAMInspection()
    /// Every device section (not RAM), in stream order.
    public var sections: [InspectedSection] = []
    /// QEMU_VM_COMMAND records (the first `maximumKeptRecords`).
    public var commands: [MigrationCommand] = []
    /// Device sections and commands not kept (beyond `maximumKeptRecords`), and decoded trees
    /// dropped (beyond `maximumDecodedBytes`): a hostile stream cannot make the inspection grow
    /// without bound.
    public var droppedRecords = 0
    /// Sections whose decoded tree was dropped (kept as header and place only).
    public var droppedDecodedSections = 0
    private var decodedBytes = 0
    /// Bodies of sections skipped to their footer (no vmdesc yet: a pipe), by index in
    /// `sections`, decoded once the trailer brings the vmdesc.
    private var pendingBodies: [Int: [UInt8]] = [:]

    /// At most this many device sections and commands are kept.
    public static let maximumKeptRecords = 1 << 16
    /// Decoded trees are kept up to this many section body bytes in all.
    public static let maximumDecodedBytes = 64 << 20
    /// The `tpm-tis` state.
    public var tis: TISState?
    /// The `tpm-crb` registers.
    public var crbRegisters: [UInt32]?
    /// The `tpm-emulator` blobs.
    public var emulatorBlobs: TPMStateBlobs?
    /// Offset of the `tpm-emulator` body.
    public var emulatorBodyOffset: Int?
    /// Offset of the `tpm-tis` / `tpm-crb` body.
    public var frontendBodyOffset: Int?
    /// The stream's vmdesc (from the end of the file or the trailer).
    public var vmDescription: VMDescription?
    /// Whether the EOF byte was reached.
    public var sawEOF = false
    /// Offset of the EOF byte.
    public var eofOffset: Int?
    /// Why the walk stopped before the end, if it did.
    public var error: StreamError?

    /// Whether the input is not a QEMU migration stream at all (bad magic or version) or could
    /// not be read (I/O error): `tis-sim validate` exits 2 for it, not 1.
    public var isUnreadable: Bool {
        guard let e = error else { return false }
        return e.code == .badMagic || e.code == .badVersion || e.code == .io
    }

    /// The source for a command-line argument: `-` is standard input, anything else a path.
    public static func source(_ argument: String) -> MigrationStreamSource {
        argument == "-" ? .fileDescriptor(0) : .path(argument)
    }

    /// The TPM frontend the stream carries (`tpm-tis`, `tpm-crb`), if any.
    public var frontend: String? {
        sections.first { $0.idstr == TISSection.idstr || $0.idstr == CRBSection.idstr }?.idstr
    }

    /// Walks `source` to its end (or its first error, which is kept, not thrown). `progress` is
    /// called every few MiB with the bytes read so far. Throws only when the source cannot be
    /// opened.
    public static func walk(_ source: MigrationStreamSource, name: String,
                            progress: ((Int) -> Void)? = nil) throws(StreamError) -> StreamInspection {
        var out = StreamInspection(name: name)
        let walker: MigrationStreamWalker
        do {
            walker = try MigrationStreamWalker(source: source)
        } catch where error.code != .io {
            // A damaged vmdesc at the end of a file: walk it as a pipe; reading the trailer at
            // the end reports the damage where it is.
            var o = MigrationStreamWalker.Options()
            o.readTrailingVMDescription = false
            walker = try MigrationStreamWalker(source: source, options: o)
        }
        out.vmDescription = walker.vmDescription
        var lastReport = 0
        do throws(StreamError) {
            try walker.walk { (event: MigrationStreamEvent) throws(StreamError) in
                out.record(event, walker: walker)
                if let progress, walker.statistics.bytesRead - lastReport >= 8 << 20 {
                    lastReport = walker.statistics.bytesRead
                    progress(lastReport)
                }
            }
        } catch {
            out.error = error
        }
        out.bytesRead = walker.statistics.bytesRead
        out.streamLength = walker.streamEndOffset
        if out.vmDescription == nil { out.vmDescription = walker.vmDescription }
        out.configuration = walker.configuration
        out.decodePending()
        return out
    }

    /// analyze-migration.py reads the vmdesc before the sections; through a pipe it only comes
    /// at the end, so the bodies kept on the way are decoded now.
    private mutating func decodePending() {
        defer { pendingBodies = [:] }
        guard let vmdesc = vmDescription else { return }
        for (i, body) in pendingBodies.sorted(by: { $0.key < $1.key }) where i < sections.count {
            let sec = sections[i]
            guard let d = vmdesc.device(idstr: sec.idstr, instanceID: sec.instanceID)?.description else { continue }
            if let o = try? d.decode(body, version: sec.versionID, baseOffset: sec.bodyOffset, section: sec.idstr) {
                sections[i].decoded = (d, o)
            }
        }
    }

    private mutating func record(_ e: MigrationStreamEvent, walker: MigrationStreamWalker) {
        switch e {
        case .header, .configuration, .vmDescription:
            break
        case .command(let c):
            if commands.count < Self.maximumKeptRecords { commands.append(c) } else { droppedRecords += 1 }
        case .endOfStream(let at):
            sawEOF = true
            eofOffset = at
        case .section(let s):
            var sec = InspectedSection(idstr: s.idstr, instanceID: s.instanceID, versionID: s.versionID,
                                       sectionID: s.sectionID, offset: s.offset, bodyOffset: s.bodyOffset,
                                       bodyLength: s.bodyLength)
            switch s.content {
            case .ram(let r):
                ram.sectionID = s.sectionID
                if let t = r.totalSize { ram.totalSize = t }
                ram.blocks += r.blocks
                ram.pages += r.pages
                ram.zeroPages += r.zeroPages
                ram.xbzrlePages += r.xbzrlePages
                ram.compressedPages += r.compressedPages
                ram.sections += 1
                ram.bytes += s.bodyLength
                return
            case .tpmTIS(let t):
                tis = t
                frontendBodyOffset = s.bodyOffset
                sec.decoded = (TISSection.description, TISSection.object(t))
            case .tpmCRB(let regs):
                crbRegisters = regs
                frontendBodyOffset = s.bodyOffset
                sec.decoded = (CRBSection.description, CRBSection.object(regs))
            case .tpmEmulator(let b):
                emulatorBlobs = b
                emulatorBodyOffset = s.bodyOffset
                sec.decoded = (EmulatorSection.description, EmulatorSection.object(b))
            case .decoded(let o):
                if let d = walker.options.descriptions[s.idstr]
                    ?? walker.vmDescription?.device(idstr: s.idstr, instanceID: s.instanceID)?.description {
                    sec.decoded = (d, o)
                }
            case .skipped(let retained):
                if let retained, sections.count < Self.maximumKeptRecords,
                   decodedBytes + retained.count <= Self.maximumDecodedBytes {
                    decodedBytes += retained.count
                    pendingBodies[sections.count] = retained
                }
            }
            if sec.decoded != nil && !sec.idstr.hasPrefix("tpm-") {
                if decodedBytes + sec.bodyLength > Self.maximumDecodedBytes {
                    sec.decoded = nil
                    droppedDecodedSections += 1
                } else {
                    decodedBytes += sec.bodyLength
                }
            }
            if sections.count < Self.maximumKeptRecords || sec.idstr.hasPrefix("tpm-") {
                sections.append(sec)
            } else {
                droppedRecords += 1
            }
        }
    }

    /// Stream offset of `state_blobs.<type>.buffer` (the blob's first byte): the
    /// `tpm-emulator` body is three (be32 flags, be32 size, bytes) records.
    public func blobOffset(_ type: TPMStateBlobType) -> Int? {
        guard let base = emulatorBodyOffset, let b = emulatorBlobs else { return nil }
        var at = base
        for t in TPMStateBlobType.allCases {
            if t == type { return at + 8 }
            at += 8 + b[t].data.count
        }
        return nil
    }

    /// Stream offset of the field of QEMU's name `field` in the `tpm-emulator` section
    /// (`state_blobs.permanent.size`, …).
    public func emulatorFieldOffset(_ type: TPMStateBlobType, _ field: String) -> Int? {
        guard let data = blobOffset(type) else { return nil }
        switch field {
        case "flags": return data - 8
        case "size": return data - 4
        default: return data
        }
    }

    /// QEMU's field name prefix of a blob type in `vmstate_tpm_emulator`.
    public static func qemuBlobName(_ t: TPMStateBlobType) -> String {
        switch t {
        case .permanent: "permanent"
        case .volatile: "volatil"
        case .savestate: "savestate"
        }
    }
}
