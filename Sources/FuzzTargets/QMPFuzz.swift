import BlockCore
import BlockJobs
import Daemon
import EventLoop
import Glibc
import JSON
import QMP

/// One fuzz input is a QMP byte stream. It goes through the real stream splitter and JSON
/// parser, then every request is executed by a real `Daemon` — its QMP command table and
/// argument decoding, the block graph, jobs, exports — through a monitor socket, as a client
/// would send it. A fresh daemon (one loop, one worker, no NBD listener until a command
/// starts one) serves each input, in a sandbox directory with a small qcow2 chain
/// (`top.qcow2` → `base.qcow2`) and a raw image.
///
/// The sandbox policy keeps a fuzzer from touching the machine: every `filename`, `path`,
/// `backing-file`, `base` and `top` string is moved into the sandbox (its last path
/// component), and requests for `quit`, or naming a network or fd address, are dropped. So
/// the daemon sees re-serialized requests; the raw bytes exercise the splitter and parsers.
enum QMPFuzz {
    static let sandbox: String = {
        signal(SIGPIPE, SIG_IGN)
        return FuzzSupport.scratchDirectory("qmp")
    }()

    /// The sandbox's images, read once from `Fuzz/Sandbox` in the source tree.
    static let templates: [(name: String, bytes: [UInt8])] = {
        let file = #filePath
        let root = String(file[..<file.firstRange(of: "/Sources/FuzzTargets/")!.lowerBound])
        return ["base.qcow2", "top.qcow2", "raw.img"].map { name in
            guard let bytes = FuzzSupport.readFile(root + "/Fuzz/Sandbox/" + name) else {
                fatalError("QMP fuzz harness: \(root)/Fuzz/Sandbox/\(name) is missing")
            }
            return (name, bytes)
        }
    }()

    static let pathKeys: Set<String> = ["filename", "path", "backing-file", "base", "top"]
    static let refusedAddressTypes: Set<String> = ["inet", "fd", "vsock"]

    /// Moves every path into the sandbox; nil when the request must not run.
    static func sanitize(_ value: JSONValue, key: String? = nil) -> JSONValue? {
        switch value {
        case .string(let s):
            if let key, pathKeys.contains(key) {
                let last = s.split(separator: "/").last.map(String.init) ?? ""
                return .string(sandbox + "/" + (last.isEmpty || last == ".." || last == "." ? "x" : last))
            }
            if key == "type" && refusedAddressTypes.contains(s) { return nil }
            if (key == "execute" || key == "exec-oob") && s == "quit" { return nil }
            return value
        case .array(let items):
            var out: [JSONValue] = []
            for item in items {
                guard let clean = sanitize(item, key: key) else { return nil }
                out.append(clean)
            }
            return .array(out)
        case .object(let object):
            var out = JSONObject()
            for (k, v) in object {
                guard let clean = sanitize(v, key: k) else { return nil }
                out[k] = clean
            }
            return .object(out)
        default:
            return value
        }
    }

