import BlockCore
import EventLoop
import Glibc
import JSON
import QMP

/// qemu-nbd's command line (QEMU 7.2's `qemu-nbd.c`, plus `--handshake-limit` from newer
/// releases): the same options, defaults, checks in the same order and the same messages.
/// `blockd nbd …` and blockd run under the name `qemu-nbd` both come here.
public struct QemuNBDOptions: Sendable {
    /// How the program is named in `Usage:` and `Try … --help` lines (`qemu-nbd`, `blockd nbd`).
    public var program = "qemu-nbd"
    /// argv[0] as typed: getopt's messages start with it, as glibc's do.
    public var argv0 = "qemu-nbd"

    public var bind: String?
    public var port: String?
    public var socket: String?
    public var offset: UInt64 = 0
    public var readOnly = false
    public var allocationDepth = false
    /// `-B`, in the order given.
    public var bitmaps: [String] = []
    public var device: String?
    public var disconnect = false
    public var list = false
    public var snapshot = false
    public var loadSnapshot: String?
    /// `--cache` / `-n`, as given (checked when parsed).
    public var cache: String?
    public var aio: String?
    public var discard: String?
    public var detectZeroes: String?
    /// `-e`: clients at once (0: no limit). qemu-nbd's default is 1.
    public var shared = 1
    public var format: String?
    public var persistent = false
    public var verbose = false
    public var trace = false
    /// `--object` arguments, in order.
    public var objects: [String] = []
    public var exportName: String?
    public var description: String?
    public var handshakeLimit: Int?
    public var tlsCreds: String?
    public var tlsHostname: String?
    public var tlsAuthz: String?
    public var imageOpts = false
    public var fork = false
    public var pidFile: String?
    public var selinuxLabel: String?
    /// The FILE operand (or the `--image-opts` string).
    public var file: String?

    public init() {}

    // MARK: Cache, AIO and discard modes as QEMU parses them

    /// `bdrv_parse_cache_mode`: (cache.direct, cache.no-flush, writethrough), or nil.
    static func cacheMode(_ mode: String) -> (direct: Bool, noFlush: Bool, writethrough: Bool)? {
        switch mode {
        case "off", "none": return (true, false, false)
        case "directsync": return (true, false, true)
        case "writeback": return (false, false, false)
        case "unsafe": return (false, true, false)
        case "writethrough": return (false, false, true)
        default: return nil
        }
    }

    /// `bdrv_parse_aio`: the file driver's `aio` value, or nil.
    static func aioMode(_ mode: String) -> String? {
        ["native", "io_uring", "threads"].contains(mode) ? mode : nil
    }

    /// `bdrv_parse_discard_flags`: true for unmap, false for ignore, nil when invalid.
    static func discardUnmap(_ mode: String) -> Bool? {
        switch mode {
        case "off", "ignore": return false
        case "on", "unmap": return true
        default: return nil
        }
    }

    static let getopt = Getopt(short: "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L", long: [
        .init(name: "help", takesArgument: false, key: "h"),
        .init(name: "version", takesArgument: false, key: "V"),
        .init(name: "bind", takesArgument: true, key: "b"),
        .init(name: "port", takesArgument: true, key: "p"),
        .init(name: "socket", takesArgument: true, key: "k"),
        .init(name: "offset", takesArgument: true, key: "o"),
        .init(name: "read-only", takesArgument: false, key: "r"),
        .init(name: "allocation-depth", takesArgument: false, key: "A"),
        .init(name: "bitmap", takesArgument: true, key: "B"),
        .init(name: "connect", takesArgument: true, key: "c"),
        .init(name: "disconnect", takesArgument: false, key: "d"),
        .init(name: "list", takesArgument: false, key: "L"),
        .init(name: "snapshot", takesArgument: false, key: "s"),
        .init(name: "load-snapshot", takesArgument: true, key: "l"),
        .init(name: "nocache", takesArgument: false, key: "n"),
        .init(name: "cache", takesArgument: true, key: "cache"),
        .init(name: "aio", takesArgument: true, key: "aio"),
        .init(name: "discard", takesArgument: true, key: "discard"),
        .init(name: "detect-zeroes", takesArgument: true, key: "detect-zeroes"),
        .init(name: "shared", takesArgument: true, key: "e"),
        .init(name: "format", takesArgument: true, key: "f"),
        .init(name: "persistent", takesArgument: false, key: "t"),
        .init(name: "verbose", takesArgument: false, key: "v"),
        .init(name: "object", takesArgument: true, key: "object"),
        .init(name: "export-name", takesArgument: true, key: "x"),
        .init(name: "description", takesArgument: true, key: "D"),
        .init(name: "handshake-limit", takesArgument: true, key: "handshake-limit"),
        .init(name: "tls-creds", takesArgument: true, key: "tls-creds"),
        .init(name: "tls-hostname", takesArgument: true, key: "tls-hostname"),
        .init(name: "tls-authz", takesArgument: true, key: "tls-authz"),
        .init(name: "image-opts", takesArgument: false, key: "image-opts"),
        .init(name: "trace", takesArgument: true, key: "T"),
        .init(name: "fork", takesArgument: false, key: "fork"),
        .init(name: "pid-file", takesArgument: true, key: "pid-file"),
        .init(name: "selinux-label", takesArgument: true, key: "selinux-label"),
    ])

