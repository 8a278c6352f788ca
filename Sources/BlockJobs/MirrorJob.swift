import BlockCore
import BlockGraph
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// QAPI `MirrorSyncMode` (the ones `blockdev-mirror` accepts).
public enum MirrorSyncMode: String, Sendable, CaseIterable {
    /// Everything the device shows (the target is zeroed first, then allocated ranges copied).
    case full
    /// Only what the device's top layer has allocated (the target keeps its own backing).
    case top
    /// Nothing up front: only what clients write from now on.
    case none
}

/// `blockdev-mirror`'s options, resolved (QEMU's `mirror_start_job` arguments).
public struct MirrorOptions: Sendable {
    public var sync: MirrorSyncMode = .full
    /// Dirty tracking granularity in bytes; 0 = QEMU's default for the target.
    public var granularity: UInt64 = 0
    /// Bytes copied per step at most; 0 = QEMU's default (16 MiB).
    public var bufSize: UInt64 = 0
    public var copyMode: MirrorCopyMode = .background
    public var onSourceError: OnError = .report
    public var onTargetError: OnError = .report
    public var unmap = true
    /// The node the target takes the place of at `job-complete` (default: the source).
    public var replaces: BlockNode?

    public init() {}

    /// QEMU's `DEFAULT_MIRROR_BUF_SIZE` (16 in flight × 1 MiB).
    public static let defaultBufSize: UInt64 = 16 << 20
    /// The largest single copy step blockd issues (it copies one step at a time).
    public static let maxStep: UInt64 = 4 << 20

    /// QEMU's `bdrv_get_default_bitmap_granularity`: the target's cluster size within
    /// [4 KiB, 64 KiB], or 64 KiB.
    public static func defaultGranularity(for target: BlockNode) -> UInt64 {
        if let cluster = target.skippingFilters().driver.clusterSizeInfo, cluster > 0 {
            return min(65536, max(4096, cluster))
        }
        return 65536
    }
}

/// `blockdev-mirror`: copies the device into an existing target node while clients keep
/// writing (background or write-blocking), reports READY once converged, and on
/// `job-complete` puts the target in the place of the source (or `replaces`) for every user
/// in a drained section. A soft `block-job-cancel` after READY ends it successfully without
/// the switch; the source stays as it is. See `docs/jobs.md`, "blockdev-mirror".
public final class MirrorJob: JobBody {
    public let type = "mirror"
    public let source: BlockNode
    public let target: BlockNode
    public let options: MirrorOptions
    private let graph: BlockGraph
    private let holds: JobHolds
    private let copier: ConvergingCopy
    private let cleaned = Atomic<Bool>(false)

    public var canComplete: Bool { true }

    /// Takes QEMU's mirror permissions (`mirror_start_job`, in its order): `mirror_top`'s rule
    /// on the source's users, the job's read of the source ("main node"), its write backend
    /// on the target (write, sharing only write-unchanged: nobody else may read the target
    /// consistently or write it), holds on source and target. Then installs the write mirror.
    /// Throws, changing nothing, on a refusal; `failedAfterCreation` as in `JobCreation`.
    /// `filter-node-name`: QEMU's `mirror_top` as a node of that name above the source while
    /// the job runs (without it blockd inserts no node, only the filter's permission rule).
    private let filterNode: Mutex<BlockNode?>

