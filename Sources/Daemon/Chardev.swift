import JSON
import QMP
#if canImport(Glibc)
import Glibc
#endif

/// `--chardev`: the character devices a QMP monitor can sit on, parsed with QEMU's QemuOpts
/// rules (`chardev/char.c`, `char-socket.c`, `char-stdio.c`) and made as QEMU makes them: a
/// socket server listens at once (and with `wait=on` blocks until its first client), a socket
/// client connects at once.
struct Chardev {
    enum Backend {
        /// stdin/stdout.
        case stdio
        /// Reads nothing, discards everything.
        case null
        /// A listening socket; `firstClient` connected already (`wait=on`).
        case listener(QMPServer.Listener, firstClient: Int32?)
        /// A socket this process connected (`server=off`).
        case connected(Int32)
    }

    let id: String
    let backend: Backend
    /// A monitor sits on it (QEMU: "Device 'ID' is in use" for a second one).
    var inUse = false

    /// Every name QEMU 7.2's `qemu_chardev_opts` knows; others are "Invalid parameter".
    static let knownNames: Set<String> = [
        "backend", "path", "host", "port", "fd", "localaddr", "localport", "to", "ipv4", "ipv6", "wait", "server",
        "delay", "nodelay", "reconnect", "telnet", "tn3270", "tls-creds", "tls-authz", "websocket", "width", "height",
        "cols", "rows", "mux", "signal", "name", "debug", "size", "chardev", "append", "logfile", "logappend",
        "mouse", "clipboard", "tight", "abstract",
    ]
    static let boolNames: Set<String> = [
        "ipv4", "ipv6", "wait", "server", "delay", "nodelay", "telnet", "tn3270", "websocket", "mux", "signal",
        "append", "logappend", "mouse", "clipboard", "tight", "abstract",
    ]
    static let numberNames: Set<String> = ["to", "reconnect", "width", "height", "cols", "rows", "debug", "size"]

    /// QEMU's `qapi_bool_parse`.
    static func parseBool(_ text: String) -> Bool? {
        switch text {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: return nil
        }
    }

    /// The outcome of parsing: the device, and warnings to print (QEMU prints them even when
    /// the option then fails).
    struct Parsed {
        var warnings: [String]
        var result: Result<Chardev, UsageError>
    }

