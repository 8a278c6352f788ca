import BlockCore
import BlockGraph
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// QAPI `MirrorSyncMode` as `blockdev-backup` takes it (`incremental` is `bitmap` with
/// `bitmap-mode=on-success`, resolved before the job is made).
public enum BackupSync: String, Sendable, CaseIterable {
    /// Everything.
    case full
    /// What the device's own layer has (not its backing chain).
    case top
    /// Nothing in the background: only the old data of what clients write (fleecing).
    case none
    /// What a dirty bitmap marks.
    case bitmap
    case incremental
}

/// QAPI `BitmapSyncMode`: what becomes of a backup's bitmap when the job ends.
public enum BitmapSyncMode: String, Sendable, CaseIterable {
    /// On success the bitmap keeps only the writes made since the backup started; on failure
    /// or cancel it keeps everything (QEMU: abdicate / reclaim).
    case onSuccess = "on-success"
    /// The bitmap keeps everything, whatever the outcome.
    case never
    /// The bitmap keeps only the writes since the start plus what the backup did not copy.
    case always
}

/// QAPI `BackupPerf` (`x-perf`).
public struct BackupPerf: Sendable {
    public var useCopyRange = false
    /// Copies in flight at once (QEMU: 64 coroutines; blockd: that many threads, at most 8).
    public var maxWorkers: Int64 = 64
    /// Largest copy (0: `BlockCopy.maxBuffer`).
    public var maxChunk: Int64 = 0
    public init() {}
}

/// `blockdev-backup` (QEMU's `block/backup.c`): copies a node's data as it was when the job
/// started into a target node, while clients keep writing the node. A copy-before-write filter
/// above the node (made by the daemon, `filter-node-name`) copies the old data of every range
/// a client is about to change; the job copies the rest in the background through the same
/// `BlockCopy`, so each cluster is copied exactly once. See `docs/backup.md`.
///
/// In the graph the job holds the filter ("main node") and the target ("target"), taking
/// nothing and sharing everything (QEMU's `block_job_create` on the filter and
/// `block_job_add_bdrv` on the target); the filter's own edges take what the copies need.
public final class BackupJob: JobBody, BlockCopyProgress {
    public let type = "backup"
    public let filter: BlockNode
    public let source: BlockNode
    public let target: BlockNode
    public let sync: BackupSync
    public let syncBitmap: DirtyBitmap?
    public let bitmapMode: BitmapSyncMode?
    public let onSourceError: OnError
    public let onTargetError: OnError
    public let perf: BackupPerf
    public let copier: BlockCopy
    private let graph: BlockGraph
    private let holds: JobHolds
    /// Control context only.
    private let control: Mutex<(cleaned: Bool, bitmapSettled: Bool)>
    private let job = Mutex<Job?>(nil)
    /// Progress reported before the job object was attached.
    private let early = Mutex<(done: UInt64, remaining: UInt64?)>((0, nil))
    private let workers: WorkerPool?

    /// `filter` is the copy-before-write node the daemon put above `source`, whose copy state
    /// the job shares. Takes the job's holds, freezes and sets up the bitmap (QEMU's
    /// `bdrv_dirty_bitmap_create_successor`), and fills the copy bitmap for `sync`. The
    /// caller has `source` drained (a transaction), so no write falls between the filter,
    /// the bitmap's successor and the copy bitmap. Throws, changing nothing it made.
    public init(id: String, filter: BlockNode, source: BlockNode, target: BlockNode, sync: BackupSync,
                bitmap: DirtyBitmap?, bitmapMode: BitmapSyncMode?, compress: Bool,
                onSourceError: OnError, onTargetError: OnError, perf: BackupPerf,
                graph: BlockGraph) throws(BlockError) {
        guard let owner = filter.driver as? any BlockCopyOwner else {
            throw BlockError.invalid("Node '\(filter.nodeName)' is not a copy-before-write filter")
        }
        self.filter = filter
        self.source = source
        self.target = target
        self.sync = sync == .incremental ? .bitmap : sync
        syncBitmap = bitmap
        self.bitmapMode = bitmapMode
        self.onSourceError = onSourceError
        self.onTargetError = onTargetError
        self.perf = perf
        copier = owner.blockCopy
        self.graph = graph
        if perf.maxChunk > 0 && UInt64(perf.maxChunk) < copier.clusterSize {
            throw BlockError.invalid("Required max-chunk (\(perf.maxChunk)) is less than backup cluster size (\(copier.clusterSize))")
        }
        // block_job_create(cbw, 0, BLK_PERM_ALL) and block_job_add_bdrv(target, "target", 0, ALL).
        holds = try JobHolds.take(graph, filter: nil, roots: [
            JobHolds.hold(filter, "main node", type: "backup", id: id, shared: .all),
            JobHolds.hold(target, "target", type: "backup", id: id, shared: .all),
        ])
        control = Mutex((false, bitmap == nil))
        let threads = Int(min(max(perf.maxWorkers, 1), 8))
        workers = self.sync == .none || threads <= 1 ? nil : WorkerPool(threads: threads - 1, name: "backup-\(id)")
        copier.setCompress(compress)
        // backup_init_bcs_bitmap, done here under the caller's drained section (QEMU runs it
        // before the job's first yield, inside the transaction's drain).
        switch self.sync {
        case .bitmap:
            copier.replaceDirty(with: bitmap!)
        case .top:
            copier.setSkipUnallocated(true)
        default:
            break
        }
        copier.setProgress(self)
    }

