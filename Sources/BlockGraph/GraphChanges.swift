import BlockCore
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// Graph operations: every one checks frozen links, cycles and permissions first (changing
/// nothing on an error), then makes the change inside one drained section of the changed
/// nodes and everything above them, then stores the new permissions and releases the nodes
/// nobody uses any more.
extension BlockGraph {
    /// One edge to change.
    public enum EdgeChange: Sendable {
        /// A format node's backing: another node, or none.
        case backing(of: BlockNode, to: BlockNode?)
        /// A filter's filtered (`file`) child.
        case filtered(of: BlockNode, to: BlockNode)

        var parent: BlockNode {
            switch self {
            case .backing(let p, _), .filtered(let p, _): return p
            }
        }
    }

    /// Changes edges (`blockdev-reopen`, stream and commit completion) and runs the drivers'
    /// own reopen changes (`apply`) in the same drained section. Throws, changing nothing,
    /// on a frozen link, a cycle or a permission conflict (QEMU's words). `first` runs in
    /// the drained section before any edge changes (a job rewriting the image's backing file
    /// name); when it throws, nothing changes.
    public func change(_ changes: [EdgeChange], first: (() throws(BlockError) -> Void)? = nil,
                       apply: [@Sendable () -> Void] = []) throws(BlockError) {
        try changeLock.withLock { () throws(BlockError) in
            var proposal = Proposal()
            var starts: [BlockNode] = []
            var oldChildren: [BlockNode] = []
            for change in changes {
                let parent = change.parent
                switch change {
                case .backing(_, let target):
                    let edge = parent.driver.backingChild
                    if let edge, let job = edge.frozenBy {
                        _ = job
                        throw BlockError(EPERM, "Cannot change frozen 'backing' link from '\(parent.nodeName)' to '\(edge.node.nodeName)'")
                    }
                    if let target, target.chainContains(parent) || target === parent {
                        throw BlockError.invalid("Making '\(target.nodeName)' a backing child of '\(parent.nodeName)' would create a cycle")
                    }
                    if let edge {
                        proposal.hiddenEdges.insert(ObjectIdentifier(edge))
                        oldChildren.append(edge.node)
                    }
                    if let target {
                        proposal.newEdges.append(.init(parent: parent, name: "backing", role: .backing, target: target,
                                                       serial: nextSerial()))
                    }
                case .filtered(_, let target):
                    guard let edge = parent.chainChild, parent.isFilter else {
                        throw BlockError.invalid("Node '\(parent.nodeName)' is not a filter")
                    }
                    if edge.frozenBy != nil {
                        throw BlockError(EPERM, "Cannot change frozen '\(edge.name)' link from '\(parent.nodeName)' to '\(edge.node.nodeName)'")
                    }
                    if target.chainContains(parent) || target === parent {
                        throw BlockError.invalid("Making '\(target.nodeName)' a child of '\(parent.nodeName)' would create a cycle")
                    }
                    proposal.retarget[ObjectIdentifier(edge)] = target
                    proposal.serials[ObjectIdentifier(edge)] = nextSerial()
                    oldChildren.append(edge.node)
                }
                if !starts.contains(where: { $0 === parent }) { starts.append(parent) }
            }
            let outcome = try check(proposal, from: starts + uniqueNodes(oldChildren))
            let told = try prepareDrivers(outcome)
            // Checked: make the change.
            var failure: BlockError?
            BlockNode.withDrained(drainSet(starts)) {
                if let first {
                    do throws(BlockError) { try first() } catch {
                        failure = error
                        return
                    }
                }
                for change in changes {
                    switch change {
                    case .backing(let parent, let target):
                        do throws(BlockError) {
                            try parent.driver.setBacking(target, drained: parent)
                        } catch {
                            failure = error
                            return
                        }
                        if let edge = parent.driver.backingChild, let serial = proposal.newEdges.first(where: { $0.parent === parent })?.serial {
                            edge.serial = serial
                        }
                    case .filtered(let parent, let target):
                        let edge = parent.chainChild!
                        edge.replace(with: target, parent: parent)
                        edge.serial = proposal.serials[ObjectIdentifier(edge)]!
                    }
                }
                for f in apply { f() }
            }
            if let failure {
                revert(told)
                throw failure
            }
            refresh(from: starts + uniqueNodes(oldChildren))
            for old in uniqueNodes(oldChildren) { release(old) }
        }
    }

