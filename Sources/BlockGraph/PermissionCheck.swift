import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// A graph change not made yet: what the permission check looks at instead of the graph as it
/// is. Every graph operation describes its change as a proposal, checks it, and applies it
/// only when the check passed, so a refused change leaves the graph exactly as it was.
struct Proposal {
    /// Nodes being added (their edges are new users of their children).
    var addedNodes: [BlockNode] = []
    /// Nodes being deleted (their edges go away).
    var removedNodes: Set<ObjectIdentifier> = []
    var addedRoots: [BlockRoot] = []
    var removedRoots: Set<ObjectIdentifier> = []
    /// Edges and roots re-pointed: identifier of the `BlockChild`/`BlockRoot` → new node.
    var retarget: [ObjectIdentifier: BlockNode] = [:]
    /// Edges that go away (a backing edge dropped or replaced by a new one).
    var hiddenEdges: Set<ObjectIdentifier> = []
    /// Edges that a driver will create when the change is applied (a new backing edge).
    var newEdges: [NewEdge] = []
    /// Roots whose permissions change.
    var rootPermissions: [ObjectIdentifier: PermissionPair] = [:]
    /// Serials of users that become the newest parents of their node.
    var serials: [ObjectIdentifier: UInt64] = [:]

    struct NewEdge {
        let parent: BlockNode
        let name: String
        let role: ChildRole
        let target: BlockNode
        let serial: UInt64
    }
}

/// The result of a passed check: what to store on edges and nodes.
struct PermissionOutcome {
    var edges: [ObjectIdentifier: PermissionPair] = [:]
    var newEdges: [Int: PermissionPair] = [:]
    /// What each visited node's users take and share, in the order visited (parents first).
    var granted: [(node: BlockNode, cumulative: PermissionPair)] = []
}

/// QEMU's permission refresh (`bdrv_list_refresh_perms`): visits the nodes below the changed
/// ones in topological order (parents first); for each, checks every pair of its users
/// (`bdrv_a_allow_b`: what one takes, the other must share), that a read-only node has no
/// writer, then computes what the node takes on each of its children from what its users
/// take (`BlockDriver.childPermissions`). The first failure is the error, in QEMU's words.
struct PermissionCheck {
    let nodes: [BlockNode]
    let roots: [BlockRoot]
    let proposal: Proposal

    /// One user of a node, as the check sees it.
    struct User {
        enum Kind {
            case edge(BlockChild, parent: BlockNode)
            case newEdge(Int, parent: BlockNode)
            case root(BlockRoot)
        }
        let kind: Kind
        let id: ObjectIdentifier?
        let serial: UInt64
        let childName: String
        let filter: PermissionFilter?

        var description: String {
            switch kind {
            case .edge(_, let parent), .newEdge(_, let parent): return "node '\(parent.nodeName)'"
            case .root(let root): return root.userDescription
            }
        }
    }

    private var allNodes: [BlockNode] {
        nodes.filter { !proposal.removedNodes.contains(ObjectIdentifier($0)) } + proposal.addedNodes
    }

    private var allRoots: [BlockRoot] {
        roots.filter { !proposal.removedRoots.contains(ObjectIdentifier($0)) } + proposal.addedRoots
    }

    /// The node an edge leads to under the proposal (nil: the edge goes away).
    func target(of edge: BlockChild) -> BlockNode? {
        let id = ObjectIdentifier(edge)
        if proposal.hiddenEdges.contains(id) { return nil }
        return proposal.retarget[id] ?? edge.node
    }

    func target(of root: BlockRoot) -> BlockNode {
        proposal.retarget[ObjectIdentifier(root)] ?? root.node
    }

    /// The children of `node` under the proposal: (edge or new-edge index, role, target).
    func children(of node: BlockNode) -> [(edge: BlockChild?, newIndex: Int?, target: BlockNode)] {
        var out: [(BlockChild?, Int?, BlockNode)] = []
        for edge in node.children {
            if let t = target(of: edge) { out.append((edge, nil, t)) }
        }
        for (i, e) in proposal.newEdges.enumerated() where e.parent === node {
            out.append((nil, i, e.target))
        }
        return out
    }

