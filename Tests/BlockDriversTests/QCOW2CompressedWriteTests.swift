import Foundation
import Testing
import JSON
@testable import BlockCore
@testable import BlockDrivers

/// Compressed cluster writes of the qcow2 driver and the `compress` filter: descriptor
/// encoding, sector packing and refcounts, and images that `qemu-img check` and
/// `qemu-img compare` accept.
@Suite("qcow2 compressed writes")
struct QCOW2CompressedWriteTests {
    // MARK: descriptor encoding (pure)

    @Test("L2 descriptor: bit layout per cluster size, round trip with the decoder")
    func descriptorEncoding() {
        // 64 KiB clusters: x = 62 - (16 - 8) = 54. 1000 bytes at 0x50200 cover 2 sectors.
        let e = QCOW2IO.compressedEntry(offset: 0x50200, size: 1000, clusterBits: 16)
        #expect(e == (1 << 62) | (1 << 54) | 0x50200)
        // 512 B clusters: one size bit at 61, offsets up to bit 60.
        #expect(QCOW2IO.compressedEntry(offset: 0x1000, size: 511, clusterBits: 9) == (1 << 62) | 0x1000)
        // 2 MiB clusters: x = 49; 2 MiB - 1 bytes from a sector boundary: 4095 extra sectors.
        let big = QCOW2IO.compressedEntry(offset: 3 << 21, size: (1 << 21) - 1, clusterBits: 21)
        #expect(big == (1 << 62) | (4095 << 49) | (3 << 21))
        for bits in UInt64(9)...21 {
            let cs = UInt64(1) << bits
            for (offset, size) in [(cs, UInt64(1)), (cs * 7 + 512, cs - 1), (cs * 3 + cs - 512, min(cs - 1, 700)),
                                   ((UInt64(1) << 40) + 1024, cs / 2 + 1)] {
                let entry = QCOW2IO.compressedEntry(offset: offset, size: size, clusterBits: bits)
                #expect(entry & QCOW2Entry.compressed != 0 && entry & QCOW2Entry.copied == 0)
                let (o, n) = QCOW2IO.compressedRange(entry, clusterBits: bits)
                #expect(o == offset, "cluster_bits \(bits)")
                // The decoder reads whole sectors: the data and at most the rest of its last sector.
                #expect(n >= size && n == ((offset + size + 511) & ~511) - offset, "cluster_bits \(bits)")
            }
        }
    }

    // MARK: sector packing and refcounts

    @Test("packing: sector-aligned, shared host clusters, spill into the next cluster, cursor reset on free",
          .needsQemu)
    func packing() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("p.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "1M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        let driver = try #require(node.driver as? QCOW2Driver)
        try driver.meta.withLock { (m) throws(BlockError) in
            let cs: UInt64 = 4096
            let a = try m.allocateCompressedBytes(1000)
            #expect(a % cs == 0)
            let k = a / cs
            let b = try m.allocateCompressedBytes(1000)
            #expect(b == a + 1024)
            let c = try m.allocateCompressedBytes(1500)
            #expect(c == a + 2048)
            #expect(try m.refcount(ofCluster: k) == 3)
            // 512 bytes are left in k; 1000 bytes spill into k+1 when that is the next free cluster.
            let d = try m.allocateCompressedBytes(1000)
            #expect(d == a + 3584)
            #expect(try m.refcount(ofCluster: k) == 4)
            #expect(try m.refcount(ofCluster: k + 1) == 1)
            #expect(m.compressedCursor == (k + 1) * cs + 512)
            // Exactly filling the rest of k+1 closes it.
            let e = try m.allocateCompressedBytes(cs - 512 - 300)
            #expect(e == (k + 1) * cs + 512)
            #expect(m.compressedCursor == 0)
            let f = try m.allocateCompressedBytes(100)
            #expect(f % cs == 0 && f / cs != k && f / cs != k + 1)
            // Freeing the cursor's host cluster moves the cursor off it.
            try m.adjustRefcounts(start: f / cs, count: 1, increase: false)
            #expect(m.compressedCursor == 0)
            // Release the rest so the image is clean again.
            try m.adjustRefcounts(start: k, count: 1, increase: false)
            try m.adjustRefcounts(start: k, count: 1, increase: false)
            try m.adjustRefcounts(start: k, count: 1, increase: false)
            try m.adjustRefcounts(start: k, count: 2, increase: false)
            try m.adjustRefcounts(start: k + 1, count: 1, increase: false)
        }
        try registry.closeAll()
        try QCOW2Test.expectClean(img)
    }

