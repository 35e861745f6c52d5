extension SwtpmBlob {
    /// Header versions swtpm can take in CMD_SET_STATEBLOB. swtpm 0.7.1 dies with SIGSEGV on any
    /// other (`SWTPM_NVRAM_GetDecryptedData` switches on the version with no default case and
    /// goes on with no data; found by Tests/HardeningTests), and every swtpm up to 0.10 writes 2.
    public static let settableHeaderVersions: ClosedRange<UInt8> = 1...2

    /// Refuses, before anything reaches swtpm, a blob that would crash or over-read a swtpm
    /// 0.7.1 destination: shorter than the 10-byte header (CVE-2026-75900: 0.7.1 compares
    /// against the size of a pointer and reads past an 8- or 9-byte blob) or a header version
    /// swtpm cannot handle. Everything else (totlen, min_version, hdrsize, the libtpms state) is
    /// left to swtpm, which refuses it with a result code.
    public static func checkBeforeSetStateBlob(_ data: [UInt8], type: TPMStateBlobType) throws(BackendError) {
        guard data.count >= headerSize else {
            throw BackendError(.stateBlob, "the \(type) blob of \(data.count) bytes is shorter than swtpm's \(headerSize)-byte header",
                               operation: SwtpmCtrl.CommandCode.setStateBlob.name, blobType: type)
        }
        guard settableHeaderVersions.contains(data[0]) else {
            throw BackendError(.stateBlob, "the \(type) blob has header version \(data[0]); swtpm takes \(settableHeaderVersions.lowerBound)...\(settableHeaderVersions.upperBound)",
                               operation: SwtpmCtrl.CommandCode.setStateBlob.name, blobType: type)
        }
    }
}
