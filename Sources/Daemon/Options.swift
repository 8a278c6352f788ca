import BlockCore
import BlockDrivers
import JSON
import NBDServer

/// One qemu-storage-daemon option, applied in the order given (as QSD does): its argument is
/// parsed when it is applied, so its errors come in command-line order and name it.
public struct Action: Sendable, Equatable {
    public enum Kind: String, Sendable {
        case blockdev, nbdServer = "nbd-server", export, chardev, monitor, object
        /// blockd's shorthand: a QMP monitor on a unix socket.
        case qmp
    }
    public var kind: Kind
    public var argument: String
    /// The words as typed (`--blockdev driver=…`), for error messages: "--blockdev …: problem".
    public var location: String
}

/// A command-line mistake, printed as `PROGRAM: message` (exit status 1, as QEMU).
public struct UsageError: Error, Sendable, CustomStringConvertible {
    public let message: String
    /// Not a mistake: text to print on stdout before exiting with status 0 (`--object help`).
    public var isInformational = false
    /// `message` is the whole text to print, prefixes and newlines included (qemu-nbd's
    /// getopt errors mix `argv[0]:` and program-name prefixes over two lines).
    public var isPreformatted = false
    public init(_ message: String) { self.message = message }
    public var description: String { message }

    static func informational(_ text: String) -> UsageError {
        var e = UsageError(text)
        e.isInformational = true
        return e
    }
}

/// What `blockd` was asked to do.
public enum Invocation: Sendable {
    /// qemu-storage-daemon style options.
    case daemon([Action], Settings)
    /// `blockd serve IMAGE …`.
    case serve(ServeOptions, Settings)
    /// No arguments: the embedded demo.
    case demo(Settings)
    /// `blockd nbd …` or the binary run as `qemu-nbd`.
    case qemuNBD(QemuNBDOptions)
    /// Print this on stdout and exit 0 (`--help`, `--version`).
    case print(String)
}

public struct Settings: Sendable {
    public var loops = Daemon.defaultLoopCount
    public var workers = 16
    /// `-v`: per-client log lines (connects, disconnects, refused options).
    public var verbose = false
    /// `-T`/`--trace` or `BLOCKD_TRACE`: everything, including per-request debug lines.
    public var trace = false
    /// `--daemonize`: fork; the parent exits once the daemon is ready (0) or failed (1).
    public var daemonize = false
    /// `--pidfile PATH`, written (and locked) once every option is applied.
    public var pidfile: String?
    public init() {}
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
    /// `--tls-creds DIR`: X.509 server credentials (QEMU's file names in DIR).
    public var tlsCreds: String?
    /// `--tls-psk FILE`: a PSK key file (`username:hexkey` lines).
    public var tlsPSK: String?
    public var tlsVerifyPeer = true
    /// `--tls-authz IDENTITY`: the one client certificate DN (or PSK username) let in.
    public var tlsAuthz: String?
}

