import JSON
import QMP

/// `blockctl bitmap add|remove|clear|enable|disable|merge|list`: dirty bitmap commands.
extension Subcommand {
    static let bitmap = Subcommand(
        name: "bitmap",
        synopsis: "add|remove|clear|enable|disable|merge|list …",
        help: "dirty bitmaps: add NODE NAME [--granularity N] [--persistent] [--disabled]; remove|clear|enable|disable NODE NAME; merge NODE TARGET SRC… (SRC = NAME or NODE/NAME); list [NODE]"
    ) { inv in
        let verb = try inv.positional("bitmap action (add, remove, clear, enable, disable, merge, list)")
        switch verb {
        case "add":
            let granularity = try inv.option("--granularity")
            let persistent = inv.flag("--persistent")
            let disabled = inv.flag("--disabled")
            let node = try inv.positional("node name")
            let name = try inv.positional("bitmap name")
            try inv.finish()
            var args = JSONObject([("node", .string(node)), ("name", .string(name))])
            if let granularity {
                guard let g = parseSize(granularity) else { throw inv.usage("bad --granularity '\(granularity)'") }
                args["granularity"] = .int(Int64(g))
            }
            if persistent { args["persistent"] = true }
            if disabled { args["disabled"] = true }
            inv.printResult(try inv.execute("block-dirty-bitmap-add", args))
        case "remove", "clear", "enable", "disable":
            let node = try inv.positional("node name")
            let name = try inv.positional("bitmap name")
            try inv.finish()
            inv.printResult(try inv.execute("block-dirty-bitmap-\(verb)", JSONObject([("node", .string(node)), ("name", .string(name))])))
        case "merge":
            let node = try inv.positional("node name")
            let target = try inv.positional("target bitmap")
            var sources: [JSONValue] = []
            while let s = inv.optionalPositional() {
                if let slash = s.firstIndex(of: "/") {
                    sources.append(.object(JSONObject([("node", .string(String(s[..<slash]))),
                                                       ("name", .string(String(s[s.index(after: slash)...])))])))
                } else {
                    sources.append(.string(s))
                }
            }
            if sources.isEmpty { throw inv.usage("missing source bitmap") }
            try inv.finish()
            inv.printResult(try inv.execute("block-dirty-bitmap-merge",
                                             JSONObject([("node", .string(node)), ("target", .string(target)), ("bitmaps", .array(sources))])))
        case "list":
            let only = inv.optionalPositional()
            try inv.finish()
            let value = try inv.execute("query-named-block-nodes", JSONObject([("flat", true)]))
            if inv.json { print(value.serialized); return }
            var rows: [[String]] = []
            for node in value.arrayValue ?? [] {
                let name = node["node-name"]?.stringValue ?? ""
                if let only, only != name { continue }
                for b in node["dirty-bitmaps"]?.arrayValue ?? [] {
                    var state = b["recording"]?.boolValue == true ? "recording" : "disabled"
                    if b["inconsistent"]?.boolValue == true { state = "inconsistent" }
                    if b["busy"]?.boolValue == true { state += ",busy" }
                    rows.append([name, cell(b["name"]), b["granularity"]?.intValue.map(humanSize) ?? "-",
                                 b["count"]?.intValue.map(humanSize) ?? "-", state,
                                 b["persistent"]?.boolValue == true ? "yes" : "no"])
                }
            }
            print(renderTable(["NODE", "BITMAP", "GRANULARITY", "DIRTY", "STATE", "PERSISTENT"], rows))
        default:
            throw inv.usage("unknown bitmap action '\(verb)'")
        }
    }

}
