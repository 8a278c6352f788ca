import BlockCore
import BlockDrivers
import BlockGraph
import BlockJobs
import Glibc
import JSON
import QMP
import Synchronization

/// Connects jobs to the daemon: their events become QMP events (QEMU's names, members and
/// order), completion runs under the control lock.
final class DaemonJobHost: JobHost, Sendable {
    unowned let daemon: Daemon
    private let fallback = Mutex(())

    init(daemon: Daemon) { self.daemon = daemon }

    func jobEvent(_ event: JobEvent, job: Job) {
        let (name, data) = DaemonJobHost.qapi(event, job: job)
        daemon.qmp?.emit(event: name, data: data)
    }

    func withControl(_ body: () -> Void) {
        if let qmp = daemon.qmp {
            qmp.withControlLock(body)
        } else {
            fallback.withLock { _ in body() }
        }
    }

    /// QEMU's event for a job event: `JOB_STATUS_CHANGE` and the `BLOCK_JOB_*` events.
    /// `.statusChange` arrives with the job's lock held, so it reads nothing from the job.
    static func qapi(_ event: JobEvent, job: Job) -> (String, JSONObject) {
        switch event {
        case .statusChange(let status):
            return ("JOB_STATUS_CHANGE", JSONObject([("status", .string(status.rawValue)), ("id", .string(job.id))]))
        case .ready:
            return ("BLOCK_JOB_READY", eventData(job))
        case .completed(let error):
            return ("BLOCK_JOB_COMPLETED", eventData(job, error: error))
        case .cancelled:
            return ("BLOCK_JOB_CANCELLED", eventData(job))
        case .pending:
            return ("BLOCK_JOB_PENDING", JSONObject([("type", .string(job.body.type)), ("id", .string(job.id))]))
        case .ioError(let operation, let action):
            return ("BLOCK_JOB_ERROR", JSONObject([
                ("device", .string(job.id)), ("operation", .string(operation)), ("action", .string(action)),
            ]))
        }
    }

    // Member order: what qemu-storage-daemon 7.2 sends (its dictionaries' hash order), so
    // transcripts compare byte for byte.

    /// `BLOCK_JOB_COMPLETED` / `_CANCELLED` / `_READY` data.
    static func eventData(_ job: Job, error: String? = nil) -> JSONObject {
        let i = job.info
        var o = JSONObject()
        o["device"] = .string(job.id)
        o["len"] = .int(Int64(i.total))
        o["offset"] = .int(Int64(i.current))
        o["speed"] = .int(Int64(i.speed))
        o["type"] = .string(job.body.type)
        if let error { o["error"] = .string(error) }
        return o
    }

    /// `query-block-jobs` entry (QAPI `BlockJobInfo`).
    static func blockJobInfo(_ job: Job) -> JSONObject {
        let i = job.info
        var o = JSONObject()
        o["auto-finalize"] = .bool(job.autoFinalize)
        o["io-status"] = .string(i.ioStatus)
        o["device"] = .string(job.id)
        o["auto-dismiss"] = .bool(job.autoDismiss)
        o["busy"] = .bool(i.busy)
        o["len"] = .int(Int64(i.total))
        o["offset"] = .int(Int64(i.current))
        o["status"] = .string(i.status.rawValue)
        o["paused"] = .bool(i.paused)
        o["speed"] = .int(Int64(i.speed))
        o["ready"] = .bool(i.status == .ready || i.status == .standby)
        o["type"] = .string(job.body.type)
        if let e = i.error { o["error"] = .string(e) }
        return o
    }

    /// `query-jobs` entry (QAPI `JobInfo`).
    static func jobInfo(_ job: Job) -> JSONObject {
        let i = job.info
        var o = JSONObject()
        o["current-progress"] = .int(Int64(i.current))
        o["status"] = .string(i.status.rawValue)
        o["total-progress"] = .int(Int64(i.total))
        o["type"] = .string(job.body.type)
        o["id"] = .string(job.id)
        if let e = i.error { o["error"] = .string(e) }
        return o
    }
}

extension Daemon {
    /// A job QEMU had created when its set-up failed goes at once: `JOB_STATUS_CHANGE`
    /// "created" then "null", before the command's error (`JobCreation`).
    func earlyJobFailure(id: String) -> @Sendable () -> Void {
        { [self] in
            for status in [JobStatus.created, .null] {
                qmp?.emit(event: "JOB_STATUS_CHANGE", data: JSONObject([("status", .string(status.rawValue)), ("id", .string(id))]))
            }
        }
    }

