import WireFormat

/// What decoding keeps in memory: stream content is never trusted to size an allocation.
public struct VMStateLimits: Sendable, Equatable {
    /// Buffers and opaque fields above this are skipped on the wire and kept as `.skipped`.
    public var maximumRetainedFieldSize: Int
    /// Arrays with more elements are refused (`lengthOverLimit`).
    public var maximumArrayElements: Int

    /// Limits; the defaults keep 1 MiB per field and 2^20 elements per array.
    public init(maximumRetainedFieldSize: Int = 1 << 20, maximumArrayElements: Int = 1 << 20) {
        self.maximumRetainedFieldSize = maximumRetainedFieldSize
        self.maximumArrayElements = maximumArrayElements
    }
}

/// Loads vmstate bodies from a stream: QEMU's `vmstate_load_state` and
/// `vmstate_subsection_load` (migration/vmstate.c), building a `VMStateObject` tree.
struct VMStateLoader {
    let input: MigrationInput
    let limits: VMStateLimits

    private func error(_ code: StreamError.Code, _ field: String, _ offset: Int, _ detail: String) -> StreamError {
        StreamError(code, section: input.section, field: field, offset: offset, detail: detail)
    }

    /// `vmstate_load_state`: version checks, then every field present at `version`, then the
    /// subsections. `versionOffset` is where the version came from, for errors.
    func load(_ d: VMStateDescription, version: UInt32, path: String = "", versionOffset: Int) throws(StreamError) -> VMStateObject {
        guard version <= d.versionID else {
            throw error(.versionOutOfRange, path.isEmpty ? "version_id" : path, versionOffset,
                        "incoming version_id \(version) is too new for local version_id \(d.versionID) of \(d.name)")
        }
        guard version >= d.minimumVersionID else {
            throw error(.versionOutOfRange, path.isEmpty ? "version_id" : path, versionOffset,
                        "incoming version_id \(version) is too old for local minimum version_id \(d.minimumVersionID) of \(d.name)")
        }
        var out = VMStateObject(name: d.name, versionID: version, fields: [])
        out.fields.reserveCapacity(d.fields.count)
        for f in d.fields where f.versionID <= version {
            let at = input.offset
            let name = path.isEmpty ? f.name : "\(path).\(f.name)"
            let v = try loadKind(f.kind, name: name, earlier: out.fields)
            out.fields.append(VMStateFieldValue(name: f.name, value: v, offset: at))
        }
        out.subsections = try loadSubsections(of: d)
        return out
    }

    private func count(from field: String, in earlier: [VMStateFieldValue], limit: Int, for name: String) throws(StreamError) -> Int {
        guard let f = earlier.last(where: { $0.name == field }), let n = f.value.unsignedValue else {
            throw error(.invalidField, name, input.offset, "its length field \(field) is not an earlier unsigned field")
        }
        guard n <= UInt64(limit) else {
            throw error(.lengthOverLimit, field, f.offset, "\(name) would be \(n) long; the limit is \(limit)")
        }
        return Int(n)
    }

    private func retained(_ size: Int, _ name: String) throws(StreamError) -> VMStateValue {
        if size > limits.maximumRetainedFieldSize {
            try input.skip(size, name)
            return .skipped(byteCount: size)
        }
        return .bytes(try input.readBytes(size, name, limit: limits.maximumRetainedFieldSize))
    }

