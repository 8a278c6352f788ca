import BlockCore
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a copy-before-write filter does when copying old data to its target fails (QAPI
/// `OnCbwError`).
public enum OnCBWError: String, Sendable, CaseIterable {
    /// The client's write fails; the snapshot stays intact (QEMU's default).
    case breakGuestWrite = "break-guest-write"
    /// The client's write goes ahead; the snapshot is broken: every snapshot read fails.
    case breakSnapshot = "break-snapshot"
}

/// A node whose driver offers a point-in-time view of its filtered child (the
/// copy-before-write filter), for `snapshot-access` — QEMU's `bdrv_co_preadv_snapshot`,
/// `bdrv_co_snapshot_block_status` and `bdrv_co_pdiscard_snapshot`.
protocol SnapshotSource: AnyObject, Sendable {
    func snapshotRead(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                      flags: RequestFlags) throws(BlockError)
    func snapshotBlockStatus(at offset: UInt64, length: UInt64) throws(BlockError) -> BlockStatus
    func snapshotDiscard(at offset: UInt64, length: UInt64) throws(BlockError)
}

/// A filter that goes in above its file when it is added (`blockdev-add`): the file's users
/// move to it (see `docs/backup.md`), and back again when it is deleted.
public protocol InsertedFilter: BlockDriver {}

/// `copy-before-write` (QEMU's `block/copy-before-write.c`): before a client write, zero write
/// or discard reaches `file`, the old data of the clusters it touches is copied to `target`,
/// once per cluster (`BlockCopy`). `target` then holds, with `file` where nothing was copied
/// yet, the disk as it was when the filter went in: the view `snapshot-access` reads
/// (`SnapshotSource`), and what a backup job copies.
///
/// Options: `file`, `target`, `bitmap` (copy only the clusters a bitmap marks: the snapshot is
/// then readable only there), `on-cbw-error` and `cbw-timeout` (seconds a copy may take before
/// it counts as failed).
///
/// Copies never reach `file` (they only read it), and writes into a fleecing target are
/// `.writeUnchanged`: no dirty bitmap records them. A client write that needs no copy and
/// meets no snapshot read of its range runs inline on the event loop; one that must copy or
/// wait goes to a worker.
public final class CopyBeforeWriteFilter: FilterDriver, SnapshotSource, InsertedFilter, BlockCopyOwner {
    public let driverName = "copy-before-write"
    public let filtered: BlockChild
    public let target: BlockChild
    public let blockCopy: BlockCopy
    public let onError: OnCBWError
    /// `cbw-timeout` in nanoseconds (0: none).
    public let timeoutNanos: UInt64

    private struct Read {
        let id: UInt64
        let start: UInt64
        let end: UInt64
    }
    private struct State {
        /// Clusters a snapshot reader may read (set at open; cleared by snapshot discards).
        let access: HBitmap
        /// Clusters whose old data is in the target (copied before a client write).
        let done: HBitmap
        /// Snapshot reads reading from `file` now: client writes to those ranges wait.
        var reads: [Read] = []
        var nextRead: UInt64 = 1
        /// The first copy error under `break-snapshot`: every snapshot read fails from then on.
        var snapshotError: BlockError?
    }
    private let state: LockGuarded<State>
    private var lock: ConditionLock { state.lock }
    private let broken = Atomic<Bool>(false)
    /// Runs copies that may time out (`cbw-timeout`), so the client's write can give up.
    private let timedCopies: WorkerPool?
    private let closed = Atomic<Bool>(false)

    public var children: [BlockChild] { [filtered, target] }

    public init(file: BlockNode, target: BlockNode, bitmap: DirtyBitmap?, onError: OnCBWError,
                timeoutSeconds: UInt32) throws(BlockError) {
        if target.length < file.length {
            throw BlockError.invalid("copy-before-write target '\(target.nodeName)' (\(target.length) bytes) is smaller than its file '\(file.nodeName)' (\(file.length) bytes)")
        }
        if let bitmap, bitmap.isBusy || bitmap.inconsistent {
            let why = bitmap.isBusy
                ? "Bitmap '\(bitmap.name)' is currently in use by another operation and cannot be used"
                : "Bitmap '\(bitmap.name)' is inconsistent and cannot be used"
            throw BlockError.invalid("Cannot create block-copy-state: Failed to merge bitmap '\(bitmap.name)' to internal copy-bitmap: \(why)")
        }
        filtered = BlockChild(name: "file", role: .filteredPrimary, node: file)
        self.target = BlockChild(name: "target", role: .data, node: target)
        let copier = BlockCopy(source: filtered, target: self.target, clusterSize: BlockCopy.clusterSize(for: target),
                               bitmap: bitmap)
        blockCopy = copier
        self.onError = onError
        timeoutNanos = UInt64(timeoutSeconds) * 1_000_000_000
        // The snapshot is readable where the copy bitmap starts dirty (QEMU's access_bitmap).
        let access = HBitmap(count: copier.clusterCount)
        let cs = copier.clusterSize
        copier.forEachDirtyRun { offset, length in
            access.set(Int(offset / cs), Int((offset + length + cs - 1) / cs))
        }
        state = LockGuarded(State(access: access, done: HBitmap(count: copier.clusterCount)))
        timedCopies = timeoutSeconds > 0 ? WorkerPool(threads: 2, name: "cbw-timeout") : nil
        if blockCopy.isFleecing { target.beginSerialisingReads() }
    }

    public func close() throws(BlockError) {
        if closed.exchange(true, ordering: .sequentiallyConsistent) { return }
        // Copies that timed out may still run: they finish before the target can go.
        timedCopies?.shutdown()
        if blockCopy.isFleecing { target.node.endSerialisingReads() }
    }

    /// QEMU's `cbw_child_perm`: the target is written (others may write it too, nobody may
    /// resize it); the file gets what the filter's users take, plus consistent read when they
    /// write (the copies read it), and — once the filter has users — nobody else may write or
    /// resize it, since such writes would bypass the copies.
    public func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool,
                                 hasUsers: Bool) -> PermissionPair {
        if child === target {
            return PermissionPair(perm: .write, shared: BlockPermissions.all.subtracting(.resize))
        }
        var p = BlockPermissions.defaultChildPermissions(role: .filteredPrimary, parent: parent, writable: writable)
        if hasUsers {
            if parent.perm.contains(.write) { p.perm.insert(.consistentRead) }
            p.shared.subtract([.write, .resize])
        }
        return p
    }

    public func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool) -> PermissionPair {
        childPermissions(for: child, parent: parent, writable: writable, hasUsers: true)
    }

    // MARK: client writes

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        try copyBeforeWrite(offset, UInt64(buffer.count), flags)
        try filtered.node.write(at: offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try copyBeforeWrite(offset, length, flags)
        try filtered.node.writeZeroes(at: offset, length: length, flags: flags)
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try copyBeforeWrite(offset, length, flags.intersection(.noWait))
        try filtered.node.discard(at: offset, length: length, flags: flags)
    }

    /// QEMU's `cbw_do_copy_before_write`: copies the old data of the clusters the request
    /// touches (unless already copied), then waits until no snapshot read is reading them from
    /// `file`. On success no snapshot read will read them from `file` again (they are `done`:
    /// the target has them).
    private func copyBeforeWrite(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) throws(BlockError) {
        if flags.contains(.writeUnchanged) || length == 0 { return }
        if broken.load(ordering: .relaxed) { return }
        let cs = blockCopy.clusterSize
        let start = offset / cs * cs
        let end = min((offset + length + cs - 1) / cs * cs, UInt64(blockCopy.clusterCount) * cs)
        if start >= end { return }
        let first = Int(start / cs)
        let last = Int(end / cs)
        if blockCopy.isSettled(offset: start, length: end - start) {
            // Nothing to copy: mark the clusters done and go ahead, unless a snapshot read is
            // reading them from `file` right now.
            let clear = state.withLock { s -> Bool in
                if s.snapshotError == nil { s.done.set(first, last) }
                return !s.reads.contains { $0.start < end && start < $0.end }
            }
            if clear { return }
            if flags.contains(.noWait) { throw .wouldBlock }
        } else {
            if flags.contains(.noWait) { throw .wouldBlock }
            do throws(BlockError) {
                try copyWithTimeout(start, end - start)
            } catch {
                if onError == .breakGuestWrite { throw error }
                state.withLock { s in
                    if s.snapshotError == nil {
                        s.snapshotError = error
                        Log.error("copy-before-write: copying the old data of \(start)+\(end - start) failed (\(error.message)); the snapshot is broken (on-cbw-error=break-snapshot)")
                    }
                }
                broken.store(true, ordering: .relaxed)
            }
        }
        lock.lock()
        if state.value.snapshotError == nil { state.value.done.set(first, last) }
        while state.value.reads.contains(where: { $0.start < end && start < $0.end }) { lock.wait() }
        lock.unlock()
    }

    private final class TimedCopy: Sendable {
        let lock = LockGuarded<(finished: Bool, error: BlockError?)>((false, nil))
    }

    private func copyWithTimeout(_ offset: UInt64, _ length: UInt64) throws(BlockError) {
        guard let pool = timedCopies, timeoutNanos > 0 else {
            try blockCopy.copy(offset: offset, length: length)
            return
        }
        let call = TimedCopy()
        let copier = blockCopy
        pool.submit {
            var failure: BlockError?
            do throws(BlockError) { try copier.copy(offset: offset, length: length) } catch { failure = error }
            call.lock.withLock { $0 = (true, failure) }
            call.lock.lock.broadcast()
        }
        let deadline = monotonicNanos() + timeoutNanos
        call.lock.lock.lock()
        defer { call.lock.lock.unlock() }
        while !call.lock.value.finished {
            let now = monotonicNanos()
            if now >= deadline {
                // QEMU's block_copy with a timeout: the copy goes on in the background (and
                // still counts when it succeeds); this write gives up.
                throw BlockError(ETIMEDOUT, "copy-before-write: copying the old data of \(offset)+\(length) took longer than cbw-timeout (\(timeoutNanos / 1_000_000_000) s)")
            }
            _ = call.lock.lock.wait(seconds: Double(deadline - now) / 1e9)
        }
        if let error = call.lock.value.error { throw error }
    }

    // MARK: snapshot (snapshot-access)

    private func clusterRange(_ offset: UInt64, _ length: UInt64) -> (Int, Int) {
        let cs = blockCopy.clusterSize
        return (Int(offset / cs), Int(min((offset + length + cs - 1) / cs, UInt64(blockCopy.clusterCount))))
    }

    private static let accessDenied = BlockError(EACCES, "Permission denied")

    /// Where the snapshot's data at `offset` is for the next `n` bytes: the target (already
    /// copied) or `file` (then registered as a read that client writes wait for). Throws
    /// `EACCES` when the snapshot is broken or the range is not readable (QEMU's
    /// `cbw_snapshot_read_lock`).
    private func snapshotLock(_ offset: UInt64, _ length: UInt64) throws(BlockError) -> (n: UInt64, fromTarget: Bool, read: UInt64?) {
        let cs = blockCopy.clusterSize
        let (first, end) = clusterRange(offset, length)
        return try state.withLock { s throws(BlockError) in
            if s.snapshotError != nil { throw Self.accessDenied }
            if !s.access.allSet(first, end) { throw Self.accessDenied }
            let isDone = s.done.get(first)
            let runEnd = (isDone ? s.done.nextClear(from: first) : s.done.nextSet(from: first)) ?? blockCopy.clusterCount
            let n = min(offset + length, UInt64(runEnd) * cs) - offset
            if isDone { return (n, true, nil) }
            let id = s.nextRead
            s.nextRead &+= 1
            s.reads.append(Read(id: id, start: offset, end: offset + n))
            return (n, false, id)
        }
    }

    private func snapshotUnlock(_ read: UInt64?) {
        guard let read else { return }
        state.withLock { s in s.reads.removeAll { $0.id == read } }
        lock.broadcast()
    }

    func snapshotRead(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let (n, fromTarget, read) = try snapshotLock(pos, UInt64(buffer.count - done))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + Int(n)])
            do throws(BlockError) {
                if fromTarget {
                    try target.node.read(at: pos, into: part, flags: flags.intersection(.noWait))
                } else {
                    try filtered.node.read(at: pos, into: part, flags: flags.intersection(.noWait))
                }
            } catch {
                snapshotUnlock(read)
                throw error
            }
            snapshotUnlock(read)
            done += Int(n)
        }
    }

    func snapshotBlockStatus(at offset: UInt64, length: UInt64) throws(BlockError) -> BlockStatus {
        let (n, fromTarget, read) = try snapshotLock(offset, length)
        defer { snapshotUnlock(read) }
        // The whole chain below answers (the target or the disk as clients see it), so the
        // snapshot node reports its frozen content as its own: allocated, data or zero.
        let node = fromTarget ? target.node : filtered.node
        var status = try node.blockStatusAbove(at: offset, length: n)
        status.flags.insert(.allocated)
        status.depth = 1
        return status
    }

    func snapshotDiscard(at offset: UInt64, length: UInt64) throws(BlockError) {
        let cs = blockCopy.clusterSize
        // Whole clusters only: the rest of a partly discarded cluster stays readable.
        let first = (offset + cs - 1) / cs
        let endByte = offset + length
        let last = endByte >= blockCopy.length ? UInt64(blockCopy.clusterCount) : endByte / cs
        if first >= last { return }
        state.withLock { s in _ = s.access.clear(Int(first), Int(last)) }
        blockCopy.reset(offset: first * cs, length: min(last * cs, blockCopy.length) - first * cs)
        let start = first * cs
        let stop = min(last * cs, target.node.length)
        if stop > start { try target.node.discard(at: start, length: stop - start) }
    }
}