    /// A qemu-nbd mistake: the lines to print on stderr, complete (qemu-nbd mixes prefixes).
    public struct Failure: Error, Sendable {
        public var text: String
        /// `--help`/`--version`/`--object help`: print on stdout and exit 0.
        public var isInformational = false
    }

    /// Parses qemu-nbd's arguments (without argv[0]).
    public static func parse(_ args: [String], program: String, argv0: String? = nil) throws(UsageError) -> Invocation {
        do {
            return .qemuNBD(try parseOptions(args, program: program, argv0: argv0 ?? program))
        } catch {
            if error.isInformational { return .print(error.text) }
            var e = UsageError(error.text)
            e.isPreformatted = true
            throw e
        }
    }

    static func parseOptions(_ args: [String], program: String, argv0: String) throws(Failure) -> QemuNBDOptions {
        // Messages start with the program's name: `qemu-nbd`, or `blockd` for `blockd nbd`.
        let prefix = program.split(separator: " ").first.map(String.init) ?? program
        func fail(_ message: String) -> Failure { Failure(text: "\(prefix): \(message)\n") }
        var o = QemuNBDOptions()
        o.program = program
        o.argv0 = argv0
        let parsed: (items: [Getopt.Item], operands: [String])
        do {
            parsed = try getopt.parse(args)
        } catch {
            guard case .message(let m) = error else { fatalError() }
            throw Failure(text: "\(argv0): \(m)\n\(prefix): Try `\(program) --help' for more information.\n")
        }
        var seenCache = false, seenAIO = false, seenDiscard = false
        for case .option(let key, let argument, _) in parsed.items {
            let arg = argument ?? ""
            switch key {
            case "s": o.snapshot = true
            case "n", "cache":
                if seenCache { throw fail("-n and --cache can only be specified once") }
                seenCache = true
                let mode = key == "n" ? "none" : arg
                if cacheMode(mode) == nil { throw fail("Invalid cache mode `\(mode)'") }
                o.cache = mode
            case "aio":
                if seenAIO { throw fail("--aio can only be specified once") }
                seenAIO = true
                if aioMode(arg) == nil { throw fail("Invalid aio mode '\(arg)'") }
                o.aio = arg
            case "discard":
                if seenDiscard { throw fail("--discard can only be specified once") }
                seenDiscard = true
                if discardUnmap(arg) == nil { throw fail("Invalid discard mode `\(arg)'") }
                o.discard = arg
            case "detect-zeroes":
                guard ["off", "on", "unmap"].contains(arg) else {
                    throw fail("Failed to parse detect_zeroes mode: invalid parameter value: \(arg)")
                }
                // Checked against the discard mode given so far, as qemu-nbd does.
                if arg == "unmap" && o.discard.flatMap(discardUnmap) != true {
                    throw fail("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
                }
                o.detectZeroes = arg
            case "b": o.bind = arg
            case "p": o.port = arg
            case "o":
                guard let (negative, magnitude) = QMPArguments.parseCInteger(arg) else { throw fail("Invalid offset '\(arg)'") }
                o.offset = negative ? 0 &- magnitude : magnitude
            case "l":
                o.loadSnapshot = arg
                o.readOnly = true
            case "r": o.readOnly = true
            case "A": o.allocationDepth = true
            case "B": o.bitmaps.append(arg)
            case "k":
                if !arg.hasPrefix("/") { throw fail("socket path must be absolute") }
                o.socket = arg
            case "d": o.disconnect = true
            case "c": o.device = arg
            case "e":
                guard let (negative, magnitude) = QMPArguments.parseCInteger(arg), !negative, magnitude <= UInt64(Int32.max) else {
                    throw fail("Invalid shared device number '\(arg)'")
                }
                o.shared = Int(magnitude)
            case "f": o.format = arg
            case "t": o.persistent = true
            case "x":
                if arg.utf8.count > 4096 { throw fail("export name '\(arg)' too long") }
                o.exportName = arg
            case "D":
                if arg.utf8.count > 4096 { throw fail("export description '\(arg)' too long") }
                o.description = arg
            case "v": o.verbose = true
            case "V":
                // QEMU's first line ("NAME VERSION (PACKAGE)"), for scripts that read the version:
                // blockd speaks 7.2's options, as its QMP greeting says 7.2.0.
                throw Failure(text: "\(program) 7.2.0 (blockd \(Runner.version))\n"
                              + "blockd's implementation of qemu-nbd's command line.\n", isInformational: true)
            case "h":
                throw Failure(text: usage(program), isInformational: true)
            case "object":
                if !arg.hasPrefix("{"), let (options, help) = try? KeyValue.parseAllowingHelp(arg, impliedKey: "qom-type"), help {
                    throw Failure(text: Daemon.objectHelp(options), isInformational: true)
                }
                o.objects.append(arg)
            case "tls-creds": o.tlsCreds = arg
            case "tls-hostname": o.tlsHostname = arg
            case "image-opts": o.imageOpts = true
            case "T": o.trace = true
            case "tls-authz": o.tlsAuthz = arg
            case "fork": o.fork = true
            case "L": o.list = true
            case "pid-file": o.pidFile = arg
            case "selinux-label": o.selinuxLabel = arg
            case "handshake-limit":
                guard let (negative, magnitude) = QMPArguments.parseCInteger(arg), !negative, magnitude <= UInt64(Int32.max) else {
                    throw fail("Invalid handshake limit '\(arg)'")
                }
                o.handshakeLimit = Int(magnitude)
            default:
                fatalError("qemu-nbd option \(key) not handled")
            }
        }
        if o.list {
            if !parsed.operands.isEmpty { throw fail("List mode is incompatible with a file name") }
            if o.exportName != nil || o.description != nil || o.offset != 0 || o.device != nil || o.disconnect
                || o.format != nil || o.loadSnapshot != nil || !o.bitmaps.isEmpty || o.allocationDepth || seenAIO
                || seenDiscard || seenCache {
                throw fail("List mode is incompatible with per-device settings")
            }
            if o.fork { throw fail("List mode is incompatible with forking") }
        } else if parsed.operands.count != 1 {
            throw Failure(text: "\(prefix): Invalid number of arguments\nTry `\(argv0) --help' for more information.\n")
        } else {
            o.file = parsed.operands[0]
        }
        return o
    }

    static func usage(_ name: String) -> String {
        """
        Usage: \(name) [OPTIONS] FILE
          or:  \(name) -L [OPTIONS]
        QEMU Disk Network Block Device Utility (blockd's implementation)

          -h, --help                display this help and exit
          -V, --version             output version information and exit

        Connection properties:
          -p, --port=PORT           port to listen on (default `10809')
          -b, --bind=IFACE          interface to bind to (default `0.0.0.0')
          -k, --socket=PATH         path to the unix socket
          -e, --shared=NUM          device can be shared by NUM clients (default '1')
          -t, --persistent          don't exit on the last connection
          -v, --verbose             display extra debugging information
          -x, --export-name=NAME    expose export by name (default is empty string)
          -D, --description=TEXT    export a human-readable description
              --handshake-limit=N   limit client's handshake to N seconds (default 10)

        Exposing part of the image:
          -o, --offset=OFFSET       offset into the image
          -A, --allocation-depth    expose the allocation depth
          -B, --bitmap=NAME         expose a persistent dirty bitmap

        General purpose options:
          -L, --list                list exports available from another NBD server
          --object type,id=ID,...   define an object such as 'tls-creds-x509' for providing
                                    TLS credentials (also tls-creds-psk, authz-simple,
                                    throttle-group; --object help lists them)
          --tls-creds=ID            use id of an earlier --object to provide TLS
          --tls-authz=ID            use id of an earlier --object to provide
                                    authorization
          --tls-hostname=HOSTNAME   override hostname used to check x509 certificate
          -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                                    log everything blockd does (blockd has no trace events)
          --fork                    fork off the server process and exit the parent
                                    once the server is running
          --pid-file=PATH           store the server's process ID in the given file

        Block device options:
          -f, --format=FORMAT       set image format (raw, qcow2)
          -r, --read-only           export read-only
          -n, --nocache             disable host cache
              --cache=MODE          set cache mode used to access the disk image, the
                                    valid options are: 'none', 'writeback' (default),
                                    'writethrough', 'directsync' and 'unsafe'
              --aio=MODE            set AIO mode (native, io_uring or threads)
              --discard=MODE        set discard mode (ignore, unmap)
              --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
              --image-opts          treat FILE as a full set of image options

        Not available in blockd: -c/--connect and -d/--disconnect (kernel /dev/nbdN),
        -s/--snapshot and -l/--load-snapshot, --selinux-label.

        """
    }
}

