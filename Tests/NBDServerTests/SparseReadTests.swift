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
}