    /// Attaches the job object (between `JobRegistry.create` and `begin`): progress from
    /// copies that ran before goes to it.
    public func attach(_ job: Job) {
        self.job.withLock { $0 = job }
        let (done, remaining) = early.withLock { e in
            defer { e = (0, nil) }
            return (e.done, e.remaining)
        }
        job.setTotal(remaining ?? copier.remainingBytes)
        if done > 0 {
            job.addProgress(done)
            job.setRemaining(copier.remainingBytes)
        }
    }

    // MARK: BlockCopyProgress

    public func blockCopyDidWork(_ bytes: UInt64) {
        if let job = job.withLock({ $0 }) { job.addProgress(bytes); return }
        early.withLock { $0.done += bytes }
    }

    public func blockCopyRemaining(_ bytes: UInt64) {
        if let job = job.withLock({ $0 }) { job.setRemaining(bytes); return }
        early.withLock { $0.remaining = bytes }
    }

    // MARK: run

    public func run(_ job: Job) throws(BlockError) {
        try job.checkpoint()
        if sync == .top {
            // backup_run's first pass: drop what the source leaves to its backing file.
            var offset: UInt64 = 0
            while offset < copier.length {
                try job.checkpoint()
                let n: UInt64
                do throws(BlockError) {
                    n = try filter.withRequest { () throws(BlockError) -> UInt64 in try copier.resetUnallocated(at: offset) }
                } catch {
                    if error.errno == jobCancelled.errno { throw error }
                    if try job.handleIOError(error, operation: "read", policy: onSourceError) { continue }
                    break
                }
                offset += max(n, 1)
            }
            copier.setSkipUnallocated(false)
        }
        if sync == .none {
            // Nothing to copy in the background: the filter copies what clients overwrite,
            // until the job is cancelled.
            while true { try job.idle(nanos: 100_000_000) }
        }
        defer { workers?.shutdown() }
        let chunk = perf.maxChunk > 0 ? UInt64(perf.maxChunk) / copier.clusterSize * copier.clusterSize : BlockCopy.maxBuffer
        let parallel = (workers == nil ? 0 : Int(min(max(perf.maxWorkers, 1), 8)) - 1) + 1
        let buffers = (0..<parallel).map { _ in
            UnsafeMutableRawBufferPointer.allocate(byteCount: Int(max(chunk, copier.clusterSize)), alignment: 4096)
        }
        defer { for b in buffers { b.deallocate() } }
        var copied: UInt64 = 0
        while true {
            try job.checkpoint(copied: copied)
            copied = 0
            // With a speed limit one copy at a time, charged before the next (QEMU checks the
            // limit before each copy, so at most one chunk goes over it).
            let width = job.info.speed > 0 ? 1 : parallel
            var claims: [BlockCopy.Claim] = []
            while claims.count < width, let c = copier.claimNext(maxBytes: chunk) { claims.append(c) }
            if claims.isEmpty {
                // Only copies of others in flight (client writes): wait for them; a failed one
                // leaves its clusters dirty again.
                let (dirty, inFlight) = copier.waitForProgress(nanos: 50_000_000)
                if !dirty && !inFlight { break }
                continue
            }
            let results = runClaims(claims, buffers)
            var failure: (BlockError, Bool)?
            for r in results {
                switch r {
                case .success(let n): copied += n
                case .failure(let e, let isRead): if failure == nil { failure = (e, isRead) }
                }
            }
            if let (error, isRead) = failure {
                // QEMU's backup_loop: report ends the job; stop pauses, then the clusters are
                // tried again; ignore tries them again at once.
                _ = try job.handleIOError(error, operation: isRead ? "read" : "write",
                                          policy: isRead ? onSourceError : onTargetError)
            }
        }
        try filter.withRequest { () throws(BlockError) in try target.flush() }
    }

