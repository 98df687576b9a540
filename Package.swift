// swift-tools-version: 6.0
import PackageDescription

// Layers, lowest first; a target only imports the ones above it in this list.
//   CFerry         C shim: kernel UAPI headers, ioctl numbers, syscall wrappers
//   FerrySys       typed syscall gateway (errno -> SysError, EINTR retry)
//   FerryMemory    guest RAM blocks, page bitmaps, the memory checker
//   FerryKVM       Kvm -> VirtualMachine -> VCPU, vCPU state, dirty log
//   FerryMachine   a running VM: vCPU thread, serial port, guest loading
//   FerryWire      pure stream codec (no I/O)
//   COpenSSL       OpenSSL's headers and wrappers for its macros (libssl-dev)
//   FerryTLS       TLS credentials (x509 directory, PSK) and sessions over a socket
//   CZstd          libzstd's header (libzstd-dev): multifd's zstd compression
//   FerryMigration state machine, source, destination, channels
//   FerryQMP       QMP server and client; the Prometheus /metrics endpoint
//   FerryHarness   drives whole ferry processes over QMP (demo, benchmarks)
//   ferry          the CLI; ferry-bench the benchmarks
let package = Package(
    name: "Ferry",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ferry", targets: ["ferry"]),
        .executable(name: "ferry-bench", targets: ["ferry-bench"]),
    ],
    dependencies: [
        // The CLI's subcommands and options (`ferry run`, `ferry migrate`, ...).
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // The engine's log (state changes, pauses, recoveries, refusals); the CLI picks the output.
        .package(url: "https://github.com/apple/swift-log", from: "1.5.0"),
        // Postcopy fault latencies: percentiles without keeping every sample.
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        // `ferry run --metrics-listen`: migration metrics for Prometheus.
        .package(url: "https://github.com/apple/swift-metrics", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
    ],
    targets: [
        .target(name: "CFerry"),
        .target(name: "FerrySys", dependencies: ["CFerry"]),
        .target(name: "FerryMemory", dependencies: ["FerrySys", "CFerry"]),
        .target(name: "FerryKVM", dependencies: ["FerrySys", "FerryMemory", "CFerry"]),
        .target(name: "FerryMachine", dependencies: ["FerryKVM", "FerryMemory", "FerrySys", "CFerry"]),
        .target(name: "FerryWire", dependencies: []),
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .target(name: "FerryTLS", dependencies: ["COpenSSL", "FerrySys"]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .target(name: "FerryMigration", dependencies: [
            "CZstd", "FerryTLS", "FerryWire", "FerryMachine", "FerryKVM", "FerryMemory", "FerrySys", "CFerry",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
        ]),
        .target(name: "FerryQMP", dependencies: [
            "FerryMigration", "FerryWire", "FerryTLS", "FerryMachine", "FerrySys", "CFerry",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        .target(name: "FerryHarness", dependencies: ["FerryQMP", "FerryMachine", "FerryMemory", "FerrySys", "CFerry"]),
        .executableTarget(name: "ferry", dependencies: [
            "FerryHarness", "FerryQMP", "FerryMigration", "FerryMachine", "FerryMemory", "FerrySys",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "ferry-bench", dependencies: [
            "FerryHarness", "FerryQMP", "FerryMachine", "FerrySys",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "FerryTests", dependencies: [
            "FerryHarness", "FerryQMP", "FerryMigration", "FerryWire", "FerryMachine", "FerryKVM", "FerryMemory", "FerrySys", "CFerry",
        ]),
    ],
    swiftLanguageModes: [.v6]
)
