import BlockCore
import BlockDrivers
import BlockGraph
import BlockJobs
import EventLoop
import Glibc
import JSON
import QMP

/// `blockdev-backup` and `transaction` (bitmap actions, `blockdev-backup`, `abort`), with
/// QEMU's checks in QEMU's order and words (`blockdev.c`: `do_backup_common`,
/// `backup_job_create`). See `docs/backup.md`.
///
/// A transaction runs as QEMU's `qmp_transaction`: every action is prepared inside one drained
/// section of the whole graph (QEMU's `bdrv_drain_all`), so no client write falls between a
/// new bitmap, a bitmap disabled and a backup's copy-before-write filter going in: the
/// bitmap and the backup see the same instant. When an action fails, the ones before are
/// undone (a backup job made is dropped: `created`, `aborting`, `concluded`, `null`); when all
/// are prepared, each commits (persistent bitmaps are written, backup jobs start) after the
/// drained section.
extension Daemon {
    static let transactionActionTypes = bitmapActionTypes + ["blockdev-backup", "abort"]

    func registerBackupCommands(on server: QMPServer, host: any JobHost) {
        server.register("blockdev-backup") { [self] args, _ throws(QMPError) in
            // QEMU runs it as a transaction of one action.
            for key in args.object.keys { _ = args.value(key) }
            try runTransaction([("blockdev-backup", QMPArguments(args.object))], host: host)
            return .object([:])
        }
        server.register("transaction") { [self] args, _ throws(QMPError) in
            let actions = try args.requiredArray("actions")
            var grouped = false
            if var props = try args.object("properties") {
                let mode = try props.enumValue("completion-mode", allowed: ["individual", "grouped"])
                try props.finish()
                grouped = mode == "grouped"
            }
            try args.finish()
            var items: [(String, QMPArguments)] = []
            for (i, item) in actions.enumerated() {
                guard case .object(let o) = item else {
                    throw .generic("Invalid parameter type for 'actions[\(i)]', expected: TransactionAction")
                }
                var a = QMPArguments(o, path: "actions[\(i)].")
                let type = try a.requiredString("type")
                guard Daemon.transactionActionTypes.contains(type) else {
                    throw QMPError.generic("Transaction action '\(type)' is not supported by blockd")
                }
                let data = try a.object("data") ?? QMPArguments(JSONObject(), path: "actions[\(i)].data.")
                try a.finish()
                items.append((type, data))
            }
            if grouped {
                // QEMU refuses it for the bitmap actions in their prepare; blockd has no job
                // groups, so it refuses it for backups too.
                if let bitmap = items.first(where: { Daemon.bitmapActionTypes.contains($0.0) }) {
                    throw .generic("Action '\(bitmap.0)' does not support Transaction property completion-mode = grouped")
                }
                throw .generic("blockd does not support Transaction property completion-mode = grouped")
            }
            try runTransaction(items, host: host)
            return .object([:])
        }
    }

    /// QEMU's `qmp_transaction`: prepare every action inside one drained section of the
    /// graph, undo them all when one fails, else commit them all.
    func runTransaction(_ items: [(String, QMPArguments)], host: any JobHost) throws(QMPError) {
        var transaction = GraphTransaction()
        var failure: QMPError?
        graph.withLock {
            BlockNode.withDrained(graph.drainSet(graph.all)) {
                for (type, data) in items {
                    do throws(QMPError) {
                        try transaction.prepare { () throws(QMPError) -> GraphTransaction.Action in
                            var data = data
                            switch type {
                            case "blockdev-backup": return try prepareBackup(&data, host: host)
                            case "abort":
                                try data.finish()
                                throw QMPError.generic("Transaction aborted using Abort action")
                            default: return try prepareBitmapAction(type, &data)
                            }
                        }
                    } catch {
                        failure = error
                        return
                    }
                }
            }
        }
        if let failure { throw failure }
        do throws(BlockError) { try transaction.commit() } catch {
            Log.error("transaction: \(error.message)")
            throw .generic(error.message)
        }
    }

