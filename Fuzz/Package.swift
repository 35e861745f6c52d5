// swift-tools-version:6.1
// libFuzzer targets over the root package's `Fuzzing` library. Kept out of the root package
// so `swift build` / `swift test` never see them (reference: swift-sockets-fuzzing.md §2e).
//
//   cd Fuzz && swift build -c release --sanitize=fuzzer                                   # coverage
//   cd Fuzz && swift build -c release --sanitize=fuzzer -Xswiftc -sanitize=fuzzer,address # + ASan
//   SWIFT_BACKTRACE=enable=no .build/release/TISFuzz corpus/tis -max_total_time=300
//
// See docs/FUZZING.md for the recorded runs.
import PackageDescription

let package = Package(
    name: "swift-tpm-frontend-fuzz",
    dependencies: [.package(name: "swift-tpm-frontend", path: "..")],
    targets: [
        .executableTarget(name: "TISFuzz", dependencies: [.product(name: "Fuzzing", package: "swift-tpm-frontend")]),
        .executableTarget(name: "StreamFuzz", dependencies: [.product(name: "Fuzzing", package: "swift-tpm-frontend")]),
        .executableTarget(name: "CtrlReplyFuzz", dependencies: [.product(name: "Fuzzing", package: "swift-tpm-frontend")]),
    ]
)
