import CLibtpms
import Synchronization
#if canImport(Glibc)
import Glibc
#endif
import WireFormat

// libtpms keeps one TPM in C globals and its callbacks carry no context pointer, so what the
// callbacks need lives here, process-wide, behind its own locks (never the engine lock: the
// callbacks run inside TPMLIB_Process / MainInit while the engine lock is held).
enum LibtpmsGlobals {
    /// The NV store the callbacks read and write.
    static let nv = Mutex(NVStore())
    /// The locality `tpm_io_getlocality` reports: that of the command being processed.
    static let locality = Atomic<UInt8>(0)
    /// Whether a LibtpmsBackend is live in this process.
    static let live = Atomic<Bool>(false)
}

struct NVStore: ~Copyable {
    var directory: StateDirectory? = nil
    var memory: [String: [UInt8]] = [:]
    var lastError: BackendError? = nil
    var storeCount = 0
}

let tpmSuccess: TPM_RESULT = 0
let tpmFail: TPM_RESULT = 9
let tpmRetry: TPM_RESULT = 0x800

private func nvInit() -> TPM_RESULT { tpmSuccess }

private func nvLoad(_ data: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>?,
                    _ length: UnsafeMutablePointer<UInt32>?, _ tpmNumber: UInt32,
                    _ name: UnsafePointer<CChar>?) -> TPM_RESULT {
    guard let data, let length, let name else { return tpmFail }
    let key = String(cString: name)
    let loaded: Result<[UInt8]?, BackendError> = LibtpmsGlobals.nv.withLock { nv in
        if let m = nv.memory[key] { return .success(m) }
        guard let dir = nv.directory else { return .success(nil) }
        do throws(BackendError) {
            let b = try dir.load(key)
            if let b { nv.memory[key] = b }
            return .success(b)
        } catch {
            nv.lastError = error
            return .failure(error)
        }
    }
    guard case .success(let blobOrNil) = loaded else { return tpmFail }
    // TPM_RETRY: "does not exist yet"; libtpms then manufactures a fresh TPM.
    guard let blob = blobOrNil, !blob.isEmpty else { return tpmRetry }
    var buf: UnsafeMutablePointer<UInt8>? = nil
    let rc = TPM_Malloc(&buf, UInt32(blob.count))   // libtpms frees it
    guard rc == tpmSuccess, let buf else { return rc == tpmSuccess ? tpmFail : rc }
    blob.withUnsafeBufferPointer { src in
        if let base = src.baseAddress { buf.update(from: base, count: blob.count) }
    }
    data.pointee = buf
    length.pointee = UInt32(blob.count)
    return tpmSuccess
}

private func nvStore(_ data: UnsafePointer<UInt8>?, _ length: UInt32, _ tpmNumber: UInt32,
                     _ name: UnsafePointer<CChar>?) -> TPM_RESULT {
    guard let name else { return tpmFail }
    let key = String(cString: name)
    let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: Int(length))) } ?? []
    return LibtpmsGlobals.nv.withLock { nv in
        do throws(BackendError) {
            try nv.directory?.store(key, bytes)
        } catch {
            nv.lastError = error
            return tpmFail
        }
        nv.memory[key] = bytes
        nv.storeCount += 1
        return tpmSuccess
    }
}

private func nvDelete(_ tpmNumber: UInt32, _ name: UnsafePointer<CChar>?, _ mustExist: TPM_BOOL) -> TPM_RESULT {
    guard let name else { return tpmFail }
    let key = String(cString: name)
    return LibtpmsGlobals.nv.withLock { nv in
        var existed = nv.memory.removeValue(forKey: key) != nil
        do throws(BackendError) {
            if let dir = nv.directory, try dir.delete(key) { existed = true }
        } catch {
            nv.lastError = error
            return tpmFail
        }
        return (!existed && mustExist != 0) ? tpmFail : tpmSuccess
    }
}

private func ioInit() -> TPM_RESULT { tpmSuccess }

