#if canImport(Glibc)
import Glibc
#endif
import Fuzzing

/// Ops run over the whole fuzzing session, printed at exit (libFuzzer counts inputs only).
nonisolated(unsafe) var totalOps = 0
nonisolated(unsafe) var atExitInstalled = false

/// libFuzzer entry: the input is an op script for `TISOpScript` (Sources/Fuzzing). A broken
/// invariant traps, so libFuzzer keeps the input as `crash-*`; replay it with the seeded tests
/// by copying it to Tests/FuzzTests/Corpus/tis/.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if !atExitInstalled {
        atExitInstalled = true
        atexit { print("TISFuzz: \(totalOps) TIS ops in total") }
    }
    let bytes = [UInt8](UnsafeBufferPointer(start: data, count: size))
    do {
        totalOps += try TISOpScript.run(bytes, maxOps: 20_000).ops
    } catch {
        fatalError("\(error)")
    }
    return 0
}
