import BlockCore
import JSON
import NBDServer

/// One parsed command-line action, applied in the order given (as qemu-storage-daemon does).
public enum Action: Sendable {
    case blockdev(JSONObject)
    case nbdServer([ListenAddress], maxConnections: Int)
    case export(ExportOptions)
    case chardev(id: String, path: String)
    case monitor(chardevID: String)
    case qmp(path: String)
    case object(JSONObject)
    case pidfile(String)
}

public struct ExportOptions: Sendable {
    public var id: String
    public var nodeName: String
    public var name: String?
    public var description: String?
    public var writable: Bool
    public var bitmaps: [String]
    /// `writethrough=on`: writes are durable before their reply.
    public var writethrough = false
}

/// A command-line mistake: names the option and the problem; the daemon exits with status 2.
public struct UsageError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What `blockd` was asked to do.
public enum Invocation: Sendable {
    /// qemu-storage-daemon style options.
    case daemon([Action], Settings)
    /// `blockd serve IMAGE …`.
    case serve(ServeOptions, Settings)
    /// No arguments: the embedded demo.
    case demo(Settings)
    case help
    case version
}

public struct Settings: Sendable {
    public var loops = Daemon.defaultLoopCount
    public var workers = 16
    public var verbose = false
}

public struct ServeOptions: Sendable {
    public var image: String
    public var socket: String?
    public var port: Int?
    public var host = "localhost"
    public var name: String?
    public var readOnly = false
    public var format: String?
    public var qmp: String?
}

public enum CommandLine {
    public static func parse(_ args: [String]) throws(UsageError) -> Invocation {
        var settings = Settings()
        if args.isEmpty { return .demo(settings) }
        if args.first == "serve" { return try parseServe(Array(args.dropFirst()), &settings) }
        if args.first == "demo" { return .demo(settings) }
        var actions: [Action] = []
        var i = 0
        while i < args.count {
            var arg = args[i]
            var inlineValue: String?
            if arg.hasPrefix("--"), let eq = arg.firstIndex(of: "=") {
                inlineValue = String(arg[arg.index(after: eq)...])
                arg = String(arg[..<eq])
            }
            if arg.hasPrefix("-") && !arg.hasPrefix("--") && arg.count > 2 { arg = "-" + arg } // -blockdev → --blockdev
            func value() throws(UsageError) -> String {
                if let inlineValue { return inlineValue }
                i += 1
                guard i < args.count else { throw UsageError("\(arg): requires an argument") }
                return args[i]
            }
            switch arg {
            case "-h", "--help": return .help
            case "-V", "--version": return .version
            case "-v", "--verbose": settings.verbose = true
            case "--blockdev":
                let text = try value()
                var options = try parseOptions(text, option: arg, impliedKey: nil)
                if options["backing"] == .string("null") { options["backing"] = .null }
                actions.append(.blockdev(options))
            case "--nbd-server":
                actions.append(try parseNBDServer(try value()))
            case "--export":
                actions.append(.export(try parseExport(try value())))
            case "--chardev":
                actions.append(try parseChardev(try value()))
            case "--monitor":
                let o = try parseOptions(try value(), option: arg, impliedKey: "chardev")
                guard let id = o["chardev"]?.stringValue else { throw UsageError("--monitor: Parameter 'chardev' is missing") }
                for (k, v) in o where k != "chardev" {
                    if k == "mode" && v == "control" { continue }
                    if k == "pretty" { continue }
                    throw UsageError("--monitor: Parameter '\(k)' is unexpected")
                }
                actions.append(.monitor(chardevID: id))
            case "--qmp":
                actions.append(.qmp(path: try value()))
            case "--object":
                actions.append(.object(try parseOptions(try value(), option: arg, impliedKey: "qom-type")))
            case "--pidfile":
                actions.append(.pidfile(try value()))
            case "--loops":
                guard let n = Int(try value()), n > 0, n <= 256 else { throw UsageError("--loops: expects a number from 1 to 256") }
                settings.loops = n
            case "--workers":
                guard let n = Int(try value()), n > 0, n <= 1024 else { throw UsageError("--workers: expects a number from 1 to 1024") }
                settings.workers = n
            case "-T", "--trace", "--daemonize":
                if arg != "--daemonize" { _ = try value() }
                throw UsageError("\(arg): not supported by blockd")
            default:
                if arg.hasPrefix("-") { throw UsageError("\(arg): unknown option (see blockd --help)") }
                throw UsageError("unexpected argument '\(arg)' (to serve an image: blockd serve \(arg))")
            }
            i += 1
        }
        return .daemon(actions, settings)
    }