/// `snapshot-access` (QEMU's `block/snapshot-access.c`): reads the point-in-time view of a
/// copy-before-write filter (its `file`). Reads return the disk as it was when the filter went
/// in, block status reports that view, discard tells the filter a range will not be read again
/// (it stops copying it and frees it in the target). Writes are not supported.
public final class SnapshotAccessDriver: BlockDriver {
    public let driverName = "snapshot-access"
    public let role = DriverRole.format
    public let file: BlockChild
    public let isReadOnly = false

    public init(file: BlockNode) {
        self.file = BlockChild(name: "file", role: [.data, .primary], node: file)
    }

    public var children: [BlockChild] { [file] }
    public var length: UInt64 { file.node.length }
    public var limits: BlockLimits { file.node.limits }

    private var source: any SnapshotSource {
        get throws(BlockError) {
            guard let s = file.node.driver as? any SnapshotSource else {
                throw BlockError.notSupported("Operation not supported")
            }
            return s
        }
    }

    /// QEMU's `snapshot_access_child_perm`: nothing taken, everything shared.
    public func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool) -> PermissionPair {
        PermissionPair(perm: [], shared: .all)
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        try source.snapshotRead(at: offset, into: buffer, flags: flags)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        throw BlockError.notSupported("Operation not supported")
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        throw BlockError.notSupported("Operation not supported")
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        try source.snapshotDiscard(at: offset, length: length)
    }

    public func flush() throws(BlockError) {}

    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        // The frozen view may have to wait for the filter's lock and read metadata below.
        if flags.contains(.noWait) { throw .wouldBlock }
        return try source.snapshotBlockStatus(at: offset, length: length)
    }
}

