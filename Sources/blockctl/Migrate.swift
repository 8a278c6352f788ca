#if canImport(Glibc)
import Glibc
#endif
import JSON
import QMP

/// `blockctl migrate`: live storage migration of one node to another blockd (or any QMP
/// daemon with an NBD server) — the QMP sequence of `docs/migration.md`, with progress.
extension Subcommand {
    static let migrate = Subcommand(
        name: "migrate",
        synopsis: "NODE --to DEST_QMP --dest-node NODE --dest-nbd ADDR [--source-nbd ADDR] [--tls-creds ID] [--tls-hostname NAME] [--speed B/S] [--switch-at BYTES] [--no-complete]",
        help: "move NODE's disk to DEST_QMP's --dest-node (same size, empty, writable) while clients keep writing: export it there, mirror into it over NBD (ADDR = unix:PATH or HOST:PORT), switch to write-blocking near the end, job-complete at READY; persistent bitmaps follow (needs --source-nbd, the source's NBD server, reachable from the destination). See docs/migration.md"
    ) { inv in
        let destQMP = try inv.option("--to")
        let destNode = try inv.option("--dest-node")
        let destNBD = try inv.option("--dest-nbd")
        let sourceNBD = try inv.option("--source-nbd")
        let tlsCreds = try inv.option("--tls-creds")
        let tlsHostname = try inv.option("--tls-hostname")
        let speedText = try inv.option("--speed")
        let switchText = try inv.option("--switch-at")
        let noComplete = inv.flag("--no-complete")
        let node = try inv.positional("node name")
        try inv.finish()
        guard let destQMP else { throw inv.usage("--to needs the destination daemon's QMP socket") }
        guard let destNode else { throw inv.usage("--dest-node needs the destination node (an empty writable image of the same size)") }
        guard let destNBD, let destServer = nbdServer(destNBD) else {
            throw inv.usage("--dest-nbd needs the destination's NBD server: unix:PATH or HOST:PORT")
        }
        var speed: UInt64 = 0
        if let speedText {
            guard let n = parseSize(speedText) else { throw inv.usage("--speed needs a number of bytes per second (k/M/G suffixes allowed)") }
            speed = n
        }
        var switchAt: UInt64 = 64 << 20
        if let switchText {
            guard let n = parseSize(switchText) else { throw inv.usage("--switch-at needs a number of bytes (k/M/G suffixes allowed)") }
            switchAt = n
        }
        var migration = Migration(node: node, destNode: destNode, destServer: destServer,
                                  sourceServer: sourceNBD.flatMap(nbdServer), tlsCreds: tlsCreds, tlsHostname: tlsHostname,
                                  speed: speed, switchAt: switchAt, complete: !noComplete)
        if sourceNBD != nil && migration.sourceServer == nil {
            throw inv.usage("--source-nbd needs the source's NBD server: unix:PATH or HOST:PORT")
        }
        let dest = try QMPClient(path: destQMP)
        defer { dest.close() }
        try migration.run(source: inv.connect(), dest: dest)
    }

    /// `unix:PATH` or `HOST:PORT` as a QAPI `SocketAddress`.
    static func nbdServer(_ text: String) -> JSONObject? {
        if text.hasPrefix("unix:") {
            return JSONObject([("type", "unix"), ("path", .string(String(text.dropFirst(5))))])
        }
        guard let colon = text.lastIndex(of: ":"), !text[..<colon].isEmpty, UInt16(text[text.index(after: colon)...]) != nil else {
            return nil
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return JSONObject([("type", "inet"), ("host", .string(host)), ("port", .string(String(text[text.index(after: colon)...])))])
    }
}

/// One migration: the steps of docs/migration.md, undone (best effort) when a step fails
/// before the switch.
struct Migration {
    let node: String
    let destNode: String
    let destServer: JSONObject
    let sourceServer: JSONObject?
    let tlsCreds: String?
    let tlsHostname: String?
    let speed: UInt64
    let switchAt: UInt64
    let complete: Bool

    var jobID: String { "migrate-\(node)" }
    var targetNode: String { "migrate-target-\(node)" }
    var destExport: String { "migrate-\(destNode)" }
    var bitmapExport: String { "migrate-bitmaps-\(node)" }

