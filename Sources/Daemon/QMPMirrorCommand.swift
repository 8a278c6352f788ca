import BlockCore
import BlockDrivers
import BlockGraph
import BlockJobs
import Glibc
import JSON
import QMP

/// `blockdev-mirror`: QEMU 7.2's arguments, checks (in `qmp_blockdev_mirror`,
/// `blockdev_mirror_common`, `mirror_start_job` order) and error texts, then the mirror job.
extension Daemon {
    func registerMirrorCommand(on server: QMPServer, host: DaemonJobHost) {
        server.register("blockdev-mirror") { [self] args, _ throws(QMPError) in
            let jobID = try args.string("job-id")
            let device = try args.requiredString("device")
            let targetName = try args.requiredString("target")
            let replaces = try args.string("replaces")
            let sync = try args.requiredEnum("sync", allowed: ["top", "full", "none", "incremental", "bitmap"])
            let speed = try args.int("speed") ?? 0
            let granularity = try args.uint32("granularity") ?? 0
            let bufSize = try args.int("buf-size") ?? 0
            let onSourceError = try args.enumValue("on-source-error", allowed: OnError.allCases.map(\.rawValue)) ?? "report"
            let onTargetError = try args.enumValue("on-target-error", allowed: OnError.allCases.map(\.rawValue)) ?? "report"
            let filterNodeName = try args.string("filter-node-name")
            let copyMode = try args.enumValue("copy-mode", allowed: ["background", "write-blocking"]) ?? "background"
            let autoFinalize = try args.bool("auto-finalize") ?? true
            let autoDismiss = try args.bool("auto-dismiss") ?? true
            try args.finish()
            // qmp_get_root_bs
            guard let source = graph.node(named: device) else {
                throw .generic("Cannot find device='\(device)' nor node-name='\(device)'")
            }
            if !isRootNode(source) { throw .generic("Need a root block node") }
            guard let target = graph.node(named: targetName) else {
                throw .generic("Cannot find device='\(targetName)' nor node-name='\(targetName)'")
            }
            // blockdev_mirror_common
            if granularity != 0 && (granularity < 512 || granularity > 64 << 20) {
                throw .generic("Parameter 'granularity' expects a value in range [512B, 64MB]")
            }
            if granularity & (granularity &- 1) != 0 {
                throw .generic("Parameter 'granularity' expects a power of 2")
            }
            do throws(BlockError) {
                try checkNotInJob(source)
                try checkNotInJob(target)
                try checkNotBacking(target)
            } catch {
                throw .generic(error.message)
            }
            var replacesNode: BlockNode?
            if let replaces {
                guard let n = graph.node(named: replaces) else {
                    throw .generic("Failed to find node with node-name='\(replaces)'")
                }
                do throws(BlockError) {
                    try checkNotInJob(n)
                    try checkNotBacking(n)
                } catch {
                    throw .generic(error.message)
                }
                // bdrv_recurse_can_replace: only the source or a node below it through filters.
                var reach: BlockNode? = source
                while let r = reach, r !== n { reach = r.isFilter ? r.chainChild?.node : nil }
                if reach == nil {
                    throw .generic("Cannot replace '\(replaces)' by a node mirrored from '\(device)', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data")
                }
                if n.length != source.length {
                    throw .generic("cannot replace image with a mirror image of different size")
                }
                replacesNode = n
            }
            // mirror_start
            guard let syncMode = MirrorSyncMode(rawValue: sync) else {
                throw .generic("Sync mode '\(sync)' not supported")
            }
            // mirror_start_job
            if bufSize < 0 { throw .generic("Invalid parameter 'buf-size'") }
            if source.skippingFilters() === target.skippingFilters() {
                throw .generic("Can't mirror node into itself")
            }
            let id = jobID ?? ""
            do throws(JobError) { try JobRegistry.validate(id: id) } catch { throw Daemon.qmpError(error) }
            if jobs.job(id: id) != nil { throw .generic("Job ID '\(id)' already in use") }
            var options = MirrorOptions()
            options.sync = syncMode
            options.granularity = UInt64(granularity)
            options.bufSize = UInt64(bufSize)
            options.copyMode = MirrorCopyMode(rawValue: copyMode) ?? .background
            options.onSourceError = OnError(rawValue: onSourceError) ?? .report
            options.onTargetError = OnError(rawValue: onTargetError) ?? .report
            options.unmap = true
            options.replaces = replacesNode
            if speed < 0 {
                // block_job_create fails after job_create: QEMU's job exists for a moment.
                earlyJobFailure(id: id)()
                throw .generic("Parameter 'speed' expects a non-negative value")
            }
            let mirror: MirrorJob
            do throws(BlockError) {
                mirror = try MirrorJob(source: source, target: target, options: options, graph: graph, id: id,
                                       filterNodeName: filterNodeName, failedAfterCreation: earlyJobFailure(id: id))
            } catch {
                throw .generic(error.message)
            }
            do throws(JobError) {
                try jobs.start(id: id, body: mirror, speed: speed, autoFinalize: autoFinalize,
                               autoDismiss: autoDismiss, onError: options.onSourceError, host: host)
            } catch {
                mirror.clean(nil)
                throw Daemon.qmpError(error)
            }
            return .object([:])
        }
    }

    /// QEMU's op blockers of a backing link: a node used as some node's backing file cannot
    /// be a mirror target or be replaced ("node is used as backing hd of 'top'").
    func checkNotBacking(_ node: BlockNode) throws(BlockError) {
        if let parent = graph.parents(of: node).first(where: { $0.backing === node }) {
            throw BlockError(EBUSY, "Node '\(node.nodeName)' is busy: node is used as backing hd of '\(parent.nodeName)'")
        }
    }

    /// QEMU's `bdrv_is_root_node`: only exports and other block backends use the node — no
    /// parent node, and no job (QEMU's job holds are parents that are not backends).
    func isRootNode(_ node: BlockNode) -> Bool {
        graph.parents(of: node).isEmpty && graph.jobRoots(on: node).isEmpty
    }
}
