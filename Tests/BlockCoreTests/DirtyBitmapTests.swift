import Testing
import Synchronization
@testable import BlockCore
#if canImport(Glibc)
import Glibc
#endif

@Suite struct HBitmapTests {
    @Test func setClearAndCount() {
        let b = HBitmap(count: 1000)
        #expect(b.set(3, 130) == 127)
        #expect(b.popcount == 127)
        #expect(b.get(3) && b.get(129) && !b.get(130) && !b.get(2))
        #expect(b.set(100, 200) == 70)
        #expect(b.clear(0, 50) == 47)
        #expect(b.popcount == 150)
        #expect(b.nextSet(from: 0) == 50)
        #expect(b.nextClear(from: 50) == 200)
        #expect(b.nextSet(from: 200) == nil)
        #expect(b.nextClear(from: 999) == 999)
        b.clearAll()
        #expect(b.popcount == 0 && b.nextSet(from: 0) == nil)
    }

    @Test func fullBitmapHasNoClearBit() {
        let b = HBitmap(count: 130)
        b.set(0, 130)
        #expect(b.nextClear(from: 0) == nil)
        #expect(b.allSet(0, 130))
        b.clear(129, 130)
        #expect(b.nextClear(from: 0) == 129)
    }

    /// 16 TiB at 64 KiB granularity: 2^28 granules, a few dirty extents far apart.
    @Test func hugeSparseSearchIsFast() {
        let n = 1 << 28
        let b = HBitmap(count: n)
        let spots = [5, 1 << 20, (1 << 27) + 12345, n - 1]
        for s in spots { b.set(s, s + 1) }
        var found: [Int] = []
        var at = 0
        let start = clock()
        for _ in 0..<1000 {
            found = []
            at = 0
            while let s = b.nextSet(from: at) {
                found.append(s)
                at = (b.nextClear(from: s) ?? n)
            }
        }
        let cpu = Double(clock() - start) / Double(CLOCKS_PER_SEC)
        #expect(found == spots)
        #expect(cpu < 1.0, "1000 walks took \(cpu) s")
        // Next clean on an almost full bitmap.
        b.set(0, n)
        b.clear(n - 100, n - 99)
        #expect(b.nextClear(from: 0) == n - 100)
        #expect(b.memoryBytes < (n / 8) * 105 / 100)
    }

    @Test func randomAgainstReference() {
        var rng = SystemRandomNumberGenerator()
        let n = 10_000
        let b = HBitmap(count: n)
        var ref = [Bool](repeating: false, count: n)
        for _ in 0..<2000 {
            let lo = Int.random(in: 0..<n, using: &rng)
            let hi = min(n, lo + Int.random(in: 1..<300, using: &rng))
            let set = Bool.random(using: &rng)
            if set { b.set(lo, hi) } else { b.clear(lo, hi) }
            for i in lo..<hi { ref[i] = set }
            let probe = Int.random(in: 0..<n, using: &rng)
            #expect(b.nextSet(from: probe) == ref[probe...].firstIndex(of: true))
            #expect(b.nextClear(from: probe) == ref[probe...].firstIndex(of: false))
        }
        #expect(b.popcount == ref.filter { $0 }.count)
    }

    @Test func serialisationRoundTrip() {
        let b = HBitmap(count: 100_003)
        b.set(0, 1); b.set(9, 10); b.set(70_000, 80_000); b.set(100_002, 100_003)
        var bytes = [UInt8](repeating: 0xff, count: b.byteCount + 100)
        bytes.withUnsafeMutableBytes { b.copyBytes(from: 0, into: $0) }
        #expect(bytes[0] == 1 && bytes[1] == 2)  // bit n of byte m is item 8m+n
        #expect(bytes[b.byteCount...].allSatisfy { $0 == 0 })
        let c = HBitmap(count: 100_003)
        // Load in two pieces, as per-cluster loading does.
        bytes.withUnsafeBytes { raw in
            c.orBytes(at: 0, from: UnsafeRawBufferPointer(rebasing: raw[0..<4096]))
            c.orBytes(at: 4096, from: UnsafeRawBufferPointer(rebasing: raw[4096...]))
        }
        #expect(c.popcount == b.popcount)
        #expect(c.nextSet(from: 10) == 70_000)
        #expect(c.nextClear(from: 70_000) == 80_000)
        #expect(c.get(100_002))
    }
}

/// A driver that stores nothing: enough to drive a node's write path.
final class CountingNullDriver: BlockDriver, @unchecked Sendable {
    let driverName = "null-co"
    let role = DriverRole.protocol
    let length: UInt64
    let isReadOnly = false
    var writes = 0
    init(length: UInt64) { self.length = length }
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {}
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) { writes += 1 }
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func flush() throws(BlockError) {}
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: [.data, .allocated])
    }
}

