import BlockCore
import NBDProtocol
@testable import NBDServer
import Testing

@Suite struct SparseReadTests {
    static func request(offset: UInt64, length: Int, dataAt: [Int]) -> (Request, BufferPool) {
        let pool = BufferPool()
        let r = Request()
        r.header = RequestHeader(flags: [], type: 0, cookie: 1, offset: offset, length: UInt64(length))
        r.buffer = pool.take(Request.headroom + length)
        r.data.initializeMemory(as: UInt8.self, repeating: 0)
        for at in dataAt { r.data[at] = 0xab }
        return (r, pool)
    }

    @Test func holeChunksStartAtAbsoluteGranuleBoundaries() {
        let (r, pool) = Self.request(offset: 1000, length: 200 * 1024, dataAt: [70_000])
        defer { pool.give(r.buffer) }
        Executor.splitHoles(r)
        let g = Executor.holeGranule
        let first = g - 1000
        #expect(r.chunks.map(\.offset) == [0, first, first + g])
        #expect(r.chunks.map(\.hole) == [true, false, true])
        #expect(r.chunks.map(\.length) == [first, g, 200 * 1024 - first - g])
        for c in r.chunks.dropFirst() { #expect((1000 + UInt64(c.offset)) % UInt64(g) == 0) }
    }

    @Test func smallReadsStraddlingAGranuleAreSplitToo() {
        let (r, pool) = Self.request(offset: UInt64(Executor.holeGranule) - 4096, length: 8192, dataAt: [5000])
        defer { pool.give(r.buffer) }
        Executor.splitHoles(r)
        #expect(r.chunks.map(\.hole) == [true, false])
        let (all, pool2) = Self.request(offset: 4096, length: 8192, dataAt: [])
        defer { pool2.give(all.buffer) }
        Executor.splitHoles(all)
        #expect(all.chunks.count == 1 && all.chunks[0].hole && all.chunks[0].length == 8192)
        let (data, pool3) = Self.request(offset: 0, length: 1 << 20, dataAt: Array(stride(from: 0, to: 1 << 20, by: 4096)))
        defer { pool3.give(data.buffer) }
        Executor.splitHoles(data)
        #expect(data.chunks.isEmpty, "all data: one OFFSET_DATA chunk, no split")
    }

    /// The granule is the node's allocation unit: a qcow2 with 512-byte clusters gets a
    /// 512-byte hole chunk, then the data (libnbd's structured-read.sh, as qemu-nbd answers).
    @Test func granuleIsTheAllocationUnit() {
        let (r, pool) = Self.request(offset: 2048, length: 1024, dataAt: Array(512..<1024))
        defer { pool.give(r.buffer) }
        Executor.splitHoles(r, granule: 512)
        #expect(r.chunks.map(\.offset) == [0, 512] && r.chunks.map(\.length) == [512, 512])
        #expect(r.chunks.map(\.hole) == [true, false])
        // At the default 64 KiB it stays one data chunk.
        let (coarse, pool2) = Self.request(offset: 2048, length: 1024, dataAt: Array(512..<1024))
        defer { pool2.give(coarse.buffer) }
        Executor.splitHoles(coarse)
        #expect(coarse.chunks.isEmpty)
        // A file system block: a 4 KiB hole between data at offset 1 MiB.
        let (fs, pool3) = Self.request(offset: 1 << 20, length: 12288, dataAt: [0, 8192])
        defer { pool3.give(fs.buffer) }
        Executor.splitHoles(fs, granule: 4096)
        #expect(fs.chunks.map(\.hole) == [false, true, false] && fs.chunks.map(\.length) == [4096, 4096, 4096])
    }

    @Test func allocationUnitsOfTheDrivers() {
        #expect(BlockLimits.allocationUnit(512) == 512)
        #expect(BlockLimits.allocationUnit(4096) == 4096)
        #expect(BlockLimits.allocationUnit(2 << 20) == 65536)
        #expect(BlockLimits.allocationUnit(100) == 512)
        #expect(BlockLimits().allocationUnit == 65536)
    }
}
