import Synchronization

/// An edge of the block graph: a parent driver's use of a child node (QEMU's `BdrvChild`).
///
/// The edge carries what the graph decided for it: the permissions the parent takes on the
/// child and the ones it shares (`permissions`, set only by `BlockGraph` when it checked the
/// whole graph), whether a job froze it, and its place among the child's parents (`serial`:
/// QEMU lists a node's parents newest first, which decides the wording of a conflict).
///
/// `node` changes only inside a drained section of the parent: requests read it without a lock.
///
/// Invariant (an `@unchecked Sendable` wrapper, as `DrainGuarded` — the edge is read on every
/// request of every layer, so the node sits in the edge itself, one load away): `node` is
/// written only before the edge is shared (`init`, `replaceUnpublished`) or by `replace`,
/// which checks that the parent is drained; it is read only by requests in flight in the
/// parent (or a node above it) and by the graph-lock holder. Everything else is behind a
/// mutex.
public final class BlockChild: @unchecked Sendable {
    /// The edge name QEMU uses: `file`, `backing` (filters' child is `file` too).
    public let name: String
    /// What the parent uses the child for; decides the parent's permissions on it.
    public let role: ChildRole
    private var target: BlockNode
    private let state: Mutex<EdgeState>

    struct EdgeState {
        var permissions = PermissionPair.none
        var frozenBy: String?
        var serial: UInt64 = 0
        var filter: PermissionFilter?
    }

    /// `role` defaults to what the name usually means: `backing` is copy-on-write, anything
    /// else a format's image file. Filters and raw pass `.filteredPrimary`.
    public init(name: String, role: ChildRole? = nil, node: BlockNode) {
        self.name = name
        self.role = role ?? (name == "backing" ? .backing : .image)
        target = node
        state = Mutex(EdgeState())
    }

    /// The child node (for requests in flight in the parent, or the graph lock holder).
    @inline(__always)
    public var node: BlockNode { target }

    /// Re-points the edge. The caller holds the graph's change lock and has drained `parent`
    /// and every node above it (`BlockGraph` does both).
    public func replace(with newNode: BlockNode, parent: BlockNode) {
        precondition(parent.isDrained, "graph change outside a drained section of '\(parent.nodeName)'")
        target = newNode
    }

    /// Re-points an edge of a driver that is not part of the graph yet (being opened).
    public func replaceUnpublished(with newNode: BlockNode) {
        target = newNode
    }

    /// A job relies on this edge: graph changes that would replace or remove it are refused.
    public var frozenBy: String? {
        get { state.withLock { $0.frozenBy } }
        set { state.withLock { $0.frozenBy = newValue } }
    }

    /// What the parent takes on the child and shares with the child's other users, as the
    /// graph last checked it.
    public var permissions: PermissionPair {
        get { state.withLock { $0.permissions } }
        set { state.withLock { $0.permissions = newValue } }
    }

    /// Order among the child's parents (newer edges have larger serials); set by the graph.
    public var serial: UInt64 {
        get { state.withLock { $0.serial } }
        set { state.withLock { $0.serial = newValue } }
    }

    /// A job's implicit filter this edge sits under (`PermissionFilter`), if any.
    public var permissionFilter: PermissionFilter? {
        get { state.withLock { $0.filter } }
        set { state.withLock { $0.filter = newValue } }
    }
}
