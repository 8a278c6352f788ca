#if canImport(Glibc)
import Glibc
#endif
import JSON
import QMP

/// `blockctl backup start|finish|push`: the pull-mode flow of docs/backup.md in two commands,
/// and a push-mode `blockdev-backup` with progress and ETA.
///
/// The nodes, job and export a pull-mode backup of NODE makes are named after NODE, so that
/// `finish` finds them: `NODE-fleece` (the fleecing image), `NODE-cbw` (the copy-before-write
/// filter, also the job's `filter-node-name`), `NODE-snap` (snapshot-access), job
/// `NODE-backup`, export id and name `NODE-backup`.
extension Subcommand {
    static let backup = Subcommand(
        name: "backup",
        synopsis: "start|finish|push …",
        help: """
        point-in-time backups (docs/backup.md). start NODE --fleece FILE --checkpoint NEW [--since PREV] [--persistent]: \
        in one transaction bitmap NEW is added (PREV disabled) and the copy-before-write filter goes in above NODE with \
        the fleecing qcow2 FILE (as big as NODE); the frozen view is exported as NODE-backup, with \
        qemu:dirty-bitmap:PREV when --since is given. finish NODE --checkpoint NEW [--since PREV] [--failed]: removes the \
        export, the filter and the fleecing node; then removes PREV (success) or merges PREV into NEW and removes it \
        (--failed: the next incremental backup copies those extents again). push NODE TARGET [--sync full|top|none|incremental|bitmap] \
        [--bitmap B] [--bitmap-mode on-success|never|always] [--compress] [--speed B/S] [--job-id ID] [--no-wait]: \
        blockdev-backup into node TARGET, showing progress, rate and ETA until it ends
        """
    ) { inv in
        let verb = try inv.positional("backup action (start, finish, push)")
        switch verb {
        case "start": try backupStart(&inv)
        case "finish": try backupFinish(&inv)
        case "push": try backupPush(&inv)
        default: throw inv.usage("unknown backup action '\(verb)'")
        }
    }

    static func names(_ node: String) -> (fleece: String, cbw: String, snap: String, job: String, export: String) {
        (node + "-fleece", node + "-cbw", node + "-snap", node + "-backup", node + "-backup")
    }

    static func backupStart(_ inv: inout Invocation) throws {
        let fleece = try inv.option("--fleece")
        let checkpoint = try inv.option("--checkpoint")
        let since = try inv.option("--since")
        let persistent = inv.flag("--persistent")
        let node = try inv.positional("node name")
        try inv.finish()
        guard let fleece else { throw inv.usage("--fleece FILE (a qcow2 image as big as the node) is required") }
        guard let checkpoint else { throw inv.usage("--checkpoint NAME (the bitmap the next incremental backup uses) is required") }
        let n = names(node)
        try inv.execute("blockdev-add", JSONObject([
            ("driver", "qcow2"), ("node-name", .string(n.fleece)),
            ("file", .object(JSONObject([("driver", "file"), ("filename", .string(fleece))]))),
        ]))
        var actions: [JSONValue] = [
            .object(JSONObject([("type", "block-dirty-bitmap-add"), ("data", .object(JSONObject([
                ("node", .string(node)), ("name", .string(checkpoint)), ("persistent", .bool(persistent)),
            ])))])),
        ]
        if let since {
            actions.append(.object(JSONObject([("type", "block-dirty-bitmap-disable"), ("data", .object(JSONObject([
                ("node", .string(node)), ("name", .string(since)),
            ])))])))
        }
        actions.append(.object(JSONObject([("type", "blockdev-backup"), ("data", .object(JSONObject([
            ("job-id", .string(n.job)), ("device", .string(node)), ("target", .string(n.fleece)),
            ("sync", "none"), ("filter-node-name", .string(n.cbw)),
        ])))])))
        do {
            try inv.execute("transaction", JSONObject([("actions", .array(actions))]))
        } catch {
            // Nothing else changed (the transaction is all or nothing): drop the fleecing node.
            _ = try? inv.execute("blockdev-del", JSONObject([("node-name", .string(n.fleece))]))
            throw error
        }
        try inv.execute("blockdev-add", JSONObject([
            ("driver", "snapshot-access"), ("node-name", .string(n.snap)), ("file", .string(n.cbw)),
        ]))
        var export = JSONObject([("type", "nbd"), ("id", .string(n.export)), ("node-name", .string(n.snap)),
                                 ("name", .string(n.export))])
        if let since {
            export["bitmaps"] = .array([.object(JSONObject([("node", .string(node)), ("name", .string(since))]))])
        }
        try inv.execute("block-export-add", export)
        // What the client has to pull: PREV's dirty bytes, or the whole node.
        var bytes: Int64 = 0
        for info in try inv.execute("query-named-block-nodes", JSONObject([("flat", true)])).arrayValue ?? []
        where info["node-name"]?.stringValue == node {
            bytes = info["image"]?["virtual-size"]?.intValue ?? 0
            if let since {
                for b in info["dirty-bitmaps"]?.arrayValue ?? [] where b["name"]?.stringValue == since {
                    bytes = b["count"]?.intValue ?? bytes
                }
            }
        }
        if inv.json {
            print(JSONValue.object(JSONObject([
                ("export", .string(n.export)), ("context", since.map { .string("qemu:dirty-bitmap:" + $0) } ?? .null),
                ("bytes", .int(bytes)),
            ])).serialized)
            return
        }
        if let since {
            print("backup of \(node) started: pull the extents qemu:dirty-bitmap:\(since) marks (\(humanSize(bytes))) from export '\(n.export)'; writes from now on go to bitmap \(checkpoint)")
        } else {
            print("backup of \(node) started: pull all of export '\(n.export)' (\(humanSize(bytes))); writes from now on go to bitmap \(checkpoint)")
        }
        print("when done: blockctl backup finish \(node) --checkpoint \(checkpoint)\(since.map { " --since " + $0 } ?? "") [--failed]")
    }

