import Glibc

/// Page-aligned request buffers, recycled by size class. Owned by one event loop thread:
/// buffers go to workers and come back with the completion, so no lock is needed.
final class BufferPool {
    private var free: [[UnsafeMutableRawBufferPointer]] = Array(repeating: [], count: 14)
    private let maxCached = 64

    /// Size class index: 4 KiB << index.
    @inline(__always)
    private func sizeClass(_ n: Int) -> Int? {
        if n <= 4096 { return 0 }
        let c = (Int.bitWidth - (n - 1).leadingZeroBitCount) - 12
        return c < free.count ? c : nil
    }

    func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
        if let c = sizeClass(count) {
            if let b = free[c].popLast() { return UnsafeMutableRawBufferPointer(rebasing: b[0..<count]) }
            let full = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096 << c, alignment: 4096)
            return UnsafeMutableRawBufferPointer(rebasing: full[0..<count])
        }
        return .allocate(byteCount: max(count, 1), alignment: 4096)
    }

    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress else { return }
        if let c = sizeClass(buffer.count), free[c].count < maxCached {
            free[c].append(UnsafeMutableRawBufferPointer(start: base, count: 4096 << c))
        } else {
            UnsafeMutableRawBufferPointer(start: base, count: buffer.count).deallocate()
        }
    }

    deinit {
        for list in free { for b in list { b.deallocate() } }
    }
}
