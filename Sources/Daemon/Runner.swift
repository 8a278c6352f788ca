import BlockCore
import BlockDrivers
import EventLoop
import Glibc
import JSON
import NBDServer

/// Runs an `Invocation`: builds the daemon, prints where it serves, waits for a signal,
/// shuts down cleanly. `main` is only wiring around this.
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

    /// Returns the process exit status.
    public static func run(_ arguments: [String]) -> Int32 {
        let invocation: Invocation
        do {
            invocation = try CommandLine.parse(arguments)
        } catch {
            printError("blockd: \(error.message)")
            return 2
        }
        switch invocation {
        case .help:
            print(CommandLine.usage)
            return 0
        case .version:
            print("blockd \(version) (speaks qemu-storage-daemon 7.2 options and QMP)")
            return 0
        default:
            break
        }
        // Signals: handled by sigwait on this thread; every other thread inherits the mask.
        signal(SIGPIPE, SIG_IGN)
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGUSR1] { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)

        let daemon: Daemon
        do {
            daemon = try start(invocation)
        } catch {
            printError("blockd: \(error.message)")
            return 2
        }
        var received: Int32 = 0
        while true {
            sigwait(&set, &received)
            if received != SIGHUP { break }
        }
        Log.info("shutting down (signal \(received))")
        daemon.shutdown()
        return 0
    }

    static func printError(_ line: String) {
        var bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress!, $0.count) }
    }

    static func start(_ invocation: Invocation) throws(UsageError) -> Daemon {
        switch invocation {
        case .daemon(let actions, let settings):
            Log.level = settings.verbose ? .debug : .info
            let daemon = Daemon(configuration: .init(loopCount: settings.loops, workerCount: settings.workers))
            do {
                try apply(actions, to: daemon)
            } catch {
                daemon.shutdown()
                throw error
            }
            return daemon
        case .serve(let s, let settings):
            Log.level = settings.verbose ? .debug : .info
            let daemon = Daemon(configuration: .init(loopCount: settings.loops, workerCount: settings.workers))
            do {
                try serve(s, on: daemon, demo: false)
            } catch {
                daemon.shutdown()
                throw error
            }
            return daemon
        case .demo(let settings):
            Log.level = settings.verbose ? .debug : .info
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
        case .help, .version:
            fatalError("handled before start")
        }
    }

    static func apply(_ actions: [Action], to daemon: Daemon) throws(UsageError) {
        var chardevs: [String: String] = [:]
        var server: ([ListenAddress], Int)?
        for action in actions {
            switch action {
            case .blockdev(let options):
                do { try daemon.blockdevAdd(options) } catch { throw UsageError("--blockdev: \(error.messageWithHint)") }
            case .nbdServer(let addresses, let max):
                // Listening starts after every option is applied, so a client that connects as
                // soon as the socket appears finds the exports given after --nbd-server.
                if server != nil { throw UsageError("--nbd-server: NBD server already running") }
                server = (addresses, max)
            case .export(let e):
                do {
                    try daemon.exportAdd(id: e.id, nodeName: e.nodeName, name: e.name, description: e.description, writable: e.writable,
                                         bitmaps: e.bitmaps, writethrough: e.writethrough)
                } catch { throw UsageError("--export: \(error.message)") }
            case .chardev(let id, let path):
                if chardevs[id] != nil { throw UsageError("--chardev: attempt to add duplicate chardev '\(id)'") }
                chardevs[id] = path
            case .monitor(let id):
                guard let path = chardevs[id] else { throw UsageError("--monitor: chardev \"\(id)\" not found") }
                try daemon.addMonitor(path: path)
            case .qmp(let path):
                try daemon.addMonitor(path: path)
            case .object(let options):
                do { try daemon.objectAdd(options) } catch { throw UsageError("--object: \(error.message)") }
            case .pidfile(let path):
                let text = "\(getpid())\n"
                let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                if fd < 0 { throw UsageError("--pidfile: cannot write '\(path)': \(String(cString: strerror(errno)))") }
                _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
                Glibc.close(fd)
            }
        }
        if let (addresses, max) = server {
            do { _ = try daemon.nbdServerStart(addresses, maxConnections: max) } catch {
                throw UsageError("--nbd-server: \(error.message)")
            }
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
        let address: ListenAddress
        if let port = s.port {
            address = .inet(host: s.host, port: String(port))
        } else {
            let path = s.socket ?? runtimeDirectory + "/nbd.sock"
            if s.socket == nil { try ensureDirectory(runtimeDirectory) }
            address = .unix(path: path)
        }
        let ports: [Int?]
        do {
            // The export exists before the socket listens, so the first client finds it.
            try daemon.exportAdd(id: name, nodeName: node.nodeName, name: name, description: s.image, writable: !s.readOnly)
            ports = try daemon.nbdServerStart([address])
        } catch {
            throw UsageError("serve: \(error.message)")
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
        switch address {
        case .unix(let path): uri = "nbd+unix:///\(name)?socket=\(path)"
        case .inet(let host, _):
            let h = host.contains(":") ? "[\(host)]" : host
            uri = "nbd://\(h):\(ports.first.flatMap { $0 } ?? s.port ?? 10809)/\(name)"
        }
        var text = """
        blockd \(version) serving \(s.image) (\(node.driverName), \(node.length) bytes, \(s.readOnly ? "read-only" : "writable"))
          NBD URI: \(uri)

        """
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
        print(text, terminator: "")
        fflushStdout()
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
