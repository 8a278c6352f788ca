import Glibc
import JSON
import QMP

extension Subcommand {
    static let stream = Subcommand(
        name: "stream",
        synopsis: "NODE [--base NODE|--bottom NODE] [--job-id ID] [--speed BYTES/S] [--backing-file NAME] [--wait]",
        help: "copy the backing chain's data into NODE (block-stream); --wait shows progress until done"
    ) { inv in
        let base = try inv.option("--base")
        let bottom = try inv.option("--bottom")
        let id = try inv.option("--job-id")
        let speed = try inv.option("--speed")
        let backingFile = try inv.option("--backing-file")
        let wait = inv.flag("--wait")
        let node = try inv.positional("node name")
        try inv.finish()
        let jobID = id ?? "stream-\(node)"
        var args = JSONObject([("job-id", .string(jobID)), ("device", .string(node))])
        if let base { args["base-node"] = .string(base) }
        if let bottom { args["bottom"] = .string(bottom) }
        if let backingFile { args["backing-file"] = .string(backingFile) }
        if let speed {
            guard let n = parseSize(speed) else { throw inv.usage("--speed needs a number of bytes per second (k/M/G suffixes allowed)") }
            args["speed"] = .int(Int64(n))
        }
        inv.printResult(try inv.execute("block-stream", args))
        if wait { _ = try watchJobs(&inv, only: jobID) }
    }

    static let commit = Subcommand(
        name: "commit",
        synopsis: "DEVICE [--top NODE] [--base NODE] [--speed B/S] [--wait|--complete]",
        help: "copy TOP's data (default: DEVICE's active layer) down into BASE (block-commit); --wait shows progress until done (active commit: until READY), --complete then switches clients to base; also --job-id ID, --backing-file NAME, --copy-mode auto|background|write-blocking"
    ) { inv in
        let top = try inv.option("--top")
        let base = try inv.option("--base")
        let id = try inv.option("--job-id")
        let speed = try inv.option("--speed")
        let backingFile = try inv.option("--backing-file")
        let mode = try inv.option("--copy-mode")
        let wait = inv.flag("--wait")
        let complete = inv.flag("--complete")
        let device = try inv.positional("device node name")
        try inv.finish()
        let jobID = id ?? "commit-\(device)"
        var args = JSONObject([("job-id", .string(jobID)), ("device", .string(device))])
        if let top { args["top-node"] = .string(top) }
        if let base { args["base-node"] = .string(base) }
        if let backingFile { args["backing-file"] = .string(backingFile) }
        if let mode { args["x-copy-mode"] = .string(mode) }
        if let speed {
            guard let n = parseSize(speed) else { throw inv.usage("--speed needs a number of bytes per second (k/M/G suffixes allowed)") }
            args["speed"] = .int(Int64(n))
        }
        inv.printResult(try inv.execute("block-commit", args))
        guard wait || complete else { return }
        let status = try watchJobs(&inv, only: jobID, untilReady: true)
        if status == "ready" {
            guard complete else {
                print("\(jobID) is ready: base has caught up; run 'blockctl job-complete \(jobID)' (or commit --complete) to switch to base")
                return
            }
            _ = try inv.execute("job-complete", JSONObject([("id", .string(jobID))]))
            print("\(jobID): switching clients to base (job-complete)")
            _ = try watchJobs(&inv, only: jobID, untilReady: false)
        }
    }

    static let jobComplete = Subcommand(
        name: "job-complete", synopsis: "JOB",
        help: "complete a ready job (active commit: switch clients to base)"
    ) { inv in
        let id = try inv.positional("job id")
        try inv.finish()
        inv.printResult(try inv.execute("job-complete", JSONObject([("id", .string(id))])))
    }

