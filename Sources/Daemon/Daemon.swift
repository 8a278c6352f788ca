import BlockCore
import BlockDrivers
import BlockGraph
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
    /// QEMU's terminal hint (see `BlockError.hint`); QMP replies leave it out.
    public var hint: String?
    public init(_ message: String, hint: String? = nil) {
        self.message = message
        self.hint = hint
    }
    public var description: String { message }
}

/// The composition root: owns the graph, the NBD server, exports and jobs. Control-plane
/// methods are called one at a time (command line start-up, QMP commands under the QMP
/// control lock, job completion in the same control context); the few members they change
/// sit behind one mutex so that any thread may read them.
public final class Daemon: Sendable {
    public let graph = BlockGraph()
    /// What the block-device factory opens nodes in: the graph, plus what drivers need from
    /// the daemon (the event loops and TLS objects for `nbd` nodes).
    let nodes: DaemonNodeRegistry
    public let loops: EventLoopGroup
    public let workers: WorkerPool
    /// Block jobs, in creation order.
    public let jobs = JobRegistry()
    private struct ControlState {
        var nbd: NBDServer?
        var exports: [Export] = []
        var qmp: QMPServer?
        var quitRequested: @Sendable () -> Void = { kill(getpid(), SIGTERM) }
        var nbdClientClosed: (@Sendable (_ negotiated: Bool, _ remaining: Int) -> Void)?
        var exportPreferredBlockSize = Export.PreferredBlockSize.node
    }
    private let control = Mutex(ControlState())

