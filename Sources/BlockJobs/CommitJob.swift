import BlockCore
import BlockGraph
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

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

/// `block-commit`: copies the data of top..aboveBase into base, then removes those layers
/// from the chain. Intermediate commit rewrites the overlay's backing file; active commit
/// mirrors client writes to top, reaches READY and on `job-complete` switches every user of
/// top (exports, parent edges) to base in a drained section. See `docs/jobs.md`.
public final class CommitJob: JobBody {
    public let type = "commit"
    public let plan: CommitPlan
    public let backingFile: String?
    public let copyMode: CommitCopyMode
    private let graph: BlockGraph
    private let holds: JobHolds
    /// Control context only (creation, completion, clean).
    private let control: Mutex<(frozen: FrozenChain?, cleaned: Bool)>
    /// Bytes per copy step.
    public static let chunk: UInt64 = 1 << 20
    /// Dirty tracking granularity for active commit.
    public static let granularity: UInt64 = 64 << 10

    /// Active commit: the converging copy from top into base (shared with `blockdev-mirror`).
    private let copier: ConvergingCopy?
    /// Set when the job switched to write-blocking on its own (`auto`), for `query` and tests.
    public var switchedToWriteBlocking: Bool { copier?.isWriteBlocking ?? false }

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
        copier = plan.isActive
            ? ConvergingCopy(source: plan.top, target: plan.base, granularity: CommitJob.granularity,
                             step: CommitJob.chunk, mode: copyMode, unmap: true)
            : nil
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
        control = Mutex((frozen, false))
        copier?.install()
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
        if plan.isActive {
            try runActive(job)
        } else {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(CommitJob.chunk), alignment: 4096)
            defer { buffer.deallocate() }
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

    private func runActive(_ job: Job) throws(BlockError) {
        let copier = self.copier!
        // Everything allocated above base needs copying; writes from now on are marked by the
        // mirror hook (installed before this scan, so nothing falls in between).
        try copier.markAllocated(above: plan.base)
        try copier.run(job) { (side, error) throws(BlockError) in
            _ = try job.handleIOError(error, operation: side == .source ? "read" : "write")
        }
        try plan.base.flush()
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
        let copier = self.copier!
        try graph.withLock { () throws(BlockError) in
            try BlockNode.withDrained(graph.drainSet([top])) { () throws(BlockError) in
                try copier.copyRemainingDrained()
                try graph.carryBitmaps(from: plan.layers, to: base)
                copier.uninstall(drained: true)
                control.withLock { c in
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
        control.withLock { c in
            c.frozen?.unfreeze()
            c.frozen = nil
            c.cleaned = true
        }
        holds.release()
        copier?.uninstall()
    }
}