    @Test("1-bit refcounts: one compressed cluster per host cluster", .needsQemu)
    func oneBitRefcounts() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("r1.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", img, "4M")
        var model = [UInt8](repeating: 0, count: 4 << 20)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        for i in 0..<8 {
            let data = Self.text(65536, seed: UInt64(i))
            try QCOW2Test.write(node, UInt64(i) << 16, data, flags: .writeCompressed)
            model.replaceSubrange((i << 16)..<((i + 1) << 16), with: data)
        }
        #expect(try QCOW2Test.readAll(node) == model)
        try registry.closeAll()
        try Self.expectCleanAndEqual(img, model, in: dir, compressed: 8)
    }

    // MARK: whole images

    /// Compressible text-like bytes (random words), deterministic per seed.
    static func text(_ count: Int, seed: UInt64) -> [UInt8] {
        var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        func next() -> UInt64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x }
        let words: [[UInt8]] = (0..<64).map { _ in (0..<Int(2 + next() % 8)).map { _ in UInt8(97 + next() % 26) } }
        var out: [UInt8] = []
        out.reserveCapacity(count + 16)
        while out.count < count {
            out += words[Int(next() % 64)]
            out.append(next() % 12 == 0 ? 10 : 32)
        }
        return Array(out[0..<count])
    }

    static func random(_ count: Int, seed: UInt64) -> [UInt8] {
        var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in x ^= x << 13; x ^= x >> 7; x ^= x << 17; return UInt8(truncatingIfNeeded: x) }
    }

    /// `qemu-img check` clean (and reporting `compressed` compressed clusters when given),
    /// and `qemu-img compare` equal to `model`.
    static func expectCleanAndEqual(_ img: String, _ model: [UInt8], in dir: QCOW2TempDir, compressed: Int? = nil,
                                    sourceLocation: SourceLocation = #_sourceLocation) throws {
        try QCOW2Test.expectClean(img, sourceLocation: sourceLocation)
        let raw = dir.file("model-\(UUID().uuidString).raw")
        try Data(model).write(to: URL(fileURLWithPath: raw))
        let cmp = try QCOW2Tools.qemuImg("compare", raw, img)
        #expect(cmp.status == 0, "\(cmp.output)", sourceLocation: sourceLocation)
        if let compressed {
            #expect(try Self.compressedClusters(img) == compressed, sourceLocation: sourceLocation)
        }
    }

    /// Number of compressed clusters, from the L2 tables as qemu-img sees them: `qemu-img map`
    /// gives an `offset` for data clusters only when they are not compressed.
    static func compressedClusters(_ img: String) throws -> Int {
        let out = try QCOW2Tools.run("qemu-img", ["map", "--output=json", img]).output
        guard case .array(let extents) = try JSONParser.parse(out) else { return -1 }
        var clusters = 0
        let cs = try QCOW2Tools.run("qemu-img", ["info", "--output=json", img]).output
        guard case .object(let info) = try JSONParser.parse(cs), case .int(let clusterSize)? = info["cluster-size"] else { return -1 }
        for case .object(let e) in extents where e["data"] == .bool(true) && e["offset"] == nil {
            if case .int(let len)? = e["length"] { clusters += Int((len + clusterSize - 1) / clusterSize) }
        }
        return clusters
    }

    @Test("compressed writes: read back, check clean, smaller than the data",
          .needsQemu, arguments: ["zlib", "zstd"], [4096, 65536, 2 << 20])
    func compressedWrites(type: String, clusterSize: Int) throws {
        let dir = QCOW2TempDir()
        let img = dir.file("c.qcow2")
        // Not a multiple of the cluster size: the last cluster is partial.
        let size = clusterSize * 12 + 1536
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize),compression_type=\(type)",
                               img, "\(size)")
        var model = [UInt8](repeating: 0, count: size)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        func put(_ cluster: Int, _ count: Int, _ data: [UInt8], flags: RequestFlags = .writeCompressed) throws {
            try QCOW2Test.write(node, UInt64(cluster * clusterSize), data, flags: flags)
            model.replaceSubrange((cluster * clusterSize)..<(cluster * clusterSize + data.count), with: data)
        }
        try put(0, 4, Self.text(clusterSize * 4, seed: 1))
        try put(4, 1, Self.random(clusterSize, seed: 2))       // incompressible: stored normally
        try put(5, 2, Self.text(clusterSize * 2, seed: 3), flags: [.writeCompressed, .fua])
        try put(12, 1, Self.text(1536, seed: 4))                // the last, partial cluster
        try put(8, 1, QCOW2Test.pattern(0, clusterSize))        // zeroes compress too
        #expect(try QCOW2Test.readAll(node) == model)
        // Refused: not cluster-aligned, or not whole clusters.
        #expect(throws: BlockError.self) { try QCOW2Test.write(node, 512, Self.text(clusterSize, seed: 5), flags: .writeCompressed) }
        #expect(throws: BlockError.self) { try QCOW2Test.write(node, 0, Self.text(clusterSize / 2, seed: 5), flags: .writeCompressed) }
        try registry.closeAll()
        try Self.expectCleanAndEqual(img, model, in: dir, compressed: 8)
        let fileSize = try FileManager.default.attributesOfItem(atPath: img)[.size] as! Int
        // 8 clusters of text compress at least 2:1; the random one and metadata add the rest.
        #expect(fileSize < clusterSize * 4 + clusterSize * 5 + 4 * max(clusterSize, 65536), "file \(fileSize)")
    }

    @Test("overwrite, partial write, zeroes and discard of compressed clusters free their share",
          .needsQemu, arguments: ["zlib", "zstd"])
    func overwriteAndDiscard(type: String) throws {
        let dir = QCOW2TempDir()
        let img = dir.file("o.qcow2")
        let cs = 65536
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compression_type=\(type)", img, "2M")
        // An allocated data cluster to overwrite compressed.
        try QCOW2Tools.qemuIO(img, "write -P 0x77 \(20 * cs) 64k")
        var model = try QCOW2Test.convertToRaw(img, in: dir)
        let registry = QCOW2TestRegistry()
        // discard=unmap: a node's discards are ignored by default, as in QEMU.
        let node = try QCOW2Test.open(img, extra: [("discard", .string("unmap"))], registry: registry)
        func put(_ off: Int, _ data: [UInt8], _ flags: RequestFlags = .writeCompressed) throws {
            try QCOW2Test.write(node, UInt64(off), data, flags: flags)
            model.replaceSubrange(off..<(off + data.count), with: data)
        }
        try put(0, Self.text(cs * 16, seed: 10))
        try node.flush()
        try put(2 * cs, Self.text(cs * 2, seed: 11))           // compressed over compressed
        try put(20 * cs, Self.text(cs, seed: 12))              // compressed over data (QEMU 7.2: EIO)
        try put(5 * cs + 100, QCOW2Test.pattern(0x5c, 300), []) // a normal partial write: COW, uncompressed
        try node.writeZeroes(at: UInt64(6 * cs), length: UInt64(cs), flags: .mayUnmap)
        model.replaceSubrange((6 * cs)..<(7 * cs), with: QCOW2Test.pattern(0, cs))
        try node.writeZeroes(at: UInt64(7 * cs), length: UInt64(cs), flags: [])
        model.replaceSubrange((7 * cs)..<(8 * cs), with: QCOW2Test.pattern(0, cs))
        try node.discard(at: UInt64(8 * cs), length: UInt64(4 * cs))
        model.replaceSubrange((8 * cs)..<(12 * cs), with: QCOW2Test.pattern(0, 4 * cs))
        #expect(try QCOW2Test.readAll(node) == model)
        try node.flush()
        // Everything the first round compressed is rewritten: its host clusters are reused.
        try put(0, Self.text(cs * 16, seed: 13))
        #expect(try QCOW2Test.readAll(node) == model)
        try registry.closeAll()
        try Self.expectCleanAndEqual(img, model, in: dir, compressed: 17)
    }

    @Test("concurrent compressed writes to the same and to different clusters", .needsQemu)
    func concurrentWrites() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("m.qcow2")
        let cs = 4096
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(cs)", img, "4M")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        let threads = 8, perThread = 200
        // Thread t writes clusters t, t+8, … (its own) and cluster 1000 (shared) with its own text.
        let shared = (0..<threads).map { Self.text(cs, seed: UInt64(500 + $0)) }
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for i in 0..<perThread {
                let c = (i * threads + t) % 960
                let data = Self.text(cs, seed: UInt64(c * 7 + i / 120))
                try? QCOW2Test.write(node, UInt64(c * cs), data, flags: .writeCompressed)
                if i % 10 == 0 { try? QCOW2Test.write(node, UInt64(1000 * cs), shared[t], flags: .writeCompressed) }
                if i % 50 == 0 { try? node.flush() }
            }
        }
        var model = [UInt8](repeating: 0, count: 4 << 20)
        for t in 0..<threads {
            for i in 0..<perThread {
                let c = (i * threads + t) % 960
                // The last write of cluster c (each cluster is written by one thread, in order).
                model.replaceSubrange((c * cs)..<((c + 1) * cs), with: Self.text(cs, seed: UInt64(c * 7 + i / 120)))
            }
        }
        var got = try QCOW2Test.readAll(node)
        let last = Array(got[(1000 * cs)..<(1001 * cs)])
        #expect(shared.contains(last))
        model.replaceSubrange((1000 * cs)..<(1001 * cs), with: last)
        #expect(got == model)
        got = []
        try registry.closeAll()
        try Self.expectCleanAndEqual(img, model, in: dir, compressed: 961)
    }

    // MARK: the compress filter

    static func openFilter(over img: String, registry: QCOW2TestRegistry, formatNode: String = "fmt") throws -> BlockNode {
        registerFormats()
        registerFilters()
        // discard=unmap on both: a node's discards are ignored by default, as in QEMU.
        var q = QCOW2Test.options(img, [("discard", .string("unmap"))])
        q["node-name"] = .string(formatNode)
        _ = try BlockdevFactory.open(q, in: registry)
        return try BlockdevFactory.open(JSONObject([("driver", .string("compress")), ("node-name", .string("cmp")),
                                                    ("discard", .string("unmap")), ("file", .string(formatNode))]),
                                        in: registry)
    }

    @Test("compress filter: every write compressed, partial clusters completed, limits", .needsQemu)
    func filter() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("f.qcow2")
        let cs = 65536
        let size = cs * 20 + 512 * 3
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "\(size)")
        let registry = QCOW2TestRegistry()
        let node = try Self.openFilter(over: img, registry: registry)
        #expect(node.isFilter && node.driverName == "compress")
        #expect(node.limits.minimum == UInt32(cs) && node.limits.preferred == UInt32(cs))
        var model = [UInt8](repeating: 0, count: size)
        func put(_ off: Int, _ data: [UInt8]) throws {
            try QCOW2Test.write(node, UInt64(off), data)
            model.replaceSubrange(off..<(off + data.count), with: data)
        }
        try put(0, Self.text(cs * 4, seed: 1))                 // aligned
        try put(cs * 4 + 1000, Self.text(5000, seed: 2))       // inside one unallocated cluster
        try put(cs * 2 + 7, Self.text(100, seed: 3))           // inside a compressed cluster
        try put(cs * 6 - 300, Self.text(cs * 3 + 600, seed: 4)) // partial head, 3 whole, partial tail
        try put(size - 700, Self.text(700, seed: 5))           // the partial last cluster
        try node.writeZeroes(at: UInt64(cs * 2 + 5), length: 10, flags: [])  // rewritten compressed
        model.replaceSubrange((cs * 2 + 5)..<(cs * 2 + 15), with: QCOW2Test.pattern(0, 10))
        try node.writeZeroes(at: UInt64(cs * 10), length: UInt64(cs * 2), flags: .mayUnmap)  // passes through
        model.replaceSubrange((cs * 10)..<(cs * 12), with: QCOW2Test.pattern(0, cs * 2))
        let fast = #expect(throws: BlockError.self) { try node.writeZeroes(at: 100, length: 10, flags: .noFallback) }
        #expect(fast?.errno == ENOTSUP)
        try node.discard(at: UInt64(cs * 3), length: UInt64(cs))
        model.replaceSubrange((cs * 3)..<(cs * 4), with: QCOW2Test.pattern(0, cs))
        #expect(try QCOW2Test.readAll(node) == model)
        // Not on an event loop.
        let e = #expect(throws: BlockError.self) { try QCOW2Test.write(node, 0, Self.text(cs, seed: 6), flags: .noWait) }
        #expect(e?.isWouldBlock == true)
        try registry.closeAll()
        // Clusters 0-2, 4-9 and the last are compressed (3 was discarded).
        try Self.expectCleanAndEqual(img, model, in: dir, compressed: 10)
    }

    @Test("compress filter over a node that cannot compress: QEMU's error")
    func filterRefusesRaw() throws {
        registerFilters()
        let registry = QCOW2TestRegistry()
        let null = BlockNode(name: "n0", driver: NullDriver(size: 1 << 20, readZeroes: true))
        try registry.register(null)
        let opts = JSONObject([("driver", .string("compress")), ("node-name", .string("c")), ("file", .string("n0"))])
        let error = #expect(throws: BlockError.self) { _ = try BlockdevFactory.open(opts, in: registry) }
        #expect(error?.message == "Compression is not supported for underlying format: null-co")
        // A compressed write to a driver without support fails instead of writing uncompressed.
        let buf = [UInt8](repeating: 1, count: 4096)
        #expect(throws: BlockError.self) { try buf.withUnsafeBytes { try null.write(at: 0, from: $0, flags: .writeCompressed) } }
    }
}
