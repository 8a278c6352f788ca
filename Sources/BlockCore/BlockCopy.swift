import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// Where a `BlockCopy` reports its progress (a backup job: QEMU's `ProgressMeter`).
public protocol BlockCopyProgress: AnyObject, Sendable {
    /// `bytes` more were copied (or written as zeroes) to the target.
    func blockCopyDidWork(_ bytes: UInt64)
    /// What is left to copy: dirty clusters plus the clusters being copied now.
    func blockCopyRemaining(_ bytes: UInt64)
}

/// A driver that copies with a `BlockCopy` (the copy-before-write filter): how a backup job
/// finds its filter's copy state without knowing the driver's type.
public protocol BlockCopyOwner: AnyObject, Sendable {
    var blockCopy: BlockCopy { get }
}

/// QEMU's block-copy (`block/block-copy.c`): copies clusters of a source node to the same
/// offsets of a target node, each cluster at most once, for the copy-before-write filter (the
/// old data of a range, just before a client write changes it) and the backup job (everything
/// else, in the background) at the same time.
///
/// State (behind one lock): the *copy bitmap*, one bit per cluster that still has to be copied,
/// and the copies in flight. A caller *claims* a run of dirty clusters (clears their bits and
/// records the run as in flight), copies it without the lock, and ends the claim; a failed copy
/// sets its bits again. A caller that finds part of its range in flight waits for that copy
/// and looks again. So each cluster is copied exactly once, by whoever gets there first, and
/// a copy that failed is retried by whoever needs the range next.
///
/// The source and target are the copy-before-write filter's edges. Callers reach them only
/// while counted in flight in the filter's node or a node above it (a client write, a snapshot
/// read, a job copy inside `BlockNode.withRequest`), so a graph change never re-points an edge
/// under a copy.
///
/// *Fleecing*: when the target's chain contains the source (a qcow2 overlay whose backing is
/// the disk), the target shows the disk's current data where it has none of its own, so a copy
/// into it changes nothing a reader of the target sees: copies are `.writeUnchanged` (they
/// dirty no bitmap of the target), and reads of the target serialise against them (the
/// target's range lock), so a reader that looked through to the disk cannot read data a client
/// wrote after the copy — QEMU's `BDRV_REQ_SERIALISING` for fleecing targets.
public final class BlockCopy: Sendable {
    public let source: BlockChild
    public let target: BlockChild
    /// Bytes per bit of the copy bitmap (QEMU: the target's cluster size, at least 64 KiB).
    public let clusterSize: UInt64
    /// The source's size when the copy started.
    public let length: UInt64
    public let clusterCount: Int
    /// The target's chain contains the source (see the type's comment).
    public let isFleecing: Bool

    /// Largest run one copy reads and writes at once (QEMU's `BLOCK_COPY_MAX_BUFFER`).
    public static let maxBuffer: UInt64 = 1 << 20
    /// QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`.
    public static let defaultClusterSize: UInt64 = 64 << 10

    struct Task {
        var id: UInt64
        var first: Int
        var end: Int
    }

    struct State {
        let bits: HBitmap
        var tasks: [Task] = []
        var nextID: UInt64 = 1
        var inFlightClusters = 0
        var compress = false
        var skipUnallocated = false
        var progress: (any BlockCopyProgress)?
    }
    private let state: LockGuarded<State>
    private var lock: ConditionLock { state.lock }

    /// A claimed run of clusters: copy it with `perform`, which ends the claim.
    public struct Claim: Sendable {
        let id: UInt64
        let first: Int
        let end: Int
        public let offset: UInt64
        public let length: UInt64
    }

    /// `bitmap`: copy only the clusters it marks dirty (rounded out to clusters); nil: all.
    public init(source: BlockChild, target: BlockChild, clusterSize: UInt64, bitmap: DirtyBitmap?) {
        precondition(clusterSize.nonzeroBitCount == 1 && clusterSize >= 512)
        self.source = source
        self.target = target
        self.clusterSize = clusterSize
        length = source.node.length
        clusterCount = Int((length + clusterSize - 1) / clusterSize)
        isFleecing = target.node.chain.dropFirst().contains { $0 === source.node }
        let bits = HBitmap(count: clusterCount)
        if let bitmap {
            var at: UInt64 = 0
            while let e = bitmap.nextDirty(from: at), e.offset < length {
                let end = min(e.offset + e.length, length)
                bits.set(Int(e.offset / clusterSize), Int((end + clusterSize - 1) / clusterSize))
                at = e.offset + e.length
            }
        } else {
            bits.set(0, clusterCount)
        }
        state = LockGuarded(State(bits: bits))
    }

