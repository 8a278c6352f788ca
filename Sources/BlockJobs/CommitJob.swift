import BlockCore
import BlockGraph
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How an active commit treats client writes to top (blockd's `x-copy-mode`).
public enum CommitCopyMode: String, Sendable, CaseIterable {
    /// Start in background mode; switch to write-blocking when the copy is not catching up.
    case auto
    /// Record written ranges and copy them later (QEMU's default `background`).
    case background
    /// Write each client write to base as well before it is acknowledged (QEMU's mirror
    /// `copy-mode: write-blocking`).
    case writeBlocking = "write-blocking"
}

/// Which nodes a commit works on, resolved from `device`, `top` and `base`.
///
/// ```
///  base ◀─ aboveBase … top ◀─ aboveTop … overlay … ◀─ device      (intermediate commit)
///  base ◀─ aboveBase … top ◀─ [filters] ◀─ device                   (active commit)
/// ```
public struct CommitPlan: Sendable {
    public let device: BlockNode
    /// The highest layer whose data is committed.
    public let top: BlockNode
    /// The node the data goes into; it takes the place of top..aboveBase.
    public let base: BlockNode
    /// The node whose chain child is base (a filter or the lowest committed layer).
    public let aboveBase: BlockNode
    /// The node whose chain child is top (intermediate commit only).
    public let aboveTop: BlockNode?
    /// The data node above top whose header records the new backing file (intermediate).
    public let overlay: BlockNode?
    /// The data layers that leave the chain: top down to the one above base.
    public let layers: [BlockNode]

    public var isActive: Bool { overlay == nil }

    /// Resolves the plan; `top`/`base` default to the active layer and the bottom of the chain.
    public static func resolve(device: BlockNode, top: BlockNode?, base: BlockNode?) throws(BlockError) -> CommitPlan {
        let chain = device.chain
        let activeTop = device.skippingFilters()
        let top = top ?? activeTop
        guard let ti = chain.firstIndex(where: { $0 === top }) else {
            throw BlockError.invalid("Top image file \(top.nodeName) not found")
        }
        if top.isFilter { throw BlockError.invalid("Top node '\(top.nodeName)' is a filter; name a data node") }
        let base = base ?? chain.last!.skippingFilters()
        if base === top { throw BlockError.invalid("cannot commit an image into itself") }
        guard let bi = chain.firstIndex(where: { $0 === base }) else {
            throw BlockError.invalid("Base '\(base.nodeName)' not found")
        }
        if bi < ti { throw BlockError.invalid("Base '\(base.nodeName)' is not below top '\(top.nodeName)' in the backing chain") }
        let layers = chain[ti..<bi].filter { !$0.isFilter }
        if top === activeTop {
            return CommitPlan(device: device, top: top, base: base, aboveBase: chain[bi - 1], aboveTop: nil,
                              overlay: nil, layers: layers)
        }
        let overlay = chain[0..<ti].last(where: { !$0.isFilter })!
        return CommitPlan(device: device, top: top, base: base, aboveBase: chain[bi - 1], aboveTop: chain[ti - 1],
                          overlay: overlay, layers: layers)
    }
}

/// A bitset of `granularity`-sized chunks that need copying (active commit), guarded by a mutex.
final class DirtyChunks: Sendable {
    let granularity: UInt64
    let count: Int
    private let state: Mutex<(words: [UInt64], set: Int)>

    init(length: UInt64, granularity: UInt64) {
        self.granularity = granularity
        count = Int((length + granularity - 1) / granularity)
        state = Mutex((words: [UInt64](repeating: 0, count: (count + 63) / 64), set: 0))
    }

    func mark(_ offset: UInt64, _ length: UInt64) {
        guard length > 0 else { return }
        let first = Int(offset / granularity)
        let last = min(count - 1, Int((offset + length - 1) / granularity))
        if first > last { return }
        state.withLock { s in
            for i in first...last where s.words[i >> 6] & (1 << UInt64(i & 63)) == 0 {
                s.words[i >> 6] |= 1 << UInt64(i & 63)
                s.set += 1
            }
        }
    }

    func clear(_ first: Int, _ n: Int) {
        state.withLock { s in
            for i in first..<(first + n) where s.words[i >> 6] & (1 << UInt64(i & 63)) != 0 {
                s.words[i >> 6] &= ~(1 << UInt64(i & 63))
                s.set -= 1
            }
        }
    }

    var dirtyChunks: Int { state.withLock { $0.set } }

    /// The first run of dirty chunks at or after `from` (wrapping), at most `max` long.
    func nextRun(from: Int, max: Int) -> (first: Int, count: Int)? {
        state.withLock { s -> (Int, Int)? in
            if s.set == 0 { return nil }
            func find(_ lo: Int, _ hi: Int) -> Int? {
                var i = lo
                while i < hi {
                    let w = s.words[i >> 6] >> UInt64(i & 63)
                    if w == 0 { i = (i | 63) + 1; continue }
                    i += w.trailingZeroBitCount
                    return i < hi ? i : nil
                }
                return nil
            }
            guard let start = find(from, count) ?? find(0, from) else { return nil }
            var n = 1
            while n < max, start + n < count, s.words[(start + n) >> 6] & (1 << UInt64((start + n) & 63)) != 0 { n += 1 }
            return (start, n)
        }
    }
}

/// `block-commit`: copies the data of top..aboveBase into base, then removes those layers
/// from the chain. Intermediate commit rewrites the overlay's backing file; active commit
/// mirrors client writes to top, reaches READY and on `job-complete` switches every user of
/// top (exports, parent edges) to base in a drained section. See `docs/jobs.md`.
public final class CommitJob: JobBody, WriteMirror {
    public let type = "commit"
    public let plan: CommitPlan
    public let backingFile: String?
    public let copyMode: CommitCopyMode
    private let graph: BlockGraph
    private let holds: JobHolds
    /// Control context only (creation, completion, clean).
    private let control: Mutex<(frozen: FrozenChain?, cleaned: Bool, mirroring: Bool)>
    /// Bytes per copy step.
    public static let chunk: UInt64 = 1 << 20
    /// Dirty tracking granularity for active commit.
    public static let granularity: UInt64 = 64 << 10

    private let dirty: DirtyChunks?
    private let writeBlocking = Atomic<Bool>(false)
    /// Serialises overlapping client writes in write-blocking mode (write top + write base).
    private let mirrorLock = RangeLock()
    /// Set when the job switched to write-blocking on its own (`auto`), for `query` and tests.
    public var switchedToWriteBlocking: Bool { writeBlocking.load(ordering: .relaxed) }

    public var canComplete: Bool { plan.isActive }

    /// Freezes the chain and takes QEMU's commit permissions (see `holds(plan:id:)`); for an
    /// active commit, makes client writes to top serialise against the copies and mirrors
    /// them. Throws, changing nothing, when a link is frozen or a permission conflicts.
    /// `failedAfterCreation`: see `JobCreation` (QEMU creates an intermediate commit before
    /// anything else, an active commit once its `mirror_top` filter is in; both freeze the
    /// chain after that).
    public init(plan: CommitPlan, backingFile: String?, copyMode: CommitCopyMode, graph: BlockGraph,
                id: String, failedAfterCreation: (@Sendable () -> Void)? = nil) throws(BlockError) {
        self.plan = plan
        self.backingFile = backingFile
        self.copyMode = copyMode
        self.graph = graph
        if plan.base.isReadOnly {
            throw BlockError(EPERM, "Block node '\(plan.base.nodeName)' is read-only")
        }
        if plan.base.length < plan.top.length {
            throw BlockError.notSupported("Base '\(plan.base.nodeName)' (\(plan.base.length) bytes) is smaller than top '\(plan.top.nodeName)' (\(plan.top.length) bytes); resize it first")
        }
        if let overlay = plan.overlay, !overlay.driver.canRecordBackingFile {
            throw BlockError.notSupported("Node '\(overlay.nodeName)' (\(overlay.driverName)) cannot record a backing file")
        }
        dirty = plan.isActive ? DirtyChunks(length: plan.top.length, granularity: CommitJob.granularity) : nil
        let frozen: FrozenChain
        do throws(BlockError) {
            frozen = try FrozenChain.freeze(from: plan.aboveTop ?? plan.top, through: plan.base, owner: id)
        } catch {
            failedAfterCreation?()
            throw error
        }
        do throws(BlockError) {
            let (filter, roots) = CommitJob.holds(plan: plan, id: id)
            holds = try JobHolds.take(graph, filter: filter, roots: roots,
                                      creation: JobCreation(beforeFilter: !plan.isActive, failed: failedAfterCreation))
        } catch {
            frozen.unfreeze()
            throw error
        }
        control = Mutex((frozen, false, plan.isActive))
        if plan.isActive {
            writeBlocking.store(copyMode == .writeBlocking, ordering: .relaxed)
            plan.top.beginSerialising()
            plan.top.setMirror(self)
        }
    }

    /// QEMU's permissions for a commit, in the order QEMU takes them. Intermediate commit
    /// (`commit_start`): `commit_top` goes above top and hides its users; the job holds the
    /// device ("main node", shares everything), every node from top down to base ("intermediate
    /// node": shares writes, and consistent read only for filters directly above base) and
    /// base ("base"), and writes base through its own backend (consistent read and write,
    /// sharing consistent read and write-unchanged). Active commit (`mirror_start_job` with
    /// base as target): `mirror_top` goes above the device; the job reads through it ("main
    /// node"), writes base through a backend that shares everything but resize, and holds the
    /// device ("source"), base ("target") and the nodes between ("intermediate node").
    static func holds(plan: CommitPlan, id: String) -> ((PermissionFilter, BlockNode), [BlockRoot]) {
        let all = BlockPermissions.all
        var roots: [BlockRoot] = []
        // The topmost node of the ones that are only filters on base.
        var filteredBase: BlockNode? = plan.base
        var n: BlockNode? = plan.top
        while let cur = n, cur !== plan.base {
            if cur.skippingFilters() === plan.base { filteredBase = cur; break }
            n = cur.chainChild?.node
        }
        func intermediates(from first: BlockNode?) {
            var shared: BlockPermissions = [.writeUnchanged, .write]
            var node = first
            while let cur = node, cur !== plan.base {
                if cur === filteredBase { shared.insert(.consistentRead) }
                roots.append(JobHolds.hold(cur, "intermediate node", type: "commit", id: id, shared: shared))
                node = cur.chainChild?.node
            }
        }
        if plan.isActive {
            let source = plan.device
            let main = BlockRoot(name: "main node", kind: .job(type: "commit", id: id), node: source,
                                 permissions: PermissionPair(perm: .consistentRead, shared: [.consistentRead, .writeUnchanged, .write]))
            main.permissionFilter = .commitMirrorTop
            roots.append(main)
            roots.append(JobHolds.backend(plan.base, perm: .write, shared: [.writeUnchanged, .consistentRead, .write]))
            roots.append(JobHolds.hold(source, "source", type: "commit", id: id, shared: [.writeUnchanged, .write, .consistentRead]))
            roots.append(JobHolds.hold(plan.base, "target", type: "commit", id: id, shared: all))
            intermediates(from: source.chainChild?.node)
            return ((.commitMirrorTop, source), roots)
        }
        roots.append(JobHolds.hold(plan.device, "main node", type: "commit", id: id, shared: all))
        intermediates(from: plan.top)
        roots.append(JobHolds.hold(plan.base, "base", type: "commit", id: id, shared: all))
        roots.append(JobHolds.backend(plan.base, perm: [.consistentRead, .write], shared: [.consistentRead, .writeUnchanged]))
        return ((.commitTop, plan.top), roots)
    }

    // MARK: run

    public func run(_ job: Job) throws(BlockError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(CommitJob.chunk), alignment: 4096)
        defer { buffer.deallocate() }
        if plan.isActive {
            try runActive(job, buffer)
        } else {
            try runIntermediate(job, buffer)
        }
    }

    private func runIntermediate(_ job: Job, _ buffer: UnsafeMutableRawBufferPointer) throws(BlockError) {
        let top = plan.top
        let length = top.length
        job.setTotal(length)
        var offset: UInt64 = 0
        try job.checkpoint()
        while offset < length {
            let want = min(CommitJob.chunk, length - offset)
            let status: BlockStatus
            do throws(BlockError) {
                status = try top.blockStatusAbove(base: plan.base, at: offset, length: want)
            } catch {
                if try job.handleIOError(error, operation: "read") { continue }
                offset += want
                job.addProgress(want)
                continue
            }
            let n = status.length
            var copied: UInt64 = 0
            if status.depth >= 1 {
                do throws(BlockError) {
                    try copyDown(at: offset, length: n, buffer: buffer) { (dst) throws(BlockError) in
                        try top.read(at: offset, into: dst)
                    }
                    copied = n
                } catch {
                    if error.errno == jobCancelled.errno { throw error }
                    if try job.handleIOError(error, operation: error.message.hasPrefix("write") ? "write" : "read") { continue }
                }
            }
            offset += n
            job.addProgress(n)
            try job.checkpoint(copied: copied)
        }
        try plan.base.flush()
    }

    /// Reads a range with `read` and writes it into base as a commit copy (zeroes as zeroes).
    private func copyDown(at offset: UInt64, length: UInt64, buffer: UnsafeMutableRawBufferPointer,
                          read: (UnsafeMutableRawBufferPointer) throws(BlockError) -> Void) throws(BlockError) {
        let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(length)])
        try read(dst)
        if UnsafeRawBufferPointer(dst).isAllZero {
            try plan.base.writeZeroes(at: offset, length: length, flags: [.commitCopy])
        } else {
            try plan.base.write(at: offset, from: UnsafeRawBufferPointer(dst), flags: [.commitCopy])
        }
    }

    private func runActive(_ job: Job, _ buffer: UnsafeMutableRawBufferPointer) throws(BlockError) {
        let top = plan.top
        let dirty = self.dirty!
        let length = top.length
        let g = CommitJob.granularity
        // Everything allocated above base needs copying; writes from now on are marked by the
        // mirror hook (installed before this scan, so nothing falls in between).
        var offset: UInt64 = 0
        while offset < length {
            let status = try top.blockStatusAbove(base: plan.base, at: offset, length: min(1 << 30, length - offset))
            if status.depth >= 1 { dirty.mark(offset, status.length) }
            offset += status.length
        }
        var copiedTotal: UInt64 = 0
        var cursor = 0
        var ready = false
        var lastCheck = monotonicNanos()
        var lastDirty = dirty.dirtyChunks
        var stalled = 0
        job.setTotal(UInt64(dirty.dirtyChunks) * g)
        try job.checkpoint()
        while true {
            // Not catching up (auto): every client write goes to base before it is acknowledged.
            let now = monotonicNanos()
            if now - lastCheck >= 500_000_000 {
                let d = dirty.dirtyChunks
                // Two windows in a row in which the dirty set did not shrink: clients dirty
                // faster than the job copies (at its speed limit or flat out).
                stalled = d > 0 && d >= lastDirty ? stalled + 1 : 0
                if copyMode == .auto && !writeBlocking.load(ordering: .relaxed) && stalled >= 2 {
                    writeBlocking.store(true, ordering: .sequentiallyConsistent)
                    Log.info("job '\(job.id)': commit copy is not catching up (\(d) dirty chunks); switching to write-blocking mode")
                }
                lastDirty = d
                lastCheck = now
            }
            if let run = dirty.nextRun(from: cursor, max: Int(CommitJob.chunk / g)) {
                let start = UInt64(run.first) * g
                let n = min(UInt64(run.count) * g, length - start)
                var copied: UInt64 = 0
                do throws(BlockError) {
                    try top.rangeLock.withLock(offset: start, length: n, exclusive: true) { () throws(BlockError) in
                        dirty.clear(run.first, run.count)
                        do throws(BlockError) {
                            try copyDown(at: start, length: n, buffer: buffer) { (dst) throws(BlockError) in
                                try top.read(at: start, into: dst)
                            }
                        } catch {
                            dirty.mark(start, n)
                            throw error
                        }
                    }
                    copied = n
                } catch {
                    if error.errno == jobCancelled.errno { throw error }
                    _ = try job.handleIOError(error, operation: error.message.hasPrefix("write") ? "write" : "read")
                }
                cursor = run.first + run.count
                if cursor >= dirty.count { cursor = 0 }
                copiedTotal += copied
                job.addProgress(copied)
                job.setTotal(job.info.current + UInt64(dirty.dirtyChunks) * g)
                try job.checkpoint(copied: copied)
                continue
            }
            if !ready {
                try plan.base.flush()
                ready = true
                job.setReady()
            }
            if job.shouldFinish { break }
            try job.idle(nanos: 10_000_000)
        }
        try plan.base.flush()
    }

    // MARK: WriteMirror (client writes to top during an active commit)

    public func mirror(offset: UInt64, length: UInt64, change: MirroredChange, flags: RequestFlags,
                       apply: () throws(BlockError) -> Void) throws(BlockError) {
        guard let dirty else { try apply(); return }
        if !writeBlocking.load(ordering: .relaxed) {
            try apply()
            dirty.mark(offset, length)
            return
        }
        // Write-blocking: the base write happens before the client's reply; never on a loop.
        if flags.contains(.noWait) { throw .wouldBlock }
        let g = CommitJob.granularity
        let start = offset / g * g
        let end = min(((offset + max(length, 1) + g - 1) / g) * g, plan.top.length)
        let token = try mirrorLock.lock(offset: start, length: end - start, exclusive: true)
        defer { mirrorLock.unlock(token) }
        try apply()
        do throws(BlockError) {
            switch change {
            case .write(let data):
                try plan.base.write(at: offset, from: data, flags: flags.intersection(.fua).union(.commitCopy))
            case .zeroes(let f):
                try plan.base.writeZeroes(at: offset, length: length, flags: f.intersection(.fua).union(.commitCopy))
            case .discard:
                dirty.mark(offset, length)
            }
        } catch {
            // The client's write succeeded on top; copy the range again later.
            dirty.mark(offset, length)
        }
    }

    // MARK: completion

    public func prepare(_ job: Job) throws(BlockError) {
        if plan.isActive {
            if job.softCancelled { return }
            try pivot()
        } else {
            try dropIntermediate()
        }
    }

    /// Active commit: under a drained section of top and everything above it, copies what is
    /// still dirty (nothing can write now), merges bitmaps, and re-points top's users to base.
    private func pivot() throws(BlockError) {
        let top = plan.top
        let base = plan.base
        let dirty = self.dirty!
        let g = CommitJob.granularity
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(CommitJob.chunk), alignment: 4096)
        defer { buffer.deallocate() }
        try graph.withLock { () throws(BlockError) in
            try BlockNode.withDrained(graph.drainSet([top])) { () throws(BlockError) in
                while let run = dirty.nextRun(from: 0, max: Int(CommitJob.chunk / g)) {
                    let start = UInt64(run.first) * g
                    let n = min(UInt64(run.count) * g, top.length - start)
                    // Top is drained (no request inside), so its driver is read directly.
                    try copyDown(at: start, length: n, buffer: buffer) { (dst) throws(BlockError) in
                        try top.driver.read(at: start, into: dst, flags: [])
                    }
                    dirty.clear(run.first, run.count)
                }
                try base.flush()
                try graph.carryBitmaps(from: plan.layers, to: base)
                top.setMirrorDrained(nil)
                control.withLock { c in
                    c.mirroring = false
                    c.frozen?.unfreeze()
                    c.frozen = nil
                }
                // QEMU's mirror_exit_common: the job's holds and filter go, then every user of
                // top (exports, parents) is switched to base.
                holds.release()
                try graph.replaceDrained(top, with: base)
            }
            for n in plan.layers { graph.release(n) }
        }
    }

    /// Intermediate commit: the overlay's header names base, then its chain edge goes to base.
    private func dropIntermediate() throws(BlockError) {
        guard let overlay = plan.overlay, let aboveTop = plan.aboveTop, overlay.driver.canRecordBackingFile else { return }
        let base = plan.base
        let name: String
        if let given = backingFile {
            name = given
        } else {
            name = try StreamJob.backingName(for: base.skippingFilters(), top: overlay)
        }
        let format = base.skippingFilters().driverName
        try graph.withLock { () throws(BlockError) in
            // QEMU's commit_prepare: unfreeze, drop the job's hold on base (it still takes
            // write), then base takes the committed layers' place below aboveTop.
            control.withLock { c in
                c.frozen?.unfreeze()
                c.frozen = nil
            }
            holds.release()
            let change: BlockGraph.EdgeChange = aboveTop.isFilter
                ? .filtered(of: aboveTop, to: base) : .backing(of: aboveTop, to: base)
            try graph.change([change], first: { [self] () throws(BlockError) in
                try overlay.driver.setBackingFile(name: name, format: format)
                try graph.carryBitmaps(from: plan.layers, to: base)
            })
            for n in plan.layers { graph.release(n) }
        }
    }

    public func abort(_ job: Job) {}

    public func clean(_ job: Job?) {
        let (first, mirroring) = control.withLock { c -> (Bool, Bool) in
            c.frozen?.unfreeze()
            c.frozen = nil
            defer {
                c.cleaned = true
                c.mirroring = false
            }
            return (!c.cleaned, c.mirroring)
        }
        holds.release()
        if !first { return }
        if plan.isActive {
            if mirroring { plan.top.setMirror(nil) }
            plan.top.endSerialising()
        }
    }

}