    private func loadKind(_ kind: VMStateFieldKind, name: String, earlier: [VMStateFieldValue]) throws(StreamError) -> VMStateValue {
        switch kind {
        case .uint8, .bool: return .unsigned(UInt64(try input.readUInt8(name)))
        case .uint16: return .unsigned(UInt64(try input.readBigEndianUInt16(name)))
        case .uint32: return .unsigned(UInt64(try input.readBigEndianUInt32(name)))
        case .uint64: return .unsigned(try input.readBigEndianUInt64(name))
        case .int8: return .signed(Int64(Int8(bitPattern: try input.readUInt8(name))))
        case .int16: return .signed(Int64(Int16(bitPattern: try input.readBigEndianUInt16(name))))
        case .int32: return .signed(Int64(Int32(bitPattern: try input.readBigEndianUInt32(name))))
        case .int64: return .signed(Int64(bitPattern: try input.readBigEndianUInt64(name)))
        case .int32LittleEndian:
            return .signed(Int64(Int32(bitPattern: (try input.readBigEndianUInt32(name)).byteSwapped)))
        case .buffer(let size), .opaque(_, let size):
            return try retained(size, name)
        case .vbuffer(let sizeField, let limit):
            let n = try count(from: sizeField, in: earlier, limit: limit, for: name)
            return .bytes(try input.readBytes(n, name, limit: limit))
        case .structure(let d, let structVersion):
            return .structure(try load(d, version: structVersion, path: name, versionOffset: input.offset))
        case .array(let n, let element):
            guard n >= 0, n <= limits.maximumArrayElements else {
                throw error(.lengthOverLimit, name, input.offset, "\(n) elements; the limit is \(limits.maximumArrayElements)")
            }
            return try loadArray(n, element, name: name, earlier: earlier)
        case .varray(let countField, let limit, let element):
            let n = try count(from: countField, in: earlier, limit: min(limit, limits.maximumArrayElements), for: name)
            return try loadArray(n, element, name: name, earlier: earlier)
        case .capability:
            let n = try input.readUInt8(name + ".len")
            return .string(String(decoding: try input.readBytes(Int(n), name, limit: 255), as: UTF8.self))
        }
    }

    private func loadArray(_ n: Int, _ element: VMStateFieldKind, name: String, earlier: [VMStateFieldValue]) throws(StreamError) -> VMStateValue {
        if element == .uint8 { return try retained(n, name) }
        var items: [VMStateValue] = []
        items.reserveCapacity(min(n, 4096))
        for i in 0..<n {
            items.append(try loadKind(element, name: "\(name)[\(i)]", earlier: earlier))
        }
        return .array(items)
    }

    /// `vmstate_subsection_load`: while the next byte is 0x05, peek the name; a name without the
    /// parent's prefix ends the subsections (QEMU returns 0 and the caller then fails on the
    /// footer); a name with the prefix but no description is `-ENOENT`.
    private func loadSubsections(of d: VMStateDescription) throws(StreamError) -> [VMStateObject] {
        var subs: [VMStateObject] = []
        while try input.peekUInt8() == SectionType.subsection.rawValue {
            let head = try input.peek(2 + 255)
            guard head.count >= 2 else { break }
            let len = Int(head[1])
            guard len >= d.name.utf8.count + 1, head.count >= 2 + len else { break }
            let nameBytes = head[2..<(2 + len)]
            guard nameBytes.starts(with: d.name.utf8) else { break }
            let name = String(decoding: nameBytes, as: UTF8.self)
            guard let sub = d.subsections.first(where: { $0.name == name }) else {
                throw error(.unknownSubsection, name, input.offset, "\(d.name) has no subsection \(name)")
            }
            try input.skip(2 + len, "subsection")
            let at = input.offset
            let version = try input.readBigEndianUInt32("\(name).version_id")
            subs.append(try load(sub, version: version, path: name, versionOffset: at))
        }
        return subs
    }
}

/// Saves vmstate bodies: QEMU's `vmstate_save_state_v` and `vmstate_subsection_save`, checking
/// that the value tree matches the description (a vbuffer's size field equals its length, a
/// fixed buffer has its size, integers fit their width).
struct VMStateSaver {
    var out = ByteWriter(capacity: 256)
    /// Stream offset of the first byte written, for errors.
    var baseOffset = 0
    var section = ""

    private func error(_ field: String, _ detail: String) -> StreamError {
        StreamError(.invalidField, section: section, field: field, offset: baseOffset + out.count, detail: detail)
    }