    /// QEMU's `block_copy_calculate_cluster_size`: the target's cluster size, at least 64 KiB;
    /// 64 KiB with a warning when the target has no clusters and no backing file (a raw target
    /// with larger blocks would need them whole).
    public static func clusterSize(for target: BlockNode) -> UInt64 {
        if let c = target.skippingFilters().driver.clusterSizeInfo, c.nonzeroBitCount == 1 {
            return max(defaultClusterSize, c)
        }
        if target.backingSkippingFilters() == nil {
            Log.warning("The target block device doesn't provide information about the block size and it doesn't have a backing file. The default block size of \(defaultClusterSize) bytes is used. If the actual block size of the target exceeds this default, the backup may be unusable")
        }
        return defaultClusterSize
    }

    // MARK: settings (before the copy starts, or any time for the flags)

    /// Writes data to the target compressed (`.writeCompressed`), one cluster per copy.
    public func setCompress(_ on: Bool) { state.withLock { $0.compress = on } }

    /// `sync=top`: clusters the source leaves to its backing file are dropped, not copied.
    public func setSkipUnallocated(_ on: Bool) { state.withLock { $0.skipUnallocated = on } }

    public func setProgress(_ sink: (any BlockCopyProgress)?) { state.withLock { $0.progress = sink } }

    // MARK: queries

    /// Bytes still to copy (dirty clusters, in whole clusters).
    public var dirtyBytes: UInt64 { state.withLock { UInt64($0.bits.popcount) * clusterSize } }

    /// Bytes left: dirty plus in flight.
    public var remainingBytes: UInt64 {
        state.withLock { UInt64($0.bits.popcount + $0.inFlightClusters) * clusterSize }
    }

    /// Nothing of [offset, offset+length) needs copying and no copy of it is in flight: a
    /// client write may go ahead without waiting (the copy-before-write filter's fast path).
    public func isSettled(offset: UInt64, length: UInt64) -> Bool {
        let (first, end) = clusters(offset, length)
        return state.withLock { s in
            (s.bits.nextSet(from: first).map { $0 >= end } ?? true) && !Self.overlaps(s.tasks, first, end)
        }
    }

    /// Calls `body(offset, length)` for each run of clusters still to copy (to merge them back
    /// into a bitmap when a backup failed: `bitmap-mode=always`).
    public func forEachDirtyRun(_ body: (UInt64, UInt64) -> Void) {
        var runs: [(UInt64, UInt64)] = []
        state.withLock { s in
            var at = 0
            while let a = s.bits.nextSet(from: at) {
                let b = s.bits.nextClear(from: a) ?? clusterCount
                runs.append((UInt64(a) * clusterSize, min(UInt64(b) * clusterSize, length) - UInt64(a) * clusterSize))
                at = b
            }
            for t in s.tasks {
                runs.append((UInt64(t.first) * clusterSize, min(UInt64(t.end) * clusterSize, length) - UInt64(t.first) * clusterSize))
            }
        }
        for (o, l) in runs { body(o, l) }
    }

    // MARK: changing the bitmap

    /// The clusters to copy become exactly the ones `bitmap` marks (rounded out to clusters):
    /// a backup's `sync=bitmap`.
    public func replaceDirty(with bitmap: DirtyBitmap) {
        state.withLock { s in
            s.bits.clearAll()
            var at: UInt64 = 0
            while let e = bitmap.nextDirty(from: at), e.offset < length {
                let end = min(e.offset + e.length, length)
                s.bits.set(Int(e.offset / clusterSize), Int((end + clusterSize - 1) / clusterSize))
                at = e.offset + e.length
            }
        }
        reportRemaining()
    }

    /// Marks every cluster as needing a copy (QEMU's `backup_do_checkpoint`).
    public func setAllDirty() {
        state.withLock { _ = $0.bits.set(0, clusterCount) }
        reportRemaining()
    }

    /// Clusters entirely inside [offset, offset+length) no longer need a copy (a snapshot
    /// discard: nobody will read them). Partial clusters at the ends stay.
    public func reset(offset: UInt64, length: UInt64) {
        let first = Int((offset + clusterSize - 1) / clusterSize)
        let endByte = offset + length
        let end = endByte >= self.length ? clusterCount : Int(endByte / clusterSize)
        if first >= end { return }
        state.withLock { _ = $0.bits.clear(first, end) }
        reportRemaining()
    }