    static func backupFinish(_ inv: inout Invocation) throws {
        let checkpoint = try inv.option("--checkpoint")
        let since = try inv.option("--since")
        let failed = inv.flag("--failed")
        let node = try inv.positional("node name")
        try inv.finish()
        guard let checkpoint else { throw inv.usage("--checkpoint NAME (the bitmap 'backup start' added) is required") }
        let n = names(node)
        // The export first (its clients are disconnected), then what reads the snapshot, then
        // the filter (cancelling the sync=none job takes it out), then the fleecing image.
        if try exists(&inv, "query-block-exports", key: "id", n.export) {
            try inv.execute("block-export-del", JSONObject([("id", .string(n.export)), ("mode", "hard")]))
            try waitGone(&inv, "query-block-exports", key: "id", n.export)
        }
        if try exists(&inv, "query-named-block-nodes", key: "node-name", n.snap) {
            try inv.execute("blockdev-del", JSONObject([("node-name", .string(n.snap))]))
        }
        if try exists(&inv, "query-block-jobs", key: "device", n.job) {
            try inv.execute("block-job-cancel", JSONObject([("device", .string(n.job)), ("force", true)]))
            try waitGone(&inv, "query-block-jobs", key: "device", n.job)
        }
        if try exists(&inv, "query-named-block-nodes", key: "node-name", n.fleece) {
            try inv.execute("blockdev-del", JSONObject([("node-name", .string(n.fleece))]))
        }
        if let since {
            if failed {
                // The extents of PREV were not backed up: NEW takes them over.
                try inv.execute("block-dirty-bitmap-merge", JSONObject([
                    ("node", .string(node)), ("target", .string(checkpoint)), ("bitmaps", .array([.string(since)])),
                ]))
            }
            try inv.execute("block-dirty-bitmap-remove", JSONObject([("node", .string(node)), ("name", .string(since))]))
        } else if failed {
            print("the failed backup was a full one: take a full backup again (bitmap \(checkpoint) only holds writes since it started)")
        }
        if !inv.json {
            print(failed ? "backup of \(node) torn down; the next incremental backup uses \(checkpoint) (it includes what this one missed)"
                         : "backup of \(node) finished; the next incremental backup uses \(checkpoint)")
        }
    }

    static func backupPush(_ inv: inout Invocation) throws {
        let sync = try inv.option("--sync") ?? "full"
        let bitmap = try inv.option("--bitmap")
        let bitmapMode = try inv.option("--bitmap-mode")
        let speed = try inv.option("--speed")
        let jobID = try inv.option("--job-id")
        let compress = inv.flag("--compress")
        let noWait = inv.flag("--no-wait")
        let node = try inv.positional("node name")
        let target = try inv.positional("target node name")
        try inv.finish()
        let id = jobID ?? names(node).job
        var args = JSONObject([("job-id", .string(id)), ("device", .string(node)), ("target", .string(target)),
                               ("sync", .string(sync))])
        if let bitmap { args["bitmap"] = .string(bitmap) }
        if let bitmapMode { args["bitmap-mode"] = .string(bitmapMode) }
        if compress { args["compress"] = true }
        if let speed {
            guard let s = parseSize(speed) else { throw inv.usage("--speed needs a number of bytes per second (k/M/G suffixes allowed)") }
            args["speed"] = .int(Int64(s))
        }
        inv.printResult(try inv.execute("blockdev-backup", args))
        if noWait { return }
        _ = try watchJobs(&inv, only: id)
    }

    static func exists(_ inv: inout Invocation, _ query: String, key: String, _ value: String) throws(QMPError) -> Bool {
        let args: JSONObject? = query == "query-named-block-nodes" ? JSONObject([("flat", true)]) : nil
        return (try inv.execute(query, args).arrayValue ?? []).contains { $0[key]?.stringValue == value }
    }

    /// Polls `query` until no entry has `key` == `value` (an export or job that ends after
    /// its command returned), for up to 60 s.
    static func waitGone(_ inv: inout Invocation, _ query: String, key: String, _ value: String) throws {
        for _ in 0..<1200 {
            if try !exists(&inv, query, key: key, value) { return }
            usleep(50_000)
        }
        throw UsageError(message: "'\(value)' is still listed by \(query) after 60 s")
    }
}
