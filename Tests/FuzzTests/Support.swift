import Foundation
import TISConformance

/// Paths beside this file.
enum Paths {
    static let testsDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    static let packageRoot = testsDir.deletingLastPathComponent().deletingLastPathComponent().path
    static func corpus(_ target: String) -> String { testsDir.appendingPathComponent("Corpus").appendingPathComponent(target).path }
    static let fixtures = testsDir.deletingLastPathComponent().appendingPathComponent("VMStateTests").appendingPathComponent("Fixtures").path
    static func fixture(_ name: String) throws -> [UInt8] {
        try [UInt8](Data(contentsOf: URL(fileURLWithPath: fixtures + "/" + name)))
    }
    /// Every file of a checked-in corpus (crash reproducers and seeds), sorted by name.
    static func corpusFiles(_ target: String) throws -> [(String, [UInt8])] {
        let dir = corpus(target)
        let names = try FileManager.default.contentsOfDirectory(atPath: dir).filter { !$0.hasPrefix(".") }.sorted()
        return try names.map { ($0, try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir + "/" + $0)))) }
    }
}

extension SplitMix64 {
    mutating func bytes(_ n: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(n + 8)
        while out.count < n {
            let v = next()
            for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
        }
        return Array(out.prefix(n))
    }
}

func monotonic() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
