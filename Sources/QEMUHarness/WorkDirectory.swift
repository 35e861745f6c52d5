import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A unique scratch directory under `/tmp` with an absolute path, removed by `remove()`.
///
/// Absolute and short on purpose: swtpm chdirs to `/` when daemonized (relative state paths
/// break NV writes) and a unix socket path must fit in `sun_path` (108 bytes).
public final class WorkDirectory {
    /// The absolute path of the directory.
    public let path: String
    /// Whether `remove()` deletes the directory (set to false to keep it for a post-mortem).
    public var removeOnClose: Bool

    /// Creates `/tmp/<prefix>-XXXXXX` with `mkdtemp`.
    public init(prefix: String = "qemu-harness", removeOnClose: Bool = true) throws(HarnessError) {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buf -> Bool in
            guard let base = buf.baseAddress else { return false }
            return mkdtemp(base) != nil
        }
        guard made else {
            throw HarnessError(.workDirectory, "mkdtemp failed for /tmp/\(prefix)-XXXXXX",
                               operation: "mkdtemp", errno: errno)
        }
        self.path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.removeOnClose = removeOnClose
    }

    /// Uses an existing directory; it is not removed unless `removeOnClose` is set.
    public init(existing path: String, removeOnClose: Bool = false) throws(HarnessError) {
        guard path.hasPrefix("/") else {
            throw HarnessError(.invalidArgument, "work directory must be absolute: \(path)")
        }
        var isDir: ObjCBool = false
        if !FileManager.default.fileExists(atPath: path, isDirectory: &isDir) {
            do {
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            } catch {
                throw HarnessError(.workDirectory, "cannot create \(path): \(error)")
            }
        } else if !isDir.boolValue {
            throw HarnessError(.workDirectory, "\(path) exists and is not a directory")
        }
        self.path = path
        self.removeOnClose = removeOnClose
    }

    /// `path/name`.
    public func file(_ name: String) -> String { path + "/" + name }

    /// Creates (if needed) and returns the absolute path of a subdirectory.
    public func subdirectory(_ name: String) throws(HarnessError) -> String {
        let p = file(name)
        do {
            try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        } catch {
            throw HarnessError(.workDirectory, "cannot create \(p): \(error)")
        }
        return p
    }

    /// Deletes the directory and everything in it, if `removeOnClose`; safe to call twice.
    public func remove() {
        guard removeOnClose else { return }
        try? FileManager.default.removeItem(atPath: path)
        removeOnClose = false
    }

    deinit { remove() }
}

/// The firmware image that makes TCG usable for qtest: the CPU halts at the reset vector.
///
/// Debian's QEMU has no qtest accelerator; with TCG and the default SeaBIOS the firmware would
/// talk to the TPM (Startup, PCR extends, HierarchyChangeAuth) before any test could.
public enum HaltBIOS {
    /// The image size: 64 KiB, mapped so that its last 16 bytes hold the reset vector.
    public static let size = 0x1_0000
    /// Offset of the x86 reset vector within the image.
    public static let resetVectorOffset = 0xFFF0
    /// `cli; hlt; jmp $-3` (back to the hlt).
    public static let resetVectorCode: [UInt8] = [0xFA, 0xF4, 0xEB, 0xFD]
    /// `hlt` fills the rest.
    public static let fill: UInt8 = 0xF4

    /// The 65,536 bytes of the image.
    public static var image: [UInt8] {
        var bytes = [UInt8](repeating: fill, count: size)
        bytes.replaceSubrange(resetVectorOffset..<(resetVectorOffset + resetVectorCode.count),
                              with: resetVectorCode)
        return bytes
    }

    /// Writes the image to `path` (absolute) and returns the path.
    @discardableResult
    public static func write(to path: String) throws(HarnessError) -> String {
        do {
            try Data(image).write(to: URL(fileURLWithPath: path), options: .atomic)
        } catch {
            throw HarnessError(.workDirectory, "cannot write halt.bin to \(path): \(error)")
        }
        return path
    }
}