    static func run(_ data: [UInt8]) -> [String] {
        var problems: [String] = []
        // The splitter, fed in two pieces (resumption), then the requests it found.
        var parser = QMPStreamParser(maxMessageBytes: 1 << 16)
        let cut = data.isEmpty ? 0 : Int(data[0]) % (data.count + 1)
        var items = parser.feed(data[..<cut])
        items += parser.feed(data[cut...])
        var requests: [String] = []
        for item in items {
            guard case .value(let value) = item else { continue }
            // Serializing and parsing again gives the same value.
            let text = value.serialized
            do {
                let back = try JSONParser.parse(text)
                if back != value { problems.append("JSON round trip changed \(text)") }
            } catch {
                problems.append("JSON round trip: \(text) does not parse: \(error)")
            }
            if let clean = sanitize(value) { requests.append(clean.serialized) }
        }
        if requests.isEmpty || requests.count > 64 { return problems }

        for t in templates { FuzzSupport.writeFile(sandbox + "/" + t.name, t.bytes) }
        let monitor = sandbox + "/qmp.sock"
        let daemon = Daemon(configuration: Daemon.Configuration(loopCount: 1, workerCount: 1))
        do {
            try daemon.addMonitor(path: monitor)
        } catch {
            daemon.shutdown()
            return problems + ["QMP harness: \(error)"]
        }
        let stream = Array((["{\"execute\": \"qmp_capabilities\"}"] + requests).joined(separator: "\n").utf8) + [10]
        switch FuzzSupport.exchange(unixPath: monitor, input: stream, seconds: 30) {
        case .failed(let why):
            problems.append("QMP harness: \(why)")
        case .timedOut(let got):
            problems.append("the monitor neither answered nor closed within 30 s (\(got.count) bytes received)")
        case .closed(let got):
            problems += checkReplies(got, requests: requests.count + 1)
        }
        final class Weak { weak var node: BlockNode?; let name: String; init(_ n: BlockNode) { node = n; name = n.nodeName } }
        let tracked = getenv("BLOCKD_FUZZ_TRACE") != nil ? daemon.graph.all.map(Weak.init) : []
        final class WeakJob { weak var job: Job?; init(_ j: Job) { job = j } }
        let trackedJobs = daemon.jobs.all.map(WeakJob.init)
        // Jobs end before the graph goes away (the daemon's own shutdown expects no jobs).
        let jobs = daemon.jobs.all
        for job in jobs { try? job.cancel(force: true) }
        for job in jobs { job.join() }
        if getenv("BLOCKD_FUZZ_TRACE") != nil {
            FuzzSupport.trace("qmp fuzz: jobs \(jobs.map { "\($0.id) \($0.status)" }), left \(daemon.jobs.all.count)")
        }
        daemon.shutdown()
        // The command handlers capture the daemon, which holds the server: drop them so this
        // input's daemon is freed (a daemon process has one for its lifetime; a fuzzer one per input).
        if let commands = daemon.qmp?.commands {
            for name in commands.names { commands.unregister(name) }
        }
        if getenv("BLOCKD_FUZZ_TRACE") != nil {
            weak var server = daemon.qmp
            weak var gone = daemon
            let nodes = daemon.graph.all.count
            _ = consume daemon
            FuzzSupport.trace("qmp fuzz: daemon freed \(gone == nil), server freed \(server == nil), \(nodes) nodes left, "
                              + "not freed: \(tracked.filter { $0.node != nil }.map(\.name)), jobs alive \(trackedJobs.filter { $0.job != nil }.count)")
        }
        return problems
    }

    /// Every line is one JSON object: the greeting, a reply (`return` or `error`) or an event.
    static func checkReplies(_ bytes: [UInt8], requests: Int) -> [String] {
        var problems: [String] = []
        var replies = 0
        var sawGreeting = false
        for line in bytes.split(separator: UInt8(ascii: "\n")) {
            let text = line.last == UInt8(ascii: "\r") ? line.dropLast() : line
            guard let value = try? JSONParser.parse(Array(text)), let object = value.objectValue else {
                problems.append("monitor output is not a JSON object: \(String(decoding: text.prefix(200), as: UTF8.self))")
                continue
            }
            if object["QMP"] != nil {
                if sawGreeting || replies > 0 { problems.append("a second greeting") }
                sawGreeting = true
            } else if object["event"] != nil {
                if object["timestamp"] == nil { problems.append("an event without a timestamp") }
            } else if object["return"] != nil || object["error"] != nil {
                replies += 1
                if let error = object["error"] {
                    if error["class"]?.stringValue == nil || error["desc"]?.stringValue == nil {
                        problems.append("an error without class or desc: \(value.serialized)")
                    }
                    if error["desc"]?.stringValue?.hasPrefix("JSON parse error") == true {
                        problems.append("a re-serialized request did not parse: \(value.serialized)")
                    }
                }
            } else {
                problems.append("unexpected monitor output: \(value.serialized)")
            }
        }
        if replies > requests { problems.append("\(replies) replies to \(requests) requests") }
        return problems
    }
}