public enum CommandLine {
    /// Parses blockd's arguments (without argv[0]); `program` is how it was invoked, for
    /// messages (`blockd`, or `qemu-nbd` when run through that name).
    public static func parse(_ args: [String], program: String = "blockd") throws(UsageError) -> Invocation {
        var settings = Settings()
        if args.isEmpty { return .demo(settings) }
        switch args[0] {
        case "serve": return try parseServe(Array(args.dropFirst()), &settings)
        case "demo": return .demo(settings)
        case "nbd": return try QemuNBDOptions.parse(Array(args.dropFirst()), program: program + " nbd")
        default: break
        }
        let getopt = Getopt(short: "hT:Vv", long: [
            .init(name: "blockdev", takesArgument: true, key: "blockdev"),
            .init(name: "chardev", takesArgument: true, key: "chardev"),
            .init(name: "daemonize", takesArgument: false, key: "daemonize"),
            .init(name: "export", takesArgument: true, key: "export"),
            .init(name: "help", takesArgument: false, key: "h"),
            .init(name: "monitor", takesArgument: true, key: "monitor"),
            .init(name: "nbd-server", takesArgument: true, key: "nbd-server"),
            .init(name: "object", takesArgument: true, key: "object"),
            .init(name: "pidfile", takesArgument: true, key: "pidfile"),
            .init(name: "trace", takesArgument: true, key: "T"),
            .init(name: "version", takesArgument: false, key: "V"),
            // blockd's own
            .init(name: "qmp", takesArgument: true, key: "qmp"),
            .init(name: "loops", takesArgument: true, key: "loops"),
            .init(name: "workers", takesArgument: true, key: "workers"),
            .init(name: "verbose", takesArgument: false, key: "v"),
        ], inOrder: true)
        // QEMU's system emulator spells these with one dash; take `-blockdev` for `--blockdev`.
        let longNames = Set(["blockdev", "chardev", "daemonize", "export", "monitor", "nbd-server", "object",
                             "pidfile", "qmp", "loops", "workers"])
        let words = args.map { w -> String in
            if w.hasPrefix("-") && !w.hasPrefix("--") {
                let name = w.dropFirst().split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
                if longNames.contains(name) { return "-" + w }
            }
            return w
        }
        let items: [Getopt.Item]
        do {
            items = try getopt.parse(words).items
        } catch {
            guard case .message(let m) = error else { fatalError() }
            throw UsageError(m)
        }
        var actions: [Action] = []
        for item in items {
            switch item {
            case .operand(let word):
                throw UsageError("\(word): Unexpected argument")
            case .option(let key, let argument, let words):
                let location = words.joined(separator: " ")
                switch key {
                case "h": return .print(usage(program: program))
                case "V": return .print("\(program) \(Runner.version) (speaks qemu-storage-daemon 7.2 options and QMP)\n")
                case "v": settings.verbose = true
                case "T": settings.trace = true
                case "daemonize": settings.daemonize = true
                case "pidfile": settings.pidfile = argument
                case "loops":
                    guard let n = Int(argument ?? ""), n > 0, n <= 256 else { throw UsageError("\(location): expects a number from 1 to 256") }
                    settings.loops = n
                case "workers":
                    guard let n = Int(argument ?? ""), n > 0, n <= 1024 else { throw UsageError("\(location): expects a number from 1 to 1024") }
                    settings.workers = n
                default:
                    guard let kind = Action.Kind(rawValue: key) else { fatalError("option \(key) has no action") }
                    actions.append(Action(kind: kind, argument: argument ?? "", location: location))
                }
            }
        }
        return .daemon(actions, settings)
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
            case "--tls-creds": s.tlsCreds = try value()
            case "--tls-psk": s.tlsPSK = try value()
            case "--tls-authz": s.tlsAuthz = try value()
            case "--tls-verify-peer":
                switch try value() {
                case "on", "yes", "true": s.tlsVerifyPeer = true
                case "off", "no", "false": s.tlsVerifyPeer = false
                case let v: throw UsageError("--tls-verify-peer: expects 'on' or 'off', not '\(v)'")
                }
            case "--loops":
                guard let n = Int(try value()), n > 0 else { throw UsageError("--loops: expects a positive number") }
                settings.loops = n
            case "-v", "--verbose": settings.verbose = true
            case "-h", "--help": return .print(usage(program: "blockd"))
            default:
                if arg.hasPrefix("-") { throw UsageError("serve: unknown option \(arg)") }
                if image != nil { throw UsageError("serve: only one IMAGE may be given (got '\(image!)' and '\(arg)')") }
                image = arg
            }
            i += 1
        }
        guard let image else { throw UsageError("serve: IMAGE is missing (blockd serve IMAGE [--socket PATH | --port N])") }
        if s.socket != nil && s.port != nil { throw UsageError("serve: give either --socket or --port, not both") }
        if s.tlsCreds != nil && s.tlsPSK != nil { throw UsageError("serve: give either --tls-creds or --tls-psk, not both") }
        if s.tlsAuthz != nil && s.tlsCreds == nil && s.tlsPSK == nil {
            throw UsageError("serve: --tls-authz is not permitted without --tls-creds or --tls-psk")
        }
        s.image = image
        return .serve(s, settings)
    }

    static func usage(program: String) -> String {
        """
        Usage: \(program) [options]
               \(program) serve IMAGE [--socket PATH | --port N [--host H]] [--name NAME] [--read-only]
                            [--format raw|qcow2] [--qmp PATH]
                            [--tls-creds DIR [--tls-verify-peer on|off] | --tls-psk FILE]
                            [--tls-authz IDENTITY]
                            (under systemd socket activation, no --socket/--port: it serves
                            every socket passed in LISTEN_FDS)
               \(program) nbd [qemu-nbd options] FILE      (see \(program) nbd --help)
               \(program)                                  serve a demo image and print how to connect
        A block-device daemon that speaks qemu-storage-daemon's options and QMP.

          -h, --help             display this help and exit
          -V, --version          output version information and exit
          -v, --verbose          log every client connection and refused request
          -T, --trace <pattern>  log everything, with per-request debug lines
                                 (also: BLOCKD_TRACE=1 in the environment)

          --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
                     [,cache.direct=on|off][,cache.no-flush=on|off]
                     [,read-only=on|off][,auto-read-only=on|off]
                     [,force-share=on|off][,detect-zeroes=on|off|unmap]
                     [,driver specific parameters...]
                                 configure a block node (drivers: \(BlockdevFactory.driverNames.joined(separator: ", ")));
                                 children inline (file.driver=file,file.filename=…) or by name
                                 (file=<node-name>); or a JSON object

          --chardev stdio,id=<id>
          --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
          --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
                                 configure a character device for a monitor

          --daemonize            daemonize the process, and have the parent exit
                                 once startup is complete

          --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
                   [,writable=on|off][,bitmaps.0=<name>][,allocation-depth=on|off]
                                 export the specified block node over NBD
                                 (requires --nbd-server)

          --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                                 configure a QMP monitor
          --qmp <path>           shorthand: a QMP monitor on a unix socket

          --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
                       [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                       [,handshake-max-seconds=<n>]
          --nbd-server addr.type=unix,addr.path=<path>
                       [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                       [,handshake-max-seconds=<n>]
          --nbd-server addr.type=fd,addr.str=<fd>|<name>
                       [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                       [,handshake-max-seconds=<n>]
                                 start an NBD server for exporting block nodes;
                                 without addr, on every socket systemd passed
                                 (LISTEN_FDS; <name> is one of LISTEN_FDNAMES)

          --object help          list object types that can be added
          --object <type>,help   list properties for the given object type
          --object <type>,id=<id>[,<property>=<value>...]
                                 create a new object of type <type>:
                                 tls-creds-x509,id=<id>,endpoint=server|client,dir=<dir>
                                     [,verify-peer=on|off][,priority=<p>]
                                 tls-creds-psk,id=<id>,endpoint=server|client,dir=<dir>
                                     [,username=<user>][,priority=<p>]  (<dir>/keys.psk)
                                 authz-simple,id=<id>,identity=<DN or PSK username>
                                 throttle-group,id=<id>,x-bps-total=<n>,...

          --pidfile <path>       write process ID to a file after startup

          --loops <n>            event loop threads (default: one per core)
          --workers <n>          threads for blocking I/O (default 16)

        Every option taking key=value also takes a JSON object ('{"driver": "qcow2", …}').

        """
    }
}
