// swift-tools-version: 6.1
// Fuzz targets, built apart from the main package with libFuzzer (see README.md):
//   swift build -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library
//   .build/debug/FuzzNBD -max_total_time=60 -max_len=4096 Corpus/nbd
import PackageDescription

let package = Package(
    name: "blockd-fuzz",
    dependencies: [.package(name: "blockd", path: "..")],
    targets: [
        .executableTarget(name: "FuzzNBD", dependencies: [.product(name: "FuzzTargets", package: "blockd")]),
        .executableTarget(name: "FuzzQCOW2", dependencies: [.product(name: "FuzzTargets", package: "blockd")]),
        .executableTarget(name: "FuzzQMP", dependencies: [.product(name: "FuzzTargets", package: "blockd")]),
    ]
)