    /// The users of `node`, newest first (QEMU inserts a new parent at the head of the list).
    func users(of node: BlockNode) -> [User] {
        var out: [User] = []
        for parent in allNodes {
            for edge in parent.children where target(of: edge) === node {
                let id = ObjectIdentifier(edge)
                out.append(User(kind: .edge(edge, parent: parent), id: id,
                                serial: proposal.serials[id] ?? edge.serial, childName: edge.name,
                                filter: edge.permissionFilter))
            }
            for (i, e) in proposal.newEdges.enumerated() where e.parent === parent && e.target === node {
                out.append(User(kind: .newEdge(i, parent: parent), id: nil, serial: e.serial, childName: e.name, filter: nil))
            }
        }
        for root in allRoots where target(of: root) === node {
            let id = ObjectIdentifier(root)
            out.append(User(kind: .root(root), id: id, serial: proposal.serials[id] ?? root.serial,
                            childName: root.name, filter: root.permissionFilter))
        }
        return out.sorted { $0.serial > $1.serial }
    }

    /// The nodes at and below `starts`, parents before children: QEMU's
    /// `bdrv_topological_dfs`, which prepends each node after its subtree (so of two children
    /// the later one's subtree comes first), called for each start in turn.
    func topologicalOrder(_ starts: [BlockNode]) -> [BlockNode] {
        var found = Set<ObjectIdentifier>()
        func dfs(_ list: [BlockNode], _ node: BlockNode) -> [BlockNode] {
            if !found.insert(ObjectIdentifier(node)).inserted { return list }
            var l = list
            for child in children(of: node) { l = dfs(l, child.target) }
            return [node] + l
        }
        var list: [BlockNode] = []
        for s in starts { list = dfs(list, s) }
        return list
    }

    /// Checks the proposal from `starts` down. With `loosening` (users only went away) a
    /// conflict is not an error: QEMU ignores failures when permissions only relax.
    func run(from starts: [BlockNode], loosening: Bool = false) throws(BlockError) -> PermissionOutcome {
        var outcome = PermissionOutcome()
        for node in topologicalOrder(starts) {
            let users = users(of: node)
            func effective(_ u: User) -> PermissionPair {
                var p: PermissionPair
                switch u.kind {
                case .edge(let edge, _): p = outcome.edges[ObjectIdentifier(edge)] ?? edge.permissions
                case .newEdge(let i, _): p = outcome.newEdges[i] ?? .none
                case .root(let root): p = proposal.rootPermissions[ObjectIdentifier(root)] ?? root.permissions
                }
                if let f = u.filter { p = f.apply(p) }
                return p
            }
            let perms = users.map(effective)
            if !loosening {
                // bdrv_parent_perms_conflict: every ordered pair; the first that fails.
                for (i, a) in users.enumerated() {
                    for (j, b) in users.enumerated() where i != j {
                        let missing = perms[j].perm.subtracting(perms[i].shared)
                        if missing.isEmpty { continue }
                        throw BlockError(EPERM, "Permission conflict on node '\(node.nodeName)': permissions '\(missing.names)' are both required by \(b.description) (uses node '\(node.nodeName)' as '\(b.childName)' child) and unshared by \(a.description) (uses node '\(node.nodeName)' as '\(a.childName)' child).")
                    }
                }
            }
            var cumulative = PermissionPair(perm: [], shared: .all)
            for p in perms {
                cumulative.perm.formUnion(p.perm)
                cumulative.shared.formIntersection(p.shared)
            }
            // Write permissions never work with read-only nodes.
            if !loosening && !cumulative.perm.isDisjoint(with: [.write, .writeUnchanged]) && node.isReadOnly {
                throw BlockError(EPERM, "Block node is read-only")
            }
            outcome.granted.append((node, cumulative))
            for child in children(of: node) {
                let role = child.edge?.role ?? proposal.newEdges[child.newIndex!].role
                let edge = child.edge ?? BlockChild(name: proposal.newEdges[child.newIndex!].name, role: role, node: child.target)
                let p = node.driver.childPermissions(for: edge, parent: cumulative, writable: !node.isReadOnly,
                                                     hasUsers: !users.isEmpty)
                if let e = child.edge {
                    outcome.edges[ObjectIdentifier(e)] = p
                } else {
                    outcome.newEdges[child.newIndex!] = p
                }
            }
        }
        return outcome
    }
}