    /// Refuses a graph change on a node a job holds (QEMU's op blockers and wording).
    public func checkNotInJob(_ node: BlockNode) throws(BlockError) {
        if let hold = graph.jobRoots(on: node).first, let type = hold.jobType {
            throw BlockError(EBUSY, "Node '\(node.nodeName)' is busy: block device is in use by block job: \(type)")
        }
    }

    static func runVerb(_ body: () throws(JobError) -> Void) throws(QMPError) {
        do throws(JobError) { try body() } catch { throw Daemon.qmpError(error) }
    }

    static func qmpError(_ e: JobError) -> QMPError {
        e.kind == .deviceNotActive ? .deviceNotActive(e.message) : .generic(e.message)
    }

    /// Finds the node named by `base` (a file name) in `top`'s chain, as QEMU's
    /// `bdrv_find_backing_image` does: by the path of the file under each layer.
    func findBacking(named file: String, below top: BlockNode) -> BlockNode? {
        for node in top.chain.dropFirst() where !node.isFilter {
            if let path = StreamJob.filePath(of: node), path == file || StreamJob.absolute(path) == StreamJob.absolute(file) {
                return node
            }
        }
        return nil
    }

    /// `object-add` / `--object`: `throttle-group` here, TLS credentials and `authz-simple`
    /// in TLSObjects.swift, `secret` in BlockDrivers/Secrets.swift (`Daemon.userCreatableTypes`). Throttle limits come flat
    /// (`x-bps-total=…`) or in a `limits` object (`limits.bps-total`).
    public func objectAdd(_ options: JSONObject) throws(BlockError) {
        try Daemon.addObject(options, tlsObjects: tlsObjects)
    }

    /// `objectAdd` into `tlsObjects` and the throttle groups, without a daemon (qemu-nbd makes
    /// its objects before it starts one).
    static func addObject(_ options: JSONObject, tlsObjects: TLSObjects) throws(BlockError) {
        guard let type = options["qom-type"]?.stringValue else { throw BlockError.invalid("Parameter 'qom-type' is missing") }
        if TLSObjects.types.contains(type) { return try tlsObjects.add(type: type, options: options) }
        if type == "secret" {
            // Keys for rbd nodes (`key-secret`), in Secrets.swift.
            if let id = options["id"]?.stringValue, tlsObjects.contains(id) || ThrottleGroups.shared.group(id) != nil {
                throw BlockError.invalid("attempt to add duplicate property '\(id)' to object (type 'container')")
            }
            return try SecretStore.shared.add(options)
        }
        guard type == "throttle-group" else { throw BlockError.invalid("Parameter 'qom-type' does not accept value '\(type)'") }
        guard let id = options["id"]?.stringValue else { throw BlockError.invalid("Parameter 'id' is missing") }
        if tlsObjects.contains(id) || SecretStore.shared.contains(id) {
            throw BlockError.invalid("attempt to add duplicate property '\(id)' to object (type 'container')")
        }
        var props: [String: UInt64] = [:]
        func take(_ key: String, _ value: JSONValue) throws(BlockError) {
            switch value {
            case .int(let i) where i >= 0: props[key] = UInt64(i)
            case .string(let t):
                guard let n = OptionReader.parseSize(t) else { throw BlockError.invalid("Parameter '\(key)' expects a number") }
                props[key] = n
            case .object(let o):
                for (k, v) in o { try take(key + "." + k, v) }
            default: throw BlockError.invalid("Parameter '\(key)' expects a number")
            }
        }
        for (k, v) in options where k != "qom-type" && k != "id" { try take(k, v) }
        try ThrottleGroups.shared.add(ThrottleGroup(id: id, limits: ThrottleGroup.parseLimits(props)))
    }

