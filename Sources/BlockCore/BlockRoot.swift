import Synchronization

/// A user of a node that is not a node: an export (QEMU's BlockBackend), a block job's hold
/// on a node (`block_job_add_bdrv`), a job's own I/O backend. Like a `BlockChild` it takes
/// and shares permissions, checked by `BlockGraph` when it is attached or changed.
///
/// An export's requests load `node` without entering anything first, so the node is an
/// `AtomicReference` (replaced atomically, never freed under a reader), and a request that
/// entered a node checks that the root still points at it (`BlockNode`'s `via:` argument):
/// a request that loaded the old node just before an active commit's switch backs out with
/// `.replaced` and is retried on the new one.
public final class BlockRoot: Sendable {
    public enum Kind: Sendable, Equatable {
        /// An export, or a job's I/O backend: QEMU describes it as a block device.
        case backend(name: String?)
        /// A block job's hold on a node (QEMU's `child_job` edge); blocks other graph changes
        /// on the node ("block device is in use by block job: TYPE").
        case job(type: String, id: String)
    }

    /// The child name QEMU prints: `root` for backends, `intermediate node`, `base`… for jobs.
    public let name: String
    public let kind: Kind
    private let current: AtomicReference<BlockNode>
    private let state: Mutex<(permissions: PermissionPair, serial: UInt64, filter: PermissionFilter?)>

    public init(name: String, kind: Kind, node: BlockNode, permissions: PermissionPair) {
        self.name = name
        self.kind = kind
        current = AtomicReference(node)
        state = Mutex((permissions, 0, nil))
    }

    /// The node used now.
    @inline(__always)
    public var node: BlockNode { current.load().unsafelyUnwrapped }

    /// True when the root points at `node` now.
    @inline(__always)
    public func points(at node: BlockNode) -> Bool { current.holds(node) }

    /// Re-points the root (`BlockGraph.replace`, under the change lock, `old` drained).
    public func replace(with newNode: BlockNode, drained old: BlockNode) {
        precondition(old.isDrained, "root re-pointed outside a drained section of '\(old.nodeName)'")
        current.store(newNode)
    }

    /// QEMU's description of the user, for permission errors.
    public var userDescription: String {
        switch kind {
        case .backend(let name?): return "block device '\(name)'"
        case .backend(nil): return "an unnamed block device"
        case .job(let type, let id): return "\(type) job '\(id)'"
        }
    }

    /// The job type when this is a job's hold on a node.
    public var jobType: String? {
        if case .job(let type, _) = kind { return type }
        return nil
    }

    public var isBackend: Bool {
        if case .backend = kind { return true }
        return false
    }

    public var permissions: PermissionPair {
        get { state.withLock { $0.permissions } }
        set { state.withLock { $0.permissions = newValue } }
    }

    public var serial: UInt64 {
        get { state.withLock { $0.serial } }
        set { state.withLock { $0.serial = newValue } }
    }

    public var permissionFilter: PermissionFilter? {
        get { state.withLock { $0.filter } }
        set { state.withLock { $0.filter = newValue } }
    }
}