    static func parseOptions(_ text: String, option: String, impliedKey: String?) throws(UsageError) -> JSONObject {
        if text.hasPrefix("{") {
            do {
                guard case .object(let o) = try JSONParser.parse(text) else {
                    throw UsageError("\(option): JSON options must be an object")
                }
                return o
            } catch let e as JSONParseError {
                throw UsageError("\(option): \(e.description)")
            } catch {
                throw error as! UsageError
            }
        }
        do {
            return try KeyValue.parse(text, impliedKey: impliedKey)
        } catch {
            throw UsageError("\(option): \(error.message)")
        }
    }

    static func string(_ o: JSONObject, _ key: String, _ option: String) throws(UsageError) -> String? {
        guard let v = o[key] else { return nil }
        if case .string(let s) = v { return s }
        if case .int(let n) = v { return String(n) }
        throw UsageError("\(option): Invalid parameter type for '\(key)', expected: string")
    }

    static func bool(_ o: JSONObject, _ key: String, _ option: String) throws(UsageError) -> Bool? {
        guard let v = o[key] else { return nil }
        switch v {
        case .bool(let b): return b
        case .string("on"), .string("yes"), .string("true"): return true
        case .string("off"), .string("no"), .string("false"): return false
        default: throw UsageError("\(option): Parameter '\(key)' expects 'on' or 'off'")
        }
    }

    static func parseAddress(_ o: JSONObject, option: String, prefix: String) throws(UsageError) -> ListenAddress {
        guard let type = try string(o, "type", option) else { throw UsageError("\(option): Parameter '\(prefix)type' is missing") }
        switch type {
        case "unix":
            guard let path = try string(o, "path", option) else { throw UsageError("\(option): Parameter '\(prefix)path' is missing") }
            for (k, _) in o where !["type", "path", "abstract", "tight"].contains(k) {
                throw UsageError("\(option): Parameter '\(prefix)\(k)' is unexpected")
            }
            return .unix(path: path)
        case "inet":
            guard let host = try string(o, "host", option) else { throw UsageError("\(option): Parameter '\(prefix)host' is missing") }
            guard let port = try string(o, "port", option) else { throw UsageError("\(option): Parameter '\(prefix)port' is missing") }
            for (k, _) in o where !["type", "host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive"].contains(k) {
                throw UsageError("\(option): Parameter '\(prefix)\(k)' is unexpected")
            }
            return .inet(host: host, port: port)
        default:
            throw UsageError("\(option): Parameter '\(prefix)type' does not accept value '\(type)'")
        }
    }

    static func parseNBDServer(_ text: String) throws(UsageError) -> Action {
        let option = "--nbd-server"
        let o = try parseOptions(text, option: option, impliedKey: nil)
        guard case .object(let addr)? = o["addr"] else { throw UsageError("\(option): Parameter 'addr' is missing") }
        let address = try parseAddress(addr, option: option, prefix: "addr.")
        var maxConnections = 0
        for (k, v) in o {
            switch k {
            case "addr", "tls-creds", "tls-authz": continue
            case "max-connections":
                guard let n = v.intValue ?? v.stringValue.flatMap({ Int64($0) }), n >= 0 else {
                    throw UsageError("\(option): Parameter 'max-connections' expects a non-negative number")
                }
                maxConnections = Int(n)
            default: throw UsageError("\(option): Parameter '\(k)' is unexpected")
            }
        }
        if o["tls-creds"] != nil { throw UsageError("\(option): TLS is not supported by blockd yet") }
        return .nbdServer([address], maxConnections: maxConnections)
    }

    static func parseExport(_ text: String) throws(UsageError) -> ExportOptions {
        let option = "--export"
        let o = try parseOptions(text, option: option, impliedKey: "type")
        guard let type = try string(o, "type", option) else { throw UsageError("\(option): Parameter 'type' is missing") }
        guard type == "nbd" else { throw UsageError("\(option): Parameter 'type' does not accept value '\(type)'") }
        guard let id = try string(o, "id", option) else { throw UsageError("\(option): Parameter 'id' is missing") }
        guard let node = try string(o, "node-name", option) else { throw UsageError("\(option): Parameter 'node-name' is missing") }
        var bitmaps: [String] = []
        if let b = o["bitmaps"] {
            switch b {
            case .string(let s): bitmaps = s.split(separator: ":").map(String.init)
            case .array(let a): bitmaps = a.compactMap(\.stringValue)
            case .object(let obj): bitmaps = obj.map { $0.value.stringValue ?? "" }
            default: throw UsageError("\(option): Invalid parameter type for 'bitmaps', expected: array")
            }
        }
        for (k, _) in o where !["type", "id", "node-name", "name", "description", "writable", "bitmaps",
                                "writethrough", "iothread", "fixed-iothread", "allocation-depth", "multi-conn"].contains(k) {
            throw UsageError("\(option): Parameter '\(k)' is unexpected")
        }
        var export = ExportOptions(id: id, nodeName: node, name: try string(o, "name", option),
                                   description: try string(o, "description", option),
                                   writable: try bool(o, "writable", option) ?? false, bitmaps: bitmaps)
        export.writethrough = try bool(o, "writethrough", option) ?? false
        return export
    }

