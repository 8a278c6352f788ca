import BlockCore
import BlockDrivers
import BlockGraph
import EventLoop

/// What `BlockdevFactory` opens nodes in: the daemon's `BlockGraph` (lookups, names, and
/// `register`, which checks the new node's permissions), plus what drivers need from the
/// daemon while they open — the event loops (`nbd` nodes do their I/O on them) and the TLS
/// objects (`nbd`'s `tls-creds`). The graph itself knows no driver, so the composition root
/// puts the two together here.
final class DaemonNodeRegistry: NodeRegistry, Sendable {
    let graph: BlockGraph
    let eventLoops: EventLoopGroup?
    let nbdClientTLS: (any NBDClientTLSProvider)?

    init(graph: BlockGraph, eventLoops: EventLoopGroup?, nbdClientTLS: (any NBDClientTLSProvider)?) {
        self.graph = graph
        self.eventLoops = eventLoops
        self.nbdClientTLS = nbdClientTLS
    }

    func node(named name: String) -> BlockNode? { graph.node(named: name) }
    func makeAutoName() -> String { graph.makeAutoName() }
    func register(_ node: BlockNode) throws(BlockError) { try graph.register(node) }
}
