import BlockCore
import BlockDrivers
import BlockGraph
import BlockJobs
import EventLoop
import Glibc
import JSON
import QMP

/// `block-commit`: resolves the plan, reopens base read-write when needed (through the graph),
/// and starts the commit job.
extension Daemon {
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
            if !plan.isActive && backingFile == nil, plan.overlay.map({ !$0.driver.canRecordBackingFile }) ?? false {
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
                    let fresh = try graph.reopenReadWrite(plan.base)
                    // New driver instances: the daemon watches them as it does every node it opens.
                    nodesOpened([fresh] + fresh.children.map(\.node))
                    plan = try CommitPlan.resolve(device: deviceNode, top: plan.top, base: graph.node(named: plan.base.nodeName))
                } catch {
                    throw .generic(error.message)
                }
            }
            let commit: CommitJob
            do throws(BlockError) {
                commit = try CommitJob(plan: plan, backingFile: backingFile, copyMode: CommitCopyMode(rawValue: mode) ?? .auto,
                                       graph: graph, id: id, failedAfterCreation: earlyJobFailure(id: id))
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