    /// Parses and creates one `--chardev`. `existing` are the devices defined so far;
    /// `daemonize` refuses stdio as QEMU does. Errors are QEMU's messages (without location).
    static func make(_ text: String, existing: [String: Chardev], daemonize: Bool) -> Parsed {
        let opts = QemuOpts.parse(text, impliedName: "backend")
        func fail(_ message: String) -> Parsed { Parsed(warnings: opts.warnings, result: .failure(UsageError(message))) }
        if let id = opts.id, !QemuOpts.isValidID(id) {
            return fail("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        }
        // QemuOpts validates each name and boolean as it parses.
        for (key, value) in opts.pairs {
            guard knownNames.contains(key) else { return fail("Invalid parameter '\(key)'") }
            if boolNames.contains(key), parseBool(value) == nil { return fail("Parameter '\(key)' expects 'on' or 'off'") }
            if numberNames.contains(key), UInt64(value) == nil {
                return fail("Parameter '\(key)' expects a number")
            }
        }
        func bool(_ key: String, _ defaultValue: Bool) -> Bool { opts.value(key).flatMap(parseBool) ?? defaultValue }
        let backendName = opts.value("backend")
        if backendName == "help" || backendName == "?" {
            return fail("Available chardev backend types: null socket stdio (blockd)")
        }
        guard let id = opts.id else { return fail("chardev: no id specified") }
        guard let backendName else { return fail("chardev: \"\(id)\" missing backend") }
        let knownBackends = ["null", "socket", "stdio", "file", "pipe", "pty", "serial", "tty", "parallel", "udp",
                             "ringbuf", "memory", "spicevmc", "spiceport", "qemu-vdagent", "dbus", "braille", "msmouse",
                             "wctablet", "testdev", "vc", "mux"]
        guard knownBackends.contains(backendName) else { return fail("'\(backendName)' is not a valid char driver name") }
        for key in ["mux", "logappend"] where bool(key, false) {
            return fail("'\(key)=on' is not supported by blockd")
        }
        if opts.value("logfile") != nil { return fail("'logfile' is not supported by blockd") }

        var backend: Backend
        switch backendName {
        case "null":
            backend = .null
        case "stdio":
            if daemonize { return fail("cannot use stdio with -daemonize") }
            if existing.values.contains(where: { if case .stdio = $0.backend { return true }; return false }) {
                return fail("cannot use stdio by multiple character devices")
            }
            backend = .stdio
        case "socket":
            let path = opts.value("path"), host = opts.value("host"), port = opts.value("port"), fd = opts.value("fd")
            if [path, host, fd].compactMap({ $0 }).count > 1 {
                return fail("None or one of 'path', 'fd' or 'host' option required.")
            }
            if host != nil && port == nil { return fail("chardev: socket: no port given") }
            if opts.value("delay") != nil && opts.value("nodelay") != nil {
                return fail("'delay' and 'nodelay' are mutually exclusive")
            }
            for key in ["telnet", "tn3270", "websocket"] where bool(key, false) {
                return fail("'\(key)=on' is not supported by blockd")
            }
            if opts.value("tls-creds") != nil { return fail("'tls-creds' on a chardev is not supported by blockd") }
            if let r = opts.value("reconnect"), r != "0" { return fail("'reconnect' is not supported by blockd") }
            if bool("abstract", false) { return fail("abstract unix sockets are not supported by blockd") }
            if existing[id] != nil { return fail("duplicate yank instance") }
            let server = bool("server", false)
            let wait = bool("wait", true)
            if let path {
                if server {
                    let listener: QMPServer.Listener
                    do { listener = try QMPServer.listen(unixPath: path) } catch { return fail(error.desc) }
                    backend = .listener(listener, firstClient: nil)
                    if wait {
                        waitingMessage(text, "disconnected:unix:\(path),server=on")
                        backend = .listener(listener, firstClient: QMPServer.acceptOne(listener))
                    }
                } else {
                    do { backend = .connected(try QMPServer.connect(unixPath: path)) } catch { return fail(error.desc) }
                }
            } else if let host, let port {
                let ipv4 = opts.value("ipv4").flatMap(parseBool), ipv6 = opts.value("ipv6").flatMap(parseBool)
                if server {
                    let listener: QMPServer.Listener
                    do {
                        listener = try QMPServer.listen(host: host, port: port, ipv4: ipv4, ipv6: ipv6)
                    } catch {
                        return fail(error.desc)
                    }
                    backend = .listener(listener, firstClient: nil)
                    if wait {
                        waitingMessage(text, "disconnected:tcp:\(host):\(port),server=on")
                        backend = .listener(listener, firstClient: QMPServer.acceptOne(listener))
                    }
                } else {
                    do { backend = .connected(try QMPServer.connect(host: host, port: port)) } catch { return fail(error.desc) }
                }
            } else {
                // QEMU reads a missing path/host as an (empty) fd number.
                guard let fd, let n = Int32(fd), n >= 0, fcntl(n, F_GETFD) >= 0 else {
                    return fail("Unable to parse FD number \(fd ?? "")")
                }
                backend = .connected(n)
            }
        default:
            return fail("chardev backend '\(backendName)' is not supported by blockd (only socket, stdio and null)")
        }
        if existing[id] != nil {
            return fail("attempt to add duplicate property '\(id)' to object (type 'container')")
        }
        return Parsed(warnings: opts.warnings, result: .success(Chardev(id: id, backend: backend)))
    }

    /// QEMU's notice before it blocks on `wait=on` (scripts wait for this line).
    private static func waitingMessage(_ text: String, _ address: String) {
        Report.line("--chardev \(text): info: QEMU waiting for connection on: \(address)")
    }

    /// Closes what a device holds when it never got a monitor (start-up failed).
    func release() {
        switch backend {
        case .listener(let l, let first):
            QMPServer.closeListener(l)
            if let first { close(first) }
        case .connected(let fd): close(fd)
        case .stdio, .null: break
        }
    }
}
