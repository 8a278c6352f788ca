import BlockCore
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The block graph of the daemon: named nodes, the roots that use them (exports, jobs), and
/// every change to their edges, each checked against QEMU's permission rules in one place
/// (`PermissionCheck`) before it is made.
///
/// Threads: graph changes come from the control context (QMP commands, job completion) and
/// take the graph's change lock; a changed edge is re-pointed inside a drained section of its
/// parent and everything above it, so requests never see a half-made change. Lookups
/// (`node(named:)`) may come from any thread.
///
/// Ownership follows QEMU's reference counting: a node stays while the monitor owns it
/// (`blockdev-add` created it by name at the top level) or while anything uses it (a parent
/// edge or a root). A node only its users kept (an inline or implicit child, a streamed-away
/// backing file) is closed when its last user goes (`release`).
public final class BlockGraph: Sendable {
    private struct State {
        var nodes: [String: BlockNode] = [:]
        /// Creation order (`query-named-block-nodes` lists newest first).
        var order: [BlockNode] = []
        var roots: [BlockRoot] = []
        var monitorOwned = Set<ObjectIdentifier>()
        var counter = 0
        var serial: UInt64 = 0
        /// What each node's driver was last told its users take and share
        /// (`BlockDriver.setPermissions`).
        var driverPermissions: [ObjectIdentifier: PermissionPair] = [:]
    }
    private let state = Mutex(State())
    /// Serialises graph changes (recursive: a job's completion composes several).
    public let changeLock = RecursiveLock()

    public init() {}

