/// An edge of the block graph: a parent driver's use of a child node.
///
/// `node` changes only inside a drained section of the parent (no request in flight through
/// this edge), which is what makes the unsynchronised read on the request path safe; the
/// drain's own lock orders the change before the next request.
public final class BlockChild: @unchecked Sendable {
    /// The edge name QEMU uses: `file`, `backing`, `filtered` (shown as `file` by QEMU for filters).
    public let name: String
    public private(set) var node: BlockNode
    /// A job relies on this edge: graph changes that would replace or remove it are refused.
    public var frozenBy: String?

    public init(name: String, node: BlockNode) {
        self.name = name
        self.node = node
    }

    /// Re-points the edge. The caller holds the graph's change lock and has drained the parent.
    public func replace(with newNode: BlockNode) {
        node = newNode
    }
}