    /// `sync=top`'s first pass: clears the clusters from `offset` on that the source leaves
    /// unallocated (to its backing file); returns the bytes examined.
    public func resetUnallocated(at offset: UInt64) throws(BlockError) -> UInt64 {
        let want = min(length - offset, UInt64(1) << 30)
        let node = source.node
        let status = try node.blockStatusAbove(base: node.backingSkippingFilters(), at: offset, length: want)
        // Whole clusters only: an unallocated run that ends inside a cluster leaves it dirty.
        let first = Int(offset / clusterSize)
        var end = Int((offset + status.length) / clusterSize)
        if offset + status.length >= length { end = clusterCount }
        if status.depth == 0 && end > first {
            state.withLock { _ = $0.bits.clear(first, end) }
            reportRemaining()
        }
        return status.length
    }

    // MARK: copying

    private func clusters(_ offset: UInt64, _ length: UInt64) -> (Int, Int) {
        let first = Int(min(offset / clusterSize, UInt64(clusterCount)))
        let end = Int(min((offset + length + clusterSize - 1) / clusterSize, UInt64(clusterCount)))
        return (first, end)
    }

    private static func overlaps(_ tasks: [Task], _ first: Int, _ end: Int) -> Bool {
        tasks.contains { $0.first < end && first < $0.end }
    }

    /// Claims the first dirty run in clusters [from, below), at most `maxBytes` long. Call with
    /// the lock held.
    private func claimLocked(_ s: inout State, from: Int, below: Int, maxBytes: UInt64) -> Claim? {
        guard let a = s.bits.nextSet(from: from), a < below else { return nil }
        let maxClusters = max(1, Int(maxBytes / clusterSize))
        let b = min(s.bits.nextClear(from: a) ?? clusterCount, below, a + maxClusters)
        s.bits.clear(a, b)
        let id = s.nextID
        s.nextID &+= 1
        s.tasks.append(Task(id: id, first: a, end: b))
        s.inFlightClusters += b - a
        let offset = UInt64(a) * clusterSize
        return Claim(id: id, first: a, end: b, offset: offset, length: min(UInt64(b) * clusterSize, length) - offset)
    }

    /// The job's background loop: claims the first dirty run at or after `offset`.
    public func claimNext(from offset: UInt64 = 0, maxBytes: UInt64 = BlockCopy.maxBuffer) -> Claim? {
        state.withLock { s in
            claimLocked(&s, from: Int(offset / clusterSize), below: clusterCount,
                        maxBytes: s.compress ? clusterSize : maxBytes)
        }
    }

    /// Waits until a copy in flight ends (or `nanos` pass); returns whether anything is left
    /// to do: dirty clusters, or copies in flight that may still fail and make some dirty.
    public func waitForProgress(nanos: UInt64) -> (dirty: Bool, inFlight: Bool) {
        lock.lock()
        defer { lock.unlock() }
        if state.value.bits.popcount == 0 && !state.value.tasks.isEmpty {
            _ = lock.wait(seconds: Double(nanos) / 1e9)
        }
        return (state.value.bits.popcount > 0, !state.value.tasks.isEmpty)
    }

    /// Shrinks a claim to its first `clusters` clusters, giving the rest back (dirty again).
    private func shrink(_ claim: Claim, to clusters: Int) -> Claim {
        let newEnd = claim.first + clusters
        lock.lock()
        if let i = state.value.tasks.firstIndex(where: { $0.id == claim.id }) {
            state.value.tasks[i].end = newEnd
        }
        state.value.bits.set(newEnd, claim.end)
        state.value.inFlightClusters -= claim.end - newEnd
        lock.broadcast()
        lock.unlock()
        let offset = claim.offset
        return Claim(id: claim.id, first: claim.first, end: newEnd, offset: offset,
                     length: min(UInt64(newEnd) * clusterSize, length) - offset)
    }

    private func end(_ claim: Claim, failed: Bool, copied: UInt64) {
        let progress = state.withLock { s -> (any BlockCopyProgress)? in
            s.tasks.removeAll { $0.id == claim.id }
            s.inFlightClusters -= claim.end - claim.first
            if failed { s.bits.set(claim.first, claim.end) }
            return s.progress
        }
        lock.broadcast()
        if let progress {
            if copied > 0 { progress.blockCopyDidWork(copied) }
            progress.blockCopyRemaining(remainingBytes)
        }
    }

    private func reportRemaining() {
        if let progress = state.withLock({ $0.progress }) { progress.blockCopyRemaining(remainingBytes) }
    }