    /// What was set up so far (for the undo).
    private var exported = false, targetAdded = false, jobStarted = false, canSwitch = true
    private var bitmapsAdded: [String] = []

    init(node: String, destNode: String, destServer: JSONObject, sourceServer: JSONObject?, tlsCreds: String?,
         tlsHostname: String?, speed: UInt64, switchAt: UInt64, complete: Bool) {
        self.node = node
        self.destNode = destNode
        self.destServer = destServer
        self.sourceServer = sourceServer
        self.tlsCreds = tlsCreds
        self.tlsHostname = tlsHostname
        self.speed = speed
        self.switchAt = switchAt
        self.complete = complete
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    static func nodeInfo(_ client: QMPClient, _ name: String) throws -> JSONValue {
        let nodes = try client.execute("query-named-block-nodes", arguments: JSONObject([("flat", true)])).arrayValue ?? []
        guard let n = nodes.first(where: { $0["node-name"]?.stringValue == name }) else {
            throw Failure(description: "no node '\(name)'")
        }
        return n
    }

    mutating func run(source: QMPClient, dest: QMPClient) throws {
        let start = Migration.now()
        // 1. Sizes, and the source's persistent bitmaps.
        let src = try Migration.nodeInfo(source, node)
        let dst: JSONValue
        do { dst = try Migration.nodeInfo(dest, destNode) } catch { throw Failure(description: "destination: \(error)") }
        let size = src["image"]?["virtual-size"]?.intValue ?? -1
        let destSize = dst["image"]?["virtual-size"]?.intValue ?? -2
        if size != destSize {
            throw Failure(description: "destination node '\(destNode)' is \(destSize) bytes, '\(node)' is \(size): create it with the same size")
        }
        let bitmaps: [(name: String, granularity: Int64)] = (src["dirty-bitmaps"]?.arrayValue ?? []).compactMap { b in
            guard b["persistent"]?.boolValue == true, let name = b["name"]?.stringValue,
                  let g = b["granularity"]?.intValue else { return nil }
            return (name, g)
        }
        if !bitmaps.isEmpty && sourceServer == nil {
            throw Failure(description: "'\(node)' has persistent bitmaps (\(bitmaps.map(\.name).joined(separator: ", "))): give --source-nbd so the destination can read them")
        }
        print("migrating '\(node)' (\(humanSize(size))) to '\(destNode)'\(bitmaps.isEmpty ? "" : " with bitmaps \(bitmaps.map(\.name).joined(separator: ", "))")")
        do {
            try setUp(source: source, dest: dest, bitmaps: bitmaps)
            try copy(source: source, dest: dest, bitmaps: bitmaps)
        } catch {
            undo(source: source, dest: dest)
            throw error
        }
        guard complete else {
            print("\(jobID) is ready; run 'blockctl job-complete \(jobID)' to switch (bitmaps are not carried then)")
            return
        }
        try switchOver(source: source, dest: dest, bitmaps: bitmaps)
        let took = Migration.now() - start
        print("done: '\(node)' now writes to '\(destNode)' through node '\(targetNode)' (\(humanSize(size)) in \(Int(took)).\(Int(took * 10) % 10) s); clients can move to the destination's export '\(destExport)'")
    }

    /// Steps 1–4: the destination exports its node and gets disabled bitmaps; the source adds
    /// the nbd node and starts the mirror in background mode.
    private mutating func setUp(source: QMPClient, dest: QMPClient, bitmaps: [(name: String, granularity: Int64)]) throws {
        _ = try dest.execute("block-export-add", arguments: JSONObject([
            ("type", "nbd"), ("id", .string(destExport)), ("node-name", .string(destNode)),
            ("name", .string(destExport)), ("writable", true),
        ]))
        exported = true
        for b in bitmaps {
            _ = try dest.execute("block-dirty-bitmap-add", arguments: JSONObject([
                ("node", .string(destNode)), ("name", .string(b.name)), ("granularity", .int(b.granularity)),
                ("persistent", true), ("disabled", true),
            ]))
            bitmapsAdded.append(b.name)
        }
        var nbd = JSONObject([("driver", "nbd"), ("node-name", .string(targetNode)), ("server", .object(destServer)),
                              ("export", .string(destExport))])
        if let tlsCreds { nbd["tls-creds"] = .string(tlsCreds) }
        if let tlsHostname { nbd["tls-hostname"] = .string(tlsHostname) }
        _ = try source.execute("blockdev-add", arguments: nbd)
        targetAdded = true
        // A daemon without block-job-change (QEMU before 8.2) blocks writes from the start.
        let commands = (try source.execute("query-commands").arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        canSwitch = commands.contains("block-job-change")
        var mirror = JSONObject([("job-id", .string(jobID)), ("device", .string(node)), ("target", .string(targetNode)),
                                 ("sync", "full"), ("copy-mode", canSwitch ? "background" : "write-blocking"),
                                 ("auto-dismiss", false)])
        if speed > 0 { mirror["speed"] = .int(Int64(speed)) }
        _ = try source.execute("blockdev-mirror", arguments: mirror)
        jobStarted = true
    }

    /// Step 5: progress until READY; switches to write-blocking once at most `switchAt` bytes
    /// remain, or when the remainder stopped shrinking for three seconds (a writer as fast as
    /// the copy): from then on no client write can leave the destination behind.
    private func copy(source: QMPClient, dest: QMPClient, bitmaps: [(name: String, granularity: Int64)]) throws {
        var switched = !canSwitch
        var best = Int64.max
        var bestAt = Migration.now()
        var lastOffset: Int64 = 0, lastTime = Migration.now(), rate = 0.0
        while true {
            let jobs = try source.execute("query-block-jobs").arrayValue ?? []
            guard let j = jobs.first(where: { $0["device"]?.stringValue == jobID }) else {
                throw Failure(description: "job \(jobID) disappeared")
            }
            let status = j["status"]?.stringValue ?? "?"
            if status == "concluded" || status == "aborting" {
                let all = (try? source.execute("query-jobs"))?.arrayValue ?? []
                let info = all.first { $0["id"]?.stringValue == jobID }
                throw Failure(description: "mirror failed: \(info?["error"]?.stringValue ?? status)")
            }
            let len = j["len"]?.intValue ?? 0, off = j["offset"]?.intValue ?? 0
            let remaining = max(0, len - off)
            let now = Migration.now()
            if now > lastTime {
                let r = Double(off - lastOffset) / (now - lastTime)
                rate = rate == 0 ? r : rate * 0.6 + r * 0.4
            }
            lastOffset = off
            lastTime = now
            if remaining < best { best = remaining; bestAt = now }
            let frac = len > 0 ? Double(off) / Double(len) : 1
            let filled = Int(frac * 30)
            print("\u{1B}[2K\r\(jobID) [\(String(repeating: "#", count: filled))\(String(repeating: "-", count: 30 - filled))] \(Int(frac * 100))% \(humanSize(off))/\(humanSize(len)) \(humanSize(Int64(rate)))/s \(switched ? "write-blocking" : "background") \(status)",
                  terminator: "")
            fflushStdout()
            if status == "ready" {
                print("")
                return
            }
            // len is 0 until the job has its dirty set (sync=full zeroes the target first).
            if !switched && len > 0 && (UInt64(remaining) <= switchAt || now - bestAt >= 3) {
                _ = try source.execute("block-job-change", arguments: JSONObject([
                    ("id", .string(jobID)), ("type", "mirror"), ("copy-mode", "write-blocking"),
                ]))
                switched = true
                print("\n\(jobID): \(humanSize(remaining)) left; client writes now reach the destination before their reply (write-blocking)")
            }
            usleep(200_000)
        }
    }

    /// Steps 6–8: destination bitmaps start recording, job-complete switches the source's
    /// users to the nbd node, then the source's bitmaps (frozen on the old node) are merged
    /// into the destination's over NBD.
    private func switchOver(source: QMPClient, dest: QMPClient, bitmaps: [(name: String, granularity: Int64)]) throws {
        for b in bitmaps {
            _ = try dest.execute("block-dirty-bitmap-enable", arguments: JSONObject([("node", .string(destNode)), ("name", .string(b.name))]))
        }
        _ = try source.execute("job-complete", arguments: JSONObject([("id", .string(jobID))]))
        while true {
            let info = (try source.execute("query-jobs").arrayValue ?? []).first { $0["id"]?.stringValue == jobID }
            guard let info else { throw Failure(description: "job \(jobID) disappeared") }
            if info["status"]?.stringValue == "concluded" {
                _ = try source.execute("job-dismiss", arguments: JSONObject([("id", .string(jobID))]))
                if let e = info["error"]?.stringValue { throw Failure(description: "the switch failed: \(e)") }
                break
            }
            usleep(50_000)
        }
        print("\(jobID): switched; '\(node)' is no longer written")
        guard !bitmaps.isEmpty, let sourceServer else { return }
        // The old node gets no writes now; its bitmaps stop recording and are exported
        // read-only for the destination to read.
        for b in bitmaps {
            _ = try source.execute("block-dirty-bitmap-disable", arguments: JSONObject([("node", .string(node)), ("name", .string(b.name))]))
        }
        _ = try source.execute("block-export-add", arguments: JSONObject([
            ("type", "nbd"), ("id", .string(bitmapExport)), ("node-name", .string(node)), ("name", .string(bitmapExport)),
            ("writable", false), ("bitmaps", .array(bitmaps.map { .string($0.name) })),
        ]))
        defer { _ = try? source.execute("block-export-del", arguments: JSONObject([("id", .string(bitmapExport))])) }
        for b in bitmaps {
            let reader = "migrate-bitmap-\(b.name)"
            var nbd = JSONObject([("driver", "nbd"), ("node-name", .string(reader)), ("server", .object(sourceServer)),
                                  ("export", .string(bitmapExport)), ("x-dirty-bitmap", .string("qemu:dirty-bitmap:\(b.name)")),
                                  ("read-only", true)])
            if let tlsCreds { nbd["tls-creds"] = .string(tlsCreds) }
            if let tlsHostname { nbd["tls-hostname"] = .string(tlsHostname) }
            _ = try dest.execute("blockdev-add", arguments: nbd)
            defer { _ = try? dest.execute("blockdev-del", arguments: JSONObject([("node-name", .string(reader))])) }
            _ = try dest.execute("block-dirty-bitmap-merge", arguments: JSONObject([
                ("node", .string(destNode)), ("target", .string(b.name)),
                ("bitmaps", .array([.object(JSONObject([("node", .string(reader)), ("name", .string(b.name))]))])),
            ]))
            // The switch carried an in-memory copy onto the source's nbd node: the
            // destination's persistent bitmap is the one that counts from now on.
            _ = try? source.execute("block-dirty-bitmap-remove", arguments: JSONObject([("node", .string(targetNode)), ("name", .string(b.name))]))
            print("bitmap '\(b.name)': merged into '\(destNode)' on the destination")
        }
    }

    /// Before the switch, a failure leaves both sides as they were (best effort).
    private func undo(source: QMPClient, dest: QMPClient) {
        if jobStarted {
            _ = try? source.execute("job-cancel", arguments: JSONObject([("id", .string(jobID))]))
            for _ in 0..<200 {
                let info = ((try? source.execute("query-jobs"))?.arrayValue ?? []).first { $0["id"]?.stringValue == jobID }
                if info == nil { break }
                if info?["status"]?.stringValue == "concluded" {
                    _ = try? source.execute("job-dismiss", arguments: JSONObject([("id", .string(jobID))]))
                    break
                }
                usleep(50_000)
            }
        }
        if targetAdded { _ = try? source.execute("blockdev-del", arguments: JSONObject([("node-name", .string(targetNode))])) }
        for b in bitmapsAdded {
            _ = try? dest.execute("block-dirty-bitmap-remove", arguments: JSONObject([("node", .string(destNode)), ("name", .string(b))]))
        }
        if exported { _ = try? dest.execute("block-export-del", arguments: JSONObject([("id", .string(destExport))])) }
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
