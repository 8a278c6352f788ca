import BlockCore
import BlockDrivers
import EventLoop
import Glibc
import JSON
import NBDServer
import QMP
import TLS

/// Runs an `Invocation`: builds the daemon, waits for a signal, shuts down cleanly. Quiet in
/// normal operation, as qemu-storage-daemon and qemu-nbd are: only errors and warnings reach
/// stderr (`-v` adds per-client lines, `--trace`/`BLOCKD_TRACE=1` everything). `main` is only
/// wiring around this.
public enum Runner {
    public static let version = "0.1.0"

    /// Default directory for sockets and the demo: `$XDG_RUNTIME_DIR/blockd` or `/tmp/blockd-UID`.
    public static var runtimeDirectory: String {
        if let xdg = getenv("BLOCKD_RUNTIME_DIR") { return String(cString: xdg) }
        return "/tmp/blockd-\(getuid())"
    }

    static func ensureDirectory(_ path: String) throws(UsageError) {
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            throw UsageError("cannot create directory '\(path)': \(String(cString: strerror(errno)))")
        }
    }

    /// The process entry point: `argv0` decides the personality. Run as `qemu-nbd` (a symlink
    /// or a copy), blockd is qemu-nbd's front end and names itself so in messages.
    public static func main(argv0: String, arguments: [String]) -> Int32 {
        let program = argv0.split(separator: "/").last.map(String.init) ?? "blockd"
        Log.programName = program
        // Sockets from systemd: taken (and LISTEN_* unset) before any thread starts.
        _ = SocketActivation.passed
        if program == "qemu-nbd" {
            do {
                switch try QemuNBDOptions.parse(arguments, program: program, argv0: argv0) {
                case .qemuNBD(let options): return QemuNBDRunner.run(options)
                case .print(let text):
                    Report.stdout(text)
                    return 0
                default: return 1
                }
            } catch {
                return QemuNBDRunner.usageFailure(error)
            }
        }
        return run(arguments, program: program)
    }

    /// Returns the process exit status.
    public static func run(_ arguments: [String], program: String = "blockd") -> Int32 {
        let invocation: Invocation
        do {
            invocation = try CommandLine.parse(arguments, program: program)
        } catch {
            return QemuNBDRunner.usageFailure(error)
        }
        switch invocation {
        case .print(let text):
            Report.stdout(text)
            return 0
        case .qemuNBD(let options):
            return QemuNBDRunner.run(options)
        case .daemon(let actions, let settings):
            return runDaemon(actions, settings)
        case .serve(_, let settings), .demo(let settings):
            setLogLevel(settings)
            blockSignals()
            let daemon: Daemon
            do {
                daemon = try start(invocation)
            } catch {
                Report.line(error.message)
                return 1
            }
            _ = waitForSignal()
            daemon.shutdown()
            return 0
        }
    }

    static func setLogLevel(_ settings: Settings) {
        var trace = settings.trace
        if let env = getenv("BLOCKD_TRACE"), !["", "0", "off", "no", "false"].contains(String(cString: env)) { trace = true }
        Log.level = trace ? .debug : settings.verbose ? .info : .warning
    }

    static let stopSignals = [SIGINT, SIGTERM, SIGHUP]

    /// Signals are taken by `sigwait` on the main thread; every thread made later inherits the mask.
    static func blockSignals() {
        signal(SIGPIPE, SIG_IGN)
        var set = sigset_t()
        sigemptyset(&set)
        for s in stopSignals { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Waits for SIGINT, SIGTERM or SIGHUP (qemu-storage-daemon and qemu-nbd stop on all three).
    static func waitForSignal() -> Int32 {
        var set = sigset_t()
        sigemptyset(&set)
        for s in stopSignals { sigaddset(&set, s) }
        var received: Int32 = 0
        sigwait(&set, &received)
        return received
    }

    // MARK: qemu-storage-daemon mode

    static func runDaemon(_ actions: [Action], _ settings: Settings) -> Int32 {
        setLogLevel(settings)
        // Fork before any thread exists (QSD forks before it initialises anything).
        var readiness: Daemonize.Readiness?
        if settings.daemonize { readiness = Daemonize.start(restrictUmask: true) }
        blockSignals()
        let daemon = Daemon(configuration: .init(loopCount: settings.loops, workerCount: settings.workers))
        var startup = Startup(daemonize: settings.daemonize)
        var pidfile: PidFile?
        do throws(UsageError) {
            for action in actions { try startup.apply(action, to: daemon) }
            try startup.finish(daemon)
            if let path = settings.pidfile {
                do { pidfile = try PidFile.write(path) } catch { throw UsageError("cannot create PID file: \(error.message)") }
            }
        } catch {
            startup.release()
            daemon.shutdown()
            if error.isInformational {
                Report.stdout(error.message)
                return 0
            }
            Report.line(error.message)
            return 1
        }
        readiness?.ready()
        _ = waitForSignal()
        daemon.shutdown()
        pidfile?.remove()
        return 0
    }

    static func start(_ invocation: Invocation) throws(UsageError) -> Daemon {
        switch invocation {
        case .serve(let s, let settings):
            let daemon = Daemon(configuration: .init(loopCount: settings.loops, workerCount: settings.workers))
            do {
                try serve(s, on: daemon, demo: false)
            } catch {
                daemon.shutdown()
                throw error
            }
            return daemon
        case .demo(let settings):
            let dir = runtimeDirectory
            try ensureDirectory(dir)
            try ensureDirectory(dir + "/demo")
            let image = dir + "/demo/demo.img"
            try DemoImage.create(at: image)
            let daemon = Daemon(configuration: .init(loopCount: settings.loops, workerCount: settings.workers))
            var s = ServeOptions(image: image)
            s.name = "demo"
            s.socket = dir + "/nbd.sock"
            s.qmp = dir + "/qmp.sock"
            do {
                try serve(s, on: daemon, demo: true)
            } catch {
                daemon.shutdown()
                throw error
            }
            return daemon
        default:
            fatalError("not a serve invocation")
        }
    }

    static func serve(_ s: ServeOptions, on daemon: Daemon, demo: Bool) throws(UsageError) {
        let node: BlockNode
        do {
            node = try daemon.openImage(path: s.image, format: s.format, readOnly: s.readOnly)
        } catch {
            throw UsageError("serve: \(error.messageWithHint)")
        }
        let name = s.name ?? basename(s.image)
        var addresses: [ListenAddress]
        let activated = demo ? [] : SocketActivation.inherited
        if !activated.isEmpty {
            // qemu-nbd's rule: socket activation decides where to listen.
            if s.socket != nil { throw UsageError("serve: Unix socket can't be set when using socket activation") }
            if s.port != nil { throw UsageError("serve: TCP port number can't be set when using socket activation") }
            addresses = activated.map { .fd(String($0.fd)) }
        } else if let port = s.port {
            addresses = [.inet(host: s.host, port: String(port))]
        } else {
            let path = s.socket ?? runtimeDirectory + "/nbd.sock"
            if s.socket == nil { try ensureDirectory(runtimeDirectory) }
            addresses = [.unix(path: path)]
        }
        let tls = try serveTLSPolicy(s)
        let ports: [Int?]
        do {
            // The export exists before the socket listens, so the first client finds it.
            try daemon.exportAdd(id: name, nodeName: node.nodeName, name: name, description: s.image, writable: !s.readOnly)
            ports = try daemon.nbdServerStart(addresses, tls: tls)
        } catch {
            throw UsageError("serve: \(error.message)")
        }
        // What to print: an activated socket by where it is bound.
        var address = addresses[0]
        if case .fd(let n) = address, let fd = Int32(n) {
            switch Sockets.localAddress(fd) {
            case .unix(let path)?: address = .unix(path: path)
            case .inet(let host, let port)?: address = .inet(host: host, port: String(port))
            case nil: break
            }
        }
        var qmpPath = s.qmp
        if let qmp = s.qmp {
            do {
                try daemon.addMonitor(path: qmp)
            } catch {
                // The demo offers QMP when this build has it; the NBD export works without.
                guard demo else { throw error }
                qmpPath = nil
            }
        }
        let uri: String
        let scheme = tls == nil ? "nbd" : "nbds"
        switch address {
        case .unix(let path): uri = "\(scheme)+unix:///\(name)?socket=\(path)"
        case .inet(let host, let port):
            let h = host.contains(":") ? "[\(host)]" : host
            uri = "\(scheme)://\(h):\(ports.first.flatMap { $0 } ?? Int(port) ?? 10809)/\(name)"
        case .fd(let n):
            uri = "(socket-activated fd \(n))"
        }
        var text = """
        blockd \(version) serving \(s.image) (\(node.driverName), \(node.length) bytes, \(s.readOnly ? "read-only" : "writable"))
          NBD URI: \(uri)

        """
        if let tls {
            let c = tls.credentials
            text += c.kind == .x509
                ? "  TLS:     X.509 from \(c.source)\(c.verifyPeer ? "; clients need a certificate from its CA" : "")"
                : "  TLS:     PSK from \(c.source)"
            text += tls.authorization.map { " (only '\($0.identity)')" } ?? ""
            text += "\n"
        }
        if let qmp = qmpPath { text += "  QMP:     \(qmp)\n" }
        if demo {
            text += """

            Try it (in another terminal):
              nbdinfo '\(uri)'
              nbdinfo --map '\(uri)'
              qemu-io -f raw -c 'read -v 0 64' '\(uri)'
              qemu-img convert -f raw -O qcow2 '\(uri)' /tmp/copy.qcow2
              nbdcopy '\(uri)' - | head -c 200
            Stop with Ctrl-C.

            """
        }
        // `serve` says where it serves (its URI, with the port when it was 0): that is its
        // output, as `nbdinfo` prints what it found. The qemu-* command lines print nothing.
        print(text, terminator: "")
        fflushStdout()
    }

    /// `serve --tls-creds DIR | --tls-psk FILE [--tls-authz ID]`.
    static func serveTLSPolicy(_ s: ServeOptions) throws(UsageError) -> TLSServerPolicy? {
        let credentials: TLSCredentials
        do throws(TLSError) {
            if let dir = s.tlsCreds {
                credentials = try .x509(directory: dir, endpoint: .server, verifyPeer: s.tlsVerifyPeer)
            } else if let file = s.tlsPSK {
                credentials = try .psk(keyFile: file, endpoint: .server)
            } else {
                return nil
            }
        } catch {
            throw UsageError("serve: \(s.tlsCreds != nil ? "--tls-creds" : "--tls-psk"): \(error.message)")
        }
        if s.tlsAuthz != nil && credentials.kind == .x509 && !credentials.verifyPeer {
            throw UsageError("serve: --tls-authz needs --tls-verify-peer on")
        }
        return TLSServerPolicy(credentials: credentials,
                               authorization: s.tlsAuthz.map { TLSAuthorization(id: "--tls-authz", identity: $0) })
    }

    static func basename(_ path: String) -> String {
        let last = path.split(separator: "/").last.map(String.init) ?? path
        if let dot = last.lastIndex(of: "."), dot != last.startIndex { return String(last[..<dot]) }
        return last
    }

    static func fflushStdout() { fflush(nil) }
}

extension Daemon {
    /// Opens an image file with its format detected (qcow2 magic, else raw) as nodes
    /// `file0`/`disk0`-style names: the format node is returned.
    public func openImage(path: String, format: String?, readOnly: Bool) throws(BlockError) -> BlockNode {
        let detected: String
        if let format { detected = format } else { detected = try ImageProbe.format(path: path) }
        let file: JSONObject = ["driver": "file", "filename": .string(path), "read-only": .bool(readOnly)]
        // Discards reach the image (qemu-nbd's --discard=unmap); --blockdev nodes default to
        // QEMU's discard=ignore.
        let options: JSONObject = ["driver": .string(detected), "node-name": "disk", "file": .object(file),
                                   "read-only": .bool(readOnly), "discard": "unmap"]
        return try blockdevAdd(options)
    }

}

/// Detects an image's format from its first bytes.
public enum ImageProbe {
    public static func format(path: String) throws(BlockError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw BlockError.system("Could not open '\(path)'") }
        defer { close(fd) }
        var magic = [UInt8](repeating: 0, count: 4)
        let n = read(fd, &magic, 4)
        if n == 4 && magic == [0x51, 0x46, 0x49, 0xFB] { return "qcow2" }
        return "raw"
    }
}

/// The embedded demo image: 64 MiB, mostly holes, with a greeting at the start and a few
/// data extents so `nbdinfo --map` has something to show.
enum DemoImage {
    static let size: Int = 64 << 20

    static func create(at path: String) throws(UsageError) {
        if access(path, F_OK) == 0 { return }
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        if fd < 0 { throw UsageError("cannot create demo image '\(path)': \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        ftruncate(fd, size)
        let greeting = "Hello from blockd! This 64 MiB demo disk is served over NBD.\n"
        _ = greeting.withCString { pwrite(fd, $0, strlen($0), 0) }
        var block = [UInt8](repeating: 0, count: 1 << 20)
        for i in 0..<block.count { block[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        for mib in [8, 9, 32, 60] {
            _ = block.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, off_t(mib) << 20) }
        }
    }
}