@Suite struct DirtyBitmapTests {
    @Test func writePathMarksGranules() throws {
        let node = BlockNode(name: "n", driver: CountingNullDriver(length: 1 << 30))
        let b = DirtyBitmap(name: "b0", granularity: 65536, length: node.length)
        node.addObserver(b)
        let buf = [UInt8](repeating: 1, count: 4096)
        try buf.withUnsafeBytes { try node.write(at: 65536 * 3 + 100, from: $0) }
        try node.writeZeroes(at: 1 << 20, length: 65537)
        try node.discard(at: 1 << 29, length: 512)
        let e = b.extents(offset: 0, length: node.length, maxExtents: 100)
        let dirty = e.reduce(into: (UInt64(0), [(UInt64, UInt64)]())) { acc, x in
            if x.dirty { acc.1.append((acc.0, x.length)) }
            acc.0 += x.length
        }.1
        #expect(dirty.map(\.0) == [65536 * 3, 1 << 20, 1 << 29])
        #expect(dirty.map(\.1) == [65536, 131072, 65536])
        #expect(b.dirtyBytes == 4 * 65536)
    }

    @Test func writeUnchangedNeverMarks() throws {
        let node = BlockNode(name: "n", driver: CountingNullDriver(length: 1 << 20))
        let b = DirtyBitmap(name: "b0", granularity: 512, length: node.length)
        node.addObserver(b)
        let buf = [UInt8](repeating: 1, count: 4096)
        try buf.withUnsafeBytes { try node.write(at: 0, from: $0, flags: [.writeUnchanged]) }
        try node.writeZeroes(at: 8192, length: 4096, flags: [.writeUnchanged])
        try node.discard(at: 16384, length: 4096, flags: [.writeUnchanged])
        #expect(b.dirtyBytes == 0)
        try buf.withUnsafeBytes { try node.write(at: 0, from: $0) }
        #expect(b.dirtyBytes == 4096)
    }

    @Test func disabledBitmapDoesNotRecord() throws {
        let node = BlockNode(name: "n", driver: CountingNullDriver(length: 1 << 20))
        let b = DirtyBitmap(name: "b0", granularity: 65536, length: node.length, enabled: false)
        node.addObserver(b)
        try node.writeZeroes(at: 0, length: 4096)
        #expect(b.dirtyBytes == 0)
        b.setEnabled(true)
        try node.writeZeroes(at: 0, length: 4096)
        #expect(b.dirtyBytes == 65536)
        #expect(node.dirtyBitmap(named: "b0") === b)
    }

    @Test func nextDirtyAndCleanOn16TiB() {
        let size: UInt64 = 16 << 40
        let b = DirtyBitmap(name: "big", granularity: 65536, length: size)
        b.mark(offset: 1 << 40, length: 1)
        b.mark(offset: (8 << 40) + 65536 * 7, length: 65536 * 3)
        let t: UInt64 = 1 << 40
        let g: UInt64 = 65536
        let d1 = b.nextDirty(from: 0)!
        #expect(d1.offset == t && d1.length == g)
        let d2 = b.nextDirty(from: t + g)!
        #expect(d2.offset == 8 * t + 7 * g && d2.length == 3 * g)
        #expect(b.nextDirty(from: 8 * t + 10 * g) == nil)
        let c1 = b.nextClean(from: t)!
        let want: UInt64 = 8 * t + 6 * g - t
        #expect(c1.offset == t + g && c1.length == want)
        let e = b.extents(offset: 0, length: size, maxExtents: 100_000)
        #expect(e.reduce(0) { $0 + $1.length } == size)
        #expect(e.filter(\.dirty).count == 2)
    }

    @Test func mergeSameAndDifferentGranularity() {
        let a = DirtyBitmap(name: "a", granularity: 65536, length: 1 << 30)
        let b = DirtyBitmap(name: "b", granularity: 65536, length: 1 << 30)
        let c = DirtyBitmap(name: "c", granularity: 4096, length: 1 << 30)
        b.mark(offset: 0, length: 1)
        c.mark(offset: 1 << 20, length: 4096)
        a.merge(from: b)
        a.merge(from: c)
        #expect(a.dirtyBytes == 2 * 65536)
        #expect(a.isDirty(offset: 0) && a.isDirty(offset: 1 << 20))
    }

    @Test func granularityRules() {
        #expect(throws: BlockError.self) { try DirtyBitmap.checkGranularity(256) }
        #expect(throws: BlockError.self) { try DirtyBitmap.checkGranularity(1000) }
        #expect(throws: BlockError.self) { try DirtyBitmap.checkGranularity(1 << 32) }
        #expect(throws: Never.self) { try DirtyBitmap.checkGranularity(1 << 31) }
    }
}
