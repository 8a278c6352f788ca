import BlockCore
import BlockDrivers
import EventLoop
import Glibc
import JSON
import NBDServer
import QMP

/// Applies qemu-storage-daemon options in order, each through the same code as its QMP
/// command (`--blockdev` is `blockdev-add`, `--export` is `block-export-add`, `--object` is
/// `object-add`, `--nbd-server` is `nbd-server-start`), so both accept the same options and
/// say the same things. A `key=value` argument is converted as QEMU's keyval visitor does
/// (`QMPArguments(keyval: true)`); a JSON argument is taken as it is.
///
/// Errors read `--option ARGUMENT: message`, as QEMU prints them.
struct Startup {
    let daemonize: Bool
    var chardevs: [String: Chardev] = [:]
    /// `--nbd-server` as given; it listens once every option is applied, so a client that
    /// connects the moment the socket appears finds every export (QSD's main loop likewise
    /// accepts nothing until start-up is over).
    var server: (config: Daemon.NBDServerConfig, location: String)?
    /// Monitors given so far, started by `finish` once every option is applied: QSD's monitors
    /// read no command before its main loop runs, so a command on stdin never meets a node a
    /// later `--blockdev` defines (iotests `qsd-jobs` sends them all at once).
    var monitors: [PendingMonitor] = []

    /// A monitor made from an option but not serving yet.
    enum PendingMonitor {
        case chardev(Chardev, pretty: Bool)
        /// `--qmp PATH`: the socket exists (errors come in command-line order).
        case listener(QMPServer.Listener)
    }

    init(daemonize: Bool) { self.daemonize = daemonize }

    mutating func apply(_ action: Action, to daemon: Daemon) throws(UsageError) {
        let location = action.location
        func fail(_ error: QMPError) -> UsageError { UsageError("\(location): \(error.descWithHint)") }
        // `--object help` prints the list and ends the program successfully, as QEMU does.
        if action.kind == .object, let (options, _, help) = try? Startup.objectArgument(action.argument), help {
            throw UsageError.informational(Daemon.objectHelp(options))
        }
        do throws(QMPError) {
            switch action.kind {
            case .blockdev:
                let (options, _) = try Startup.argumentObject(action.argument, impliedKey: "driver")
                try daemon.withControlLock { () throws(QMPError) in try daemon.blockdevAddCommand(options) }
            case .nbdServer:
                let (options, keyval) = try Startup.argumentObject(action.argument, impliedKey: nil)
                var args = QMPArguments(options, keyval: keyval)
                var config = try Daemon.nbdServerArguments(&args, legacy: false)
                try args.finish()
                if server != nil || daemon.nbd != nil { throw QMPError.generic("NBD server already running") }
                if config.addresses.isEmpty {
                    // No `addr`: every socket systemd passed (blockd's addition to QSD's syntax).
                    let activated = SocketActivation.inherited
                    guard !activated.isEmpty else { throw QMPError.generic("Parameter 'addr' is missing") }
                    config.addresses = activated.map { .fd(String($0.fd)) }
                }
                try daemon.withControlLock { () throws(QMPError) in try daemon.checkNBDServerTLS(config) }
                server = (config, location)
            case .export:
                let (options, keyval) = try Startup.argumentObject(action.argument, impliedKey: "type")
                var args = QMPArguments(options, keyval: keyval)
                let running = server != nil || daemon.nbd != nil
                try daemon.withControlLock { () throws(QMPError) in
                    try daemon.blockExportAddCommand(&args, serverRunning: running)
                }
            case .object:
                let (options, keyval, _) = try Startup.objectArgument(action.argument)
                let typed = try Daemon.typedObjectOptions(options, keyval: keyval)
                try daemon.withControlLock { () throws(QMPError) in
                    do throws(BlockError) { try daemon.objectAdd(typed) } catch { throw .generic(error.message) }
                }
            case .chardev:
                let parsed = Chardev.make(action.argument, existing: chardevs, daemonize: daemonize)
                for w in parsed.warnings { Report.line("\(location): \(w)") }
                switch parsed.result {
                case .success(let device): chardevs[device.id] = device
                case .failure(let e): throw QMPError.generic(e.message)
                }
            case .monitor:
                try addMonitor(action.argument, to: daemon)
            case .qmp:
                monitors.append(.listener(try QMPServer.listen(unixPath: action.argument)))
            }
        } catch {
            throw fail(error)
        }
    }