    mutating func save(_ d: VMStateDescription, _ obj: VMStateObject, path: String = "") throws(StreamError) {
        guard obj.versionID <= d.versionID, obj.versionID >= d.minimumVersionID else {
            throw StreamError(.versionOutOfRange, section: section, field: path.isEmpty ? "version_id" : path,
                              offset: baseOffset + out.count,
                              detail: "version \(obj.versionID) outside \(d.minimumVersionID)...\(d.versionID) of \(d.name)")
        }
        var values = obj.fields[...]
        var earlier: [VMStateFieldValue] = []
        for f in d.fields where f.versionID <= obj.versionID {
            let name = path.isEmpty ? f.name : "\(path).\(f.name)"
            guard let v = values.first, v.name == f.name else {
                throw error(name, "the value tree has no \(f.name) here")
            }
            values = values.dropFirst()
            try saveKind(f.kind, v.value, name: name, earlier: earlier)
            earlier.append(v)
        }
        if let extra = values.first { throw error(extra.name, "not a field of \(d.name) version \(obj.versionID)") }
        for sub in obj.subsections {
            guard let sd = d.subsections.first(where: { $0.name == sub.name }) else {
                throw StreamError(.unknownSubsection, section: section, field: sub.name, offset: baseOffset + out.count,
                                  detail: "\(d.name) has no subsection \(sub.name)")
            }
            out.writeUInt8(SectionType.subsection.rawValue)
            out.writeUInt8PrefixedString(sd.name)
            out.writeBigEndianUInt32(sub.versionID)
            try save(sd, sub, path: sub.name)
        }
    }

    private mutating func unsigned(_ v: VMStateValue, max: UInt64, _ name: String) throws(StreamError) -> UInt64 {
        guard case .unsigned(let x) = v, x <= max else { throw error(name, "expected an unsigned value ≤ \(max), got \(v)") }
        return x
    }

    private mutating func signed(_ v: VMStateValue, bits: Int, _ name: String) throws(StreamError) -> Int64 {
        let lo = bits == 64 ? Int64.min : -(Int64(1) << (bits - 1))
        let hi = bits == 64 ? Int64.max : (Int64(1) << (bits - 1)) - 1
        guard case .signed(let x) = v, x >= lo, x <= hi else { throw error(name, "expected a signed \(bits)-bit value, got \(v)") }
        return x
    }

    private mutating func bytes(_ v: VMStateValue, count: Int?, _ name: String) throws(StreamError) {
        guard case .bytes(let b) = v else { throw error(name, "expected bytes, got \(v)") }
        if let count, b.count != count { throw error(name, "\(b.count) bytes where the description has \(count)") }
        out.writeBytes(b)
    }

    private func elementCount(_ field: String, _ earlier: [VMStateFieldValue], _ name: String) throws(StreamError) -> Int {
        guard let f = earlier.last(where: { $0.name == field }), case .unsigned(let n) = f.value else {
            throw error(name, "its length field \(field) is not an earlier unsigned field")
        }
        return Int(clamping: n)
    }