    /// Makes `new` take `old`'s place for every user of `old` (QEMU's `bdrv_replace_node`):
    /// parent edges and exports are re-pointed; jobs' holds stay on `old`, and a parent that
    /// `new` already lies below keeps its edge (it would make a cycle: that is how a filter
    /// inserted above `old` keeps its own child). Throws, changing nothing, on a frozen edge
    /// or a permission conflict. `old` stays in the graph; release it if nothing keeps it.
    public func replace(_ old: BlockNode, with new: BlockNode) throws(BlockError) {
        try replace(old, with: new, drain: true)
    }

    /// `replace` for a caller already inside a drained section of `old` and everything above
    /// it (active commit's and mirror's switch).
    public func replaceDrained(_ old: BlockNode, with new: BlockNode) throws(BlockError) {
        try replace(old, with: new, drain: false)
    }

    /// Both `replace`s: `drain` says whether the move needs its own drained section.
    private func replace(_ old: BlockNode, with new: BlockNode, drain: Bool) throws(BlockError) {
        try changeLock.withLock { () throws(BlockError) in
            let (edges, roots) = usersToMove(from: old, to: new)
            var proposal = Proposal()
            for (edge, _) in edges where edge.frozenBy != nil {
                throw BlockError(EPERM, "Cannot change '\(edge.name)' link to '\(old.nodeName)'")
            }
            for id in edges.map({ ObjectIdentifier($0.0) }) + roots.map({ ObjectIdentifier($0) }) {
                proposal.retarget[id] = new
                proposal.serials[id] = nextSerial()
            }
            _ = try prepareDrivers(try check(proposal, from: [new, old]))
            if drain {
                BlockNode.withDrained(drainSet([old])) {
                    moveUsers(edges: edges, roots: roots, from: old, to: new, serials: proposal.serials)
                }
            } else {
                moveUsers(edges: edges, roots: roots, from: old, to: new, serials: proposal.serials)
            }
            refresh(from: [new, old])
        }
    }

    private func usersToMove(from old: BlockNode, to new: BlockNode) -> ([(BlockChild, BlockNode)], [BlockRoot]) {
        var edges: [(BlockChild, BlockNode)] = []
        for parent in all where parent !== new {
            // A parent reachable from `new` would make a cycle (QEMU's should_update_child).
            if new.reaches(parent) { continue }
            for edge in parent.children where edge.node === old { edges.append((edge, parent)) }
        }
        let roots = self.roots.filter { $0.node === old && $0.jobType == nil }
        return (edges, roots)
    }

    private func moveUsers(edges: [(BlockChild, BlockNode)], roots: [BlockRoot], from old: BlockNode, to new: BlockNode,
                           serials: [ObjectIdentifier: UInt64]) {
        for (edge, parent) in edges {
            edge.replace(with: new, parent: parent)
            edge.serial = serials[ObjectIdentifier(edge)]!
        }
        for root in roots {
            root.replace(with: new, drained: old)
            root.serial = serials[ObjectIdentifier(root)]!
        }
    }

    /// Puts `filter` (a filter node whose child is `node`, just added) in `node`'s place for
    /// every user of `node` (QEMU's `bdrv_insert_node` / `bdrv_append`): the way a backup's
    /// copy-before-write filter or a throttle goes in above a node clients already use.
    public func insertFilter(_ filter: BlockNode, above node: BlockNode) throws(BlockError) {
        guard filter.isFilter, filter.chainChild?.node === node else {
            throw BlockError.invalid("Node '\(filter.nodeName)' is not a filter of '\(node.nodeName)'")
        }
        try replace(node, with: filter)
    }

