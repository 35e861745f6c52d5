import Fuzzing

/// libFuzzer entry: the input is a migration stream for `StreamFuzz` (the walker and
/// `TPMMigrationState(source:)`). Seed the corpus with Tests/VMStateTests/Fixtures/*.bin and
/// TPM-only streams; Tests/FuzzTests/Corpus/stream/ holds kept inputs.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = [UInt8](UnsafeBufferPointer(start: data, count: size))
    do {
        try StreamFuzz.run(bytes, smallChunks: size % 2 == 0)
    } catch {
        fatalError("\(error)")
    }
    return 0
}
