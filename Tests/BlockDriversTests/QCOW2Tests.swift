import Foundation
import Testing
import JSON
@testable import BlockCore
@testable import BlockDrivers

@Suite("QCOW2 driver against qemu-img", .needsQemu)
struct QCOW2InteropTests {
    @Test("reads equal qemu-img convert output", arguments: [512, 4096, 65536, 2 << 20])
    func readsMatchConvert(clusterSize: Int) throws {
        let dir = QCOW2TempDir()
        let img = dir.file("a.qcow2")
        let size = max(8 << 20, clusterSize * 4)
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", img, "\(size)")
        try QCOW2Tools.qemuIO(img, "write -P 0x11 0 64k", "write -P 0x22 1000 3000", "write -P 0x33 3m 1m",
                              "write -z 3200k 64k", "discard 3584k 64k", "write -P 0x44 \(size - 4096) 4096")
        let expected = try QCOW2Test.convertToRaw(img, in: dir)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, readOnly: true, registry: registry)
        #expect(try QCOW2Test.readAll(node) == expected)
        // Unaligned small reads too.
        var buf = [UInt8](repeating: 0, count: 777)
        try buf.withUnsafeMutableBytes { try node.read(at: 999, into: $0) }
        #expect(buf == Array(expected[999..<(999 + 777)]))
        try registry.closeAll()
    }

    /// Applies the same operations to the image (through the driver) and to a byte model.
    private func exercise(_ node: BlockNode, _ model: inout [UInt8], clusterSize: Int) throws {
        func w(_ off: Int, _ byte: UInt8, _ len: Int) throws {
            try QCOW2Test.write(node, UInt64(off), QCOW2Test.pattern(byte, len))
            model.replaceSubrange(off..<(off + len), with: QCOW2Test.pattern(byte, len))
        }
        func z(_ off: Int, _ len: Int, _ flags: RequestFlags) throws {
            try node.writeZeroes(at: UInt64(off), length: UInt64(len), flags: flags)
            model.replaceSubrange(off..<(off + len), with: QCOW2Test.pattern(0, len))
        }
        func d(_ off: Int, _ len: Int) throws {
            try node.discard(at: UInt64(off), length: UInt64(len))
            // Whole clusters read as zeroes afterwards.
            let start = (off + clusterSize - 1) / clusterSize * clusterSize
            let end = (off + len) / clusterSize * clusterSize
            if start < end { model.replaceSubrange(start..<end, with: QCOW2Test.pattern(0, end - start)) }
        }
        let cs = clusterSize
        try w(0, 0xa1, 4096)
        try w(100, 0xa2, 10)               // unaligned inside an allocated cluster
        try w(cs * 3 + 17, 0xa3, cs * 2)   // unaligned across clusters, allocating
        try w(cs * 10, 0xa4, cs * 8)       // aligned multi-cluster
        try w(cs * 10 + 5, 0xa5, 3)        // overwrite in place
        try z(cs * 11, cs * 2, [])         // zero clusters, keeping the allocation
        try z(cs * 14, cs * 2, .mayUnmap)  // zero clusters, freeing
        try z(cs * 16 + 7, cs + 100, .mayUnmap)  // unaligned zeroes: partial parts written
        try d(cs * 3, cs * 2)
        try w(cs * 20, 0xa6, cs)
        try d(cs * 20 + 1, cs * 2)          // partial: only the second cluster goes
        try w(cs * 14 + 9, 0xa7, 9)         // write into a zeroed cluster
        try w(model.count - 1000, 0xa8, 1000)  // the last bytes
        try node.flush()
        try w(cs * 30, 0xa9, cs * 3)
    }

    @Test("writes, zeroes and discards match a raw file; check clean", arguments: [512, 65536])
    func writesMatchRaw(clusterSize: Int) throws {
        let dir = QCOW2TempDir()
        let img = dir.file("w.qcow2")
        let size = clusterSize * 64 + 1234
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", img, "\(size)")
        try QCOW2Tools.qemuIO(img, "write -P 0x5a 0 \(clusterSize * 40)")
        var model = try QCOW2Test.convertToRaw(img, in: dir)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        try exercise(node, &model, clusterSize: clusterSize)
        #expect(try QCOW2Test.readAll(node) == model)
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
        let raw = dir.file("model.raw")
        try Data(model).write(to: URL(fileURLWithPath: raw))
        #expect(try QCOW2Tools.qemuImg("compare", "-q", raw, img).status == 0)
    }

    @Test("v2 (compat=0.10) images read and write; fast zero is refused")
    func version2() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("v2.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, "4M")
        try QCOW2Tools.qemuIO(img, "write -P 0x21 0 256k")
        var model = try QCOW2Test.convertToRaw(img, in: dir)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        try exercise(node, &model, clusterSize: 65536)
        #expect(throws: BlockError.self) { try node.writeZeroes(at: 0, length: 65536, flags: .noFallback) }
        #expect(try QCOW2Test.readAll(node) == model)
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
        let raw = dir.file("model.raw")
        try Data(model).write(to: URL(fileURLWithPath: raw))
        #expect(try QCOW2Tools.qemuImg("compare", "-q", raw, img).status == 0)
    }

    @Test("a 3-level chain reads like qemu-img; writes COW from backing; lower layers unchanged")
    func backingChain() throws {
        let dir = QCOW2TempDir()
        let base = dir.file("base.qcow2"), mid = dir.file("mid.qcow2"), top = dir.file("top.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", base, "4M")
        try QCOW2Tools.qemuIO(base, "write -P 0x01 0 4M")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid, "4M")
        try QCOW2Tools.qemuIO(mid, "write -P 0x02 64k 128k", "write -z 1m 64k")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "4M")
        try QCOW2Tools.qemuIO(top, "write -P 0x03 128k 4k")
        var model = try QCOW2Test.convertToRaw(top, in: dir)
        let baseSum = try QCOW2Test.md5(base), midSum = try QCOW2Test.md5(mid)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(top, registry: registry)
        #expect(node.backing != nil && node.backing?.backing != nil)
        #expect(node.backing?.backing?.backing == nil)
        #expect(try QCOW2Test.readAll(node) == model)
        // Block status of the top layer alone, and through the chain.
        let s0 = try node.blockStatus(at: 0, length: 65536)
        #expect(s0.flags == [])
        let s1 = try node.blockStatusAbove(at: 0, length: 65536)
        #expect(s1.depth == 3)
        try exercise(node, &model, clusterSize: 65536)
        #expect(try QCOW2Test.readAll(node) == model)
        try registry.closeAll()
        try QCOW2Test.expectClean(top)
        #expect(try QCOW2Test.md5(base) == baseSum)
        #expect(try QCOW2Test.md5(mid) == midSum)
        let raw = dir.file("model.raw")
        try Data(model).write(to: URL(fileURLWithPath: raw))
        #expect(try QCOW2Tools.qemuImg("compare", "-q", raw, top).status == 0)
    }

    @Test("backing=null opens no backing; a named backing node is used")
    func explicitBacking() throws {
        let dir = QCOW2TempDir()
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", base, "1M")
        try QCOW2Tools.qemuIO(base, "write -P 0x07 0 1M")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(top, readOnly: true, extra: [("backing", .null)], registry: registry)
        #expect(node.backing == nil)
        #expect(try QCOW2Test.readAll(node) == QCOW2Test.pattern(0, 1 << 20))
        #expect(node.driver.backingFileName == base)
        let b = try QCOW2Test.open(base, readOnly: true, registry: registry)
        var opts = QCOW2Test.options(top, [("backing", .string(b.nodeName)), ("read-only", .bool(true))])
        opts["node-name"] = .string("top")
        let t2 = try BlockdevFactory.open(opts, in: registry)
        #expect(t2.backing === b)
        #expect(try QCOW2Test.readAll(t2) == QCOW2Test.pattern(7, 1 << 20))
    }

    @Test("compressed clusters (zlib and zstd) read, and rewrite on write", arguments: ["zlib", "zstd"])
    func compressed(type: String) throws {
        let dir = QCOW2TempDir()
        let src = dir.file("src.qcow2"), img = dir.file("c.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", src, "2M")
        try QCOW2Tools.qemuIO(src, "write -P 0x41 0 512k", "write -P 0x42 700k 300k")
        try QCOW2Tools.qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", src, img)
        var model = try QCOW2Test.convertToRaw(img, in: dir)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        #expect(try QCOW2Test.readAll(node) == model)
        try QCOW2Test.write(node, 70000, QCOW2Test.pattern(0x99, 100))
        model.replaceSubrange(70000..<70100, with: QCOW2Test.pattern(0x99, 100))
        try node.writeZeroes(at: 131072, length: 65536, flags: [])
        model.replaceSubrange(131072..<196608, with: QCOW2Test.pattern(0, 65536))
        try node.discard(at: 196608, length: 65536)
        model.replaceSubrange(196608..<262144, with: QCOW2Test.pattern(0, 65536))
        #expect(try QCOW2Test.readAll(node) == model)
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
        let raw = dir.file("model.raw")
        try Data(model).write(to: URL(fileURLWithPath: raw))
        #expect(try QCOW2Tools.qemuImg("compare", "-q", raw, img).status == 0)
    }

    @Test("extended L2 images read; writable open refused")
    func extendedL2() throws {
        let dir = QCOW2TempDir()
        let base = dir.file("base.qcow2"), img = dir.file("x.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", base, "4M")
        try QCOW2Tools.qemuIO(base, "write -P 0x61 0 4M")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
                               "-b", "base.qcow2", "-F", "qcow2", img, "4M")
        try QCOW2Tools.qemuIO(img, "write -P 0x62 4k 4k", "write -z 16k 2k", "write -P 0x63 1m 100k")
        let expected = try QCOW2Test.convertToRaw(img, in: dir)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, readOnly: true, registry: registry)
        #expect(try QCOW2Test.readAll(node) == expected)
        #expect(throws: BlockError.self) { _ = try QCOW2Test.open(img) }
    }

    @Test("block status matches qemu-img map for one layer", arguments: [4096, 65536])
    func blockStatusMatchesMap(clusterSize: Int) throws {
        let dir = QCOW2TempDir()
        let img = dir.file("m.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", img, "64M")
        try QCOW2Tools.qemuIO(img, "write -P 1 0 128k", "write -z 256k 64k", "write -P 2 1m 64k",
                              "write -P 3 40m 4m", "write -z 63m 1m")
        let map = try QCOW2Tools.qemuImg("map", "--output=json", img).output
        let entries = try JSONSerialization.jsonObject(with: Data(map.utf8)) as! [[String: Any]]
        var expected: [(UInt64, UInt64, String)] = []
        func add(_ list: inout [(UInt64, UInt64, String)], _ start: UInt64, _ len: UInt64, _ kind: String) {
            if let last = list.last, last.2 == kind, last.0 + last.1 == start {
                list[list.count - 1].1 += len
            } else {
                list.append((start, len, kind))
            }
        }
        for e in entries {
            let present = e["present"] as! Bool, data = e["data"] as! Bool, zero = e["zero"] as! Bool
            let kind = !present ? "unallocated" : data ? "data" : (zero ? "zero" : "?")
            add(&expected, (e["start"] as! NSNumber).uint64Value, (e["length"] as! NSNumber).uint64Value, kind)
        }
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, readOnly: true, registry: registry)
        var got: [(UInt64, UInt64, String)] = []
        var off: UInt64 = 0
        while off < node.length {
            let s = try node.blockStatus(at: off, length: node.length - off)
            let kind = s.flags.contains(.data) ? "data" : s.flags.contains(.zero) ? "zero" : "unallocated"
            add(&got, off, s.length, kind)
            off += s.length
        }
        #expect(got.map { "\($0.0)+\($0.1) \($0.2)" } == expected.map { "\($0.0)+\($0.1) \($0.2)" })
    }

    @Test("a sparse 1 TiB image maps quickly")
    func bigSparseMap() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("big.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "1T")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        for i in 0..<200 {
            try QCOW2Test.write(node, UInt64(i) * 5_000_000_000 / 65536 * 65536, QCOW2Test.pattern(1, 65536))
        }
        let clock = ContinuousClock()
        var extents = 0
        let t = clock.measure {
            var off: UInt64 = 0
            while off < node.length {
                let s = try! node.blockStatus(at: off, length: node.length - off)
                off += s.length
                extents += 1
            }
        }
        #expect(extents == 400 || extents == 401)
        #expect(t < .seconds(2))
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
    }

    @Test("concurrent writers to different and overlapping clusters")
    func concurrentWrites() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("c.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "64M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        let threads = 6
        let perThread = 40
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for i in 0..<perThread {
                // Own cluster, partly written (COW of zeroes), then an overlapping shared cluster.
                let own = UInt64((t * perThread + i) * 65536 + 1 << 20)
                try! QCOW2Test.write(node, own + 512, QCOW2Test.pattern(UInt8(t + 1), 4096))
                let shared = UInt64((i % 8) * 65536)
                try! QCOW2Test.write(node, shared, QCOW2Test.pattern(UInt8(t + 1), 65536))
            }
        }
        for t in 0..<threads {
            for i in 0..<perThread {
                var buf = [UInt8](repeating: 9, count: 65536)
                let own = UInt64((t * perThread + i) * 65536 + 1 << 20)
                try buf.withUnsafeMutableBytes { try node.read(at: own, into: $0) }
                #expect(buf[0..<512].allSatisfy { $0 == 0 })
                #expect(buf[512..<4608].allSatisfy { $0 == UInt8(t + 1) })
                #expect(buf[4608...].allSatisfy { $0 == 0 })
            }
        }
        for i in 0..<8 {
            var buf = [UInt8](repeating: 0, count: 65536)
            try buf.withUnsafeMutableBytes { try node.read(at: UInt64(i * 65536), into: $0) }
            #expect(buf.allSatisfy { $0 == buf[0] } && buf[0] != 0)
        }
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
    }

    @Test("refcount table grows (512-byte clusters)")
    func refcountGrowth() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("g.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "32M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        let chunk = QCOW2Test.pattern(0x77, 1 << 20)
        for i in 0..<12 { try QCOW2Test.write(node, UInt64(i) << 20, chunk) }
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
        let raw = try QCOW2Test.convertToRaw(img, in: dir)
        #expect(raw[0..<(12 << 20)].allSatisfy { $0 == 0x77 })
        #expect(raw[(12 << 20)...].allSatisfy { $0 == 0 })
    }

    @Test("noWait: cache misses and allocation throw wouldBlock without changes")
    func noWait() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("n.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "4M")
        try QCOW2Tools.qemuIO(img, "write -P 0x10 0 1M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        var buf = [UInt8](repeating: 0, count: 4096)
        #expect(throws: BlockError.self) { try buf.withUnsafeMutableBytes { try node.read(at: 0, into: $0, flags: .noWait) } }
        try buf.withUnsafeMutableBytes { try node.read(at: 0, into: $0) }
        // L2 cached now; data is in the page cache (just written), so this may succeed.
        do { try buf.withUnsafeMutableBytes { try node.read(at: 8192, into: $0, flags: .noWait) } } catch {
            #expect((error as? BlockError)?.isWouldBlock == true)
        }
        #expect(throws: BlockError.self) { try QCOW2Test.write(node, 2 << 20, QCOW2Test.pattern(1, 4096), flags: .noWait) }
        #expect(try node.blockStatus(at: 2 << 20, length: 65536).flags == [])
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
    }

    @Test("noWait block status: an L2 miss is wouldBlock, cached metadata answers, the file never answers inline")
    func noWaitBlockStatus() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("s.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "4M")
        try QCOW2Tools.qemuIO(img, "write -P 0x10 0 1M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        func wouldBlock(_ body: () throws -> Void) -> Bool {
            do { try body() } catch { return (error as? BlockError)?.isWouldBlock == true }
            return false
        }
        // Nothing cached yet: the L2 table would be read from disk.
        #expect(wouldBlock { _ = try node.blockStatus(at: 0, length: 4 << 20, flags: .noWait) })
        #expect(wouldBlock { _ = try node.blockStatusAbove(at: 0, length: 4 << 20, flags: .noWait) })
        // A copy-on-read read on the loop asks the same way and is handed over, not served.
        let cor = BlockNode(name: "cor", driver: CopyOnReadFilter(file: node, bottom: nil))
        var buf = [UInt8](repeating: 0, count: 4096)
        #expect(wouldBlock { try buf.withUnsafeMutableBytes { try cor.read(at: 0, into: $0, flags: .noWait) } })
        let blocking = try node.blockStatus(at: 0, length: 4 << 20)
        #expect(blocking.flags == [.data, .allocated] && blocking.length == 1 << 20)
        // Cached now: the same answer without waiting.
        #expect(try node.blockStatus(at: 0, length: 4 << 20, flags: .noWait) == blocking)
        #expect(try node.blockStatus(at: 1 << 20, length: 3 << 20, flags: .noWait).flags == [])
        // SEEK_DATA may read the filesystem's extent tree: never inline.
        #expect(wouldBlock { _ = try node.file!.blockStatus(at: 0, length: 65536, flags: .noWait) })
        try cor.driver.close()
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
    }

    @Test("a write-back makes committed allocations' refcounts durable, never one still in flight")
    func writeBackHoldsInFlightAllocations() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("w.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "4M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        let q = node.driver as! QCOW2Driver
        // Nothing written back yet: the new L2 table and data cluster are free on disk.
        try QCOW2Test.write(node, 0, QCOW2Test.pattern(1, 65536))
        let step = try q.meta.withLock { (m) throws(BlockError) -> QCOW2AllocStep in try m.planAllocation(at: 1 << 20, length: 65536) }
        guard case .planned(let plan) = step else {
            Issue.record("expected an allocation plan, got \(step)")
            return
        }
        // Its data is being written (qemu-img counts leaks only inside the file).
        try QCOW2Test.write(node.file!, plan.host, QCOW2Test.pattern(2, 65536))
        func check() throws -> String { try QCOW2Tools.run("qemu-img", ["check", "-U", img], allowFailure: true).output }
        let before = try check()
        #expect(!before.contains("leaked"), "\(before)")
        // The flush writes the committed allocation (and its L2 table) but holds the one in
        // flight: its cluster is still free on disk, so a crash now would not leak it.
        try node.flush()
        var out = try check()
        #expect(!out.contains("leaked") && !out.contains("ERROR"), "\(out)")
        // The allocating write completes.
        try q.meta.withLock { (m) throws(BlockError) in try m.commitAllocation(plan) }
        try node.flush()
        out = try check()
        #expect(!out.contains("leaked") && !out.contains("ERROR"), "\(out)")
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
    }

    @Test("setBackingFile rewrites the header; unknown extensions survive")
    func setBackingFile() throws {
        let dir = QCOW2TempDir()
        let base = dir.file("base.qcow2"), img = dir.file("s.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", base, "1M")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        // Plant an unknown extension after the header (qemu-img ignores unknown ones).
        let ext: [UInt8] = [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]
        let before = try Data(contentsOf: URL(fileURLWithPath: img))
        var bytes = [UInt8](before)
        var at = 112
        while bytes[at..<(at + 4)] != [0, 0, 0, 0] {
            let len = Int(bytes[at + 4]) << 24 | Int(bytes[at + 5]) << 16 | Int(bytes[at + 6]) << 8 | Int(bytes[at + 7])
            at += 8 + (len + 7) / 8 * 8
        }
        bytes.replaceSubrange(at..<(at + 16), with: ext)
        try Data(bytes).write(to: URL(fileURLWithPath: img))
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, extra: [("backing", .null)], registry: registry)
        let q = node.driver as! QCOW2Driver
        try q.setBackingFile(name: "base.qcow2", format: "qcow2")
        #expect(q.backingFileName == "base.qcow2")
        try registry.closeAll()
        let info = try QCOW2Tools.qemuImg("info", img).output
        #expect(info.contains("backing file: base.qcow2"))
        #expect(info.contains("backing file format: qcow2"))
        try QCOW2Test.expectClean(img)
        let after = [UInt8](try Data(contentsOf: URL(fileURLWithPath: img)))
        #expect(after.firstRange(of: ext) != nil)
    }

    @Test("lazy refcounts: dirty while open, clean after close")
    func lazyRefcountsDirtyBit() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("l.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "1M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        try QCOW2Test.write(node, 0, QCOW2Test.pattern(1, 4096))
        let dirty = [UInt8](try Data(contentsOf: URL(fileURLWithPath: img)))
        #expect(dirty[79] & 1 == 1)
        try registry.closeAll()
        let clean = [UInt8](try Data(contentsOf: URL(fileURLWithPath: img)))
        #expect(clean[79] & 1 == 0)
        try QCOW2Test.expectClean(img)
    }

    @Test("openImage builds file + format nodes and the chain")
    func openImage() throws {
        let dir = QCOW2TempDir()
        let base = dir.file("base.raw"), img = dir.file("o.qcow2")
        try Data(QCOW2Test.pattern(0x31, 1 << 20)).write(to: URL(fileURLWithPath: base))
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", img, "1M")
        #expect(QCOW2Probe.isQCOW2(path: img))
        #expect(!QCOW2Probe.isQCOW2(path: base))
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Opener.openImage(path: img, readOnly: true, in: registry)
        #expect(node.driverName == "qcow2")
        #expect(node.backing?.driverName == "raw")
        #expect(try QCOW2Test.readAll(node) == QCOW2Test.pattern(0x31, 1 << 20))
        let raw = try QCOW2Opener.openImage(path: base, readOnly: true, in: registry)
        #expect(raw.driverName == "raw")
    }
}