    static func parseChardev(_ text: String) throws(UsageError) -> Action {
        let option = "--chardev"
        let o = try parseOptions(text, option: option, impliedKey: "backend")
        guard let backend = try string(o, "backend", option) else { throw UsageError("\(option): Parameter 'backend' is missing") }
        guard backend == "socket" else { throw UsageError("\(option): backend '\(backend)' is not supported (only 'socket')") }
        guard let id = try string(o, "id", option) else { throw UsageError("\(option): Parameter 'id' is missing") }
        guard let path = try string(o, "path", option) else {
            throw UsageError("\(option): only unix sockets are supported: give path=")
        }
        if try bool(o, "server", option) == false { throw UsageError("\(option): only server=on is supported") }
        for (k, _) in o where !["backend", "id", "path", "server", "wait", "telnet", "nodelay", "logfile", "logappend", "mux"].contains(k) {
            throw UsageError("\(option): Parameter '\(k)' is unexpected")
        }
        return .chardev(id: id, path: path)
    }

    static func parseServe(_ args: [String], _ settings: inout Settings) throws(UsageError) -> Invocation {
        var image: String?
        var s = ServeOptions(image: "")
        var i = 0
        while i < args.count {
            let arg = args[i]
            func value() throws(UsageError) -> String {
                i += 1
                guard i < args.count else { throw UsageError("\(arg): requires an argument") }
                return args[i]
            }
            switch arg {
            case "--socket", "-s": s.socket = try value()
            case "--port", "-p":
                let v = try value()
                guard let p = Int(v), p >= 0, p < 65536 else { throw UsageError("--port: '\(v)' is not a TCP port number") }
                s.port = p
            case "--host": s.host = try value()
            case "--name", "-n": s.name = try value()
            case "--read-only", "-r": s.readOnly = true
            case "--format", "-f":
                let f = try value()
                guard ["raw", "qcow2"].contains(f) else { throw UsageError("--format: '\(f)' is not 'raw' or 'qcow2'") }
                s.format = f
            case "--qmp": s.qmp = try value()
            case "--loops":
                guard let n = Int(try value()), n > 0 else { throw UsageError("--loops: expects a positive number") }
                settings.loops = n
            case "-v", "--verbose": settings.verbose = true
            case "-h", "--help": return .help
            default:
                if arg.hasPrefix("-") { throw UsageError("serve: unknown option \(arg)") }
                if image != nil { throw UsageError("serve: only one IMAGE may be given (got '\(image!)' and '\(arg)')") }
                image = arg
            }
            i += 1
        }
        guard let image else { throw UsageError("serve: IMAGE is missing (blockd serve IMAGE [--socket PATH | --port N])") }
        if s.socket != nil && s.port != nil { throw UsageError("serve: give either --socket or --port, not both") }
        s.image = image
        return .serve(s, settings)
    }

    public static let usage = """
    Usage:
      blockd                                   serve a demo image (prints how to connect)
      blockd serve IMAGE [--socket PATH | --port N [--host H]] [--name NAME] [--read-only]
                         [--format raw|qcow2] [--qmp PATH]
      blockd [qemu-storage-daemon options]

    qemu-storage-daemon options:
      --blockdev driver=file,node-name=F,filename=PATH[,read-only=on]    (or a JSON object)
      --blockdev driver=raw|qcow2,node-name=N,file=F[,backing=B|null]
      --blockdev driver=null-co,node-name=N,size=1G[,read-zeroes=on]
      --nbd-server addr.type=unix,addr.path=PATH | addr.type=inet,addr.host=H,addr.port=N
                   [,max-connections=N]
      --export type=nbd,id=ID,node-name=N[,name=NAME][,description=TEXT][,writable=on]
      --chardev socket,id=ID,path=PATH,server=on,wait=off  --monitor chardev=ID
      --qmp PATH                               QMP monitor on a unix socket (shorthand)
      --pidfile PATH
    blockd options:
      --loops N      event loop threads (default: one per core)
      --workers N    threads for blocking I/O (default 16)
      -v, --verbose  log every client connection and error
      -h, --help     this text;  -V, --version
    """
}
