import BlockCore
import BlockDrivers
@testable import Daemon
import Foundation
import JSON
import Testing
import TestSupport

/// `cache-clean-interval`: the daemon's timer makes a qcow2 node drop the metadata tables it
/// has not used for an interval; with 0 (or a closed node) nothing runs.
@Suite struct QCOW2CacheCleanerTests {
    static func run(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "\(args)")
    }

    @Test(.requires("qemu-img", "qemu-io"))
    func unusedTablesLeaveAfterTheInterval() throws {
        let dir = NSTemporaryDirectory() + "cache-clean-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let daemon = Daemon(configuration: .init(loopCount: 1, workerCount: 2))
        defer { daemon.shutdown() }
        var drivers: [QCOW2Driver] = []
        var nodes: [BlockNode] = []
        for (name, interval) in [("timed", 1), ("never", 0)] {
            let img = "\(dir)/\(name).qcow2"
            // 4 KiB clusters: an L2 table maps 2 MiB; four writes, four tables.
            try Self.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "64M"])
            try Self.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "write 2M 4k", "-c", "write 4M 4k",
                          "-c", "write 6M 4k", img])
            let node = try daemon.blockdevAdd(["driver": "qcow2", "node-name": .string(name),
                                               "cache-clean-interval": .int(Int64(interval)),
                                               "file": ["driver": "file", "filename": .string(img)]])
            var buf = [UInt8](repeating: 0, count: 4096)
            for i in 0..<4 {
                try buf.withUnsafeMutableBytes { try node.read(at: UInt64(i) << 21, into: $0) }
            }
            nodes.append(node)
            drivers.append(node.driver as! QCOW2Driver)
        }
        #expect(drivers.map(\.cachedTables.l2) == [4, 4])
        // Within two intervals of the last use (the first tick marks, the second drops).
        #expect(waitUntil(timeout: 15) { drivers[0].cachedTables.l2 == 0 }, "\(drivers[0].cachedTables)")
        #expect(drivers[1].cachedTables.l2 == 4, "cache-clean-interval=0 must not clean")
    }
}