    mutating func saveKind(_ kind: VMStateFieldKind, _ v: VMStateValue, name: String, earlier: [VMStateFieldValue]) throws(StreamError) {
        switch kind {
        case .uint8, .bool: out.writeUInt8(UInt8(try unsigned(v, max: 0xFF, name)))
        case .uint16: out.writeBigEndianUInt16(UInt16(try unsigned(v, max: 0xFFFF, name)))
        case .uint32: out.writeBigEndianUInt32(UInt32(try unsigned(v, max: 0xFFFF_FFFF, name)))
        case .uint64: out.writeBigEndianUInt64(try unsigned(v, max: .max, name))
        case .int8: out.writeUInt8(UInt8(bitPattern: Int8(try signed(v, bits: 8, name))))
        case .int16: out.writeBigEndianUInt16(UInt16(bitPattern: Int16(try signed(v, bits: 16, name))))
        case .int32: out.writeBigEndianUInt32(UInt32(bitPattern: Int32(try signed(v, bits: 32, name))))
        case .int64: out.writeBigEndianUInt64(UInt64(bitPattern: try signed(v, bits: 64, name)))
        case .int32LittleEndian: out.writeLittleEndianUInt32(UInt32(bitPattern: Int32(try signed(v, bits: 32, name))))
        case .buffer(let size), .opaque(_, let size):
            try bytes(v, count: size, name)
        case .vbuffer(let sizeField, let limit):
            let n = try elementCount(sizeField, earlier, name)
            guard n <= limit else { throw error(sizeField, "\(n) exceeds the limit \(limit)") }
            try bytes(v, count: n, name)
        case .structure(let d, _):
            guard case .structure(let o) = v else { throw error(name, "expected a structure, got \(v)") }
            try save(d, o, path: name)
        case .array(let n, let element):
            try saveArray(n, element, v, name: name, earlier: earlier)
        case .varray(let countField, _, let element):
            try saveArray(try elementCount(countField, earlier, name), element, v, name: name, earlier: earlier)
        case .capability:
            guard case .string(let s) = v, s.utf8.count <= 255 else { throw error(name, "expected a capability name") }
            out.writeUInt8PrefixedString(s)
        }
    }

    private mutating func saveArray(_ n: Int, _ element: VMStateFieldKind, _ v: VMStateValue, name: String,
                                    earlier: [VMStateFieldValue]) throws(StreamError) {
        if element == .uint8, case .bytes = v { return try bytes(v, count: n, name) }
        guard case .array(let items) = v, items.count == n else { throw error(name, "expected an array of \(n) elements") }
        for (i, item) in items.enumerated() {
            try saveKind(element, item, name: "\(name)[\(i)]", earlier: earlier)
        }
    }

    /// The number of bytes `value` takes on the wire as `kind` (vmdesc `"size"`).
    static func encodedSize(_ kind: VMStateFieldKind, _ value: VMStateValue, earlier: [VMStateFieldValue]) throws(StreamError) -> Int {
        var s = VMStateSaver()
        try s.saveKind(kind, value, name: "", earlier: earlier)
        return s.out.count
    }
}

/// The vmdesc side of `vmstate_save_state_v` (`vmsd_desc_field_start` / `_end`) and of
/// `qemu_savevm_state_complete_precopy_non_iterable`: the JSON QEMU writes for a device.
enum VMDescriptionEmitter {
    /// `{"name": idstr, "instance_id": n, "vmsd_name": …, "version": …, "fields": […], "subsections": […]?}`.
    static func device(idstr: String, instanceID: UInt32, _ d: VMStateDescription, _ obj: VMStateObject,
                       into w: inout QEMUJSONWriter) throws(StreamError) {
        w.startObject()
        w.string("name", idstr)
        w.int("instance_id", Int64(instanceID))
        try body(d, obj, into: &w)
        w.endObject()
    }

