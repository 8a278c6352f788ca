#if canImport(Glibc)
import Glibc
#endif

/// Walking and freezing backing chains, with filters skipped where QEMU skips them.
///
/// Vocabulary (QEMU's): the *filtered-or-COW child* of a node is a filter's `filtered`/`file`
/// child or a format node's `backing` child: the edge a chain walk follows. Filters are
/// transparent: `skippingFilters()` goes through them to the first data node.
extension BlockNode {
    /// The edge a chain walk follows from this node: a filter's filtered child, otherwise the
    /// backing child (nil for a node with no backing).
    public var chainChild: BlockChild? {
        if isFilter { return children.first }
        return driver.backingChild
    }

    /// This node, then each node down the chain through filters and backing links.
    public var chain: [BlockNode] {
        var out: [BlockNode] = [self]
        var node = self
        while let next = node.chainChild?.node {
            out.append(next)
            node = next
        }
        return out
    }

    /// Whether `other` is this node or lies below it in its chain.
    public func chainContains(_ other: BlockNode) -> Bool { chain.contains { $0 === other } }

    /// The job that froze an edge of this node, if any (for `blockdev-del` and friends).
    public var frozenChildren: [BlockChild] { children.filter { $0.frozenBy != nil } }
}

/// The edges one job relies on, frozen together; `unfreeze()` releases them.
public struct FrozenChain: Sendable {
    public let owner: String
    public let edges: [BlockChild]

    /// Freezes the chain edges from `top` down to and including the edge *into* `bottom`
    /// (QEMU's `bdrv_freeze_backing_chain(top, bottom's child)`): each node from `top` to the
    /// node above `bottom` keeps its chain child. Fails, changing nothing, when an edge is
    /// already frozen by another job or `bottom` is not in `top`'s chain.
    public static func freeze(from top: BlockNode, through bottom: BlockNode,
                              owner: String) throws(BlockError) -> FrozenChain {
        var edges: [BlockChild] = []
        var node = top
        while node !== bottom {
            guard let edge = node.chainChild else {
                throw BlockError.invalid("'\(bottom.nodeName)' is not in the backing chain of '\(top.nodeName)'")
            }
            if let other = edge.frozenBy {
                throw BlockError(EBUSY, "Node '\(node.nodeName)' is busy: its '\(edge.name)' link to '\(edge.node.nodeName)' is frozen by block job '\(other)'")
            }
            edges.append(edge)
            node = edge.node
        }
        for edge in edges { edge.frozenBy = owner }
        return FrozenChain(owner: owner, edges: edges)
    }

    public func unfreeze() {
        for edge in edges where edge.frozenBy == owner { edge.frozenBy = nil }
    }
}

/// Where a block-stream job reads from and stops, resolved as the design in `docs/jobs.md`.
///
/// ```
///  base ◀─ [filters] ◀─ aboveBase … baseOverlay ◀─ … ◀─ top ◀─ [filters] ◀─ device
///          not frozen ──┘└──────────── frozen by the job ──────────┘
/// ```
public struct StreamPlan: Sendable {
    /// The node data is copied into: the first non-filter at or below `device`.
    public let top: BlockNode
    /// The lowest non-filter node whose data is copied.
    public let baseOverlay: BlockNode
    /// The node directly above `base` (a filter or `baseOverlay` itself): the edge below it
    /// is *not* frozen, so at the end `aboveBase`'s child then is top's new backing.
    public let aboveBase: BlockNode
    /// The node named as base when the job started (nil: stream everything).
    public let base: BlockNode?

    /// The base as the graph has it now: whatever `aboveBase`'s chain child is.
    public var currentBase: BlockNode? { aboveBase.chainChild?.node }

    /// Resolves `device`, `base`/`base-node` (already looked up) and `bottom`.
    public static func resolve(device: BlockNode, base: BlockNode?, bottom: BlockNode?) throws(BlockError) -> StreamPlan {
        let top = device.skippingFilters()
        let chain = top.chain
        var base = base
        if let bottom {
            if bottom.isFilter {
                throw BlockError.invalid("Block node '\(bottom.nodeName)' is a filter; 'bottom' must be a data node")
            }
            guard let k = chain.firstIndex(where: { $0 === bottom }), k > 0 else {
                throw BlockError.invalid("Node '\(bottom.nodeName)' is not a backing image of '\(top.nodeName)'")
            }
            base = bottom.backingSkippingFilters()
        }
        let baseIndex: Int
        if let b = base {
            guard let i = chain.firstIndex(where: { $0 === b }), i > 0 else {
                throw BlockError.invalid("Node '\(b.nodeName)' is not a backing image of '\(top.nodeName)'")
            }
            baseIndex = i
        } else {
            baseIndex = chain.count
        }
        // The lowest data node above base; top itself when nothing lies between.
        let baseOverlay = chain[0..<baseIndex].last(where: { !$0.isFilter })!
        return StreamPlan(top: top, baseOverlay: baseOverlay, aboveBase: chain[baseIndex - 1], base: base)
    }
}
