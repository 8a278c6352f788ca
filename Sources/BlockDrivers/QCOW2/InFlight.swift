import BlockCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Counts data I/O that runs without the metadata lock (reads, overwrites of allocated
/// clusters, reads of compressed clusters), by epoch parity.
///
/// An unlocked request looks its host offset up under the lock and, still under it, enters
/// the current epoch (`QCOW2Metadata.enterIO`); it leaves when its I/O is done, without the
/// lock. A host cluster that an L2 change stopped referencing is tagged with the epoch of that
/// change and its refcount is dropped only once every request of that epoch and older has
/// left (`QCOW2Metadata.releaseSafeFrees`), so a cluster is never reallocated while an older
/// unlocked read or write may still target it.
final class QCOW2IOEpochs: Sendable {
    private let even = Atomic<Int>(0)
    private let odd = Atomic<Int>(0)

    @inline(__always)
    func enter(_ parity: Int) {
        if parity == 0 { even.wrappingAdd(1, ordering: .acquiringAndReleasing) }
        else { odd.wrappingAdd(1, ordering: .acquiringAndReleasing) }
    }

    @inline(__always)
    func leave(_ parity: Int) {
        if parity == 0 { even.wrappingSubtract(1, ordering: .releasing) }
        else { odd.wrappingSubtract(1, ordering: .releasing) }
    }

    func isIdle(_ parity: Int) -> Bool {
        (parity == 0 ? even.load(ordering: .acquiring) : odd.load(ordering: .acquiring)) == 0
    }
}

/// One step of an allocating write, decided under the lock.
enum QCOW2AllocStep: Sendable {
    /// Already allocated: overwrite in place (epoch `parity` entered; leave after the I/O).
    case direct(host: UInt64, length: UInt64, parity: Int)
    /// Another request is allocating one of these guest clusters: retry shortly.
    case busy
    /// Host clusters reserved and guest clusters marked in flight: write the data without the
    /// lock, then `commitAllocation` (or `abortAllocation` on failure).
    case planned(QCOW2AllocPlan)
}

/// Host clusters reserved for one run of guest clusters inside one L2 table.
struct QCOW2AllocPlan: Sendable {
    /// Guest byte range this run writes: [start, end).
    var start: UInt64
    var end: UInt64
    var firstCluster: UInt64
    var count: UInt64
    /// Host offset of `firstCluster`'s new cluster; the run is contiguous on the host.
    var host: UInt64
    /// Host cluster index from which clusters were never written (past the old end of the
    /// file): partial writes there need no zero padding.
    var freshFrom: UInt64
    /// The old L2 entries of the first and last cluster (for copy-on-write of partial clusters).
    var headEntry: UInt64
    var tailEntry: UInt64
}

extension QCOW2Metadata {
    /// Enters the current I/O epoch; call under the lock, leave with `epochs.leave(parity)`.
    @inline(__always)
    func enterIO() -> Int {
        let parity = Int(ioEpoch & 1)
        epochs.enter(parity)
        return parity
    }

    /// Whether any guest cluster in [first, first+count) has an allocation in flight.
    func allocationsOverlap(first: UInt64, count: UInt64) -> Bool {
        if allocating.isEmpty { return false }
        if count < UInt64(allocating.count) {
            var c = first
            while c < first + count { if allocating.contains(c) { return true }; c += 1 }
            return false
        }
        return allocating.contains { $0 >= first && $0 < first + count }
    }

    /// Drops the refcounts of freed clusters whose L2 change is durable and whose epoch has
    /// drained; advances the epoch when that lets older ones drain.
    func releaseSafeFrees() throws(BlockError) {
        if readyFrees.isEmpty { return }
        if readyFrees.contains(where: { $0.epoch == ioEpoch }) && epochs.isIdle(Int((ioEpoch + 1) & 1)) {
            // Everything of epoch-1 (same parity as epoch+1) has left: start a new epoch.
            ioEpoch += 1
        }
        var keep: [QCOW2Free] = []
        var apply: [QCOW2Free] = []
        for f in readyFrees {
            if ioEpoch >= f.epoch + 2 || (ioEpoch == f.epoch + 1 && epochs.isIdle(Int(f.epoch & 1))) {
                apply.append(f)
            } else {
                keep.append(f)
            }
        }
        readyFrees = keep
        for f in apply {
            try adjustRefcounts(start: f.start, count: f.count, increase: false, discard: f.discard)
        }
    }

    /// Reserves up to `n` contiguous host clusters for data. Their refcount increase stays in
    /// memory until the next write-back, which writes it before the L2 entries that point at
    /// them: a crash before that leaves the clusters free on disk (only the file may have
    /// grown), a crash after it leaks at most the clusters whose allocation was still in flight.
    func takeDataClusters(_ n: UInt64) throws(BlockError) -> (host: UInt64, count: UInt64, freshFrom: UInt64) {
        let before = allocEnd
        let (offset, got) = try allocateClusters(maxCount: n, deferred: true)
        let c = offset >> clusterBits
        return (offset, got, max(c, before))
    }

    /// Under the lock: either a direct overwrite, a wait, or a plan for one allocation run.
    func planAllocation(at pos: UInt64, length: UInt64) throws(BlockError) -> QCOW2AllocStep {
        switch try lookupForWrite(at: pos, length: length, allowLoad: true) {
        case .direct(let host, let len):
            // The L2 entry may point at metadata on a corrupt image.
            try checkOverlap(at: host, size: len)
            return .direct(host: host, length: len, parity: enterIO())
        case .wouldBlock:
            throw BlockError.io("qcow2: internal error (metadata lookup refused)")
        case .allocate(let allocLength):
            let tableEnd = min(pos + allocLength, (UInt64(l1Index(pos)) + 1) << (clusterBits + l2Bits))
            let first = pos >> clusterBits
            let last = (tableEnd - 1) >> clusterBits
            if allocationsOverlap(first: first, count: last - first + 1) { return .busy }
            try releaseSafeFrees()
            let t = try writableL2Table(for: pos)
            let (host, got, freshFrom) = try takeDataClusters(last - first + 1)
            let runEnd = min(tableEnd, (first + got) << clusterBits)
            for c in first..<(first + got) { allocating.insert(c) }
            for h in 0..<got { reservedHost.insert((host >> clusterBits) + h) }
            return .planned(QCOW2AllocPlan(
                start: pos, end: runEnd, firstCluster: first, count: got, host: host, freshFrom: freshFrom,
                headEntry: l2Entry(t, l2Index(first << clusterBits)),
                tailEntry: l2Entry(t, l2Index((first + got - 1) << clusterBits))))
        }
    }

    /// Points the L2 entries at the written clusters and clears the in-flight marks. The L2
    /// table reaches the disk only in `writeBack`, after an fdatasync (`needSyncBeforeL2`).
    func commitAllocation(_ plan: QCOW2AllocPlan) throws(BlockError) {
        defer {
            for c in plan.firstCluster..<(plan.firstCluster + plan.count) { allocating.remove(c) }
            for h in 0..<plan.count { reservedHost.remove((plan.host >> clusterBits) + h) }
        }
        let t = try writableL2Table(for: plan.firstCluster << clusterBits)
        for i in 0..<plan.count {
            let idx = l2Index((plan.firstCluster + i) << clusterBits)
            let old = l2Entry(t, idx)
            queueFree(entry: old, discard: false)
            setL2Entry(t, idx, (plan.host + i * clusterSize) | QCOW2Entry.copied)
        }
        needSyncBeforeL2 = true
        try writeBackIfManyFrees()
    }

    /// A failed data write: nothing points at the reserved clusters, so they are freed now.
    func abortAllocation(_ plan: QCOW2AllocPlan) {
        for c in plan.firstCluster..<(plan.firstCluster + plan.count) { allocating.remove(c) }
        for h in 0..<plan.count { reservedHost.remove((plan.host >> clusterBits) + h) }
        try? adjustRefcounts(start: plan.host >> clusterBits, count: plan.count, increase: false)
    }
}

/// A cluster range whose refcount drops once the L2 change that dropped it is durable and
/// its I/O epoch has drained.
struct QCOW2Free {
    var start: UInt64
    var count: UInt64
    var discard: Bool
    var epoch: UInt64
}
