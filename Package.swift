// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "swift-tpm-frontend",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "TIS", targets: ["TIS"]),
        .library(name: "EmulatorBackend", targets: ["EmulatorBackend"]),
        .library(name: "TISDriver", targets: ["TISDriver"]),
        .library(name: "VMState", targets: ["VMState"]),
        .library(name: "TPMDiagnostics", targets: ["TPMDiagnostics"]),
        // Fuzz targets (op-script TIS, migration stream, swtpm replies) for Fuzz/ and the tests.
        .library(name: "Fuzzing", targets: ["Fuzzing"]),
        .executable(name: "tis-sim", targets: ["tis-sim"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        // System library: libtpms 0.9.x through pkg-config (Debian: libtpms-dev).
        .systemLibrary(name: "CLibtpms", pkgConfig: "libtpms", providers: [.apt(["libtpms-dev"])]),
        // Bounds-checked cursor reader and writer with explicit endianness: the one place for bytes.
        .target(name: "WireFormat"),
        // TPM backends: the TPMBackend protocol (QEMU tpm_backend.h), in-process libtpms, swtpm.
        // OpenSSL's libcrypto (already loaded by libtpms): SHA-256, HMAC, AES-CBC.
        .systemLibrary(name: "COpenSSL", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),
        // CMSG_* wrappers for SCM_RIGHTS (the macros do not import into Swift).
        .target(name: "CFdPass"),
        .target(name: "EmulatorBackend", dependencies: ["CLibtpms", "COpenSSL", "CFdPass", "WireFormat"]),
        // The TIS device core (QEMU hw/tpm/tpm_tis_common.c) and its thread-safe device wrapper.
        .target(name: "TIS", dependencies: ["EmulatorBackend", "WireFormat"]),
        // The guest side: a register-level TIS driver over an MMIO bus.
        .target(name: "TISDriver", dependencies: ["TIS", "WireFormat"]),
        // Register-level scenarios (QEMU's tpm-tis qtests, a seeded random differential) over any
        // MMIOBus, so the same sequence runs against the model and against real QEMU.
        .target(name: "TISConformance", dependencies: ["TISDriver", "TIS", "EmulatorBackend", "WireFormat"]),
        // QEMU's migration stream: framing, vmstate schema, the TPM sections, whole-stream walking.
        .target(name: "VMState", dependencies: ["TIS", "EmulatorBackend", "WireFormat"]),
        // Stream inspection and the migration troubleshooter: blob decoding, migration-key
        // decryption, libtpms validation, findings (tis-sim inspect / validate).
        .target(name: "TPMDiagnostics", dependencies: ["VMState", "EmulatorBackend", "WireFormat", "CLibtpms", "COpenSSL", "TIS"]),
        // Test support: real QEMU 7.2 driven through qtest and QMP, swtpm, halt.bin.
        .target(name: "QEMUHarness", dependencies: ["TISConformance", "TISDriver", "TIS", "EmulatorBackend", "WireFormat"]),
        // `tis-sim serve`: swtpm's TCP data/ctrl channels and the mssim ports in front of a TIS
        // device, every command carried through the FIFO by the register-level driver.
        .target(name: "TPMServer", dependencies: ["TIS", "TISDriver", "EmulatorBackend", "WireFormat"]),
        // `tis-sim machine`: a register-level test VMM driven over QEMU's qtest and QMP, migrating
        // to and from QEMU 7.2.
        .target(name: "TISMachine", dependencies: ["TIS", "TISDriver", "EmulatorBackend", "VMState", "WireFormat"]),
        // Hostile-input fuzz targets: decoders from any byte string to ops, invariants after each.
        .target(name: "Fuzzing", dependencies: ["TIS", "TISDriver", "EmulatorBackend", "VMState", "WireFormat"]),
        .executableTarget(name: "tis-sim", dependencies: [
            "TIS", "TISDriver", "EmulatorBackend", "WireFormat", "VMState", "TPMServer", "TPMDiagnostics", "TISMachine",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // `make bench`: figures against references measured in the same run.
        .executableTarget(name: "tis-bench", dependencies: ["TIS", "TISDriver", "TISConformance", "EmulatorBackend", "CLibtpms", "VMState", "QEMUHarness", "WireFormat"]),
        .testTarget(name: "WireFormatTests", dependencies: ["WireFormat"]),
        .testTarget(name: "TISTests", dependencies: ["TISConformance", "TIS", "TISDriver", "EmulatorBackend", "WireFormat"]),
        .testTarget(name: "EmulatorBackendTests", dependencies: ["EmulatorBackend", "TIS", "TISDriver", "WireFormat"]),
        .testTarget(name: "SwtpmTests", dependencies: ["EmulatorBackend", "TIS", "TISDriver", "WireFormat", "QEMUHarness"]),
        .testTarget(name: "VMStateTests", dependencies: ["VMState", "TIS", "EmulatorBackend", "WireFormat", "QEMUHarness", "TISDriver"],
                    exclude: ["Fixtures"]),
        .testTarget(name: "ServerTests", dependencies: ["TPMServer", "TIS", "TISDriver", "EmulatorBackend", "WireFormat", "TISConformance"]),
        .testTarget(name: "DiagnosticsTests", dependencies: ["TPMDiagnostics", "VMState", "EmulatorBackend", "WireFormat", "QEMUHarness", "TISConformance", "TIS"]),
        .testTarget(name: "MachineTests", dependencies: ["TISMachine", "QEMUHarness", "TISConformance", "TIS", "TISDriver", "EmulatorBackend", "VMState", "WireFormat"]),
        .testTarget(name: "FuzzTests", dependencies: ["Fuzzing", "TIS", "TISDriver", "EmulatorBackend", "VMState",
                                                      "TISConformance", "QEMUHarness", "WireFormat"],
                    exclude: ["Corpus"]),
        .testTarget(name: "HardeningTests", dependencies: ["TIS", "TISDriver", "EmulatorBackend", "VMState",
                                                           "TISConformance", "QEMUHarness", "WireFormat"]),
        .testTarget(name: "QEMUTests", dependencies: ["TISConformance", "QEMUHarness", "TIS", "TISDriver", "EmulatorBackend", "WireFormat", "VMState"]),
    ]
)