    /// Takes a filter out: its users get the filter's child back (QEMU's `bdrv_drop_filter`);
    /// the filter is released unless the monitor owns it.
    public func dropFilter(_ filter: BlockNode) throws(BlockError) {
        guard filter.isFilter, let child = filter.chainChild?.node else {
            throw BlockError.invalid("Node '\(filter.nodeName)' is not a filter")
        }
        try replace(filter, with: child)
        release(filter)
    }

    /// QEMU reopens a commit's base read-write (`bdrv_reopen_set_read_only`). blockd opens a
    /// new writable driver instance of the same image over a new writable file node (nothing
    /// was ever written through the read-only ones: `BlockDriver.reopened`, which keeps the
    /// drivers' options; the nodes keep theirs), checks the permissions with the new nodes in
    /// the old ones' place, switches every user over in a drained section, moves the
    /// in-memory bitmaps, and closes the old instances. Node names and their place in the
    /// listing stay. The old file's image locks are dropped while the new one takes its own
    /// (they would refuse it: another open file description), and taken back if that fails.
    /// Returns the new node.
    public func reopenReadWrite(_ node: BlockNode) throws(BlockError) -> BlockNode {
        try changeLock.withLock { () throws(BlockError) -> BlockNode in
            guard node.isReadOnly else { return node }
            for parent in parents(of: node) {
                for edge in parent.children where edge.node === node {
                    if let job = edge.frozenBy {
                        throw BlockError(EBUSY, "Node '\(node.nodeName)' is busy: its link from '\(parent.nodeName)' is frozen by block job '\(job)'")
                    }
                }
            }
            // The protocol node under the format node is reopened with it, when only it uses it.
            var oldFile: BlockNode?
            var freshFile: BlockNode?
            if let file = node.file {
                let otherUsers = parents(of: file).contains { $0 !== node } || !roots(of: file).isEmpty
                if file.isReadOnly && !otherUsers {
                    let d = try file.driver.reopened(readOnly: false, file: nil, backing: nil)
                    oldFile = file
                    freshFile = BlockNode(name: file.nodeName, driver: d, autoNamed: file.isAutoNamed, options: file.options)
                } else if file.isReadOnly {
                    throw BlockError(EPERM, "Block node '\(node.nodeName)' is read-only and its file '\(file.nodeName)' is used by other nodes: it cannot be reopened read-write")
                }
            }
            let driver: any BlockDriver
            do throws(BlockError) {
                driver = try node.driver.reopened(readOnly: false, file: freshFile ?? node.file, backing: node.backing)
            } catch {
                try? freshFile?.driver.close()
                if error.errno == ENOTSUP {
                    throw BlockError(EPERM, "Block node '\(node.nodeName)' (\(node.driverName)) is read-only and cannot be reopened read-write")
                }
                throw error
            }
            let fresh = BlockNode(name: node.nodeName, driver: driver, autoNamed: node.isAutoNamed, options: node.options)
            // Check: the new nodes in the old ones' place.
            var proposal = Proposal()
            proposal.removedNodes = Set([node] .map(ObjectIdentifier.init) + (oldFile.map { [ObjectIdentifier($0)] } ?? []))
            proposal.addedNodes = (freshFile.map { [$0] } ?? []) + [fresh]
            let (edges, roots) = usersToMove(from: node, to: fresh)
            // The moved users keep their place among the node's parents.
            for (edge, _) in edges {
                proposal.retarget[ObjectIdentifier(edge)] = fresh
                proposal.serials[ObjectIdentifier(edge)] = edge.serial
            }
            for root in roots {
                proposal.retarget[ObjectIdentifier(root)] = fresh
                proposal.serials[ObjectIdentifier(root)] = root.serial
            }
            for e in fresh.children { proposal.serials[ObjectIdentifier(e)] = nextSerial() }
            for e in freshFile?.children ?? [] { proposal.serials[ObjectIdentifier(e)] = nextSerial() }
            // The old file's locks go while the new file takes its own.
            let oldFilePermissions = oldFile.flatMap { driverPermissions(of: $0) }
            if let oldFile { try? tellDriver(oldFile, .none) }
            do throws(BlockError) {
                _ = try prepareDrivers(try check(proposal, from: [fresh]))
            } catch {
                try? driver.close()
                try? freshFile?.driver.close()
                if let oldFile, let oldFilePermissions {
                    do throws(BlockError) { try tellDriver(oldFile, oldFilePermissions) } catch {
                        Log.warning("node '\(oldFile.nodeName)': could not take its image locks back: \(error.message)")
                    }
                }
                throw error
            }
            // Persistent bitmaps were loaded again by the new driver; in-memory ones move over.
            for bitmap in node.dirtyBitmaps where !bitmap.persistent && fresh.dirtyBitmap(named: bitmap.name) == nil {
                node.removeObserver(bitmap)
                fresh.addObserver(bitmap)
            }
            BlockNode.withDrained(drainSet([node])) {
                moveUsers(edges: edges, roots: roots, from: node, to: fresh, serials: proposal.serials)
            }
            for e in fresh.children { e.serial = proposal.serials[ObjectIdentifier(e)]! }
            for e in freshFile?.children ?? [] { e.serial = proposal.serials[ObjectIdentifier(e)]! }
            if let oldFile, let freshFile { substitute(oldFile, with: freshFile) }
            substitute(node, with: fresh)
            refresh(from: [fresh])
            try fresh.driver.activate()
            // The old read-only instances never wrote; closing them only releases fds and caches.
            try? node.driver.close()
            try? oldFile?.driver.close()
            Log.info("reopened '\(node.nodeName)' read-write")
            return fresh
        }
    }

