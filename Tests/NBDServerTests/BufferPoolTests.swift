@testable import NBDServer
import Testing

@Suite struct BufferPoolTests {
    @Test func sizeClassesArePowersOfTwoPlusAPage() {
        #expect(BufferPool.capacity(for: 1) == 4096)
        #expect(BufferPool.capacity(for: 4096) == 4096)
        #expect(BufferPool.capacity(for: 4096 + 64) == 8192)
        #expect(BufferPool.capacity(for: 8192) == 8192)
        #expect(BufferPool.capacity(for: 8193) == 12288)
        // A 1 MiB read plus its reply-header headroom takes 1 MiB + 4 KiB, not 2 MiB.
        #expect(BufferPool.capacity(for: (1 << 20) + 64) == (1 << 20) + 4096)
        #expect(BufferPool.capacity(for: (32 << 20) + 64) == (32 << 20) + 4096)
        // Past the largest class: exactly what was asked.
        #expect(BufferPool.capacity(for: (64 << 20)) == 64 << 20)
        for n in [1, 4097, 12289, 65600, 1 << 20, (1 << 20) + 4097, 5_000_000] {
            let c = BufferPool.capacity(for: n)
            #expect(c >= n && c % 4096 == 0, "\(n) → \(c)")
        }
    }

    @Test func buffersAreRecycledByClassAndPageAligned() {
        let pool = BufferPool()
        let a = pool.take((1 << 20) + 64)
        #expect(a.count == (1 << 20) + 64)
        #expect(Int(bitPattern: a.baseAddress!) % 4096 == 0)
        let base = a.baseAddress
        pool.give(a)
        let b = pool.take(1 << 20)
        #expect(b.baseAddress == base, "same class, same buffer")
        pool.give(b)
        let small = pool.take(100)
        #expect(small.baseAddress != base)
        pool.give(small)
    }
}
