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
/// this export's writes back to the workers for a back-off period: 100 ms after a write that
/// slept once in a while (ext4 allocating blocks or throttling dirty pages during a bulk
/// restore), doubling up to 2 s while writes keep sleeping soon after each period ends (a
/// slow or stalled disk). The worst a stalled disk does to the other clients of a loop is one
/// such stall per 2 s, after a few shorter periods. FUA writes always go to a worker (they
/// wait for the disk).
final class InlineWritePolicy: Sendable {
    static let slowNanos: UInt64 = 1_000_000              // 1 ms
    static let minBackoffNanos: UInt64 = 100_000_000      // 100 ms
    static let maxBackoffNanos: UInt64 = 2_000_000_000    // 2 s

    let eligible: Bool
    private let suspendedUntil = Atomic<UInt64>(0)
    /// The last back-off period, and when it started (0: none yet).
    private let backoff = Atomic<UInt64>(InlineWritePolicy.minBackoffNanos)
    private let lastSlow = Atomic<UInt64>(0)

    init(node: BlockNode) {
        // BLOCKD_INLINE_WRITES=0 turns this off (for A/B benchmarks).
        let off = getenv("BLOCKD_INLINE_WRITES").map { String(cString: $0) == "0" } ?? false
        eligible = !off && InlineWritePolicy.isPlainFileChain(node)
    }

    /// raw (any offset/size) or qcow2 over file, or file alone. A raw write is one `pwrite`;
    /// a qcow2 write goes inline only as a plain overwrite of an allocated cluster whose L2
    /// table is cached (the driver refuses anything else under `.noWait`), so it too is one
    /// `pwrite` — allocation and metadata I/O still go to the workers.
    static func isPlainFileChain(_ node: BlockNode) -> Bool {
        var n = node
        while n.driverName == "raw" || n.driverName == "qcow2", let child = n.file { n = child }
        return n.driverName == "file" && n.children.isEmpty
    }

    @inline(__always)
    func allows(now: UInt64) -> Bool {
        eligible && !isSuspended(now: now)
    }

    /// Writes go to the workers until a back-off period ends.
    @inline(__always)
    func isSuspended(now: UInt64) -> Bool { now < suspendedUntil.load(ordering: .relaxed) }

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
            let period = backOff(now: now)
            Log.debug("export '\(exportName)': inline write slept \(elapsed / 1000) µs; writes go to workers for \(period / 1_000_000) ms")
        }
    }

    /// Sends writes to the workers after one that slept at `now`; returns for how long. A write
    /// that sleeps within one period after the last one ended doubles the period (up to
    /// `maxBackoffNanos`); one after a quiet while starts again at `minBackoffNanos`. Loops
    /// race benignly here (relaxed atomics: at worst a period is computed twice).
    @discardableResult
    func backOff(now: UInt64) -> UInt64 {
        let last = lastSlow.load(ordering: .relaxed)
        let previous = backoff.load(ordering: .relaxed)
        let period = last != 0 && now < last + 2 * previous
            ? min(2 * previous, InlineWritePolicy.maxBackoffNanos) : InlineWritePolicy.minBackoffNanos
        backoff.store(period, ordering: .relaxed)
        lastSlow.store(now, ordering: .relaxed)
        suspendedUntil.store(now + period, ordering: .relaxed)
        return period
    }
}