    func registerJobCommands(on server: QMPServer) {
        let host = DaemonJobHost(daemon: self)
        server.register("object-add") { [self] args, _ throws(QMPError) in
            for key in args.object.keys { _ = args.value(key) }
            let typed = try Daemon.typedObjectOptions(args.object, keyval: false)
            do throws(BlockError) { try objectAdd(typed) } catch { throw .generic(error.message) }
            return .object([:])
        }
        server.register("object-del") { [self] args, _ throws(QMPError) in
            let id = try args.requiredString("id")
            try args.finish()
            do throws(BlockError) {
                if try tlsObjects.remove(id) { return .object([:]) }
            } catch { throw .generic(error.message) }
            if !ThrottleGroups.shared.remove(id) && !SecretStore.shared.remove(id) { throw .generic("object '\(id)' not found") }
            return .object([:])
        }
        server.register("block-stream") { [self] args, _ throws(QMPError) in
            let jobID = try args.string("job-id")
            let device = try args.requiredString("device")
            let base = try args.string("base")
            let baseNode = try args.string("base-node")
            let bottom = try args.string("bottom")
            let backingFile = try args.string("backing-file")
            let speed = try args.int("speed") ?? 0
            let onError = try args.enumValue("on-error", allowed: OnError.allCases.map(\.rawValue)) ?? "report"
            let filterNodeName = try args.string("filter-node-name")
            let autoFinalize = try args.bool("auto-finalize") ?? true
            let autoDismiss = try args.bool("auto-dismiss") ?? true
            try args.finish()
            if base != nil && baseNode != nil {
                throw .generic("'base' and 'base-node' cannot be specified at the same time")
            }
            if bottom != nil && base != nil {
                throw .generic("'bottom' and 'base' cannot be specified at the same time")
            }
            if bottom != nil && baseNode != nil {
                throw .generic("'bottom' and 'base-node' cannot be specified at the same time")
            }
            guard let deviceNode = graph.node(named: device) else {
                throw .generic("Cannot find device='\(device)' nor node-name='\(device)'")
            }
            let top = deviceNode.skippingFilters()
            var baseBS: BlockNode?
            if let baseNode {
                guard let n = graph.node(named: baseNode) else {
                    throw .generic("Cannot find device='' nor node-name='\(baseNode)'")
                }
                guard top.chain.dropFirst().contains(where: { $0 === n }) else {
                    throw .generic("Node '\(baseNode)' is not a backing image of '\(device)'")
                }
                baseBS = n
            }
            if let base {
                guard let n = findBacking(named: base, below: top) else {
                    throw .generic("Can't find '\(base)' in the backing chain")
                }
                baseBS = n
            }
            var bottomBS: BlockNode?
            if let bottom {
                guard let n = graph.node(named: bottom) else {
                    throw .generic("Cannot find device='' nor node-name='\(bottom)'")
                }
                bottomBS = n
            }
            if filterNodeName != nil {
                throw .generic("Parameter 'filter-node-name' is not supported by blockd: clients already read through the chain; add a copy-on-read filter with blockdev-add if wanted")
            }
            let id = jobID ?? ""
            do throws(JobError) { try JobRegistry.validate(id: id) } catch { throw Daemon.qmpError(error) }
            if top.backing == nil {
                throw .generic("Node '\(top.nodeName)' has no backing file: there is nothing to stream")
            }
            let plan: StreamPlan
            do throws(BlockError) {
                plan = try StreamPlan.resolve(device: deviceNode, base: baseBS, bottom: bottomBS)
            } catch {
                throw .generic(error.message)
            }
            if jobs.job(id: id) != nil { throw .generic("Job ID '\(id)' already in use") }
            for node in plan.top.chain.prefix(while: { $0 !== plan.base }) {
                do throws(BlockError) { try checkNotInJob(node) } catch { throw .generic(error.message) }
            }
            let stream: StreamJob
            do throws(BlockError) {
                stream = try StreamJob(plan: plan, backingFile: backingFile, graph: graph, id: id,
                                       failedAfterCreation: earlyJobFailure(id: id))
            } catch {
                throw .generic(error.message)
            }
            do throws(JobError) {
                try jobs.start(id: id, body: stream, speed: speed, autoFinalize: autoFinalize,
                               autoDismiss: autoDismiss, onError: OnError(rawValue: onError) ?? .report, host: host)
            } catch {
                stream.clean(nil)
                throw Daemon.qmpError(error)
            }
            return .object([:])
        }
        registerCommitCommand(on: server, host: host)
        registerMirrorCommand(on: server, host: host)
        registerBackupCommands(on: server, host: host)
        server.register("query-block-jobs") { [self] args, _ throws(QMPError) in
            try args.finish()
            return .array(jobs.all.filter { $0.status != .null }.map { .object(DaemonJobHost.blockJobInfo($0)) })
        }
        server.register("query-jobs") { [self] args, _ throws(QMPError) in
            try args.finish()
            return .array(jobs.all.filter { $0.status != .null }.map { .object(DaemonJobHost.jobInfo($0)) })
        }

        typealias Verb = @Sendable (Job, inout QMPArguments) throws(QMPError) -> Void
        func jobVerb(_ name: String, _ verb: @escaping Verb) {
            server.register(name) { [self] args, _ throws(QMPError) in
                let id = try args.requiredString("id")
                let job: Job
                do throws(JobError) { job = try jobs.find(id) } catch { throw Daemon.qmpError(error) }
                try verb(job, &args)
                return .object([:])
            }
        }
        func blockJobVerb(_ name: String, _ verb: @escaping Verb) {
            server.register(name) { [self] args, _ throws(QMPError) in
                let id = try args.requiredString("device")
                let job: Job
                do throws(JobError) { job = try jobs.findBlockJob(id) } catch { throw Daemon.qmpError(error) }
                try verb(job, &args)
                return .object([:])
            }
        }
        let pause: Verb = { job, args throws(QMPError) in try args.finish(); try Daemon.runVerb { () throws(JobError) in try job.pause() } }
        let resume: Verb = { job, args throws(QMPError) in try args.finish(); try Daemon.runVerb { () throws(JobError) in try job.resume() } }
        let complete: Verb = { job, args throws(QMPError) in try args.finish(); try Daemon.runVerb { () throws(JobError) in try job.complete() } }
        jobVerb("job-pause", pause)
        jobVerb("job-resume", resume)
        jobVerb("job-complete", complete)
        jobVerb("job-cancel") { job, args throws(QMPError) in
            try args.finish()
            try Daemon.runVerb { () throws(JobError) in try job.cancel(force: true) }
        }
        jobVerb("job-finalize") { job, args throws(QMPError) in
            try args.finish()
            try Daemon.runVerb { () throws(JobError) in try job.finalize() }
        }
        jobVerb("job-dismiss") { job, args throws(QMPError) in
            try args.finish()
            try Daemon.runVerb { () throws(JobError) in try job.dismiss() }
        }
        blockJobVerb("block-job-pause", pause)
        blockJobVerb("block-job-resume", resume)
        blockJobVerb("block-job-complete", complete)
        blockJobVerb("block-job-cancel") { job, args throws(QMPError) in
            let force = try args.bool("force") ?? false
            try args.finish()
            try Daemon.runVerb { () throws(JobError) in try job.cancel(force: force) }
        }
        blockJobVerb("block-job-set-speed") { job, args throws(QMPError) in
            guard let speed = try args.int("speed") else { throw args.missing("speed") }
            try args.finish()
            try Daemon.runVerb { () throws(JobError) in try job.setSpeed(speed) }
        }
        // QEMU 8.2's block-job-change (BlockJobChangeOptions): a mirror's copy-mode.
        server.register("block-job-change") { [self] args, _ throws(QMPError) in
            let id = try args.requiredString("id")
            let type = try args.requiredEnum("type", allowed: ["commit", "stream", "mirror", "backup", "create", "amend", "snapshot-load", "snapshot-save", "snapshot-delete"])
            let mode = type == "mirror" ? try args.enumValue("copy-mode", allowed: ["background", "write-blocking"]) : nil
            try args.finish()
            let job: Job
            do throws(JobError) { job = try jobs.findBlockJob(id) } catch { throw Daemon.qmpError(error) }
            if job.body.type != type { throw .generic("Job type does not match specified type") }
            guard let mode, let copyMode = MirrorCopyMode(rawValue: mode) else { return .object([:]) }
            try Daemon.runVerb { () throws(JobError) in try job.change(copyMode: copyMode) }
            return .object([:])
        }
        blockJobVerb("block-job-finalize") { job, args throws(QMPError) in
            try args.finish()
            try Daemon.runVerb { () throws(JobError) in try job.finalize() }
        }
        blockJobVerb("block-job-dismiss") { job, args throws(QMPError) in
            try args.finish()
            try Daemon.runVerb { () throws(JobError) in try job.dismiss() }
        }
    }
}