private func ioGetLocality(_ locality: UnsafeMutablePointer<TPM_MODIFIER_INDICATOR>?, _ tpmNumber: UInt32) -> TPM_RESULT {
    locality?.pointee = TPM_MODIFIER_INDICATOR(LibtpmsGlobals.locality.load(ordering: .relaxed))
    return tpmSuccess
}

private func ioGetPhysicalPresence(_ pp: UnsafeMutablePointer<TPM_BOOL>?, _ tpmNumber: UInt32) -> TPM_RESULT {
    pp?.pointee = 0
    return tpmSuccess
}

/// An in-process TPM on libtpms: the embedded default backend.
///
/// libtpms holds exactly one TPM per process in C globals, so at most one `LibtpmsBackend` is
/// live at a time; creating a second one throws `.libtpmsInUse` instead of sharing state. Its
/// NV state lives in a `StateDirectory` under swtpm's file names and format, written
/// atomically on every NV change, or in memory when no directory is given.
///
/// State blobs in and out are in swtpm's migration form (header + TLV 4 + TLV 1), the form the
/// `tpm-emulator` section of a QEMU stream carries, so a stream saved from QEMU + swtpm loads
/// here and one saved here loads into QEMU + swtpm.
public final class LibtpmsBackend: TPMBackend, @unchecked Sendable {
    public let tpmVersion: TPMVersion
    public let stateDirectory: StateDirectory?

    private struct Engine: ~Copyable {
        var running = false
        var closed = false
        var response: UnsafeMutablePointer<UInt8>? = nil
        var responseCapacity: UInt32 = 0
        var bufferSize: UInt32 = 4096
    }
    // The engine's pointers are only touched under this lock; hence @unchecked Sendable.
    private let engine = Mutex(Engine())