    /// `blockdev-backup`'s prepare (`blockdev_backup_prepare` → `do_backup_common` →
    /// `backup_job_create`): checks, then the copy-before-write filter goes in above the
    /// device and the job is made (`created`); `commit` starts it, `undo` drops it.
    func prepareBackup(_ args: inout QMPArguments, host: any JobHost) throws(QMPError) -> GraphTransaction.Action {
        let jobID = try args.string("job-id")
        let device = try args.requiredString("device")
        let targetName = try args.requiredString("target")
        let syncName = try args.requiredEnum("sync", allowed: BackupSync.allCases.map(\.rawValue))
        let speed = try args.int("speed") ?? 0
        let bitmapName = try args.string("bitmap")
        let modeName = try args.enumValue("bitmap-mode", allowed: BitmapSyncMode.allCases.map(\.rawValue))
        let compress = try args.bool("compress") ?? false
        let onSourceError = try args.enumValue("on-source-error", allowed: OnError.allCases.map(\.rawValue)) ?? "report"
        let onTargetError = try args.enumValue("on-target-error", allowed: OnError.allCases.map(\.rawValue)) ?? "report"
        let autoFinalize = try args.bool("auto-finalize") ?? true
        let autoDismiss = try args.bool("auto-dismiss") ?? true
        let filterNodeName = try args.string("filter-node-name")
        var perf = BackupPerf()
        if var x = try args.object("x-perf") {
            if let v = try x.bool("use-copy-range") { perf.useCopyRange = v }
            if let v = try x.int("max-workers") { perf.maxWorkers = v }
            if let v = try x.int("max-chunk") { perf.maxChunk = v }
            try x.finish()
        }
        try args.finish()

        // blockdev_backup_prepare
        guard let source = graph.node(named: device) else {
            throw .generic("Cannot find device='\(device)' nor node-name='\(device)'")
        }
        guard let target = graph.node(named: targetName) else {
            throw .generic("Cannot find device='\(targetName)' nor node-name='\(targetName)'")
        }
        // do_backup_common
        var sync = BackupSync(rawValue: syncName)!
        var mode = modeName.flatMap(BitmapSyncMode.init(rawValue:))
        if (sync == .bitmap || sync == .incremental) && bitmapName == nil {
            throw .generic("must provide a valid bitmap name for '\(syncName)' sync mode")
        }
        if sync == .incremental {
            if let m = mode, m != .onSuccess {
                throw .generic("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
            }
            sync = .bitmap
            mode = .onSuccess
        }
        var bitmap: DirtyBitmap?
        if let bitmapName {
            guard let b = source.dirtyBitmap(named: bitmapName) else {
                throw .generic("Bitmap '\(bitmapName)' could not be found")
            }
            guard let mode else { throw .generic("Bitmap sync mode must be given when providing a bitmap") }
            try Daemon.checkUsable(b, node: source, allowReadOnly: true)
            if sync == .none {
                throw .generic("sync mode 'none' does not produce meaningful bitmap outputs")
            }
            if mode == .never && sync != .bitmap {
                throw .generic("Bitmap sync mode '\(mode.rawValue)' has no meaningful effect when combined with sync mode '\(sync.rawValue)'")
            }
            bitmap = b
        }
        if bitmap == nil && mode != nil {
            throw .generic("Cannot specify bitmap sync mode without a bitmap")
        }
        // backup_job_create
        if source === target { throw .generic("Source and target cannot be the same") }
        if compress && target.driver.compressedWriteClusterSize == nil {
            // QEMU names the target's device, which a node of the storage daemon does not have.
            throw .generic("Compression is not supported for this drive ")
        }
        do throws(BlockError) {
            try checkNotInJob(source)
            try checkNotInJob(target)
        } catch {
            throw .generic(error.message)
        }
        if perf.maxWorkers < 1 || perf.maxWorkers > Int64(Int32.max) {
            throw .generic("max-workers must be between 1 and 2147483647")
        }
        if perf.maxChunk < 0 {
            throw .generic("max-chunk must be zero (which means no limit) or positive")
        }
        if let bitmap {
            if mode != .never { try Daemon.checkUsable(bitmap, node: source, allowReadOnly: false) }
            do throws(BlockError) { try bitmap.freeze() } catch { throw .generic(error.message) }
        }
        var filter: BlockNode?
        var job: Job?
        do throws(QMPError) {
            if source.length != target.length { throw .generic("Source and target image have different sizes") }
            // QEMU checks the job id when it makes the job, after the filter went in; blockd
            // checks it first, so a bad id changes nothing (the answer is the same).
            do throws(JobError) { try JobRegistry.validate(id: jobID ?? "") } catch { throw Daemon.qmpError(error) }
            if jobs.job(id: jobID ?? "") != nil { throw .generic("Job ID '\(jobID ?? "")' already in use") }
            do throws(BlockError) { try checkNoBackup(source) } catch { throw .generic(error.message) }
            filter = try openBackupFilter(source: source, target: target, name: filterNodeName)
            let body: BackupJob
            do throws(BlockError) {
                body = try BackupJob(id: jobID ?? "", filter: filter!, source: source, target: target, sync: sync,
                                     bitmap: bitmap, bitmapMode: mode, compress: compress,
                                     onSourceError: OnError(rawValue: onSourceError)!,
                                     onTargetError: OnError(rawValue: onTargetError)!, perf: perf, graph: graph)
            } catch {
                throw .generic(error.message)
            }
            do throws(JobError) {
                job = try jobs.create(id: jobID ?? "", body: body, speed: speed, autoFinalize: autoFinalize,
                                      autoDismiss: autoDismiss, onError: .report, host: host)
            } catch {
                body.clean(nil)
                filter = nil
                throw Daemon.qmpError(error)
            }
            body.attach(job!)
        } catch {
            if let filter { dropBackupFilter(filter) }
            bitmap?.reclaim()
            throw error
        }
        let made = job!
        return GraphTransaction.Action(undo: { made.abandon() }, commit: { made.begin() })
    }

    /// QEMU's `bdrv_cbw_append`: opens a copy-before-write node over `source` writing to
    /// `target` and puts it in `source`'s place for every user of `source`.
    func openBackupFilter(source: BlockNode, target: BlockNode, name: String?) throws(QMPError) -> BlockNode {
        var options: JSONObject = ["driver": "copy-before-write", "file": .string(source.nodeName),
                                   "target": .string(target.nodeName)]
        if let name { options["node-name"] = .string(name) }
        let node: BlockNode
        do throws(BlockError) {
            node = try BlockdevFactory.open(options, in: nodes)
        } catch {
            throw .generic(error.message)
        }
        do throws(BlockError) {
            try graph.insertFilter(node, above: source)
        } catch {
            graph.abandon([node])
            throw .generic(error.message)
        }
        return node
    }

    func dropBackupFilter(_ filter: BlockNode) {
        graph.withLock {
            guard graph.contains(filter) else { return }
            do throws(BlockError) { try graph.dropFilter(filter) } catch {
                Log.error("removing filter '\(filter.nodeName)': \(error.message)")
            }
        }
    }

    /// blockd runs one backup of a node at a time: a second copy-before-write filter over the
    /// same node is refused (QEMU would stack a second one, and every client write would copy
    /// its old data twice).
    func checkNoBackup(_ node: BlockNode) throws(BlockError) {
        for parent in graph.parents(of: node) where parent.driver is any InsertedFilter && parent.chainChild?.node === node {
            throw BlockError(EBUSY, "Node '\(node.nodeName)' is busy: copy-before-write filter '\(parent.nodeName)' is already above it (one backup of a node at a time)")
        }
    }

    // MARK: copy-before-write added and deleted by the user

    /// After `blockdev-add` opened `added`: each copy-before-write node among them goes in
    /// above its file, which hands it the file's exports and parents in one drained section.
    func insertAddedFilters(_ added: [BlockNode]) throws(BlockError) {
        var inserted: [BlockNode] = []
        for node in added where node.driver is any InsertedFilter {
            guard let file = node.chainChild?.node else { continue }
            do throws(BlockError) {
                for parent in graph.parents(of: file) where parent !== node && parent.driver is any InsertedFilter && parent.chainChild?.node === file {
                    throw BlockError(EBUSY, "Node '\(file.nodeName)' is busy: copy-before-write filter '\(parent.nodeName)' is already above it (one backup of a node at a time)")
                }
                try graph.insertFilter(node, above: file)
                inserted.append(node)
            } catch {
                for n in inserted.reversed() { try? graph.replace(n, with: n.chainChild!.node) }
                throw error
            }
        }
    }

    /// `blockdev-del` of a copy-before-write node the user added: its exports and filter
    /// parents go back to its file first (undoing what `blockdev-add` did). A node that reads
    /// its snapshot (`snapshot-access`) must go first.
    func removeInsertedFilter(_ node: BlockNode) throws(BlockError) {
        guard node.driver is any InsertedFilter, let file = node.chainChild?.node else { return }
        if !graph.jobRoots(on: node).isEmpty || !graph.isMonitorOwned(node) { return }
        for parent in graph.parents(of: node) where !parent.isFilter {
            throw BlockError(EBUSY, "Block device \(node.nodeName) is in use by node '\(parent.nodeName)'")
        }
        try graph.replace(node, with: file)
    }
}