    /// Puts `new` (checked with the change that made it) where `old` was: same name, same
    /// place in the creation order, same monitor ownership; `old` leaves the graph.
    private func substitute(_ old: BlockNode, with new: BlockNode) {
        let owned = isMonitorOwned(old)
        replaceInOrder(old, with: new)
        unregister(old)
        insertChecked(new)
        if owned { setMonitorOwned(new) }
    }

    /// Drive semantics for bitmaps through commit (`docs/bitmaps.md`, "Through commit"): every
    /// bitmap of a layer that leaves the chain is merged into the same-named bitmap of the node
    /// that takes its place — created there if missing (same granularity, enabled state), and
    /// persistent if the source was and the target can store bitmaps. Persistent targets are
    /// written through at once, so a crash right after the switch keeps the bits.
    public func carryBitmaps(from layers: [BlockNode], to target: BlockNode) throws(BlockError) {
        let storage = target.driver.bitmapStorage
        for layer in layers where layer !== target {
            for source in layer.dirtyBitmaps {
                if let existing = target.dirtyBitmap(named: source.name) {
                    existing.merge(from: source)
                    if existing.persistent, let storage { try storage.changed(existing, cleared: false) }
                    continue
                }
                let persistent = source.persistent && storage != nil && !target.isReadOnly
                if persistent, let storage {
                    try storage.checkCanStore(name: source.name, granularity: source.granularity)
                }
                let bitmap = DirtyBitmap(name: source.name, granularity: source.granularity, length: target.length,
                                         enabled: source.isEnabled, persistent: persistent)
                bitmap.merge(from: source)
                target.addObserver(bitmap)
                if persistent, let storage {
                    do throws(BlockError) { try storage.add(bitmap) } catch {
                        target.removeObserver(bitmap)
                        throw error
                    }
                }
                Log.info("bitmap '\(source.name)' of '\(layer.nodeName)' carried to '\(target.nodeName)' (\(bitmap.dirtyBytes) dirty bytes)")
            }
        }
    }
}

extension BlockNode {
    /// Whether `other` is this node or lies anywhere below it (any edge, not only the chain).
    public func reaches(_ other: BlockNode) -> Bool {
        if self === other { return true }
        return children.contains { $0.node.reaches(other) }
    }
}
