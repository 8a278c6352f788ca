import BlockCore
import EventLoop
import Glibc
import Synchronization

/// Decides whether a buffered write may run on the event loop thread instead of a worker.
///
/// ext4 (and most filesystems) refuse `RWF_NOWAIT` for buffered writes, so a write cannot
/// prove up front that it will not sleep, and every write would pay a worker hand-off. A
/// buffered `pwrite` into the page cache normally takes microseconds, though, so for a plain
/// raw-over-file chain (no format metadata, no driver locks) writes run inline — guarded by
/// their measured cost: one write slower than `slowNanos` (dirty-page throttling, a page
/// that had to be read in, a stalled disk — the thread slept, not merely lost the CPU) sends
/// this export's writes back to the workers for
/// `backoffNanos`. The worst a slow disk does to the other clients of a loop is one such
/// stall per back-off period. FUA writes always go to a worker (they wait for the disk).
final class InlineWritePolicy: Sendable {
    static let slowNanos: UInt64 = 1_000_000       // 1 ms
    static let backoffNanos: UInt64 = 2_000_000_000 // 2 s

    let eligible: Bool
    private let suspendedUntil = Atomic<UInt64>(0)

    init(node: BlockNode) {
        // BLOCKD_INLINE_WRITES=0 turns this off (for A/B benchmarks).
        let off = getenv("BLOCKD_INLINE_WRITES").map { String(cString: $0) == "0" } ?? false
        eligible = !off && InlineWritePolicy.isPlainFileChain(node)
    }

    /// raw (any offset/size) over file, or file alone: a write is one `pwrite`.
    static func isPlainFileChain(_ node: BlockNode) -> Bool {
        var n = node
        while n.driverName == "raw", let child = n.file { n = child }
        return n.driverName == "file" && n.children.isEmpty
    }

    @inline(__always)
    func allows(now: UInt64) -> Bool {
        eligible && now >= suspendedUntil.load(ordering: .relaxed)
    }

    /// Voluntary context switches of the calling thread so far: they grow only when the
    /// thread sleeps, so a write that was merely preempted on a busy CPU does not count as slow.
    @inline(__always)
    static func sleeps() -> Int {
        var usage = rusage()
        getrusage(__rusage_who_t(1), &usage)  // RUSAGE_THREAD (not imported by Glibc)
        return usage.ru_nvcsw
    }

    /// Records how long an inline write took; one that slept for longer than `slowNanos`
    /// suspends inline writes for this export.
    @inline(__always)
    func record(elapsed: UInt64, sleepsBefore: Int, now: UInt64, exportName: String) {
        if elapsed > InlineWritePolicy.slowNanos && InlineWritePolicy.sleeps() != sleepsBefore {
            suspendedUntil.store(now + InlineWritePolicy.backoffNanos, ordering: .relaxed)
            Log.debug("export '\(exportName)': inline write slept \(elapsed / 1000) µs; writes go to workers for 2 s")
        }
    }
}