    public var nbd: NBDServer? { control.withLock { $0.nbd } }
    /// The QMP server, created with the first monitor.
    public internal(set) var qmp: QMPServer? {
        get { control.withLock { $0.qmp } }
        set { control.withLock { $0.qmp = newValue } }
    }
    /// Given to the NBD server started next (see `NBDServer.onClientClosed`).
    var nbdClientClosed: (@Sendable (_ negotiated: Bool, _ remaining: Int) -> Void)? {
        get { control.withLock { $0.nbdClientClosed } }
        set { control.withLock { $0.nbdClientClosed = newValue } }
    }
    /// TLS credentials and authz objects (TLSObjects.swift).
    let tlsObjects: TLSObjects
    /// The preferred block size exports advertise (qemu-nbd's front end: QEMU's).
    var exportPreferredBlockSize: Export.PreferredBlockSize {
        get { control.withLock { $0.exportPreferredBlockSize } }
        set { control.withLock { $0.exportPreferredBlockSize = newValue } }
    }
    /// Called (once) when a client asks the daemon to quit.
    var quitRequested: @Sendable () -> Void {
        get { control.withLock { $0.quitRequested } }
        set { control.withLock { $0.quitRequested = newValue } }
    }
    private var exportList: [Export] { control.withLock { $0.exports } }

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
        nodes = DaemonNodeRegistry(graph: graph, eventLoops: loops, nbdClientTLS: NBDClientTLSObjects(tlsObjects))
    }

    // MARK: nodes

    /// `blockdev-add`: opens the node and its inline children (each checked against the graph's
    /// permissions as it is attached); the monitor owns the top node. On an error every node
    /// this call opened is closed again.
    @discardableResult
    public func blockdevAdd(_ options: JSONObject) throws(BlockError) -> BlockNode {
        try graph.withLock { () throws(BlockError) -> BlockNode in
            let before = Set(graph.all.map(ObjectIdentifier.init))
            do throws(BlockError) {
                let node = try BlockdevFactory.open(options, in: nodes)
                // A copy-before-write filter goes in above its file (docs/backup.md).
                try insertAddedFilters(graph.all.filter { !before.contains(ObjectIdentifier($0)) })
                graph.setMonitorOwned(node)
                nodesOpened(graph.all.filter { !before.contains(ObjectIdentifier($0)) })
                return node
            } catch {
                graph.abandon(graph.all.filter { !before.contains(ObjectIdentifier($0)) })
                throw error
            }
        }
    }

    /// What the daemon does with every node it opens: corruption found in the image is
    /// reported (`watchCorruption`), and metadata caches are cleaned on the driver's interval
    /// (`CacheCleaner`).
    func nodesOpened(_ list: [BlockNode]) {
        for n in list {
            watchCorruption(n)
            CacheCleaner.start(for: n, loop: loops.loops[0], workers: workers)
        }
    }

    /// A node that finds its image corrupt while open (qcow2) says so as QEMU does: a line on
    /// stderr (`qcow2_signal_corruption`'s words) and `BLOCK_IMAGE_CORRUPTED` on every monitor.
    func watchCorruption(_ node: BlockNode) {
        let name = node.nodeName
        let format = node.driverName
        node.driver.onCorruption { [weak self] event in
            Report.raw("\(format): Marking image as corrupt: \(event.message); further corruption events will be suppressed\n")
            // In the order QEMU's QDict prints them.
            var data: JSONObject = ["device": "", "msg": .string(event.message)]
            if let offset = event.offset { data["offset"] = .int(Int64(bitPattern: offset)) }
            data["node-name"] = .string(name)
            data["fatal"] = .bool(event.fatal)
            if let size = event.size { data["size"] = .int(Int64(bitPattern: size)) }
            self?.qmp?.emit(event: "BLOCK_IMAGE_CORRUPTED", data: data)
        }
    }

    /// `blockdev-del`: QEMU's checks and words (`BlockGraph.delete`); the node's inline and
    /// implicit children go with it unless something else uses them.
    public func blockdevDel(_ name: String) throws(BlockError) {
        guard let node = graph.node(named: name) else {
            throw BlockError(ENODEV, "Failed to find node with node-name='\(name)'")
        }
        try graph.withLock { () throws(BlockError) in
            try removeInsertedFilter(node)
            try graph.delete(node)
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
        let exportList = self.exportList
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
        control.withLock { $0.nbd = server }
        tlsObjects.inUse = Set([tlsCreds, tlsAuthz].compactMap { $0 })
        return ports
    }

    public func nbdServerStop() throws(DaemonError) {
        guard let server = nbd else { throw DaemonError("NBD server not running") }
        server.shutdown()
        control.withLock { $0.nbd = nil }
        tlsObjects.inUse = []
    }

    public var exports: [Export] { exportList }

    /// `allocationDepth` offers `qemu:allocation-depth`. Multi-conn is advertised per client
    /// unless the NBD server takes one client at a time (`NBDServer.maxConnections`), as QEMU
    /// decides.
    @discardableResult
    public func exportAdd(id: String, nodeName: String, name: String?, description: String?,
                          writable: Bool, bitmaps: [String] = [], bitmapRefs: [ExportBitmapRef]? = nil,
                          allocationDepth: Bool = true, writethrough: Bool = false) throws(DaemonError) -> Export {
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
            throw DaemonError("Cannot export read-only node as writable")
        }
        // Dirty bitmaps offered as `qemu:dirty-bitmap:NAME`, busy while exported (QMPBitmaps.swift).
        var contexts: [DirtyBitmapContext] = []
        for ref in bitmapRefs ?? bitmaps.map(ExportBitmapRef.local) {
            contexts.append(DirtyBitmapContext(bitmap: try exportBitmap(ref, node: node, writable: writable)))
        }
        // QEMU's order: the backend is inserted sharing everything (`blk_exp_add`), then the
        // NBD export stops sharing resize (`nbd_export_create`); either can conflict, in the
        // graph or with another process's image locks (the graph's permissions reach the
        // file driver, whatever lies between).
        let root = Export.makeRoot(node: node, writable: writable)
        do throws(BlockError) {
            try graph.withLock { () throws(BlockError) in
                try graph.attach([root])
                do throws(BlockError) {
                    try graph.setPermissions(root, Export.servingPermissions(writable: writable))
                } catch {
                    graph.detach([root])
                    throw error
                }
            }
        } catch {
            throw DaemonError(error.message, hint: error.hint)
        }
        for c in contexts { c.bitmap.acquireBusy() }
        let export = Export(id: id, name: exportName, description: description, node: node, writable: writable,
                            writethrough: writethrough, root: root, extraContexts: contexts, allocationDepth: allocationDepth,
                            preferredBlockSize: exportPreferredBlockSize)
        control.withLock { $0.exports.append(export) }
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
        _ = i
        control.withLock { $0.exports.removeAll { $0 === export } }
        nbd?.exports.remove(id: id)
        if hard { nbd?.disconnectClients(of: export, reason: "export '\(id)' deleted") }
        for case let c as DirtyBitmapContext in export.contexts { c.bitmap.releaseBusy() }
        // The export's hold on its node goes (and its image locks with it); a node only the
        // export kept (inline) is closed.
        graph.detach([export.root])
        qmp?.emit(event: "BLOCK_EXPORT_DELETED", data: ["id": .string(id)])
    }

    // MARK: shutdown

    /// What qemu-storage-daemon does before it exits (`blk_exp_close_all`, then
    /// `job_cancel_sync_all`): every export goes (`BLOCK_EXPORT_DELETED`, clients
    /// disconnected), then every job is cancelled and waited for (`BLOCK_JOB_CANCELLED`).
    /// Control context: the `quit` command runs it before its reply, `shutdown` after a stop
    /// signal (then with nothing left to do after a `quit`).
    func closeExportsAndCancelJobs() {
        for export in exports {
            do throws(DaemonError) { try exportDel(id: export.id, hard: true) } catch {
                Log.error("closing export '\(export.id)': \(error.message)")
            }
        }
        for job in jobs.all { job.cancelSync() }
    }

    /// Stops serving, closes the exports and cancels the jobs, then writes back and closes
    /// every node (parents before children).
    public func shutdown() {
        qmp?.stop()
        let running = jobs.all
        closeExportsAndCancelJobs()
        // Their threads end once the completion is done (here in `cancelSync`, or by them).
        for job in running { job.join() }
        nbd?.shutdown()
        // Every loop has closed its client sockets once it ran a task queued after the
        // closes; then no request starts inline any more. Workers finish what they have
        // (their completions still reach running loops), and nodes close while the loops
        // run, since an `nbd` node (and a format node above one) does its I/O on them.
        for loop in loops.loops { loop.waitForQueuedTasks() }
        workers.shutdown()
        graph.closeAll { node, error in Log.error("closing node '\(node.nodeName)': \(error.message)") }
        loops.shutdown()
    }
}

/// QEMU's cache clean timer (`cache-clean-interval`): every N seconds a node (qcow2) drops the
/// metadata tables it has not used since the previous time. The timer runs on an event loop
/// and hands the cleaning to a worker (it takes the node's metadata lock, which a request may
/// hold during disk I/O); it stops once the driver is closed or gone.
final class CacheCleaner: Sendable {
    private weak let driver: (any BlockDriver)?
    private let loop: EventLoop
    private let workers: WorkerPool
    private let seconds: Double

    private init(driver: any BlockDriver, loop: EventLoop, workers: WorkerPool) {
        self.driver = driver
        self.loop = loop
        self.workers = workers
        self.seconds = Double(driver.cacheCleanInterval)
    }

    static func start(for node: BlockNode, loop: EventLoop, workers: WorkerPool) {
        guard node.driver.cacheCleanInterval > 0 else { return }
        CacheCleaner(driver: node.driver, loop: loop, workers: workers).arm()
    }

    private func arm() {
        loop.execute { [self] in
            loop.schedule(after: seconds) { [self] in
                guard driver != nil else { return }
                workers.submit { [self] in
                    if driver?.cleanCachesIfOpen() == true { arm() }
                }
            }
        }
    }
}
