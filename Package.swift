// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

// `BLOCKD_TSAN=1` (scripts/tsan.sh) links CTSanShim into the daemon and the test bundle:
// it tells ThreadSanitizer about Synchronization.Mutex's slow paths (Sources/CTSanShim).
let tsan = Context.environment["BLOCKD_TSAN"] == "1"
let tsanShim: [Target.Dependency] = tsan ? ["CTSanShim"] : []

let package = Package(
    name: "blockd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "blockd", targets: ["blockd"]),
        .executable(name: "blockctl", targets: ["blockctl"]),
        // Fuzz entry points, used by the libFuzzer package in Fuzz/ and replayed by tests.
        .library(name: "FuzzTargets", targets: ["FuzzTargets"]),
        // Example NBD client: full and incremental backups through qemu:dirty-bitmap:NAME.
        .executable(name: "incremental-backup", targets: ["incremental-backup"]),
    ],
    targets: [
        // Tiny C shim: epoll, eventfd, timerfd, fallocate flags, preadv2/pwritev2 flags.
        .target(name: "CLinux"),
        // zlib for compressed qcow2 clusters (Debian zlib1g-dev); zstd is loaded at run time
        // from libzstd.so.1, so building needs no libzstd-dev.
        .systemLibrary(name: "CZlib", pkgConfig: "zlib"),
        .target(name: "CZstdLoader", linkerSettings: [.linkedLibrary("dl")]),
        // GnuTLS (Debian libgnutls28-dev), the TLS library of QEMU, nbdkit and libnbd.
        .systemLibrary(name: "CGnuTLS", pkgConfig: "gnutls", providers: [.apt(["libgnutls28-dev"])]),
        // TLS credentials (X.509, PSK) and non-blocking sessions driven by an event loop.
        .target(name: "TLS", dependencies: ["CGnuTLS"], swiftSettings: strict),
        // librbd/librados for the rbd driver, loaded at run time (dlopen) by the first rbd
        // node: linking them would map ~20 MB of Ceph libraries into every blockd. Building
        // needs their headers (Debian librbd-dev); there are no pkg-config files for them.
        .target(name: "CRBD", linkerSettings: [.linkedLibrary("dl")]),
        // ThreadSanitizer builds only: interposes Mutex's slow paths to annotate them.
        .target(name: "CTSanShim", linkerSettings: [.linkedLibrary("dl")]),
        // Threads, epoll, sockets, timers, worker pool. Knows nothing about NBD or blocks.
        .target(name: "EventLoop", dependencies: ["CLinux"], swiftSettings: strict),
        // JSON values, parser and encoder (QMP, --blockdev JSON form); pure Swift.
        .target(name: "JSON", swiftSettings: strict, linkerSettings: [.linkedLibrary("m")]),
        // Pure NBD wire codec: bytes in, values out. No I/O, no Foundation.
        .target(name: "NBDProtocol", swiftSettings: strict),
        // Block graph: nodes, driver protocol, request flags, errors, block status.
        .target(name: "BlockCore", dependencies: ["CLinux", "EventLoop"], swiftSettings: strict),
        // Protocol, format and filter drivers: file, raw, null-co, qcow2, nbd, rbd.
        .target(name: "BlockDrivers", dependencies: ["BlockCore", "CLinux", "EventLoop", "JSON", "NBDProtocol", "CZlib", "CZstdLoader", "CRBD"], swiftSettings: strict),
        // The graph: named nodes, roots (exports, jobs), QEMU's permission checks, and every
        // graph operation (replace, insert/drop filter, reopen read-write, release, bitmaps).
        .target(name: "BlockGraph", dependencies: ["BlockCore", "EventLoop"], swiftSettings: strict),
        // Jobs: QEMU's job state machine, rate limiter, block-stream, block-commit.
        .target(name: "BlockJobs", dependencies: ["BlockCore", "BlockGraph", "EventLoop"], swiftSettings: strict),
        // Listeners, connection state machines, exports, meta contexts.
        .target(name: "NBDServer", dependencies: ["EventLoop", "NBDProtocol", "BlockCore", "TLS"], swiftSettings: strict),
        // QMP monitor: framing, greeting, capabilities, command table, events; client for blockctl.
        .target(name: "QMP", dependencies: ["JSON", "EventLoop"], swiftSettings: strict),
        // Composition root: option parsing, graph construction, exports.
        .target(name: "Daemon", dependencies: ["NBDServer", "BlockDrivers", "BlockCore", "BlockGraph", "BlockJobs", "EventLoop", "JSON", "QMP", "TLS"], swiftSettings: strict),
        // The Swift runtime is linked statically: only the pages the daemon runs are mapped in,
        // which cuts an idle daemon's RSS by about 3 MB (libswiftCore.so alone is ~4 MB resident).
        // Release only: the debug test bundle links this target with Foundation, which the
        // static runtime cannot link without ICU (so `swift test -c release` would fail to link).
        .executableTarget(name: "blockd", dependencies: ["Daemon"] + tsanShim, swiftSettings: strict,
                          linkerSettings: [.unsafeFlags(["-static-stdlib"], .when(platforms: [.linux], configuration: .release))]),
        // Fuzz harnesses that reach the real code: a real NBD server, the qcow2 driver on an
        // image file, a daemon's QMP monitor (see Fuzz/README.md).
        .target(name: "FuzzTargets", dependencies: ["NBDProtocol", "NBDServer", "EventLoop", "BlockCore", "BlockDrivers",
                                                    "QMP", "JSON", "Daemon", "BlockJobs"], swiftSettings: strict),
        .executableTarget(name: "blockctl", dependencies: ["QMP", "JSON"], swiftSettings: strict),
        // libnbd (Debian libnbd-dev), for the example and the tests only: no daemon target links it.
        .systemLibrary(name: "CLibNBD", path: "Examples/IncrementalBackup/CLibNBD", pkgConfig: "libnbd"),
        .executableTarget(name: "incremental-backup", dependencies: ["CLibNBD", "CZlib"],
                          path: "Examples/IncrementalBackup/Sources", swiftSettings: strict),

        // Shared by every test target: requirements (`.requires("nbdinfo")`: a skip on a laptop,
        // a failure naming the tool under CI=true) and waits on conditions with deadlines.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "JSONTests", dependencies: ["JSON", "TestSupport"]),
        .testTarget(name: "FuzzTargetsTests", dependencies: ["FuzzTargets", "TestSupport"]),
        .testTarget(name: "QMPTests", dependencies: ["QMP", "JSON", "TestSupport"]),
        .testTarget(name: "NBDProtocolTests", dependencies: ["NBDProtocol", "TestSupport"]),
        .testTarget(name: "BlockCoreTests", dependencies: ["BlockCore", "EventLoop", "TestSupport"] + tsanShim),
        .testTarget(name: "BlockDriversTests", dependencies: ["BlockDrivers", "BlockCore", "EventLoop", "TestSupport"]),
        .testTarget(name: "BlockGraphTests", dependencies: ["BlockGraph", "BlockDrivers", "BlockCore", "TestSupport"]),
        .testTarget(name: "BlockJobsTests", dependencies: ["BlockJobs", "BlockGraph", "BlockDrivers", "BlockCore", "JSON", "TestSupport"]),
        .testTarget(name: "EventLoopTests", dependencies: ["EventLoop", "TestSupport"]),
        .testTarget(name: "TLSTests", dependencies: ["TLS", "TestSupport"]),
        .testTarget(name: "DaemonTests", dependencies: ["Daemon", "BlockDrivers", "BlockCore", "JSON", "QMP", "TestSupport"]),
        .testTarget(name: "NBDServerTests", dependencies: ["NBDServer", "NBDProtocol", "BlockCore", "BlockDrivers", "TestSupport"]),
        // Drives the built `blockd`/`blockctl` with real clients; depending on the executables
        // makes `swift test` build them first (the harness finds them next to the test bundle).
        .testTarget(name: "InteropTests", dependencies: ["blockd", "blockctl", "incremental-backup", "TestSupport"],
                    exclude: ["qmp", "jobs", "cli", "remote", "graph", "rbd", "backup"]),
    ]
)