    /// Runs `body` holding the change lock (graph reads that must not race with a change).
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        try changeLock.withLock(body)
    }

    // MARK: lookups

    public func node(named name: String) -> BlockNode? {
        state.withLock { $0.nodes[name] }
    }

    public func makeAutoName() -> String {
        state.withLock { s in
            s.counter += 1
            return "#block\(String(s.counter * 100 + 17))"
        }
    }

    /// Nodes in creation order.
    public var all: [BlockNode] { state.withLock { $0.order } }

    /// Roots (exports, jobs' holds), oldest first.
    public var roots: [BlockRoot] { state.withLock { $0.roots } }

    /// Whether `node` is still part of the graph (not deleted or replaced).
    public func contains(_ node: BlockNode) -> Bool {
        state.withLock { $0.nodes[node.nodeName] === node }
    }

    /// Nodes that have `node` as a child.
    public func parents(of node: BlockNode) -> [BlockNode] {
        all.filter { p in p.children.contains { $0.node === node } }
    }

    /// Roots that use `node`.
    public func roots(of node: BlockNode) -> [BlockRoot] {
        roots.filter { $0.node === node }
    }

    /// Every node above `node`, topmost first (the order to drain them in).
    public func ancestors(of node: BlockNode) -> [BlockNode] {
        let nodes = all
        var out: [BlockNode] = []
        func visit(_ n: BlockNode) {
            for p in nodes where p.children.contains(where: { $0.node === n }) && !out.contains(where: { $0 === p }) {
                visit(p)
                if !out.contains(where: { $0 === p }) { out.append(p) }
            }
        }
        visit(node)
        return out
    }

    /// The nodes to drain before changing `node`'s edges or users: everything above it, then
    /// the node itself.
    public func drainSet(_ nodes: [BlockNode]) -> [BlockNode] {
        var out: [BlockNode] = []
        for n in nodes {
            for a in ancestors(of: n) + [n] where !out.contains(where: { $0 === a }) { out.append(a) }
        }
        return out
    }

    /// The job holds (roots of kind `.job`) on `node`, newest first.
    public func jobRoots(on node: BlockNode) -> [BlockRoot] {
        roots.filter { $0.node === node && $0.jobType != nil }.sorted { $0.serial > $1.serial }
    }

    // MARK: monitor ownership

    /// Marks `node` as owned by the monitor (created by name with `blockdev-add`): it stays
    /// in the graph until `blockdev-del`, whoever else uses it.
    public func setMonitorOwned(_ node: BlockNode) {
        state.withLock { _ = $0.monitorOwned.insert(ObjectIdentifier(node)) }
    }

    public func isMonitorOwned(_ node: BlockNode) -> Bool {
        state.withLock { $0.monitorOwned.contains(ObjectIdentifier(node)) }
    }

    // MARK: adding nodes

    func nextSerial() -> UInt64 {
        state.withLock { s in
            s.serial += 1
            return s.serial
        }
    }

    var snapshot: (nodes: [BlockNode], roots: [BlockRoot]) {
        state.withLock { ($0.order, $0.roots) }
    }

    func check(_ proposal: Proposal, from starts: [BlockNode], loosening: Bool = false) throws(BlockError) -> PermissionOutcome {
        let s = snapshot
        return try PermissionCheck(nodes: s.nodes, roots: s.roots, proposal: proposal).run(from: starts, loosening: loosening)
    }

    /// Stores what a passed check decided, and tells the drivers (loosening their image locks;
    /// what tightens was told before the change by `prepareDrivers`).
    func commit(_ outcome: PermissionOutcome) {
        let s = snapshot
        var edges: [ObjectIdentifier: BlockChild] = [:]
        for n in s.nodes { for e in n.children { edges[ObjectIdentifier(e)] = e } }
        for (id, p) in outcome.edges { edges[id]?.permissions = p }
        for (node, cumulative) in outcome.granted { node.setGranted(cumulative.perm) }
        for (node, cumulative) in outcome.granted {
            do throws(BlockError) { try tellDriver(node, cumulative) } catch {
                // Only a tightening can fail, and those were told before the change.
                Log.warning("node '\(node.nodeName)': \(error.message)")
            }
        }
        // Whether each node has an asynchronous path may change with any edge: a hint for
        // exports, which read no edge (`BlockNode.supportsAsync`).
        for n in s.nodes { n.refreshAsyncHint() }
    }

    /// What `node`'s driver was last told its users take and share.
    func driverPermissions(of node: BlockNode) -> PermissionPair? {
        state.withLock { $0.driverPermissions[ObjectIdentifier(node)] }
    }

    /// Tells `node`'s driver what its users take and share, if that changed.
    func tellDriver(_ node: BlockNode, _ cumulative: PermissionPair) throws(BlockError) {
        let id = ObjectIdentifier(node)
        if state.withLock({ $0.driverPermissions[id] }) == cumulative { return }
        try node.driver.setPermissions(cumulative)
        state.withLock { $0.driverPermissions[id] = cumulative }
    }

    /// What `prepareDrivers` changed, to give back if the graph change does not happen.
    struct DriverPermissionChanges {
        fileprivate var previous: [(node: BlockNode, cumulative: PermissionPair?)] = []
    }

    /// Tells the drivers below a checked change what their users will take and share, before
    /// the change is made (QEMU's `bdrv_check_perm` reaching the file driver's
    /// `raw_check_perm`): the file driver takes the lock bytes, and refuses when another
    /// process holds a conflicting one. On a refusal the drivers told so far get their
    /// previous permissions back and the error is thrown: the change is refused, as a
    /// permission conflict inside the graph would be.
    func prepareDrivers(_ outcome: PermissionOutcome) throws(BlockError) -> DriverPermissionChanges {
        var changes = DriverPermissionChanges()
        for (node, cumulative) in outcome.granted {
            let previous = state.withLock { $0.driverPermissions[ObjectIdentifier(node)] }
            if previous == cumulative { continue }
            do throws(BlockError) {
                try tellDriver(node, cumulative)
            } catch {
                revert(changes)
                throw error
            }
            changes.previous.append((node, previous))
        }
        return changes
    }

    /// Gives the drivers `prepareDrivers` told their previous permissions back (the change
    /// was not made). Loosening: never fails.
    func revert(_ changes: DriverPermissionChanges) {
        for (node, previous) in changes.previous.reversed() {
            try? tellDriver(node, previous ?? .none)
        }
    }

    /// Recomputes and stores the permissions below `starts` for the graph as it is now (after
    /// a change was applied). Never fails a change that passed its check: the same graph
    /// gives the same answer; `loosening` changes (users went away) ignore conflicts.
    func refresh(from starts: [BlockNode], loosening: Bool = false) {
        do throws(BlockError) {
            let outcome = try check(Proposal(), from: starts, loosening: loosening)
            commit(outcome)
        } catch {
            // Only reachable if a change that passed its check is refused afterwards.
            assertionFailure("permission refresh after an accepted change failed: \(error.message)")
        }
    }

    /// Adds a node created by the factory (through the daemon's `NodeRegistry`): its edges become users of its
    /// children, checked one by one in the order the driver lists them (QEMU attaches `file`,
    /// then `backing`). Throws, changing nothing, on a duplicate name or a conflict.
    public func register(_ node: BlockNode) throws(BlockError) {
        try changeLock.withLock { () throws(BlockError) in
            if self.node(named: node.nodeName) != nil {
                throw BlockError.invalid("Duplicate nodes with node-name='\(node.nodeName)'")
            }
            let edges = node.children
            var proposal = Proposal()
            proposal.addedNodes = [node]
            var serials: [ObjectIdentifier: UInt64] = [:]
            for e in edges { serials[ObjectIdentifier(e)] = nextSerial() }
            proposal.serials = serials
            var outcome = PermissionOutcome()
            for k in edges.indices {
                var p = proposal
                p.hiddenEdges = Set(edges[(k + 1)...].map(ObjectIdentifier.init))
                outcome = try check(p, from: [node])
            }
            if edges.isEmpty { outcome = try check(proposal, from: [node]) }
            _ = try prepareDrivers(outcome)
            state.withLock { s in
                s.nodes[node.nodeName] = node
                s.order.append(node)
            }
            for e in edges { e.serial = serials[ObjectIdentifier(e)]! }
            commit(outcome)
        }
    }

    // MARK: roots

    /// Attaches roots (an export, a job's holds) one by one, each checked with the ones
    /// before it (QEMU's order of `blk_insert_bs` / `block_job_add_bdrv` calls). Throws,
    /// changing nothing, at the first conflict.
    public func attach(_ newRoots: [BlockRoot]) throws(BlockError) {
        try changeLock.withLock { () throws(BlockError) in
            var proposal = Proposal()
            var outcome = PermissionOutcome()
            for root in newRoots {
                let serial = nextSerial()
                proposal.addedRoots.append(root)
                proposal.serials[ObjectIdentifier(root)] = serial
                outcome = try check(proposal, from: [root.node])
            }
            if !newRoots.isEmpty {
                outcome = try check(proposal, from: uniqueNodes(newRoots.map(\.node)))
                _ = try prepareDrivers(outcome)
            }
            for root in newRoots { root.serial = proposal.serials[ObjectIdentifier(root)]! }
            state.withLock { $0.roots += newRoots }
            refresh(from: uniqueNodes(newRoots.map(\.node)))
        }
    }

    /// Changes what a root takes and shares (`blk_set_perm`). Throws, changing nothing, when
    /// the new permissions conflict.
    public func setPermissions(_ root: BlockRoot, _ permissions: PermissionPair) throws(BlockError) {
        try changeLock.withLock { () throws(BlockError) in
            var proposal = Proposal()
            proposal.rootPermissions[ObjectIdentifier(root)] = permissions
            let outcome = try check(proposal, from: [root.node])
            _ = try prepareDrivers(outcome)
            root.permissions = permissions
            commit(outcome)
        }
    }

    /// Detaches roots; the nodes they kept that nobody else uses are released.
    public func detach(_ gone: [BlockRoot]) {
        changeLock.withLock {
            let ids = Set(gone.map(ObjectIdentifier.init))
            state.withLock { $0.roots.removeAll { ids.contains(ObjectIdentifier($0)) } }
            let nodes = uniqueNodes(gone.map(\.node))
            refresh(from: nodes, loosening: true)
            for n in nodes { release(n) }
        }
    }

    /// The users a job's implicit filter was installed on (`installFilter`).
    public struct FilterInstallation: Sendable {
        public let node: BlockNode
        public let edges: [BlockChild]
        public let roots: [BlockRoot]
    }

    /// Makes the existing users of `node` (all but jobs' holds) pass their permissions
    /// through `filter`: a job's implicit filter node (see `PermissionFilter`). Throws,
    /// changing nothing, when that makes a conflict.
    public func installFilter(_ filter: PermissionFilter, onUsersOf node: BlockNode) throws(BlockError) -> FilterInstallation {
        try changeLock.withLock { () throws(BlockError) -> FilterInstallation in
            let s = snapshot
            var edges: [BlockChild] = []
            for p in s.nodes { for e in p.children where e.node === node { edges.append(e) } }
            let roots = s.roots.filter { $0.node === node && $0.jobType == nil }
            let oldEdges = edges.map(\.permissionFilter)
            let oldRoots = roots.map(\.permissionFilter)
            for e in edges { e.permissionFilter = filter }
            for r in roots { r.permissionFilter = filter }
            do throws(BlockError) {
                let outcome = try check(Proposal(), from: [node])
                _ = try prepareDrivers(outcome)
                commit(outcome)
            } catch {
                for (e, f) in zip(edges, oldEdges) { e.permissionFilter = f }
                for (r, f) in zip(roots, oldRoots) { r.permissionFilter = f }
                throw error
            }
            return FilterInstallation(node: node, edges: edges, roots: roots)
        }
    }

    /// Removes a filter installed by `installFilter`.
    public func removeFilter(_ installation: FilterInstallation) {
        changeLock.withLock {
            for e in installation.edges { e.permissionFilter = nil }
            for r in installation.roots { r.permissionFilter = nil }
            let nodes = uniqueNodes([installation.node] + installation.edges.map(\.node) + installation.roots.map(\.node))
            refresh(from: nodes, loosening: true)
        }
    }

    func uniqueNodes(_ nodes: [BlockNode]) -> [BlockNode] {
        var out: [BlockNode] = []
        for n in nodes where !out.contains(where: { $0 === n }) { out.append(n) }
        return out
    }

    // MARK: removing nodes

    /// `blockdev-del`: QEMU's checks in QEMU's order and words, then the node goes, with the
    /// children only it used (inline and implicit ones).
    public func delete(_ node: BlockNode) throws(BlockError) {
        try changeLock.withLock { () throws(BlockError) in
            let name = node.nodeName
            let users = roots(of: node)
            if users.contains(where: \.isBackend) {
                throw BlockError(EBUSY, "Node \(name) is in use")
            }
            if let job = jobRoots(on: node).first, let type = job.jobType {
                throw BlockError(EBUSY, "Node '\(name)' is busy: block device is in use by block job: \(type)")
            }
            for parent in parents(of: node) where parent.driver.backingChild?.node === node {
                throw BlockError(EBUSY, "Node '\(name)' is busy: node is used as backing hd of '\(parent.nodeName)'")
            }
            if !isMonitorOwned(node) {
                throw BlockError(EPERM, "Node \(name) is not owned by the monitor")
            }
            if !parents(of: node).isEmpty || !users.isEmpty {
                throw BlockError(EBUSY, "Block device \(name) is in use")
            }
            _ = state.withLock { $0.monitorOwned.remove(ObjectIdentifier(node)) }
            try close(node)
        }
    }

    /// Closes `node` if nothing keeps it: not owned by the monitor, no parent, no root. Its
    /// children are released in turn. QEMU's `bdrv_unref` reaching zero.
    public func release(_ node: BlockNode) {
        changeLock.withLock {
            guard contains(node), !isMonitorOwned(node), parents(of: node).isEmpty, roots(of: node).isEmpty else { return }
            do { try close(node) } catch {}
        }
    }

    /// Removes `node` from the graph, closes its driver, then releases its children.
    private func close(_ node: BlockNode) throws(BlockError) {
        let children = uniqueNodes(node.children.map(\.node))
        var failure: BlockError?
        do throws(BlockError) { try node.driver.close() } catch { failure = error }
        unregister(node)
        refresh(from: children, loosening: true)
        for child in children { release(child) }
        if let failure { throw failure }
    }

    /// Closes and removes nodes just added by a failed operation (a `blockdev-add` whose
    /// later part failed), newest first, and gives their children back what they took.
    public func abandon(_ nodes: [BlockNode]) {
        changeLock.withLock {
            var below: [BlockNode] = []
            for node in nodes.reversed() {
                try? node.driver.close()
                unregister(node)
                below += node.children.map(\.node)
            }
            refresh(from: uniqueNodes(below.filter { contains($0) }), loosening: true)
        }
    }

    /// Puts `new` in `old`'s place in the creation order (a node reopened as another instance).
    func replaceInOrder(_ old: BlockNode, with new: BlockNode) {
        state.withLock { s in
            if let i = s.order.firstIndex(where: { $0 === old }) { s.order.insert(new, at: i) }
        }
    }

    /// Adds a node whose edges were checked with the change that made it (`reopenReadWrite`).
    func insertChecked(_ node: BlockNode) {
        state.withLock { s in
            s.nodes[node.nodeName] = node
            if !s.order.contains(where: { $0 === node }) { s.order.append(node) }
        }
    }

    /// Forgets a node without closing it (the caller closed or replaced it).
    public func unregister(_ node: BlockNode) {
        changeLock.withLock {
            state.withLock { s in
                if s.nodes[node.nodeName] === node { s.nodes[node.nodeName] = nil }
                s.order.removeAll { $0 === node }
                s.monitorOwned.remove(ObjectIdentifier(node))
                s.driverPermissions[ObjectIdentifier(node)] = nil
            }
        }
    }

    /// Closes every node, users before the nodes they use (daemon shutdown).
    public func closeAll(report: (BlockNode, BlockError) -> Void) {
        changeLock.withLock {
            var remaining = all
            while !remaining.isEmpty {
                let tops = remaining.filter { n in !remaining.contains { p in p.children.contains { $0.node === n } } }
                for node in tops.isEmpty ? remaining : tops {
                    do throws(BlockError) { try node.driver.close() } catch { report(node, error) }
                    unregister(node)
                }
                remaining.removeAll { n in tops.isEmpty || tops.contains { $0 === n } }
            }
        }
    }
}