    /// `--monitor [chardev=]ID[,mode=control][,pretty=on|off][,id=…]` (QAPI `MonitorOptions`).
    private mutating func addMonitor(_ text: String, to daemon: Daemon) throws(QMPError) {
        let (options, keyval) = try Startup.argumentObject(text, impliedKey: "chardev")
        var args = QMPArguments(options, keyval: keyval)
        _ = try args.string("id")
        let mode = try args.enumValue("mode", allowed: ["readline", "control"])
        let pretty = try args.bool("pretty") ?? false
        let id = try args.requiredString("chardev")
        try args.finish()
        guard var device = chardevs[id] else { throw QMPError.generic("chardev \"\(id)\" not found") }
        if mode == "readline" { throw QMPError.generic("Only QMP is supported") }
        if device.inUse { throw QMPError.generic("Device '\(id)' is in use") }
        device.inUse = true
        chardevs[id] = device
        monitors.append(.chardev(device, pretty: pretty))
    }

    /// Starts the NBD server asked for, now that every export exists, then the monitors.
    mutating func finish(_ daemon: Daemon) throws(UsageError) {
        let passed = SocketActivation.passed
        if let (fd, code) = passed.invalid {
            Log.warning("socket activation: LISTEN_FDS=\(passed.count), but fd \(fd) is not open: \(String(cString: strerror(code)))")
        }
        if let (config, location) = server {
            do throws(QMPError) {
                try daemon.withControlLock { () throws(QMPError) in try daemon.startNBDServer(config) }
            } catch {
                throw UsageError("\(location): \(error.desc)")
            }
            let used = Set(config.addresses.compactMap { a -> Int32? in
                if case .fd(let name) = a { return try? SocketActivation.descriptor(named: name) }
                return nil
            })
            let unused = passed.sockets.filter { !used.contains($0.fd) }
            if !unused.isEmpty {
                Log.warning("socket activation passed \(unused.map { "fd \($0.fd)" }.joined(separator: ", ")) that --nbd-server does not use (give addr.type=fd or no addr)")
            }
        } else if !passed.sockets.isEmpty {
            Log.warning("socket activation passed \(passed.sockets.count) socket(s) but there is no --nbd-server (give --nbd-server without addr to use them)")
        }
        let pending = monitors
        monitors = []
        let qmp = daemon.monitorServer()
        for (n, monitor) in pending.enumerated() {
            do throws(QMPError) {
                switch monitor {
                case .listener(let listener):
                    try qmp.addMonitor(listener)
                case .chardev(let device, let pretty):
                    switch device.backend {
                    case .stdio: try qmp.addMonitor(readFD: 0, writeFD: 1, isStdio: true, pretty: pretty)
                    case .null: break
                    case .listener(let listener, let first): try qmp.addMonitor(listener, pretty: pretty, firstClient: first)
                    case .connected(let fd): try qmp.addMonitor(readFD: fd, writeFD: fd, isStdio: false, pretty: pretty)
                    }
                }
            } catch {
                // Only a server stopped meanwhile refuses; what was not started is released.
                for rest in pending[(n + 1)...] { Startup.release(rest) }
                throw UsageError(error.desc)
            }
        }
    }

    /// Closes chardevs no monitor took and monitors never started (start-up failed).
    func release() {
        for device in chardevs.values where !device.inUse { device.release() }
        for monitor in monitors { Startup.release(monitor) }
    }

    private static func release(_ monitor: PendingMonitor) {
        switch monitor {
        case .listener(let listener): QMPServer.closeListener(listener)
        case .chardev(let device, _): device.release()
        }
    }

    // MARK: Arguments

