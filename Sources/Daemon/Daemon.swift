import BlockCore
import BlockDrivers
import BlockJobs
import EventLoop
import Glibc
import JSON
import NBDServer
import NBDProtocol
import QMP
import Synchronization

/// An error for people, with the option or command it is about.
public struct DaemonError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The composition root: owns the graph, the NBD server, exports and (later) jobs.
/// Control-plane methods are called one at a time (command line start-up, QMP commands).
public final class Daemon: @unchecked Sendable {
    public let graph: BlockGraph
    public let loops: EventLoopGroup
    public let workers: WorkerPool
    public private(set) var nbd: NBDServer?
    private var exportList: [Export] = []
    /// Block jobs (stream), in creation order.
    public let jobs = JobRegistry()
    /// The QMP server, created with the first monitor.
    public internal(set) var qmp: QMPServer?
    /// Given to the NBD server started next (see `NBDServer.onClientClosed`).
    var nbdClientClosed: (@Sendable (_ negotiated: Bool, _ remaining: Int) -> Void)?
    /// TLS credentials and authz objects (TLSObjects.swift).
    let tlsObjects: TLSObjects
    /// The preferred block size exports advertise (qemu-nbd's front end: QEMU's).
    var exportPreferredBlockSize = Export.PreferredBlockSize.node
    /// Called (once) when a client asks the daemon to quit.
    var quitRequested: @Sendable () -> Void = { kill(getpid(), SIGTERM) }

    public struct Configuration: Sendable {
        public var loopCount: Int
        public var workerCount: Int
        public init(loopCount: Int = Daemon.defaultLoopCount, workerCount: Int = 16) {
            self.loopCount = loopCount
            self.workerCount = workerCount
        }
    }

    public static var defaultLoopCount: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    public convenience init(configuration: Configuration = Configuration()) {
        self.init(configuration: configuration, tlsObjects: TLSObjects())
    }

    /// `tlsObjects`: objects made before the daemon (qemu-nbd creates its `--object`s while it
    /// reads its options, before it forks and starts threads).
    init(configuration: Configuration, tlsObjects: TLSObjects) {
        Daemon.registerDrivers()
        self.tlsObjects = tlsObjects
        loops = EventLoopGroup(count: configuration.loopCount)
        workers = WorkerPool(threads: configuration.workerCount)
        graph = BlockGraph(eventLoops: loops, nbdClientTLS: NBDClientTLSObjects(tlsObjects))
    }

    // MARK: nodes

    @discardableResult
    public func blockdevAdd(_ options: JSONObject) throws(BlockError) -> BlockNode {
        let before = Set(graph.all.map(\.nodeName))
        do {
            return try BlockdevFactory.open(options, in: graph)
        } catch {
            // Undo implicit children opened before the failure.
            for node in graph.all where !before.contains(node.nodeName) {
                try? node.driver.close()
                graph.unregister(node)
            }
            throw error
        }
    }

    /// Deletes a node the user added, with the implicit children only it used.
    public func blockdevDel(_ name: String) throws(BlockError) {
        // Implicitly created nodes are not the monitor's to delete; QEMU does not find them.
        guard let node = graph.node(named: name), !node.isAutoNamed else {
            throw BlockError(ENODEV, "Failed to find node with node-name='\(name)'")
        }
        try checkNotInJob(node)
        // QEMU's wording, so scripts that match on it keep working.
        if exportList.contains(where: { $0.node === node }) {
            throw BlockError(EBUSY, "Node \(name) is in use")
        }
        for parent in graph.parents(of: node) {
            if parent.backing === node {
                throw BlockError(EBUSY, "Node '\(name)' is busy: node is used as backing hd of '\(parent.nodeName)'")
            }
            throw BlockError(EBUSY, "Block device \(name) is in use")
        }
        try close(node)
    }

    func close(_ node: BlockNode) throws(BlockError) {
        let children = node.children.map(\.node)
        try node.driver.close()
        graph.unregister(node)
        for child in children where child.isAutoNamed && graph.parents(of: child).isEmpty {
            try close(child)
        }
    }

    // MARK: NBD

    /// Starts the NBD server. `tlsCreds`/`tlsAuthz` name objects (`--object`, `object-add`);
    /// `tls` gives the policy directly (`blockd serve --tls-creds DIR`).
    public func nbdServerStart(_ addresses: [ListenAddress], settings: NBDServerSettings = NBDServerSettings(),
                               tlsCreds: String? = nil, tlsAuthz: String? = nil,
                               tls: TLSServerPolicy? = nil) throws(DaemonError) -> [Int?] {
        if nbd != nil { throw DaemonError("NBD server already running") }
        var policy = tls
        if policy == nil { policy = try tlsObjects.serverPolicy(creds: tlsCreds, authz: tlsAuthz) }
        let server = NBDServer(loops: loops, workers: workers)
        server.maxConnections = settings.maxConnections
        server.handshakeMaxSeconds = settings.handshakeMaxSeconds
        server.onClientClosed = nbdClientClosed
        server.tls = policy
        // Exports first: a client may connect the moment the socket listens.
        for e in exportList { server.exports.add(e) }
        var ports: [Int?] = []
        for address in addresses {
            do {
                ports.append(try server.listen(on: address))
            } catch {
                server.stopListening()
                throw DaemonError(error.message)
            }
        }
        nbd = server
        tlsObjects.inUse = Set([tlsCreds, tlsAuthz].compactMap { $0 })
        return ports
    }

    public func nbdServerStop() throws(DaemonError) {
        guard let server = nbd else { throw DaemonError("NBD server not running") }
        server.shutdown()
        nbd = nil
        tlsObjects.inUse = []
    }

