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
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The composition root: owns the graph, the NBD server, exports and jobs. Control-plane
/// methods are called one at a time (command line start-up, QMP commands under the QMP
/// control lock, job completion in the same control context); the few members they change
/// sit behind one mutex so that any thread may read them.
public final class Daemon: Sendable {
    public let graph = BlockGraph()
    public let loops: EventLoopGroup
    public let workers: WorkerPool
    /// Block jobs, in creation order.
    public let jobs = JobRegistry()
    private struct ControlState {
        var nbd: NBDServer?
        var exports: [Export] = []
        var qmp: QMPServer?
        var quitRequested: @Sendable () -> Void = { kill(getpid(), SIGTERM) }
    }
    private let control = Mutex(ControlState())

    public var nbd: NBDServer? { control.withLock { $0.nbd } }
    /// The QMP server, created with the first monitor.
    public internal(set) var qmp: QMPServer? {
        get { control.withLock { $0.qmp } }
        set { control.withLock { $0.qmp = newValue } }
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

    public init(configuration: Configuration = Configuration()) {
        Daemon.registerDrivers()
        loops = EventLoopGroup(count: configuration.loopCount)
        workers = WorkerPool(threads: configuration.workerCount)
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
                let node = try BlockdevFactory.open(options, in: graph)
                // A copy-before-write filter goes in above its file (docs/backup.md).
                try insertAddedFilters(graph.all.filter { !before.contains(ObjectIdentifier($0)) })
                graph.setMonitorOwned(node)
                return node
            } catch {
                graph.abandon(graph.all.filter { !before.contains(ObjectIdentifier($0)) })
                throw error
            }
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

    public func nbdServerStart(_ addresses: [ListenAddress], maxConnections: Int = 0) throws(DaemonError) -> [Int?] {
        if nbd != nil { throw DaemonError("NBD server already running") }
        let exportList = self.exportList
        let server = NBDServer(loops: loops, workers: workers)
        server.maxConnections = maxConnections
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
        return ports
    }

    public func nbdServerStop() throws(DaemonError) {
        guard let server = nbd else { throw DaemonError("NBD server not running") }
        server.shutdown()
        control.withLock { $0.nbd = nil }
    }

    public var exports: [Export] { exportList }

    @discardableResult
    public func exportAdd(id: String, nodeName: String, name: String?, description: String?,
                          writable: Bool, bitmaps: [String] = [], bitmapRefs: [ExportBitmapRef]? = nil) throws(DaemonError) -> Export {
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
        // NBD export stops sharing resize (`nbd_export_create`); either can conflict.
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
            throw DaemonError(error.message)
        }
        for c in contexts { c.bitmap.acquireBusy() }
        let export = Export(id: id, name: exportName, description: description, node: node, writable: writable,
                            root: root, extraContexts: contexts)
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
        // The export's hold on its node goes; a node only the export kept (inline) is closed.
        graph.detach([export.root])
        qmp?.emit(event: "BLOCK_EXPORT_DELETED", data: ["id": .string(id)])
    }

    // MARK: shutdown

    /// Stops serving, then writes back and closes every node (parents before children).
    public func shutdown() {
        qmp?.stop()
        cancelJobsForShutdown()
        nbd?.shutdown()
        // Give loops a moment to close client sockets; in-flight requests finish on their own.
        loops.shutdown()
        workers.shutdown()
        graph.closeAll { node, error in Log.error("closing node '\(node.nodeName)': \(error.message)") }
    }
}