    /// A `key=value` or JSON argument as an object; `keyval` says which (its scalars are strings).
    static func argumentObject(_ text: String, impliedKey: String?) throws(QMPError) -> (JSONObject, keyval: Bool) {
        if text.hasPrefix("{") { return (try jsonObject(text), false) }
        do {
            return (try KeyValue.parse(text, impliedKey: impliedKey), true)
        } catch {
            throw QMPError.generic(error.message)
        }
    }

    /// `--object`: like `argumentObject`, but `help` is a request for the list of types.
    static func objectArgument(_ text: String) throws(QMPError) -> (JSONObject, keyval: Bool, help: Bool) {
        if text.hasPrefix("{") { return (try jsonObject(text), false, false) }
        do {
            let (object, help) = try KeyValue.parseAllowingHelp(text, impliedKey: "qom-type")
            return (object, true, help)
        } catch {
            throw QMPError.generic(error.message)
        }
    }

    /// QEMU's `qobject_from_json` messages for the mistakes people make.
    static func jsonObject(_ text: String) throws(QMPError) -> JSONObject {
        let bytes = Array(text.utf8)
        do {
            guard case .object(let o) = try JSONParser.parse(bytes) else {
                throw QMPError.generic("JSON parse error, expecting value")
            }
            return o
        } catch let error as JSONParseError {
            if error.reason == "unexpected trailing characters" { throw QMPError.generic("Expecting at most one JSON value") }
            if error.offset >= bytes.count { throw QMPError.generic("JSON parse error, premature EOI") }
            throw QMPError.generic("JSON parse error, \(qemuReason(error, bytes))")
        } catch {
            throw error as! QMPError
        }
    }
}

extension Startup {
    /// The parser's reason in the words of QEMU's JSON parser (qobject/json-parser.c).
    static func qemuReason(_ error: JSONParseError, _ bytes: [UInt8]) -> String {
        func word() -> String {
            var end = error.offset
            while end < bytes.count, (bytes[end] >= 65 && bytes[end] <= 90) || (bytes[end] >= 97 && bytes[end] <= 122) { end += 1 }
            return String(decoding: bytes[error.offset..<end], as: UTF8.self)
        }
        let atLetter = error.offset < bytes.count && ((bytes[error.offset] >= 65 && bytes[error.offset] <= 90)
                                                      || (bytes[error.offset] >= 97 && bytes[error.offset] <= 122))
        switch error.reason {
        case "expected ':'": return "missing : in object pair"
        case "expected ',' or '}'": return "expected separator in dict"
        case "expected ',' or ']'": return "expected separator in list"
        case "invalid literal": return "invalid keyword '\(word())'"
        case "expected a string key": return atLetter ? "invalid keyword '\(word())'" : "expecting value"
        default:
            if error.reason.hasPrefix("unexpected character") { return atLetter ? "invalid keyword '\(word())'" : "expecting value" }
            if error.reason.hasPrefix("duplicate key") { return "duplicate key" }
            return error.reason
        }
    }
}

extension Daemon {
    /// Object types `--object` and `object-add` accept (`--object help`).
    public static var userCreatableTypes: [String] { ["authz-simple", "secret", "throttle-group", "tls-creds-psk", "tls-creds-x509"] }

    /// `--object help` and `--object TYPE,help`: QEMU's listings, thrown as text to print.
    static func objectHelp(_ options: JSONObject) -> String {
        if let type = options["qom-type"]?.stringValue {
            // QEMU prints one line per property, sorted as printed; a struct-valued property
            // (throttle-group's `limits`) as one line; the deprecated `loaded` not at all.
            var lines = Set<String>()
            for (key, value) in objectSchema[type] ?? [:] where key != "loaded" {
                if let dot = key.firstIndex(of: ".") {
                    lines.insert("  \(key[..<dot])=<ThrottleLimits>\n")
                } else {
                    lines.insert("  \(key)=<\(value.name)>\n")
                }
            }
            return "\(type) options:\n" + lines.sorted().joined()
        }
        return "List of user creatable objects:\n" + userCreatableTypes.map { "  \($0)\n" }.joined()
    }