    private enum ClaimResult: Sendable {
        case success(UInt64)
        case failure(BlockError, Bool)
    }

    /// Copies the claims in parallel: the first on this thread, the rest on the job's workers.
    private func runClaims(_ claims: [BlockCopy.Claim], _ buffers: [UnsafeMutableRawBufferPointer]) -> [ClaimResult] {
        let results = LockGuarded<[ClaimResult?]>(Array(repeating: nil, count: claims.count))
        let copier = self.copier
        let filter = self.filter
        @Sendable func perform(_ i: Int, _ scratch: UnsafeTransfer<UnsafeMutableRawBufferPointer>) {
            var isRead = false
            let r: ClaimResult
            do throws(BlockError) {
                let n = try filter.withRequest { () throws(BlockError) -> UInt64 in
                    try copier.perform(claims[i], scratch: scratch.value, isRead: &isRead)
                }
                r = .success(n)
            } catch {
                r = .failure(error, isRead)
            }
            results.withLock { $0[i] = r }
            results.lock.broadcast()
        }
        if let workers {
            for i in 1..<claims.count {
                let scratch = UnsafeTransfer(buffers[i])
                workers.submit { perform(i, scratch) }
            }
        }
        perform(0, UnsafeTransfer(buffers[0]))
        results.lock.lock()
        while results.value.contains(where: { $0 == nil }) { results.lock.wait() }
        let out = results.value.map { $0! }
        results.lock.unlock()
        return out
    }

    // MARK: completion (control context)

    public func prepare(_ job: Job) throws(BlockError) {
        settleBitmap(success: true)
    }

    public func abort(_ job: Job) {
        settleBitmap(success: false)
    }

    /// QEMU's `backup_cleanup_sync_bitmap`: the successor replaces the bitmap when the backup
    /// succeeded (unless `never`) or always; otherwise it is merged back. With `always` after a
    /// failure, what was not copied is marked again. A persistent bitmap whose bits went is
    /// written back to the image.
    private func settleBitmap(success: Bool) {
        guard let bitmap = syncBitmap else { return }
        let first = control.withLock { c -> Bool in
            defer { c.bitmapSettled = true }
            return !c.bitmapSettled
        }
        guard first else { return }
        let mode = bitmapMode ?? .onSuccess
        let abdicate = (success || mode == .always) && mode != .never
        if abdicate {
            bitmap.abdicate()
            if !success {
                copier.forEachDirtyRun { offset, length in bitmap.mark(offset: offset, length: length) }
            }
            if bitmap.persistent, let storage = source.driver.bitmapStorage {
                do throws(BlockError) { try storage.changed(bitmap, cleared: true) } catch {
                    Log.error("backup: storing bitmap '\(bitmap.name)': \(error.message)")
                }
            }
        } else {
            bitmap.reclaim()
        }
    }

    public func clean(_ job: Job?) {
        let first = control.withLock { c -> Bool in
            defer { c.cleaned = true }
            return !c.cleaned
        }
        if !first { return }
        // A job that never ran settles its bitmap as a failure (the transaction failed).
        settleBitmap(success: false)
        copier.setProgress(nil)
        holds.release()
        // bdrv_cbw_drop: the filter's users get the source back, and the filter goes.
        graph.withLock {
            if graph.contains(filter) {
                do throws(BlockError) { try graph.dropFilter(filter) } catch {
                    Log.error("backup: removing filter '\(filter.nodeName)': \(error.message)")
                }
            }
        }
    }
}
