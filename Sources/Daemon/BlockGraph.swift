import BlockCore
import BlockDrivers
import EventLoop
import Synchronization

/// The named nodes of the daemon. Graph changes are serialised by the caller (the control
/// lock); lookups may come from any thread.
public final class BlockGraph: NodeRegistry, @unchecked Sendable {
    private let state = Mutex<(nodes: [String: BlockNode], order: [String], counter: Int)>(([:], [], 0))

    /// The daemon's event loops (set once by `Daemon.init`), for `nbd` nodes.
    public let eventLoops: EventLoopGroup?
    /// `tls-creds` of `nbd` nodes: the daemon's TLS objects.
    public let nbdClientTLS: (any NBDClientTLSProvider)?

    public init(eventLoops: EventLoopGroup? = nil, nbdClientTLS: (any NBDClientTLSProvider)? = nil) {
        self.eventLoops = eventLoops
        self.nbdClientTLS = nbdClientTLS
    }

    public func node(named name: String) -> BlockNode? {
        state.withLock { $0.nodes[name] }
    }

    public func makeAutoName() -> String {
        state.withLock { s in
            s.counter += 1
            return "#block\(String(s.counter * 100 + 17))"
        }
    }

    public func register(_ node: BlockNode) throws(BlockError) {
        let clash = state.withLock { s -> Bool in
            if s.nodes[node.nodeName] != nil { return true }
            s.nodes[node.nodeName] = node
            s.order.append(node.nodeName)
            return false
        }
        if clash { throw BlockError.invalid("Duplicate nodes with node-name='\(node.nodeName)'") }
    }

    public func unregister(_ node: BlockNode) {
        state.withLock { s in
            s.nodes[node.nodeName] = nil
            s.order.removeAll { $0 == node.nodeName }
        }
    }

    /// Nodes in creation order.
    public var all: [BlockNode] {
        state.withLock { s in s.order.compactMap { s.nodes[$0] } }
    }

    /// Nodes that have `node` as a child.
    public func parents(of node: BlockNode) -> [BlockNode] {
        all.filter { p in p.children.contains { $0.node === node } }
    }
}
