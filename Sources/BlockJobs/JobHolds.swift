import BlockCore
import BlockGraph
import Synchronization

/// What a block job holds in the graph while it runs, as QEMU's jobs do: its holds on nodes
/// (`block_job_add_bdrv`: roots of kind `.job`, which also make other graph operations on
/// those nodes answer "in use by block job"), its own I/O backends, and the permissions of
/// its implicit filter node (`PermissionFilter`). Taken all at once, checked in QEMU's order;
/// released at the end (idempotent).
final class JobHolds: Sendable {
    let graph: BlockGraph
    private let held: Mutex<(roots: [BlockRoot], filter: BlockGraph.FilterInstallation?)>

    private init(graph: BlockGraph, roots: [BlockRoot], filter: BlockGraph.FilterInstallation?) {
        self.graph = graph
        held = Mutex((roots, filter))
    }

    /// Installs `filter` on the users of its node, then attaches `roots` one by one. Throws,
    /// leaving the graph as it was, at the first conflict. `creation` says where QEMU creates
    /// the job among these steps; a failure after it is reported to `creation.failed` first.
    static func take(_ graph: BlockGraph, filter: (PermissionFilter, BlockNode)?, roots: [BlockRoot],
                     creation: JobCreation = .none) throws(BlockError) -> JobHolds {
        try graph.withLock { () throws(BlockError) -> JobHolds in
            var installed: BlockGraph.FilterInstallation?
            if let (f, node) = filter {
                do throws(BlockError) {
                    installed = try graph.installFilter(f, onUsersOf: node)
                } catch {
                    if creation.beforeFilter { creation.failed?() }
                    throw error
                }
            }
            do throws(BlockError) {
                try graph.attach(roots)
            } catch {
                if let installed { graph.removeFilter(installed) }
                creation.failed?()
                throw error
            }
            return JobHolds(graph: graph, roots: roots, filter: installed)
        }
    }

    /// A hold on a node: QEMU's `block_job_add_bdrv(job, name, node, 0, shared)`.
    static func hold(_ node: BlockNode, _ name: String, type: String, id: String, shared: BlockPermissions) -> BlockRoot {
        BlockRoot(name: name, kind: .job(type: type, id: id), node: node, permissions: PermissionPair(perm: [], shared: shared))
    }

    /// A job's own I/O backend on a node (QEMU's `blk_new` + `blk_insert_bs`).
    static func backend(_ node: BlockNode, perm: BlockPermissions, shared: BlockPermissions,
                        filter: PermissionFilter? = nil) -> BlockRoot {
        let root = BlockRoot(name: "root", kind: .backend(name: nil), node: node, permissions: PermissionPair(perm: perm, shared: shared))
        root.permissionFilter = filter
        return root
    }

    /// Gives everything back; the nodes only the job kept are released.
    func release() {
        let (roots, filter) = held.withLock { h in
            let taken = (h.roots, h.filter)
            h = ([], nil)
            return taken
        }
        graph.withLock {
            if let filter { graph.removeFilter(filter) }
            if !roots.isEmpty { graph.detach(roots) }
        }
    }
}

/// Where QEMU creates a block job while it sets one up (`block_job_create`, which reports
/// `JOB_STATUS_CHANGE` "created"): some checks and holds come before it, the rest after. When
/// a step after it fails, QEMU's job goes at once (`job_early_fail`: "null"), so a client
/// sees both events before the error. `failed` is called for such a failure, before the job
/// constructor throws; nothing is called for failures before the job exists.
public struct JobCreation: Sendable {
    /// The job exists before its implicit filter goes in (intermediate commit's `commit_top`);
    /// otherwise after (stream's copy-on-read, active commit's `mirror_top`).
    public var beforeFilter: Bool
    public var failed: (@Sendable () -> Void)?

    public init(beforeFilter: Bool, failed: (@Sendable () -> Void)?) {
        self.beforeFilter = beforeFilter
        self.failed = failed
    }

    public static let none = JobCreation(beforeFilter: false, failed: nil)
}