/// Registers `copy-before-write` and `snapshot-access` with the factory.
public func registerBackupDrivers() {
    BlockdevFactory.formatOpeners["copy-before-write"] = BackupOpeners.copyBeforeWrite
    BlockdevFactory.formatOpeners["snapshot-access"] = BackupOpeners.snapshotAccess
}

enum BackupOpeners {
    static let copyBeforeWrite: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        let file = try BlockdevFactory.child(&reader, "file", in: registry, prefix: prefix, required: true)!
        let target = try BlockdevFactory.child(&reader, "target", in: registry, prefix: prefix, required: true)!
        var bitmap: DirtyBitmap?
        if let ref = try reader.object("bitmap") {
            var b = OptionReader(ref, prefix: prefix + "bitmap.")
            let node = try b.requiredString("node")
            let name = try b.requiredString("name")
            try b.finish()
            guard let n = registry.node(named: node) else {
                throw BlockError(ENODEV, "Cannot find device='\(node)' nor node-name='\(node)'")
            }
            guard let found = n.dirtyBitmap(named: name) else {
                throw BlockError(ENOENT, "Dirty bitmap '\(name)' not found")
            }
            bitmap = found
        }
        let onError = try reader.enumValue("on-cbw-error", OnCBWError.allCases.map(\.rawValue))
            .flatMap(OnCBWError.init(rawValue:)) ?? .breakGuestWrite
        let timeout = try reader.uint("cbw-timeout") ?? 0
        if timeout > UInt64(UInt32.max) {
            throw BlockError.invalid("Parameter '\(prefix)cbw-timeout' expects uint32")
        }
        try reader.finish()
        return try CopyBeforeWriteFilter(file: file, target: target, bitmap: bitmap, onError: onError,
                                         timeoutSeconds: UInt32(timeout))
    }

    static let snapshotAccess: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        let file = try BlockdevFactory.child(&reader, "file", in: registry, prefix: prefix, required: true)!
        try reader.finish()
        return SnapshotAccessDriver(file: file)
    }
}
