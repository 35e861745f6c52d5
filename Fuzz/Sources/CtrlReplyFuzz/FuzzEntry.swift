import Fuzzing

/// libFuzzer entry: byte 0 picks decoders / ctrl client / data channel, the rest is what
/// swtpm answers (`CtrlReplyFuzz`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = [UInt8](UnsafeBufferPointer(start: data, count: size))
    do {
        try CtrlReplyFuzz.run(bytes)
    } catch {
        fatalError("\(error)")
    }
    return 0
}