    enum PropertyType: String {
        case bool, int, str
        /// A string from a QAPI enum (`endpoint`): converted as a string, named in help.
        case tlsEndpoint
        /// `secret`'s `format` (raw, base64).
        case secretFormat
        var name: String {
            switch self {
            case .bool: "bool"
            case .int: "int"
            case .str: "string"
            case .tlsEndpoint: "QCryptoTLSCredsEndpoint"
            case .secretFormat: "QCryptoSecretFormat"
            }
        }
    }

    /// The scalar types of each object type's properties (qapi/qom.json, crypto.json,
    /// authz.json), for converting `key=value` strings as QEMU's keyval visitor does. A type
    /// blockd does not know keeps its strings; `object-add` then says what is wrong.
    static let objectSchema: [String: [String: PropertyType]] = {
        let limits = ["iops-total", "iops-total-max", "iops-total-max-length", "iops-read", "iops-read-max",
                      "iops-read-max-length", "iops-write", "iops-write-max", "iops-write-max-length", "bps-total",
                      "bps-total-max", "bps-total-max-length", "bps-read", "bps-read-max", "bps-read-max-length",
                      "bps-write", "bps-write-max", "bps-write-max-length", "iops-size"]
        var throttle: [String: PropertyType] = [:]
        for l in limits {
            throttle["limits." + l] = .int
            throttle["x-" + l] = .int
        }
        let tls: [String: PropertyType] = ["verify-peer": .bool, "dir": .str, "endpoint": .tlsEndpoint, "priority": .str,
                                           "loaded": .bool]
        return [
            "throttle-group": throttle,
            "tls-creds-anon": tls,
            "tls-creds-psk": tls.merging(["username": .str]) { a, _ in a },
            "tls-creds-x509": tls.merging(["sanity-check": .bool, "passwordid": .str]) { a, _ in a },
            "tls-cipher-suites": tls,
            "authz-simple": ["identity": .str],
            "authz-list-file": ["filename": .str, "refresh": .bool],
            "secret": ["data": .str, "file": .str, "format": .secretFormat, "keyid": .str, "iv": .str, "loaded": .bool],
        ]
    }()

    /// Object properties checked against their types: `key=value` strings converted as QEMU's
    /// keyval visitor does (`keyval`), or JSON values checked as its JSON visitor does.
    static func typedObjectOptions(_ options: JSONObject, keyval: Bool = true) throws(QMPError) -> JSONObject {
        guard let type = options["qom-type"]?.stringValue, let schema = objectSchema[type] else { return options }
        func convert(_ object: JSONObject, prefix: String) throws(QMPError) -> JSONObject {
            var out = JSONObject()
            var args = QMPArguments(object, path: prefix, keyval: keyval)
            for (key, value) in object {
                let name = prefix + key
                if prefix.isEmpty && (key == "qom-type" || key == "id") {
                    out[key] = value
                    continue
                }
                if case .object(let child) = value, schema.keys.contains(where: { $0.hasPrefix(name + ".") }) {
                    out[key] = .object(try convert(child, prefix: name + "."))
                    continue
                }
                if schema[name] == nil { throw QMPError.generic("Parameter '\(name)' is unexpected") }
                switch schema[name] {
                case .bool?: out[key] = .bool(try args.bool(key)!)
                case .int?: out[key] = .int(try args.int(key)!)
                default: out[key] = value
                }
            }
            return out
        }
        return try convert(options, prefix: "")
    }
}

/// Messages on stderr in QEMU's form (`PROGRAM: text`), and plain output on stdout. Written
/// at once, after the log lines already queued (`Log` writes from a background thread), so
/// the order on stderr is the order they were made in.
enum Report {
    static func line(_ text: String) {
        Log.flush()
        writeAll(2, "\(Log.programName): \(text)\n")
    }

    static func raw(_ text: String) {
        Log.flush()
        writeAll(2, text)
    }

    static func stdout(_ text: String) { writeAll(1, text) }

    static func writeAll(_ fd: Int32, _ text: String) {
        var bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            done += n
        }
        bytes.removeAll()
    }
}