    public init(source: BlockNode, target: BlockNode, options: MirrorOptions, graph: BlockGraph, id: String,
                filterNodeName: String? = nil, failedAfterCreation: (@Sendable () -> Void)? = nil) throws(BlockError) {
        self.source = source
        self.target = target
        var options = options
        if options.granularity == 0 { options.granularity = MirrorOptions.defaultGranularity(for: target) }
        if options.bufSize == 0 { options.bufSize = MirrorOptions.defaultBufSize }
        // QEMU: buf_size = ROUND_UP(buf_size, granularity).
        options.bufSize = (options.bufSize + options.granularity - 1) / options.granularity * options.granularity
        if options.sync == .top && source.backingSkippingFilters() == nil { options.sync = .full }
        self.options = options
        self.graph = graph
        if source.skippingFilters() === target.skippingFilters() {
            throw BlockError.invalid("Can't mirror node into itself")
        }
        let all = BlockPermissions.all
        let main = BlockRoot(name: "main node", kind: .job(type: "mirror", id: id), node: source,
                             permissions: PermissionPair(perm: .consistentRead, shared: [.consistentRead, .writeUnchanged, .write]))
        main.permissionFilter = .mirrorTop
        var roots = [main]
        let inChain = source.chain.contains { $0 === target.skippingFilters() || $0 === target }
        roots.append(JobHolds.backend(target, perm: .write, shared: .writeUnchanged))
        roots.append(JobHolds.hold(source, "source", type: "mirror", id: id, shared: [.writeUnchanged, .write, .consistentRead]))
        roots.append(JobHolds.hold(target, "target", type: "mirror", id: id, shared: all))
        if inChain {
            // QEMU refuses this after creating the job (a mirror into its own backing chain is
            // what active commit does, with its own permissions).
            failedAfterCreation?()
            throw BlockError.invalid("Cannot mirror to a filter on top of a node in the source's backing chain")
        }
        var filter: BlockNode?
        if let filterNodeName {
            // mirror_start_job: bdrv_new_open_driver + bdrv_append, before the job exists.
            let node = BlockNode(name: filterNodeName, driver: MirrorTopFilter(file: source))
            try graph.withLock { () throws(BlockError) in
                try graph.register(node)
                do throws(BlockError) { try graph.insertFilter(node, above: source) } catch {
                    graph.release(node)
                    throw error
                }
            }
            filter = node
        }
        do throws(BlockError) {
            holds = try JobHolds.take(graph, filter: (.mirrorTop, source), roots: roots,
                                      creation: JobCreation(beforeFilter: false, failed: failedAfterCreation))
        } catch {
            if let filter { try? graph.dropFilter(filter) }
            throw error
        }
        filterNode = Mutex(filter)
        let step = min(options.bufSize, MirrorOptions.maxStep)
        copier = ConvergingCopy(source: source, target: target, granularity: options.granularity, step: step,
                                mode: options.copyMode, unmap: options.unmap)
        copier.install()
    }

    /// Whether client writes go through to the target now (`write-blocking`).
    public var isWriteBlocking: Bool { copier.isWriteBlocking }

    // MARK: run

    public func run(_ job: Job) throws(BlockError) {
        // mirror_run: a mirror (not a commit) needs a target of the source's size.
        if source.length != target.length {
            throw BlockError.invalid("Source and target image have different sizes")
        }
        try job.checkpoint()
        switch options.sync {
        case .none:
            break
        case .top:
            try copier.markAllocated(above: source.backingSkippingFilters())
        case .full:
            // zero_target: blockdev-mirror with sync=full zeroes the target first.
            do throws(BlockError) { try copier.zeroTargetOrMarkAll(above: nil) } catch {
                _ = try job.handleIOError(error, operation: "write", policy: options.onTargetError)
                copier.dirty.mark(0, copier.length)
            }
        }
        try copier.run(job) { [options] (side, error) throws(BlockError) in
            switch side {
            case .source: _ = try job.handleIOError(error, operation: "read", policy: options.onSourceError)
            case .target: _ = try job.handleIOError(error, operation: "write", policy: options.onTargetError)
            }
        }
    }

    // MARK: completion

    public func prepare(_ job: Job) throws(BlockError) {
        if job.softCancelled || !job.completeRequested { return }
        let old = options.replaces ?? source
        try graph.withLock { () throws(BlockError) in
            guard graph.contains(old) else {
                throw BlockError.invalid("Node name '\(old.nodeName)' not found")
            }
            try BlockNode.withDrained(graph.drainSet([old, source])) { () throws(BlockError) in
                try copier.copyRemainingDrained()
                // Drive semantics (blockd; QEMU leaves them behind): the replaced node's
                // bitmaps follow the disk to the target (merged, or created there).
                try graph.carryBitmaps(from: [old], to: target)
                copier.uninstall(drained: true)
                // QEMU's mirror_exit_common: the job's holds and mirror_top go, then every
                // user of the replaced node (exports, parents) is switched to the target.
                holds.release()
                try graph.replaceDrained(old, with: target)
            }
            // mirror_exit_common: mirror_top's users get what is below it (now the target).
            try dropFilterNode()
        }
    }

    private func dropFilterNode() throws(BlockError) {
        guard let filter = filterNode.withLock({ f -> BlockNode? in defer { f = nil }; return f }) else { return }
        try graph.dropFilter(filter)
    }

    public func abort(_ job: Job) {}

    public func clean(_ job: Job?) {
        cleaned.store(true, ordering: .relaxed)
        holds.release()
        copier.uninstall()
        do throws(BlockError) { try dropFilterNode() } catch {
            Log.error("mirror job: could not remove filter node: \(error.message)")
        }
    }
}

/// QEMU's `mirror_top` driver for `filter-node-name`: forwards everything to the source. The
/// job's write mirror sits on the source itself, so writes through this node reach it too.
final class MirrorTopFilter: ForwardingFilter {
    let driverName = "mirror_top"
    let filtered: BlockChild
    init(file: BlockNode) { filtered = BlockChild(name: "backing", role: .filteredPrimary, node: file) }

    func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        MirrorTopFilter(file: backing ?? file ?? filtered.node)
    }
}