    static func body(_ d: VMStateDescription, _ obj: VMStateObject, into w: inout QEMUJSONWriter) throws(StreamError) {
        w.string("vmsd_name", d.name)
        w.int("version", Int64(obj.versionID))
        w.startArray("fields")
        var values = obj.fields[...]
        var earlier: [VMStateFieldValue] = []
        for (index, f) in d.fields.enumerated() where f.versionID <= obj.versionID {
            guard let v = values.first, v.name == f.name else {
                throw StreamError(.invalidField, field: f.name, offset: -1, detail: "the value tree has no \(f.name) here")
            }
            values = values.dropFirst()
            let (elementKind, elements): (VMStateFieldKind, [VMStateValue])
            switch (f.kind, v.value) {
            case (.array(_, let k), .bytes(let b)), (.varray(_, _, let k), .bytes(let b)):
                (elementKind, elements) = (k, b.map { .unsigned(UInt64($0)) })
            case (.array(_, let k), .array(let items)), (.varray(_, _, let k), .array(let items)):
                (elementKind, elements) = (k, items)
            default:
                (elementKind, elements) = (f.kind, [v.value])
            }
            let compress = d.canCompress(f.kind)
            for (i, element) in elements.enumerated() {
                w.startObject()
                w.string("name", d.vmdescName(ofFieldAt: index))
                if elements.count > 1 {
                    if compress { w.int("array_len", Int64(elements.count)) } else { w.int("index", Int64(i)) }
                }
                w.string("type", f.kind.typeName)
                if case .structure(let sd, _) = elementKind, case .structure(let so) = element {
                    w.startObject("struct")
                    try body(sd, so, into: &w)
                    w.endObject()
                }
                w.int("size", Int64(try VMStateSaver.encodedSize(elementKind, element, earlier: earlier)))
                w.endObject()
                if compress { break }
            }
            earlier.append(v)
        }
        w.endArray()
        if !obj.subsections.isEmpty {
            w.startArray("subsections")
            for sub in obj.subsections {
                guard let sd = d.subsections.first(where: { $0.name == sub.name }) else {
                    throw StreamError(.unknownSubsection, field: sub.name, offset: -1, detail: "\(d.name) has no subsection \(sub.name)")
                }
                w.startObject()
                try body(sd, sub, into: &w)
                w.endObject()
            }
            w.endArray()
        }
    }
}

extension VMStateDescription {
    /// Decodes a section body held in memory, starting at stream offset `baseOffset`
    /// (`vmstate_load_state`). Trailing bytes are an error.
    public func decode(_ bytes: [UInt8], version: UInt32, baseOffset: Int = 0, section: String? = nil,
                       limits: VMStateLimits = VMStateLimits()) throws(StreamError) -> VMStateObject {
        let input = try MigrationInput(.bytes(bytes), chunkSize: Swift.max(4096, Swift.min(bytes.count, 1 << 20)),
                                       startOffset: baseOffset)
        input.section = section ?? name
        let obj = try VMStateLoader(input: input, limits: limits).load(self, version: version, versionOffset: baseOffset)
        if !(try input.isAtEnd()) {
            throw StreamError(.invalidField, section: section ?? name, field: "(end)", offset: input.offset,
                              detail: "bytes left after the last field of \(name)")
        }
        return obj
    }

    /// Encodes a value tree as a section body (`vmstate_save_state`).
    public func encode(_ obj: VMStateObject, baseOffset: Int = 0, section: String? = nil) throws(StreamError) -> [UInt8] {
        var s = VMStateSaver(baseOffset: baseOffset, section: section ?? name)
        try s.save(self, obj)
        return s.out.bytes
    }

    /// The vmdesc JSON object QEMU writes for a device saved with this description.
    public func vmdescJSON(idstr: String, instanceID: UInt32 = 0, _ obj: VMStateObject) throws(StreamError) -> String {
        var w = QEMUJSONWriter()
        try VMDescriptionEmitter.device(idstr: idstr, instanceID: instanceID, self, obj, into: &w)
        return String(decoding: w.text, as: UTF8.self)
    }
}

extension VMStateObject {
    /// Every field's stream offset by dotted path (`state.loc[2].state`), for errors.
    func offsets(prefix: String = "") -> [String: Int] {
        var out: [String: Int] = [:]
        func walk(_ v: VMStateValue, _ path: String, _ at: Int) {
            switch v {
            case .structure(let o):
                for f in o.fields {
                    out["\(path).\(f.name)"] = f.offset
                    walk(f.value, "\(path).\(f.name)", f.offset)
                }
            case .array(let items):
                for (i, item) in items.enumerated() {
                    let p = "\(path)[\(i)]"
                    if case .structure(let o) = item, let first = o.fields.first { out[p] = first.offset }
                    walk(item, p, at)
                }
            default: break
            }
        }
        for f in fields {
            let p = prefix.isEmpty ? f.name : "\(prefix).\(f.name)"
            out[p] = f.offset
            walk(f.value, p, f.offset)
        }
        return out
    }
}
