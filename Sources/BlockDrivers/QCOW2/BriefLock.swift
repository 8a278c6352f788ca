import Synchronization

extension Mutex where Value: ~Copyable {
    /// `withLockIfAvailable`, retried for a few microseconds: the metadata lock is usually
    /// held only for a cache lookup by another thread, and waiting that long is far cheaper
    /// than handing a `noWait` request to a worker. A holder doing disk I/O under the lock
    /// (an L2 load, a refcount write) outlasts the spin, and the caller then gives up.
    @inline(__always)
    borrowing func withLockBriefly<Result, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result? {
        for attempt in 0..<64 {
            if let r = try withLockIfAvailable(body) { return r }
            if attempt > 8 { sched_yield_hint() }
        }
        return nil
    }
}

@inline(__always)
private func sched_yield_hint() {
    // A short busy pause; the holder runs on the other core.
    for _ in 0..<32 { _ = Atomic<Int>(0).load(ordering: .relaxed) }
}
