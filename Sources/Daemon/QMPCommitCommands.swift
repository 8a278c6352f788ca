import BlockCore
import BlockDrivers
import BlockJobs
import EventLoop
import Glibc
import JSON
import QMP

/// `block-commit` and what the commit job needs from the daemon: reopening base read-write,
/// re-pointing exports and parent edges at completion, carrying bitmaps over.
extension DaemonJobHost: CommitGraph {
    func replaceEverywhere(_ old: BlockNode, with new: BlockNode) { daemon.replaceEverywhere(old, with: new) }

    func carryBitmaps(from layers: [BlockNode], to target: BlockNode) throws(BlockError) {
        try daemon.carryBitmaps(from: layers, to: target)
    }
}

extension Daemon {
    /// Re-points every parent edge and export using `old` to `new`. The caller has drained
    /// `old` and everything above it and holds the control lock.
    public func replaceEverywhere(_ old: BlockNode, with new: BlockNode) {
        for parent in graph.parents(of: old) where parent !== new {
            for edge in parent.children where edge.node === old { edge.replace(with: new) }
        }
        for export in exports where export.node === old { export.replaceNode(with: new) }
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

    /// QEMU reopens a commit's base read-write. blockd opens a second, writable driver instance
    /// of the same image (nothing was ever written through the read-only one), swaps it in
    /// under a drained section of everything above, and closes the old one. Node names stay.
    func reopenReadWrite(_ node: BlockNode) throws(BlockError) -> BlockNode {
        guard node.isReadOnly else { return node }
        guard let path = StreamJob.filePath(of: node), let oldFile = node.file,
              oldFile.driver is FileDriver else {
            throw BlockError(EPERM, "Block node '\(node.nodeName)' is read-only and cannot be reopened read-write")
        }
        for parent in graph.parents(of: node) {
            for edge in parent.children where edge.node === node {
                if let job = edge.frozenBy {
                    throw BlockError(EBUSY, "Node '\(node.nodeName)' is busy: its link from '\(parent.nodeName)' is frozen by block job '\(job)'")
                }
            }
        }
        guard node.driver is QCOW2Driver || node.driver is RawDriver else {
            throw BlockError(EPERM, "Block node '\(node.nodeName)' (\(node.driverName)) is read-only and cannot be reopened read-write")
        }
        // The read-only instance's image locks would refuse the writable one: they are
        // dropped while it opens, and taken back if it fails (another process may have the
        // image by then, which is then the error).
        let oldLocks = oldFile.driver as? FileDriver
        oldLocks?.suspendLocks()
        let fileNode: BlockNode
        let driver: any BlockDriver
        do throws(BlockError) {
            var fileOptions = oldLocks?.options ?? FileOptions()
            fileOptions.forceShare = false
            let fileDriver = try FileDriver(path: path, readOnly: false, options: fileOptions)
            fileNode = BlockNode(name: oldFile.nodeName, driver: fileDriver, autoNamed: oldFile.isAutoNamed,
                                 options: oldFile.options)
            if let old = node.driver as? QCOW2Driver {
                let q = try QCOW2Driver(file: fileNode, readOnly: false, options: old.options)
                if let b = node.backing { q.attachBacking(b) }
                try q.activate()
                driver = q
            } else {
                driver = try RawDriver(file: fileNode)
            }
        } catch {
            oldLocks?.resumeLocks()
            throw error
        }
        let fresh = BlockNode(name: node.nodeName, driver: driver, autoNamed: node.isAutoNamed, options: node.options)
        watchCorruption(fresh)
        QCOW2CacheCleaner.start(for: fresh, loop: loops.loops[0], workers: workers)
        // Persistent bitmaps were loaded again by the new driver; in-memory ones move over.
        for bitmap in node.dirtyBitmaps where !bitmap.persistent && fresh.dirtyBitmap(named: bitmap.name) == nil {
            node.removeObserver(bitmap)
            fresh.addObserver(bitmap)
        }
        BlockNode.withDrained(ancestors(of: node) + [node]) {
            replaceEverywhere(node, with: fresh)
            node.retire()
        }
        graph.unregister(node)
        graph.unregister(oldFile)
        try? graph.register(fileNode)
        try? graph.register(fresh)
        // The old read-only instance never wrote; closing it only releases the fd and caches.
        try? node.driver.close()
        try? oldFile.driver.close()
        Log.info("reopened '\(node.nodeName)' (\(path)) read-write for commit")
        return fresh
    }

    func registerCommitCommand(on server: QMPServer, host: DaemonJobHost) {
        server.register("block-commit") { [self] args, _ throws(QMPError) in
            let jobID = try args.string("job-id")
            let device = try args.requiredString("device")
            let base = try args.string("base")
            let baseNode = try args.string("base-node")
            let top = try args.string("top")
            let topNode = try args.string("top-node")
            let backingFile = try args.string("backing-file")
            let speed = try args.int("speed") ?? 0
            let onError = try args.enumValue("on-error", allowed: OnError.allCases.map(\.rawValue)) ?? "report"
            let filterNodeName = try args.string("filter-node-name")
            let autoFinalize = try args.bool("auto-finalize") ?? true
            let autoDismiss = try args.bool("auto-dismiss") ?? true
            let mode = try args.enumValue("x-copy-mode", allowed: CommitCopyMode.allCases.map(\.rawValue)) ?? "auto"
            try args.finish()
            // QEMU's wording for every refusal below, so scripts matching on it keep working.
            if base != nil && baseNode != nil {
                throw .generic("'base-node' and 'base' are mutually exclusive")
            }
            if top != nil && topNode != nil {
                throw .generic("'top-node' and 'top' are mutually exclusive")
            }
            guard let deviceNode = graph.node(named: device) else {
                throw .deviceNotFound("Device '\(device)' not found")
            }
            var topBS: BlockNode?
            if let topNode {
                guard let n = graph.node(named: topNode) else {
                    throw .generic("Cannot find device='' nor node-name='\(topNode)'")
                }
                guard deviceNode.chainContains(n) else {
                    throw .generic("'\(topNode)' is not in this backing file chain")
                }
                topBS = n
            } else if let top {
                let activeTop = deviceNode.skippingFilters()
                if let path = StreamJob.filePath(of: activeTop), path == top || StreamJob.absolute(path) == StreamJob.absolute(top) {
                    topBS = activeTop
                } else {
                    guard let n = findBacking(named: top, below: activeTop) else {
                        throw .generic("Top image file \(top) not found")
                    }
                    topBS = n
                }
            }
            let resolvedTop = topBS ?? deviceNode.skippingFilters()
            var baseBS: BlockNode?
            if let baseNode {
                guard let n = graph.node(named: baseNode) else {
                    throw .generic("Cannot find device='' nor node-name='\(baseNode)'")
                }
                guard resolvedTop.chain.dropFirst().contains(where: { $0 === n }) else {
                    throw .generic("'\(baseNode)' is not in this backing file chain")
                }
                baseBS = n
            } else if let base {
                guard let n = findBacking(named: base, below: resolvedTop) else {
                    throw .generic("Can't find '\(base)' in the backing chain")
                }
                baseBS = n
            }
            if filterNodeName != nil {
                throw .generic("Parameter 'filter-node-name' is not supported by blockd: the commit job mirrors client writes without a filter node")
            }
            let id = jobID ?? device
            do throws(JobError) { try JobRegistry.validate(id: id) } catch { throw Daemon.qmpError(error) }
            if jobs.job(id: id) != nil { throw .generic("Job ID '\(id)' already in use") }
            var plan: CommitPlan
            do throws(BlockError) {
                plan = try CommitPlan.resolve(device: deviceNode, top: topBS, base: baseBS)
            } catch {
                throw .generic(error.message)
            }
            if !plan.isActive && backingFile == nil, plan.overlay.map({ !($0.driver is QCOW2Driver) }) ?? false {
                throw .generic("Node '\(plan.overlay!.nodeName)' cannot record a backing file")
            }
            if plan.isActive && backingFile != nil {
                throw .generic("'backing-file' specified, but 'top' is the active layer")
            }
            // A job already on any node involved: busy, as QEMU answers.
            var node: BlockNode? = plan.aboveTop ?? plan.top
            while let n = node {
                do throws(BlockError) { try checkNotInJob(n) } catch { throw .generic(error.message) }
                if let edge = n.chainChild, let other = edge.frozenBy, n !== plan.base {
                    throw .generic("Node '\(n.nodeName)' is busy: its '\(edge.name)' link to '\(edge.node.nodeName)' is frozen by block job '\(other)'")
                }
                if n === plan.base { break }
                node = n.chainChild?.node
            }
            if plan.base.isReadOnly {
                do throws(BlockError) {
                    _ = try reopenReadWrite(plan.base)
                    plan = try CommitPlan.resolve(device: deviceNode, top: plan.top, base: graph.node(named: plan.base.nodeName))
                } catch {
                    throw .generic(error.message)
                }
            }
            let commit: CommitJob
            do throws(BlockError) {
                commit = try CommitJob(plan: plan, backingFile: backingFile, copyMode: CommitCopyMode(rawValue: mode) ?? .auto,
                                       graph: host, owner: id)
            } catch {
                throw .generic(error.message)
            }
            do throws(JobError) {
                try jobs.start(id: id, body: commit, speed: speed, autoFinalize: autoFinalize,
                               autoDismiss: autoDismiss, onError: OnError(rawValue: onError) ?? .report, host: host)
            } catch {
                commit.clean(nil)
                throw Daemon.qmpError(error)
            }
            return .object([:])
        }
    }
}
