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
        if wait { try watchJobs(&inv, only: jobID) }
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
        try watchJobs(&inv, only: nil)
    }

    static func parseSize(_ text: String) -> UInt64? {
        let units: [Character: UInt64] = ["k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30]
        if let last = text.last, let unit = units[last], let n = UInt64(text.dropLast()) { return n * unit }
        return UInt64(text)
    }

    /// Polls query-block-jobs twice a second and draws one progress bar per job with its rate
    /// (from the last two samples) and ETA, until the jobs are gone.
    static func watchJobs(_ inv: inout Invocation, only: String?) throws(QMPError) {
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
            if jobs.isEmpty || jobs.allSatisfy({ ["concluded", "pending"].contains($0["status"]?.stringValue ?? "") }) {
                if sawJob || only == nil { print("done"); return }
            }
            usleep(500_000)
        }
    }
}
