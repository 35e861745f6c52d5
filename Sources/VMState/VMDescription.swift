/// The vmdesc trailer QEMU appends after the EOF byte (`QEMU_VM_VMDESCRIPTION`, 0x06 + be32
/// length + JSON; `qemu_savevm_state_complete_precopy_non_iterable`): the target page size and,
/// for every non-iterable device section, its vmsd with the sizes actually written. It is what
/// lets a reader walk device sections it has no built-in description for (analyze-migration.py).
public struct VMDescription: Sendable {
    /// One `devices[]` entry.
    public struct Device: Sendable {
        /// The section idstr (`0000:00:01.3/piix4_pm`, `tpm-tis`).
        public var name: String
        /// The section instance_id.
        public var instanceID: UInt32
        /// The vmsd converted to a schema (sizes as written), or nil when the entry cannot be
        /// used to decode (then `problem` says why).
        public var description: VMStateDescription?
        /// Why `description` is nil.
        public var problem: String?
        /// The entry as parsed.
        public var json: JSONValue
    }

    /// `page_size`: TARGET_PAGE_SIZE of the source.
    public var pageSize: Int
    /// The `devices[]` entries, in stream order.
    public var devices: [Device]
    /// The whole JSON as parsed.
    public var json: JSONValue

    /// The device entry for a section.
    public func device(idstr: String, instanceID: UInt32) -> Device? {
        devices.first { $0.name == idstr && $0.instanceID == instanceID }
    }

    /// Parses the JSON text of a trailer that starts at stream offset `baseOffset`.
    public static func parse(_ bytes: [UInt8], baseOffset: Int = 0) throws(StreamError) -> VMDescription {
        let json = try JSONParser.parse(bytes, baseOffset: baseOffset)
        func bad(_ field: String, _ detail: String) -> StreamError {
            StreamError(.badVMDescription, section: "vmdesc", field: field, offset: baseOffset, detail: detail)
        }
        guard let ps = json["page_size"]?.intValue, ps >= 512, ps <= 1 << 16, ps & (ps - 1) == 0 else {
            throw bad("page_size", "missing, or not a power of two in 512...65536")
        }
        guard let list = json["devices"]?.arrayValue else { throw bad("devices", "missing") }
        var devices: [Device] = []
        devices.reserveCapacity(list.count)
        for entry in list {
            guard let name = entry["name"]?.stringValue, let inst = entry["instance_id"]?.intValue,
                  inst >= 0, inst <= Int64(UInt32.max) else {
                throw bad("devices", "an entry without name or instance_id")
            }
            var d = Device(name: name, instanceID: UInt32(inst), description: nil, problem: nil, json: entry)
            do {
                d.description = try Self.description(from: entry, depth: 0)
            } catch {
                d.problem = error.message
            }
            devices.append(d)
        }
        return VMDescription(pageSize: Int(ps), devices: devices, json: json)
    }

    struct Unusable: Error { var message: String }

    /// A vmdesc vmsd object → schema. Fields are read by their recorded `size`, as
    /// analyze-migration.py does; integer types are decoded when the size matches.
    static func description(from j: JSONValue, depth: Int) throws(Unusable) -> VMStateDescription {
        guard depth < 32 else { throw Unusable(message: "nesting too deep") }
        guard let fields = j["fields"]?.arrayValue else { throw Unusable(message: "no fields") }
        guard let name = j["vmsd_name"]?.stringValue ?? j["name"]?.stringValue else { throw Unusable(message: "no vmsd_name") }
        guard let v = j["version"]?.intValue, v >= 0, v <= Int64(UInt32.max) else { throw Unusable(message: "\(name): no version") }
        var out = VMStateDescription(name: name, versionID: UInt32(v), fields: [])
        for f in fields {
            guard let fname = f["name"]?.stringValue, let type = f["type"]?.stringValue,
                  let size = f["size"]?.intValue, size >= 0, size <= Int64(Int32.max) else {
                throw Unusable(message: "\(name): a field without name, type or size")
            }
            let n = Int(size)
            var kind: VMStateFieldKind
            switch (type, n) {
            case ("struct", _):
                guard let s = f["struct"] else { throw Unusable(message: "\(name).\(fname): struct without description") }
                let sd = try description(from: s, depth: depth + 1)
                kind = .structure(sd, structVersion: sd.versionID)
            case ("uint8", 1): kind = .uint8
            case ("uint16", 2): kind = .uint16
            case ("uint32", 4): kind = .uint32
            case ("uint64", 8): kind = .uint64
            case ("int8", 1): kind = .int8
            case ("int16", 2): kind = .int16
            case ("int32", 4): kind = .int32
            case ("int64", 8): kind = .int64
            case ("bool", 1): kind = .bool
            case ("int32 le", 4): kind = .int32LittleEndian
            case ("buffer", _): kind = .buffer(size: n)
            default: kind = .opaque(type: type, size: n)
            }
            if let count = f["array_len"]?.intValue {
                guard count >= 0, count <= Int64(Int32.max) else { throw Unusable(message: "\(name).\(fname): bad array_len") }
                kind = .array(count: Int(count), of: kind)
            }
            out.fields.append(VMStateField(fname, kind, versionID: 0))
        }
        for s in j["subsections"]?.arrayValue ?? [] {
            out.subsections.append(try description(from: s, depth: depth + 1))
        }
        return out
    }

    /// Finds the trailer in the last bytes of a stream: the one 0x06 byte followed by a be32
    /// length that runs exactly to the end and by `{`. Exact where analyze-migration.py's
    /// "last NUL, then first brace" guess is not (it breaks when the length bytes hold 0x7B):
    /// compact JSON contains no byte below 0x20, so the marker is among the 5 bytes at and
    /// before the last such byte. Returns the marker's index in `tail`.
    static func locate(inTail tail: [UInt8]) -> Int? {
        var q = tail.count - 1
        while q >= 0, tail[q] >= 0x20 { q -= 1 }
        guard q >= 0 else { return nil }
        for p in stride(from: q, through: Swift.max(0, q - 4), by: -1) where tail[p] == SectionType.vmDescription.rawValue {
            guard p + 5 < tail.count else { continue }
            let len = Int(tail[p + 1]) << 24 | Int(tail[p + 2]) << 16 | Int(tail[p + 3]) << 8 | Int(tail[p + 4])
            if len == tail.count - p - 5, tail[p + 5] == UInt8(ascii: "{") { return p }
        }
        return nil
    }
}