    static let jobCancel = Subcommand(
        name: "job-cancel", synopsis: "JOB [--soft]",
        help: "cancel a job; --soft on a ready active commit ends it without switching to base (block-job-cancel)"
    ) { inv in
        let soft = inv.flag("--soft")
        let id = try inv.positional("job id")
        try inv.finish()
        if soft {
            inv.printResult(try inv.execute("block-job-cancel", JSONObject([("device", .string(id))])))
        } else {
            inv.printResult(try inv.execute("job-cancel", JSONObject([("id", .string(id))])))
        }
    }

    static let jobs = Subcommand(
        name: "jobs", synopsis: "[--watch]",
        help: "list block jobs with progress, rate and ETA (query-block-jobs); --watch redraws until none is left"
    ) { inv in
        let watch = inv.flag("--watch")
        try inv.finish()
        if !watch {
            let value = try inv.execute("query-block-jobs")
            if inv.json { print(value.serialized); return }
            print(renderTable(["JOB", "TYPE", "STATUS", "PROGRESS", "SPEED LIMIT"], (value.arrayValue ?? []).map { j in
                let len = j["len"]?.intValue ?? 0, off = j["offset"]?.intValue ?? 0
                let pct = len > 0 ? Double(off) * 100 / Double(len) : 100
                let speed = j["speed"]?.intValue ?? 0
                return [cell(j["device"]), cell(j["type"]), cell(j["status"]),
                        "\(humanSize(off)) / \(humanSize(len)) (\(Int(pct))%)", speed == 0 ? "-" : humanSize(speed) + "/s"]
            }))
            return
        }
        _ = try watchJobs(&inv, only: nil)
    }

    static func parseSize(_ text: String) -> UInt64? {
        let units: [Character: UInt64] = ["k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30]
        if let last = text.last, let unit = units[last], let n = UInt64(text.dropLast()) { return n * unit }
        return UInt64(text)
    }

    /// Polls query-block-jobs twice a second and draws one progress bar per job with its rate
    /// (from the last two samples) and ETA, until the jobs are gone.
    @discardableResult
    static func watchJobs(_ inv: inout Invocation, only: String?, untilReady: Bool = false) throws(QMPError) -> String {
        var last: [String: (offset: Int64, time: Double)] = [:]
        var rates: [String: Double] = [:]
        var drawn = 0
        var sawJob = false
        while true {
            let jobs = (try inv.execute("query-block-jobs").arrayValue ?? []).filter { j in
                only == nil || j["device"]?.stringValue == only
            }
            if drawn > 0 { print("\u{1B}[\(drawn)A", terminator: "") }
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            let now = Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
            for j in jobs {
                sawJob = true
                let id = j["device"]?.stringValue ?? "?"
                let len = j["len"]?.intValue ?? 0, off = j["offset"]?.intValue ?? 0
                if let prev = last[id], now > prev.time {
                    let r = Double(off - prev.offset) / (now - prev.time)
                    rates[id] = rates[id].map { $0 * 0.6 + r * 0.4 } ?? r
                }
                last[id] = (off, now)
                let frac = len > 0 ? Double(off) / Double(len) : 1
                let width = 30
                let filled = Int(frac * Double(width))
                let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
                let rate = rates[id] ?? 0
                let eta = rate > 0 ? "\(Int(Double(len - off) / rate))s" : "--"
                print("\u{1B}[2K\(id) [\(bar)] \(Int(frac * 100))% \(humanSize(off))/\(humanSize(len)) \(humanSize(Int64(rate)))/s ETA \(eta) \(cell(j["status"]))")
            }
            for _ in jobs.count..<max(drawn, jobs.count) { print("\u{1B}[2K") }
            drawn = max(drawn, jobs.count)
            fflushStdout()
            if untilReady, !jobs.isEmpty, jobs.allSatisfy({ $0["status"]?.stringValue == "ready" }) {
                print("ready")
                return "ready"
            }
            if jobs.isEmpty || jobs.allSatisfy({ ["concluded", "pending"].contains($0["status"]?.stringValue ?? "") }) {
                // A job asked for by id that is already gone ended before the first poll.
                if sawJob || only == nil || jobs.isEmpty { print("done"); return "done" }
            }
            usleep(500_000)
        }
    }
}