    /// Copies a claimed run and ends the claim: skips it (`sync=top`, unallocated), writes
    /// zeroes where the source reads as zeroes, otherwise reads and writes the data. On an
    /// error the clusters are dirty again; `isRead` tells which side failed (`on-source-error`
    /// or `on-target-error`). Returns the bytes handled (the claim may have been shortened to
    /// a run of uniform status; the rest is dirty again for the next claim).
    @discardableResult
    public func perform(_ claim: Claim, scratch: UnsafeMutableRawBufferPointer? = nil,
                        isRead: inout Bool) throws(BlockError) -> UInt64 {
        var claim = claim
        let (compress, skip) = state.withLock { ($0.compress, $0.skipUnallocated) }
        let src = source.node
        let dst = target.node
        // QEMU's block_copy_block_status: a run of one status, whole clusters; on an error or
        // less than a cluster, copy one cluster as data.
        var zero = false
        var unallocated = false
        do throws(BlockError) {
            let base = skip ? src.backingSkippingFilters() : nil
            let st = try src.blockStatusAbove(base: base, at: claim.offset, length: claim.length)
            var n = st.length
            if claim.offset + n < length { n = n / clusterSize * clusterSize }
            if n >= clusterSize || claim.offset + n >= length {
                let clusters = Int((n + clusterSize - 1) / clusterSize)
                if clusters < claim.end - claim.first { claim = shrink(claim, to: clusters) }
                zero = st.isZero
                unallocated = skip && st.depth == 0
            } else if claim.end - claim.first > 1 {
                claim = shrink(claim, to: 1)
            }
        } catch {
            if claim.end - claim.first > 1 { claim = shrink(claim, to: 1) }
        }
        if unallocated {
            end(claim, failed: false, copied: 0)
            return claim.length
        }
        let fleece: RequestFlags = isFleecing ? .writeUnchanged : []
        var token: RangeLock.Token?
        if isFleecing {
            // Readers of the target that looked through to the source finish first, and new
            // ones wait for the copy (see the type's comment).
            do throws(BlockError) {
                token = try dst.rangeLock.lock(offset: claim.offset, length: claim.length, exclusive: true)
            } catch {
                end(claim, failed: true, copied: 0)
                throw error
            }
        }
        defer { if let token { dst.rangeLock.unlock(token) } }
        do throws(BlockError) {
            if zero {
                isRead = false
                try dst.writeZeroes(at: claim.offset, length: claim.length, flags: fleece)
            } else {
                let n = Int(claim.length)
                var owned: UnsafeMutableRawBufferPointer?
                let buffer: UnsafeMutableRawBufferPointer
                if let scratch, scratch.count >= n {
                    buffer = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n])
                } else {
                    owned = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 4096)
                    buffer = owned!
                }
                defer { owned?.deallocate() }
                isRead = true
                try src.read(at: claim.offset, into: buffer)
                isRead = false
                let data = UnsafeRawBufferPointer(buffer)
                if data.isAllZero {
                    try dst.writeZeroes(at: claim.offset, length: claim.length, flags: fleece)
                } else {
                    try dst.write(at: claim.offset, from: data, flags: compress ? fleece.union(.writeCompressed) : fleece)
                }
            }
        } catch {
            end(claim, failed: true, copied: 0)
            throw error
        }
        end(claim, failed: false, copied: claim.length)
        return claim.length
    }

    /// Copy-before-write: copies every cluster of [offset, offset+length) not copied yet, and
    /// returns once the whole range is copied, by this call or by others (waiting for their
    /// copies; retrying what they failed). Throws this call's own first error, leaving its
    /// clusters dirty.
    public func copy(offset: UInt64, length: UInt64) throws(BlockError) {
        let (first, end) = clusters(offset, length)
        if first >= end { return }
        let compress = state.withLock { $0.compress }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(clusterSize * UInt64(end - first), compress ? clusterSize : BlockCopy.maxBuffer)), alignment: 4096)
        defer { scratch.deallocate() }
        var from = first
        while true {
            let claim = state.withLock { s in
                claimLocked(&s, from: from, below: end, maxBytes: compress ? clusterSize : BlockCopy.maxBuffer)
            }
            if let claim {
                var isRead = false
                try perform(claim, scratch: scratch, isRead: &isRead)
                from = claim.first
                continue
            }
            // Nothing left to claim: wait for others' copies of this range; a failed one makes
            // its clusters dirty again, which this call then copies itself.
            lock.lock()
            var done = false
            while true {
                if let d = state.value.bits.nextSet(from: first), d < end { break }
                if !Self.overlaps(state.value.tasks, first, end) {
                    done = true
                    break
                }
                lock.wait()
            }
            lock.unlock()
            if done { return }
            from = first
        }
    }
}