    public var exports: [Export] { exportList }

    /// `allocationDepth` offers `qemu:allocation-depth`. Multi-conn is advertised per client
    /// unless the NBD server takes one client at a time (`NBDServer.maxConnections`), as QEMU
    /// decides.
    @discardableResult
    public func exportAdd(id: String, nodeName: String, name: String?, description: String?,
                          writable: Bool, bitmaps: [String] = [], allocationDepth: Bool = true) throws(DaemonError) -> Export {
        if exportList.contains(where: { $0.id == id }) {
            throw DaemonError("Block export id '\(id)' is already in use")
        }
        guard let node = graph.node(named: nodeName) else {
            throw DaemonError("Cannot find device='\(nodeName)' nor node-name='\(nodeName)'")
        }
        let exportName = name ?? nodeName
        if exportList.contains(where: { $0.name == exportName }) {
            throw DaemonError("NBD server already has export named '\(exportName)'")
        }
        if writable && node.isReadOnly {
            throw DaemonError("Cannot export node '\(nodeName)' writable: the node is read-only")
        }
        // Dirty bitmaps offered as `qemu:dirty-bitmap:NAME`, busy while exported (QMPBitmaps.swift).
        var contexts: [DirtyBitmapContext] = []
        for b in bitmaps {
            contexts.append(DirtyBitmapContext(bitmap: try exportBitmap(b, node: node, writable: writable)))
        }
        for c in contexts { c.bitmap.acquireBusy() }
        let export = Export(id: id, name: exportName, description: description, node: node, writable: writable,
                            extraContexts: contexts, allocationDepth: allocationDepth,
                            preferredBlockSize: exportPreferredBlockSize)
        exportList.append(export)
        nbd?.exports.add(export)
        return export
    }

    public func exportDel(id: String, hard: Bool) throws(DaemonError) {
        guard let i = exportList.firstIndex(where: { $0.id == id }) else {
            throw DaemonError("Export '\(id)' is not found")
        }
        let export = exportList[i]
        if !hard && export.activeConnections > 0 {
            // A client that has just hung up may not be reaped by its loop yet: give the
            // loops a moment before calling the export busy.
            let deadline = monotonicNanos() + 500_000_000
            while export.activeConnections > 0 && monotonicNanos() < deadline { usleep(2_000) }
            if export.activeConnections > 0 {
                throw DaemonError("export '\(id)' still in use")
            }
        }
        exportList.remove(at: i)
        nbd?.exports.remove(id: id)
        if hard { nbd?.disconnectClients(of: export, reason: "export '\(id)' deleted") }
        for case let c as DirtyBitmapContext in export.contexts { c.bitmap.releaseBusy() }
        qmp?.emit(event: "BLOCK_EXPORT_DELETED", data: ["id": .string(id)])
    }

    // MARK: shutdown

    /// Stops serving, then writes back and closes every node (parents before children).
    ///
    /// In qemu-storage-daemon's order: exports are closed (`BLOCK_EXPORT_DELETED`), jobs are
    /// cancelled and waited for (their events), then the monitors answer a pending `quit`,
    /// write what is queued for their clients (2 s at most) and close; then the nodes.
    public func shutdown() {
        closeExportsAndJobs()
        qmp?.stop(drainFor: 2)
        nbd?.shutdown()
        // Every loop has closed its client sockets once it ran a task queued after the
        // closes; then no request starts inline any more. Workers finish what they have
        // (their completions still reach running loops), and nodes close while the loops
        // run, since an `nbd` node (and a format node above one) does its I/O on them.
        for loop in loops.loops { Daemon.barrier(loop) }
        workers.shutdown()
        var remaining = graph.all
        while !remaining.isEmpty {
            let roots = remaining.filter { node in !remaining.contains { p in p.children.contains { $0.node === node } } }
            for node in roots.isEmpty ? remaining : roots {
                do { try node.driver.close() } catch {
                    Log.error("closing node '\(node.nodeName)': \(error.message)")
                }
                graph.unregister(node)
            }
            remaining.removeAll { n in roots.isEmpty || roots.contains { $0 === n } }
        }
        loops.shutdown()
    }

    /// QSD's `blk_exp_close_all` and `job_cancel_sync_all`: every export deleted, its clients
    /// cut off; every job cancelled (forced) and its thread waited for, and every job left
    /// concluded dismissed. Runs under the control lock but waits outside it, since a job
    /// completes under it.
    private func closeExportsAndJobs() {
        func control(_ body: () -> Void) {
            if let qmp { qmp.withControlLock(body) } else { body() }
        }
        control {
            for e in exportList {
                do throws(DaemonError) { try exportDel(id: e.id, hard: true) } catch {
                    Log.error("closing export '\(e.id)': \(error.message)")
                }
            }
        }
        let running = jobs.all
        if running.isEmpty { return }
        control {
            for job in running {
                do throws(JobError) { try job.cancel(force: true) } catch { try? job.dismiss() }
            }
        }
        for job in running { job.join() }
        control {
            for job in jobs.all { try? job.dismiss() }
        }
    }

    /// Waits until `loop` has run everything queued before this call.
    static func barrier(_ loop: EventLoop) {
        let lock = ConditionLock()
        let done = Atomic<Bool>(false)
        loop.execute {
            done.store(true, ordering: .releasing)
            lock.withLock { lock.broadcast() }
        }
        lock.withLock {
            while !done.load(ordering: .acquiring) && !loop.hasStopped { _ = lock.wait(seconds: 0.1) }
        }
    }
}
