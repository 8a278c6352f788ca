import JSON
import QMP

extension Subcommand {
    /// Every subcommand, in the order `blockctl --help` lists them.
    static let all: [Subcommand] = [
        nodes, exports, addNode, delNode, export, unexport, serverStart, stream, commit, migrate, jobComplete, jobCancel, jobs, bitmap, backup, query, events, quit,
    ]

    static let nodes = Subcommand(
        name: "nodes", synopsis: "", help: "list block nodes (query-named-block-nodes)"
    ) { inv in
        try inv.finish()
        let value = try inv.execute("query-named-block-nodes", JSONObject([("flat", true)]))
        if inv.json { print(value.serialized); return }
        let rows = (value.arrayValue ?? []).map { node -> [String] in
            let size = node["image"]?["virtual-size"]?.intValue.map(humanSize) ?? "-"
            return [cell(node["node-name"]), cell(node["drv"]), size, cell(node["file"]),
                    node["ro"]?.boolValue == true ? "ro" : "rw"]
        }
        print(renderTable(["NODE", "DRIVER", "SIZE", "FILE", "MODE"], rows))
    }

    static let exports = Subcommand(
        name: "exports", synopsis: "", help: "list block exports (query-block-exports)"
    ) { inv in
        try inv.finish()
        let value = try inv.execute("query-block-exports")
        if inv.json { print(value.serialized); return }
        let rows = (value.arrayValue ?? []).map { e -> [String] in
            [cell(e["id"]), cell(e["type"]), cell(e["node-name"]), e["shutting-down"]?.boolValue == true ? "shutting down" : "active"]
        }
        print(renderTable(["ID", "TYPE", "NODE", "STATE"], rows))
    }

    static let addNode = Subcommand(
        name: "add-node", synopsis: "KEY=VALUE,…|JSON",
        help: "add a node (blockdev-add), e.g. driver=qcow2,node-name=disk,file.driver=file,file.filename=a.qcow2"
    ) { inv in
        let spec = try inv.positional("node options")
        try inv.finish()
        inv.printResult(try inv.execute("blockdev-add", try parseOptions(spec)))
    }

    static let delNode = Subcommand(
        name: "del-node", synopsis: "NODE", help: "remove a node (blockdev-del)"
    ) { inv in
        let node = try inv.positional("node name")
        try inv.finish()
        inv.printResult(try inv.execute("blockdev-del", JSONObject([("node-name", .string(node))])))
    }

    static let export = Subcommand(
        name: "export", synopsis: "NODE [--name NAME] [--writable] [--id ID] [--bitmap NAME]",
        help: "export a node over NBD (block-export-add); the id defaults to the node name"
    ) { inv in
        let name = try inv.option("--name")
        let id = try inv.option("--id")
        let writable = inv.flag("--writable")
        let bitmap = try inv.option("--bitmap")
        let node = try inv.positional("node name")
        try inv.finish()
        var args = JSONObject([("type", "nbd"), ("id", .string(id ?? node)), ("node-name", .string(node))])
        if let name { args["name"] = .string(name) }
        if writable { args["writable"] = true }
        if let bitmap { args["bitmaps"] = .array([.string(bitmap)]) }
        inv.printResult(try inv.execute("block-export-add", args))
    }

    static let unexport = Subcommand(
        name: "unexport", synopsis: "ID", help: "remove an export (block-export-del)"
    ) { inv in
        let id = try inv.positional("export id")
        try inv.finish()
        inv.printResult(try inv.execute("block-export-del", JSONObject([("id", .string(id))])))
    }

    static let serverStart = Subcommand(
        name: "server-start", synopsis: "--socket PATH | --tcp HOST:PORT", help: "start the NBD server (nbd-server-start)"
    ) { inv in
        let socket = try inv.option("--socket")
        let tcp = try inv.option("--tcp")
        try inv.finish()
        let addr: JSONObject
        switch (socket, tcp) {
        case (let path?, nil):
            addr = JSONObject([("type", "unix"), ("data", .object(JSONObject([("path", .string(path))])))])
        case (nil, let hostPort?):
            guard let colon = hostPort.lastIndex(of: ":") else { throw inv.usage("--tcp needs HOST:PORT") }
            var host = String(hostPort[..<colon])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            let port = String(hostPort[hostPort.index(after: colon)...])
            addr = JSONObject([("type", "inet"), ("data", .object(JSONObject([("host", .string(host)), ("port", .string(port))])))])
        default:
            throw inv.usage("give exactly one of --socket and --tcp")
        }
        inv.printResult(try inv.execute("nbd-server-start", JSONObject([("addr", .object(addr))])))
    }

    static let query = Subcommand(
        name: "query", synopsis: "COMMAND [JSON-ARGUMENTS]", help: "run any QMP command and print its JSON result"
    ) { inv in
        let command = try inv.positional("command")
        let argText = inv.optionalPositional()
        try inv.finish()
        var args: JSONObject?
        if let argText { args = try parseOptions(argText) }
        print(try inv.execute(command, args).serialized)
    }

    static let events = Subcommand(
        name: "events", synopsis: "", help: "print events as they arrive (Ctrl-C to stop)"
    ) { inv in
        try inv.finish()
        let client = try inv.connect()
        client.timeoutMS = -1
        while let event = try client.nextEvent() {
            if inv.json {
                print(JSONValue.object(event).serialized)
            } else {
                let seconds = event["timestamp"]?["seconds"]?.intValue ?? 0
                let micros = event["timestamp"]?["microseconds"]?.intValue ?? 0
                let frac = String(micros + 1_000_000).dropFirst()
                let data = event["data"].map { " " + $0.serialized } ?? ""
                print("\(seconds).\(frac) \(cell(event["event"]))\(data)")
            }
            fflushStdout()
        }
    }

    static let quit = Subcommand(
        name: "quit", synopsis: "", help: "stop the daemon"
    ) { inv in
        try inv.finish()
        inv.printResult(try inv.execute("quit"))
    }
}
