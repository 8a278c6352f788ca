import Foundation
import Testing
import TestSupport
import JSON
@testable import BlockCore
@testable import BlockDrivers

/// The qcow2 options besides `overlap-check` (QCOW2OverlapCheckTests): each acts as in QEMU
/// or is refused naming it.
@Suite("qcow2 options", .needsQemu)
struct QCOW2OptionsTests {
    static func header(size: UInt64, clusterBits: UInt32 = 16) -> QCOW2Header {
        QCOW2Header(version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: clusterBits, size: size,
                    cryptMethod: 0, l1Size: 1, l1TableOffset: 0, refcountTableOffset: 0, refcountTableClusters: 1,
                    nbSnapshots: 0, snapshotsOffset: 0)
    }

    static func sizes(_ size: UInt64, cache: UInt64? = nil, l2: UInt64? = nil, refcount: UInt64? = nil,
                      entry: UInt64? = nil) throws -> QCOW2CacheSizes {
        var o = QCOW2Options()
        o.cacheSize = cache
        o.l2CacheSize = l2
        o.refcountCacheSize = refcount
        o.l2CacheEntrySize = entry
        return try QCOW2CacheSizes.resolve(o, header: header(size: size))
    }

    /// QEMU's `read_cache_sizes`, worked through for 64 KiB clusters: a 1 TiB disk needs
    /// 128 MiB of L2 tables (2048), a 4 GiB disk 512 KiB (8).
    @Test("cache-size, l2-cache-size and refcount-cache-size resolve as QEMU's read_cache_sizes")
    func cacheSizesAsQemu() throws {
        let tib: UInt64 = 1 << 40, gib: UInt64 = 1 << 30, mib: UInt64 = 1 << 20
        // Defaults: L2 for the whole disk up to 32 MiB; blockd's 4 MiB of refcount blocks.
        #expect(try Self.sizes(tib) == QCOW2CacheSizes(l2Tables: 512, refcountBlocks: 64))
        #expect(try Self.sizes(4 * gib) == QCOW2CacheSizes(l2Tables: 8, refcountBlocks: 64))
        // l2-cache-size is capped at what the disk needs; at least 2 tables, 4 refcount blocks.
        #expect(try Self.sizes(4 * gib, l2: 64 * mib) == QCOW2CacheSizes(l2Tables: 8, refcountBlocks: 64))
        #expect(try Self.sizes(tib, l2: 1, refcount: 1) == QCOW2CacheSizes(l2Tables: 2, refcountBlocks: 4))
        // cache-size alone: the L2 part covers the disk when it can, the rest is refcount cache.
        #expect(try Self.sizes(4 * gib, cache: 8 * mib) == QCOW2CacheSizes(l2Tables: 8, refcountBlocks: 120))
        #expect(try Self.sizes(tib, cache: 8 * mib) == QCOW2CacheSizes(l2Tables: 124, refcountBlocks: 4))
        // With one of the parts given, the other is the remainder.
        #expect(try Self.sizes(tib, cache: 8 * mib, l2: 2 * mib) == QCOW2CacheSizes(l2Tables: 32, refcountBlocks: 96))
        #expect(try Self.sizes(tib, cache: 8 * mib, refcount: 2 * mib) == QCOW2CacheSizes(l2Tables: 96, refcountBlocks: 32))
        // QEMU's refusals.
        let refusals: [(() throws -> QCOW2CacheSizes, String)] = [
            ({ try Self.sizes(tib, cache: mib, l2: mib, refcount: mib) },
             "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
            ({ try Self.sizes(tib, cache: mib, l2: 2 * mib) }, "l2-cache-size may not exceed cache-size"),
            ({ try Self.sizes(tib, cache: mib, refcount: 2 * mib) }, "refcount-cache-size may not exceed cache-size"),
            ({ try Self.sizes(tib, entry: 1000) }, "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
            ({ try Self.sizes(tib, entry: 256) }, "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
            ({ try Self.sizes(tib, entry: 4096) },
             "Parameter 'l2-cache-entry-size': blockd caches whole L2 tables; only the cluster size (65536) is accepted"),
        ]
        for (resolve, message) in refusals {
            do { _ = try resolve(); Issue.record("accepted; expected: \(message)") } catch let e as BlockError {
                #expect(e.message == message)
            }
        }
        #expect(try Self.sizes(tib, entry: 65536) == QCOW2CacheSizes(l2Tables: 512, refcountBlocks: 64))
    }

    /// QEMU's cache cleaning: a table used since the previous clean stays, one not used for a
    /// whole interval goes; dirty tables stay until written back.
    @Test("cleanUnusedCaches drops tables unused for a whole interval, never dirty ones")
    func cleaningDropsUnusedTables() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("clean.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "64M")
        // 4 KiB clusters: an L2 table maps 2 MiB, so these writes make four tables.
        try QCOW2Tools.qemuIO(img, "write -P 1 0 4k", "write -P 2 2M 4k", "write -P 3 4M 4k", "write -P 4 6M 4k")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        defer { try? registry.closeAll() }
        let q = node.driver as! QCOW2Driver
        var buf = [UInt8](repeating: 0, count: 4096)
        func read(_ offset: UInt64) throws {
            try buf.withUnsafeMutableBytes { try node.read(at: offset, into: $0) }
        }
        for i in 0..<4 { try read(UInt64(i) << 21) }
        #expect(q.cachedTables.l2 == 4)
        #expect(q.cleanUnusedCaches() == 0, "every table was used since the (first) clean")
        try read(0)
        try QCOW2Test.write(node, 2 << 20, QCOW2Test.pattern(9, 4096))   // dirties table 1 (no allocation: in place)
        try QCOW2Test.write(node, 8 << 20, QCOW2Test.pattern(8, 4096))   // a new, dirty table 4
        q.cleanUnusedCaches()
        // Table 0 was read and 1 written (its entry did not change: clean but used), 4 is dirty;
        // 2 and 3 were not used for a whole interval.
        #expect(q.cachedTables.l2 == 3, "\(q.cachedTables)")
        q.cleanUnusedCaches()
        #expect(q.cachedTables.l2 == 1, "only the dirty table stays: \(q.cachedTables)")
        try node.flush()
        q.cleanUnusedCaches()
        #expect(q.cachedTables.l2 == 0)
        // Dropped tables load again: the data is all there.
        for (i, byte) in [UInt8(1), 9, 3, 4, 8].enumerated() {
            try read(UInt64(i) << 21)
            #expect(buf == QCOW2Test.pattern(byte, 4096), "table \(i)")
        }
    }

    static func allocatedBytes(_ path: String) -> Int {
        var st = stat()
        _ = stat(path, &st)
        return Int(st.st_blocks) * 512
    }

    /// pass-discard-other (QEMU's QCOW2_DISCARD_OTHER, off by default): the clusters of a
    /// removed persistent bitmap become holes in the file only when it is on.
    @Test("pass-discard-other punches the clusters of a removed bitmap", arguments: [false, true])
    func passDiscardOther(on: Bool) throws {
        let dir = QCOW2TempDir()
        let img = dir.file("other.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "4G")
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, extra: [("pass-discard-other", .bool(on))], registry: registry)
        // 4 GiB at 4 KiB granularity: 128 KiB of bitmap data, two clusters.
        let bitmap = DirtyBitmap(name: "b0", granularity: 4096, length: node.length, persistent: true)
        try node.driver.bitmapStorage!.add(bitmap)
        try node.flush()
        let with = Self.allocatedBytes(img)
        try node.driver.bitmapStorage!.remove(bitmap)
        try node.flush()
        let without = Self.allocatedBytes(img)
        try registry.closeAll()
        if on {
            #expect(with - without >= 128 << 10, "\(with) → \(without)")
        } else {
            #expect(without >= with, "\(with) → \(without)")
        }
        try QCOW2Test.expectClean(img)
    }

    @Test("lazy-refcounts=on needs a v3 image, as QEMU")
    func lazyRefcountsNeedV3() throws {
        let dir = QCOW2TempDir()
        let v2 = dir.file("v2.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
        do {
            _ = try QCOW2Test.open(v2, extra: [("lazy-refcounts", .bool(true))])
            Issue.record("lazy-refcounts=on opened a v2 image")
        } catch let e as BlockError {
            #expect(e.message == "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
        }
        // off is fine on v2; on a v3 image, on sets the compatible bit (and dirty while open).
        let r = QCOW2TestRegistry()
        _ = try QCOW2Test.open(v2, extra: [("lazy-refcounts", .bool(false))], registry: r)
        try r.closeAll()
        let v3 = dir.file("v3.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", v3, "1M")
        let r3 = QCOW2TestRegistry()
        _ = try QCOW2Test.open(v3, extra: [("lazy-refcounts", .bool(true))], registry: r3)
        #expect(try QCOW2Tools.qemuImg("info", "-U", v3).output.contains("lazy refcounts: true"))
        try r3.closeAll()
        try QCOW2Test.expectClean(v3)
    }

    @Test("encrypt and data-file on an image that has neither: QEMU's errors")
    func encryptAndDataFileRefused() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("plain.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        let raw = dir.file("data.raw")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "raw", raw, "1M")
        let cases: [(JSONValue, String, String)] = [
            (.object(["format": "aes"]), "encrypt", "No encryption in image header, but options specified format 'aes'"),
            (.object(["format": "luks", "key-secret": "s"]), "encrypt", "No encryption in image header, but options specified format 'luks'"),
            (.object(["format": "bogus"]), "encrypt", "Parameter 'format' does not accept value 'bogus'"),
            (.object(["key-secret": "s"]), "encrypt", "Parameter 'encrypt.format' is missing"),
            (.object(["format": "aes", "bogus": "1"]), "encrypt", "Parameter 'encrypt.bogus' is unexpected"),
            (.string("x"), "encrypt", "Invalid parameter type for 'encrypt', expected: object"),
            (.object(["driver": "file", "filename": .string(raw)]), "data-file",
             "'data-file' can only be set for images with an external data file"),
            (.string("nosuch"), "data-file", "Cannot find device='nosuch' nor node-name='nosuch'"),
        ]
        for (value, key, message) in cases {
            do {
                _ = try QCOW2Test.open(img, extra: [(key, value)])
                Issue.record("\(key)=\(value) was accepted")
            } catch let e as BlockError {
                #expect(e.message == message, "\(key)")
            }
        }
    }
}