    /// Claims libtpms for this process. `stateDirectory` nil keeps the NV state in memory.
    public init(version: TPMVersion = .tpm20, stateDirectory: String? = nil) throws(BackendError) {
        guard version != .unspecified else {
            throw BackendError(.unsupported, "libtpms backend needs TPM version 1.2 or 2.0")
        }
        let dir = stateDirectory.map { StateDirectory(path: $0, version: version) }
        if let dir { try dir.create() }
        let (exchanged, _) = LibtpmsGlobals.live.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing)
        guard exchanged else {
            throw BackendError(.libtpmsInUse,
                               "another LibtpmsBackend is live in this process; libtpms holds one TPM per process (use SwtpmBackend for more)")
        }
        self.tpmVersion = version
        self.stateDirectory = dir
        LibtpmsGlobals.nv.withLock { nv in
            nv.directory = dir
            nv.memory = [:]
            nv.lastError = nil
            nv.storeCount = 0
        }
    }

    deinit {
        shutdown()
    }

    /// `TPMLIB_GetVersion()`, e.g. 0x000902 for 0.9.2.
    public static var libraryVersion: UInt32 { TPMLIB_GetVersion() }

    private func check(_ rc: TPM_RESULT, _ call: String, blob: TPMStateBlobType? = nil) throws(BackendError) {
        guard rc == tpmSuccess else {
            let nvError = LibtpmsGlobals.nv.withLock { nv -> BackendError? in
                defer { nv.lastError = nil }
                return nv.lastError
            }
            let why = nvError.map { " (NV storage: \($0.message))" } ?? ""
            throw BackendError(.libtpmsCall, "\(call) failed" + why, operation: call, tpmResult: rc, blobType: blob)
        }
    }

    private var libtpmsVersion: TPMLIB_TPMVersion {
        tpmVersion == .tpm12 ? TPMLIB_TPM_VERSION_1_2 : TPMLIB_TPM_VERSION_2
    }

    /// ChooseTPMVersion + RegisterCallbacks + SetBufferSize, before SetState / MainInit.
    private func prepare(_ e: inout Engine) throws(BackendError) {
        try check(TPMLIB_ChooseTPMVersion(libtpmsVersion), "TPMLIB_ChooseTPMVersion")
        try check(Self.registerCallbacks(), "TPMLIB_RegisterCallbacks")
        var minSize: UInt32 = 0, maxSize: UInt32 = 0
        e.bufferSize = TPMLIB_SetBufferSize(e.bufferSize, &minSize, &maxSize)
    }

    /// The NVRAM and I/O callbacks (swtpm's `libtpms_cbs`), backed by `LibtpmsGlobals.nv`.
    private static func registerCallbacks() -> TPM_RESULT {
        var cbs = libtpms_callbacks()
        cbs.sizeOfStruct = Int32(MemoryLayout<libtpms_callbacks>.size)
        cbs.tpm_nvram_init = nvInit
        cbs.tpm_nvram_loaddata = nvLoad
        cbs.tpm_nvram_storedata = nvStore
        cbs.tpm_nvram_deletename = nvDelete
        cbs.tpm_io_init = ioInit
        cbs.tpm_io_getlocality = ioGetLocality
        cbs.tpm_io_getphysicalpresence = ioGetPhysicalPresence
        return TPMLIB_RegisterCallbacks(&cbs)
    }

    /// Whether this libtpms accepts plain libtpms state blobs, as a migration destination's
    /// swtpm would: `TPMLIB_ChooseTPMVersion`, `TPMLIB_SetState` for each non-empty blob in the
    /// order swtpm's SET_STATEBLOB takes them (permanent, volatile, savestate; SetState
    /// test-unmarshals each at once), then `TPMLIB_ValidateState` over the types set.
    ///
    /// Claims the process-wide libtpms for the duration (throws `.libtpmsInUse` while a
    /// `LibtpmsBackend` is live), never powers the TPM on, never touches a state directory
    /// (the NV callbacks see an empty in-memory store), and clears libtpms' cached blobs before
    /// releasing it. A refusal throws `.libtpmsCall` with the libtpms call, the blob type and
    /// the TPM result (0x2E TPM_RC_BAD_VERSION for newer state, 0x03 for different compile-time
    /// options, 0x1E / 0x43 for the other TPM family, ...).
    public static func validateState(blobs: [(TPMStateBlobType, [UInt8])], version: TPMVersion) throws(BackendError) {
        guard version != .unspecified else {
            throw BackendError(.unsupported, "validation needs TPM version 1.2 or 2.0", operation: "TPMLIB_ValidateState")
        }
        let (exchanged, _) = LibtpmsGlobals.live.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing)
        guard exchanged else {
            throw BackendError(.libtpmsInUse, "a LibtpmsBackend is live in this process; libtpms holds one TPM per process",
                               operation: "TPMLIB_ValidateState")
        }
        LibtpmsGlobals.nv.withLock { nv in
            nv.directory = nil
            nv.memory = [:]
            nv.lastError = nil
        }
        defer {
            for t in [TPMLIB_STATE_PERMANENT, TPMLIB_STATE_VOLATILE, TPMLIB_STATE_SAVE_STATE] {
                _ = TPMLIB_SetState(t, nil, 0)
            }
            // TPMLIB_SetState test-unmarshals the blobs into libtpms' live globals (the NV
            // image, persistent and volatile data, PCRs); a later fresh TPM's manufacture does
            // not reset all of it (its PCR_Read then returned no digest). A throwaway start on
            // an empty NV store puts the globals back to a fresh TPM's.
            LibtpmsGlobals.nv.withLock { nv in nv.memory = [:] }
            if TPMLIB_MainInit() == tpmSuccess { TPMLIB_Terminate() }
            LibtpmsGlobals.nv.withLock { nv in nv.memory = [:] }
            LibtpmsGlobals.live.store(false, ordering: .releasing)
        }
        // libtpms says why it refuses state only in its log ("Minimum version 4 higher than
        // implementation version 3 ...", "Unexpected value for ..."): collect it through a pipe.
        var logPipe: [Int32] = [-1, -1]
        let logging = pipe(&logPipe) == 0
        if logging {
            for fd in logPipe { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
            // Level 0: only the errors libtpms always logs (to stderr when no fd is set).
            TPMLIB_SetDebugFD(logPipe[1])
        }
        defer {
            if logging {
                TPMLIB_SetDebugFD(-1)
                close(logPipe[0])
                close(logPipe[1])
            }
        }
        func log() -> String {
            guard logging else { return "" }
            var out: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 4096)
            while out.count < 16384 {
                let n = chunk.withUnsafeMutableBytes { read(logPipe[0], $0.baseAddress, $0.count) }
                if n <= 0 { break }
                out += chunk[..<n]
            }
            let lines = String(decoding: out, as: UTF8.self).split(separator: "\n")
                .map { String($0.drop { $0 == " " || $0 == "\t" }) }
            return lines.filter { !$0.isEmpty }.prefix(4).joined(separator: "; ")
        }
        func fail(_ rc: TPM_RESULT, _ call: String, _ blob: TPMStateBlobType?) -> BackendError {
            let said = log()
            return BackendError(.libtpmsCall, "\(call) failed" + (said.isEmpty ? "" : ": libtpms: " + said),
                                operation: call, tpmResult: rc, blobType: blob)
        }
        let chosen = version == .tpm12 ? TPMLIB_TPM_VERSION_1_2 : TPMLIB_TPM_VERSION_2
        var rc = TPMLIB_ChooseTPMVersion(chosen)
        guard rc == tpmSuccess else { throw fail(rc, "TPMLIB_ChooseTPMVersion", nil) }
        rc = registerCallbacks()
        guard rc == tpmSuccess else { throw fail(rc, "TPMLIB_RegisterCallbacks", nil) }
        // TPMLIB_ValidateState reads the state through the NV callbacks, as MainInit would
        // from swtpm's state directory: serve the blobs from memory.
        LibtpmsGlobals.nv.withLock { nv in
            for (t, b) in blobs where !b.isEmpty { nv.memory[t.nvName] = b }
        }
        var mask: UInt32 = 0
        for t in TPMStateBlobType.allCases {
            for (type, bytes) in blobs where type == t && !bytes.isEmpty {
                let st = TPMLIB_StateType(rawValue: 1 << (t.rawValue - 1))
                var b = bytes
                rc = b.withUnsafeMutableBufferPointer { TPMLIB_SetState(st, $0.baseAddress, UInt32($0.count)) }
                guard rc == tpmSuccess else { throw fail(rc, "TPMLIB_SetState", t) }
                mask |= st.rawValue
            }
        }
        guard mask != 0 else { return }
        rc = TPMLIB_ValidateState(TPMLIB_StateType(rawValue: mask), 0)
        guard rc == tpmSuccess else { throw fail(rc, "TPMLIB_ValidateState", nil) }
    }

    private func terminate(_ e: inout Engine) {
        guard e.running else { return }
        TPMLIB_Terminate()
        e.running = false
    }

    public func bufferSize() -> Int {
        engine.withLock { e -> Int in
            if !e.running {
                _ = TPMLIB_ChooseTPMVersion(libtpmsVersion)
            }
            var minSize: UInt32 = 0, maxSize: UInt32 = 0
            return Int(TPMLIB_SetBufferSize(0, &minSize, &maxSize))
        }
    }

    /// The sizes libtpms accepts for SET_BUFFERSIZE: (in use, minimum, maximum).
    public func bufferSizeLimits() -> (current: Int, minimum: Int, maximum: Int) {
        engine.withLock { _ in
            var minSize: UInt32 = 0, maxSize: UInt32 = 0
            let cur = TPMLIB_SetBufferSize(0, &minSize, &maxSize)
            return (Int(cur), Int(minSize), Int(maxSize))
        }
    }

    /// swtpm CMD_INIT: (re)start the TPM from the stored NV state. A running TPM is terminated
    /// first. `incoming`: stop and wait for `restoreState(_:)`, as QEMU does under INMIGRATE.
    public func startup(bufferSize: Int, incoming: Bool) throws(BackendError) {
        try engine.withLock { e throws(BackendError) in
            guard !e.closed else { throw BackendError(.notRunning, "the libtpms backend was shut down") }
            terminate(&e)
            if bufferSize > 0 { e.bufferSize = UInt32(clamping: bufferSize) }
            if incoming { return }
            try prepare(&e)
            try check(TPMLIB_MainInit(), "TPMLIB_MainInit")
            e.running = true
        }
    }

    /// Starts the TPM with the default buffer size (4096): `startup(bufferSize:incoming:)`.
    public func start() throws(BackendError) {
        try startup(bufferSize: 4096, incoming: false)
    }

    public var isRunning: Bool { engine.withLock { $0.running } }

    public func execute(_ command: TPMBackendCommand) throws(BackendError) -> TPMBackendResponse {
        try engine.withLock { e throws(BackendError) -> TPMBackendResponse in
            guard e.running else { throw BackendError(.notRunning, "TPM not started", operation: "TPMLIB_Process") }
            LibtpmsGlobals.locality.store(command.locality, ordering: .relaxed)
            var respLen: UInt32 = 0
            // TPMLIB_Process takes `unsigned char *` but only reads the command (it unmarshals
            // from it); passing the caller's bytes saves a copy per command.
            let rc = command.bytes.withUnsafeBufferPointer { c in
                TPMLIB_Process(&e.response, &respLen, &e.responseCapacity, UnsafeMutablePointer(mutating: c.baseAddress), UInt32(c.count))
            }
            try check(rc, "TPMLIB_Process")
            let n = min(Int(respLen), command.maxResponseSize)
            guard let resp = e.response, n > 0 else { return TPMBackendResponse(bytes: []) }
            let bytes = Array(UnsafeBufferPointer(start: resp, count: n))
            return TPMBackendResponse(bytes: bytes, selftestDone: TPMUtil.isSelftestDone(command: command.bytes, response: bytes))
        }
    }

    public func cancelCommand() {
        // The one libtpms call documented as safe from another thread while Process runs.
        _ = TPMLIB_CancelCommand()
    }

    public func establishedFlag() throws(BackendError) -> Bool {
        try engine.withLock { e throws(BackendError) -> Bool in
            guard e.running else { throw BackendError(.notRunning, "TPM not started", operation: "TPM_IO_TpmEstablished_Get") }
            var flag: TPM_BOOL = 0
            try check(TPM_IO_TpmEstablished_Get(&flag), "TPM_IO_TpmEstablished_Get")
            return flag != 0
        }
    }

    public func resetEstablishedFlag(locality: UInt8) throws(BackendError) {
        try engine.withLock { e throws(BackendError) in
            guard e.running else { throw BackendError(.notRunning, "TPM not started", operation: "TPM_IO_TpmEstablished_Reset") }
            LibtpmsGlobals.locality.store(locality, ordering: .relaxed)
            try check(TPM_IO_TpmEstablished_Reset(), "TPM_IO_TpmEstablished_Reset")
        }
    }

    /// The TIS hash sequence (swtpm CMD_HASH_START / DATA / END): resets the DRTM PCRs and
    /// extends PCR 17 with the hash of `data`; sets the established flag.
    public func hashSequence(_ data: [UInt8]) throws(BackendError) {
        try engine.withLock { e throws(BackendError) in
            guard e.running else { throw BackendError(.notRunning, "TPM not started", operation: "TPM_IO_Hash_Start") }
            LibtpmsGlobals.locality.store(4, ordering: .relaxed)
            try check(TPM_IO_Hash_Start(), "TPM_IO_Hash_Start")
            var d = data
            try check(d.withUnsafeMutableBufferPointer { TPM_IO_Hash_Data($0.baseAddress, UInt32($0.count)) }, "TPM_IO_Hash_Data")
            try check(TPM_IO_Hash_End(), "TPM_IO_Hash_End")
        }
    }

    /// The plain libtpms state of one type (TPMLIB_GetState); empty if libtpms has none.
    public func plainState(_ type: TPMStateBlobType) throws(BackendError) -> [UInt8] {
        try engine.withLock { e throws(BackendError) -> [UInt8] in try getState(&e, type) }
    }

    private func libtpmsStateType(_ t: TPMStateBlobType) -> TPMLIB_StateType {
        switch t {
        case .permanent: TPMLIB_STATE_PERMANENT
        case .volatile: TPMLIB_STATE_VOLATILE
        case .savestate: TPMLIB_STATE_SAVE_STATE
        }
    }

    private func getState(_ e: inout Engine, _ type: TPMStateBlobType) throws(BackendError) -> [UInt8] {
        guard e.running else { throw BackendError(.notRunning, "TPM not started", operation: "TPMLIB_GetState", blobType: type) }
        var buf: UnsafeMutablePointer<UInt8>? = nil
        var len: UInt32 = 0
        let rc = TPMLIB_GetState(libtpmsStateType(type), &buf, &len)
        defer { free(buf) }
        if rc == tpmRetry && type == .savestate { return [] }
        try check(rc, "TPMLIB_GetState", blob: type)
        return buf.map { Array(UnsafeBufferPointer(start: $0, count: Int(len))) } ?? []
    }

    public func saveState() throws(BackendError) -> TPMStateBlobs {
        try engine.withLock { e throws(BackendError) -> TPMStateBlobs in
            var blobs = TPMStateBlobs()
            for t in TPMStateBlobType.allCases {
                let plain = try getState(&e, t)
                // swtpm answers an absent state with TPM_RETRY and no bytes; QEMU keeps it empty.
                blobs[t] = plain.isEmpty ? .empty : TPMStateBlob(flags: 0, data: SwtpmBlob.migration(wrapping: plain).encoded())
            }
            return blobs
        }
    }

    /// Extracts the plain libtpms state from a blob: an swtpm container (migration or file
    /// form) or, for convenience, a bare libtpms blob.
    static func plain(_ blob: TPMStateBlob, _ type: TPMStateBlobType) throws(BackendError) -> [UInt8] {
        if blob.flags & 2 != 0 {
            throw BackendError(.stateBlob, "the blob is encrypted with swtpm's migration key; the embedded backend cannot decrypt it (load it into swtpm with the same --migration-key)",
                               operation: "SET_STATEBLOB", blobType: type)
        }
        let d = blob.data
        // A bare libtpms blob starts with an NV header version (0x00 0x0N) and a known magic.
        if d.count >= 2, d[0] == 0 { return d }
        let container: SwtpmBlob
        do { container = try SwtpmBlob.decode(d, field: "\(type)") } catch {
            throw BackendError(.stateBlob, "not an swtpm state blob: \(error)", operation: "SET_STATEBLOB", blobType: type)
        }
        if container.isEncrypted {
            throw BackendError(.stateBlob, "the blob is encrypted (swtpm --key or --migration-key); the embedded backend cannot decrypt it",
                               operation: "SET_STATEBLOB", blobType: type)
        }
        let inner: [UInt8]?
        do { inner = try container.plainState() } catch {
            throw BackendError(.stateBlob, "malformed swtpm state blob: \(error)", operation: "SET_STATEBLOB", blobType: type)
        }
        guard let inner else {
            throw BackendError(.stateBlob, "the swtpm state blob holds no data TLV", operation: "SET_STATEBLOB", blobType: type)
        }
        return inner
    }

    private func setStateAndInit(_ e: inout Engine, _ states: [(TPMStateBlobType, [UInt8])]) throws(BackendError) {
        try prepare(&e)
        for (t, bytes) in states where !bytes.isEmpty {
            var b = bytes
            let rc = b.withUnsafeMutableBufferPointer { TPMLIB_SetState(libtpmsStateType(t), $0.baseAddress, UInt32($0.count)) }
            try check(rc, "TPMLIB_SetState", blob: t)
        }
        try check(TPMLIB_MainInit(), "TPMLIB_MainInit")
        e.running = true
    }

    /// QEMU `tpm_emulator_post_load` against swtpm: STOP, SET_STATEBLOB for the non-empty
    /// blobs, INIT(DELETE_VOLATILE). If libtpms refuses the blobs, the TPM that was running
    /// before is restored and the error thrown: a failed load loses nothing.
    public func restoreState(_ blobs: TPMStateBlobs) throws(BackendError) {
        var states: [(TPMStateBlobType, [UInt8])] = []
        for t in TPMStateBlobType.allCases where !blobs[t].data.isEmpty {
            states.append((t, try Self.plain(blobs[t], t)))
        }
        guard states.contains(where: { $0.0 == .permanent }) else {
            throw BackendError(.stateBlob, "the permanent state blob is empty or missing", operation: "SET_STATEBLOB", blobType: .permanent)
        }
        try engine.withLock { e throws(BackendError) in
            guard !e.closed else { throw BackendError(.notRunning, "the libtpms backend was shut down") }
            var fallback: [(TPMStateBlobType, [UInt8])] = []
            if e.running {
                fallback = [(.permanent, try getState(&e, .permanent)), (.volatile, try getState(&e, .volatile))]
            }
            terminate(&e)
            do throws(BackendError) {
                try setStateAndInit(&e, states)
            } catch {
                terminate(&e)
                if !fallback.isEmpty { try? setStateAndInit(&e, fallback) }
                throw error
            }
            // The restored TPM is now the stored one; INIT's DELETE_VOLATILE drops the old
            // volatile file.
            let perm = states.first { $0.0 == .permanent }?.1 ?? []
            let stored: BackendError? = LibtpmsGlobals.nv.withLock { nv in
                nv.memory[TPMStateBlobType.permanent.nvName] = perm
                nv.memory.removeValue(forKey: TPMStateBlobType.volatile.nvName)
                do throws(BackendError) {
                    try nv.directory?.store(TPMStateBlobType.permanent.nvName, perm)
                    try nv.directory?.delete(TPMStateBlobType.volatile.nvName)
                } catch { return error }
                return nil
            }
            if let stored { throw stored }
        }
    }

    /// swtpm CMD_STORE_VOLATILE: write the volatile state next to the permanent one, so the
    /// next start resumes without TPM2_Startup.
    public func storeVolatile() throws(BackendError) {
        try engine.withLock { e throws(BackendError) in
            let v = try getState(&e, .volatile)
            let err: BackendError? = LibtpmsGlobals.nv.withLock { nv in
                nv.memory[TPMStateBlobType.volatile.nvName] = v
                do throws(BackendError) { try nv.directory?.store(TPMStateBlobType.volatile.nvName, v) } catch { return error }
                return nil
            }
            if let err { throw err }
        }
    }

    /// `TPMLIB_GetInfo` JSON (flags: 1 specification, 2 attributes, 4 features).
    public func info(flags: UInt32) -> String {
        engine.withLock { _ in
            guard let p = TPMLIB_GetInfo(TPMLIB_InfoFlags(rawValue: flags)) else { return "{}" }
            defer { free(p) }
            return String(cString: p)
        }
    }

    /// How many times libtpms stored NV state through the callbacks since creation.
    public var nvStoreCount: Int { LibtpmsGlobals.nv.withLock { $0.storeCount } }

    /// Terminates the TPM and releases libtpms for another backend in this process.
    public func shutdown() {
        let release = engine.withLock { e -> Bool in
            guard !e.closed else { return false }
            terminate(&e)
            if let r = e.response { TPM_Free(r) }
            e.response = nil
            e.responseCapacity = 0
            e.closed = true
            return true
        }
        if release {
            LibtpmsGlobals.nv.withLock { nv in
                nv.directory = nil
                nv.memory = [:]
            }
            LibtpmsGlobals.live.store(false, ordering: .releasing)
        }
    }
}
