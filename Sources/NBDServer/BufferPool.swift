import Glibc

/// Page-aligned request buffers, recycled by size class. Owned by one event loop thread:
/// buffers go to workers and come back with the completion, so no lock is needed.
///
/// Classes are a power of two plus one page (4 KiB, 8 KiB, 12 KiB, 20 KiB, …, 1 MiB + 4 KiB,
/// …, 32 MiB + 4 KiB), so a request of 2^n bytes plus its reply-header headroom takes a
/// buffer barely larger than itself rather than twice its size.
final class BufferPool {
    static let classCount = 15
    private var free: [[UnsafeMutableRawBufferPointer]] = Array(repeating: [], count: BufferPool.classCount)
    private let maxCachedPerClass = 64
    /// Most bytes kept in the free lists; beyond that, returned buffers are freed.
    static let maxCachedBytes = 64 << 20
    private var cachedBytes = 0

    /// Capacity of size class `c`.
    @inline(__always)
    static func classCapacity(_ c: Int) -> Int { c == 0 ? 4096 : (4096 << (c - 1)) + 4096 }

    /// Size class index for `n` bytes; nil when larger than the largest class.
    @inline(__always)
    static func sizeClass(_ n: Int) -> Int? {
        if n <= 4096 { return 0 }
        let m = n - 4096
        let k = max(0, Int.bitWidth - (m - 1).leadingZeroBitCount - 12)
        let c = k + 1
        return c < classCount ? c : nil
    }

    /// Bytes actually allocated for a request of `count` bytes (what it keeps alive).
    @inline(__always)
    static func capacity(for count: Int) -> Int {
        if let c = sizeClass(count) { return classCapacity(c) }
        return max(count, 1)
    }

    func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
        if let c = BufferPool.sizeClass(count) {
            if let b = free[c].popLast() {
                cachedBytes -= b.count
                return UnsafeMutableRawBufferPointer(rebasing: b[0..<count])
            }
            let full = UnsafeMutableRawBufferPointer.allocate(byteCount: BufferPool.classCapacity(c), alignment: 4096)
            return UnsafeMutableRawBufferPointer(rebasing: full[0..<count])
        }
        return .allocate(byteCount: max(count, 1), alignment: 4096)
    }

    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress else { return }
        if let c = BufferPool.sizeClass(buffer.count) {
            let capacity = BufferPool.classCapacity(c)
            if free[c].count < maxCachedPerClass && cachedBytes + capacity <= BufferPool.maxCachedBytes {
                free[c].append(UnsafeMutableRawBufferPointer(start: base, count: capacity))
                cachedBytes += capacity
                return
            }
        }
        UnsafeMutableRawBufferPointer(start: base, count: buffer.count).deallocate()
    }

    deinit {
        for list in free { for b in list { b.deallocate() } }
    }
}
