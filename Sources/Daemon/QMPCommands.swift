import BlockCore
import BlockDrivers
import EventLoop
import Glibc
import JSON
import NBDServer
import QMP

/// The block commands of qemu-storage-daemon's QMP schema that blockd implements.
/// Each handler reads and checks every argument (`finish()`) before it changes anything.
extension Daemon {
    /// The QMP server, made with every command registered when the first monitor needs it.
    public func monitorServer() -> QMPServer {
        if let existing = qmp { return existing }
        let quit = quitRequested
        let server = QMPServer(onQuit: { quit() }, beforeQuitReply: { [self] in closeExportsAndCancelJobs() })
        registerCommands(on: server)
        registerJobCommands(on: server)
        registerReopenCommand(on: server)
        qmp = server
        return server
    }

    /// Adds a QMP monitor on a unix socket (`--qmp PATH`, `blockd serve --qmp`).
    public func addMonitor(path: String) throws(UsageError) {
        do {
            try monitorServer().addMonitor(path: path)
        } catch {
            throw UsageError(error.desc)
        }
    }

    /// Runs a control-plane change under the lock QMP commands run under, so a monitor
    /// client that is already connected during start-up never sees half of it.
    func withControlLock<T>(_ body: () throws(QMPError) -> T) throws(QMPError) -> T {
        guard let qmp else { return try body() }
        let result: Result<T, QMPError> = qmp.withControlLock {
            do throws(QMPError) { return .success(try body()) } catch { return .failure(error) }
        }
        return try result.get()
    }

    func registerCommands(on server: QMPServer) {
        // Drivers that wait on the network to open (rbd) connect before the control lock is
        // taken, so other monitor commands go on meanwhile (BlockdevFactory.prepare).
        server.register("blockdev-add", prepare: Daemon.prepareBlockdevAdd) { [self] args, ctx throws(QMPError) in
            // The arguments are the blockdev options themselves; the factory checks them.
            for key in args.object.keys { _ = args.value(key) }
            try blockdevAddCommand(args.object, prepared: ctx.prepared as? PreparedOpens)
            return .object([:])
        }
        server.register("blockdev-del") { [self] args, _ throws(QMPError) in
            let name = try args.requiredString("node-name")
            try args.finish()
            do throws(BlockError) { try blockdevDel(name) } catch { throw .generic(error.message) }
            return .object([:])
        }
        server.register("query-named-block-nodes") { [self] args, _ throws(QMPError) in
            let flat = try args.bool("flat") ?? false
            try args.finish()
            return .array(graph.all.reversed().map {
                .object(NodeInfo.info($0, recursive: !flat, bitmaps: Daemon.bitmapInfo($0)))
            })
        }
        server.register("query-block") { args, _ throws(QMPError) in
            try args.finish()
            // qemu-storage-daemon has no guest devices, so it answers an empty list; so do we.
            return .array([])
        }
        registerBitmapCommands(on: server)  // QMPBitmaps.swift
        server.register("nbd-server-start") { [self] args, _ throws(QMPError) in
            let config = try Daemon.nbdServerArguments(&args, legacy: true)
            try args.finish()
            try startNBDServer(config)
            return .object([:])
        }
        server.register("nbd-server-stop") { [self] args, _ throws(QMPError) in
            try args.finish()
            do throws(DaemonError) { try nbdServerStop() } catch { throw .generic(error.message) }
            return .object([:])
        }
        server.register("block-export-add") { [self] args, _ throws(QMPError) in
            try blockExportAddCommand(&args, serverRunning: nbd != nil)
            return .object([:])
        }
        server.register("block-export-del") { [self] args, _ throws(QMPError) in
            let id = try args.requiredString("id")
            let mode = try args.enumValue("mode", allowed: ["safe", "hard"]) ?? "safe"
            try args.finish()
            do throws(DaemonError) { try exportDel(id: id, hard: mode == "hard") } catch { throw .generic(error.message) }
            return .object([:])
        }
        server.register("query-block-exports") { [self] args, _ throws(QMPError) in
            try args.finish()
            // Newest first, as QEMU keeps its export list.
            return .array(exports.reversed().map { e in
                .object(["node-name": .string(e.node.nodeName), "shutting-down": false, "type": "nbd", "id": .string(e.id)])
            })
        }
        // QEMU's older spelling of block-export-add/del for NBD.
        server.register("nbd-server-add") { [self] args, _ throws(QMPError) in
            let device = try args.requiredString("device")
            let name = try args.string("name")
            let description = try args.string("description")
            let writable = try args.bool("writable") ?? false
            let bitmap = try args.string("bitmap")
            try args.finish()
            try addExport(id: name ?? device, nodeName: device, name: name, description: description, writable: writable,
                          bitmaps: bitmap.map { [.local($0)] } ?? [],
                          nodeError: "Cannot find device='\(device)' nor node-name='\(device)'")
            return .object([:])
        }
        server.register("nbd-server-remove") { [self] args, _ throws(QMPError) in
            let name = try args.requiredString("name")
            let mode = try args.enumValue("mode", allowed: ["safe", "hard"]) ?? "safe"
            try args.finish()
            guard let e = exports.first(where: { $0.name == name }) else { throw .generic("Export '\(name)' is not found") }
            do throws(DaemonError) { try exportDel(id: e.id, hard: mode == "hard") } catch { throw .generic(error.message) }
            return .object([:])
        }
    }

    func addExport(id: String, nodeName: String, name: String?, description: String?, writable: Bool,
                   bitmaps: [ExportBitmapRef], allocationDepth: Bool = false, writethrough: Bool = false,
                   iothread: String? = nil, nodeError: String, serverRunning: Bool? = nil) throws(QMPError) {
        // QEMU looks the node up, then the iothread, before it asks the NBD server.
        guard graph.node(named: nodeName) != nil else { throw .generic(nodeError) }
        if let iothread { throw .generic("iothread \"\(iothread)\" not found") }
        guard serverRunning ?? (nbd != nil) else { throw .generic("NBD server not running") }
        do throws(DaemonError) {
            try exportAdd(id: id, nodeName: nodeName, name: name, description: description, writable: writable,
                          bitmapRefs: bitmaps, allocationDepth: allocationDepth, writethrough: writethrough)
        } catch {
            throw .generic(error.message, hint: error.hint)
        }
    }

    /// The part of `blockdev-add` that runs before the control lock: drivers' network opens
    /// (PreparedOpens.swift), on the options as `blockdevAddCommand` will open them. Nothing
    /// for a command that fails before any open.
    @Sendable static func prepareBlockdevAdd(_ options: JSONObject) -> (any Sendable)? {
        guard options["node-name"] != nil else { return nil }
        return BlockdevFactory.prepare(normalizedBlockdevOptions(options))
    }

    /// `blockdev-add`, from QMP and from `--blockdev` alike (QEMU's `qmp_blockdev_add`).
    /// `prepared`: what `prepareBlockdevAdd` opened before the control lock (QMP only; the
    /// command line opens in the drivers' openers); what no node takes is discarded.
    public func blockdevAddCommand(_ options: JSONObject, prepared: PreparedOpens? = nil) throws(QMPError) {
        defer { prepared?.discardUnused() }
        // QEMU checks the driver (with the rest of the options) before the node name.
        switch options["driver"] {
        case nil: throw .generic("Parameter 'driver' is missing")
        case .string(let d)? where !BlockdevFactory.driverNames.contains(d) && BlockdevFactory.formatOpeners[d] == nil:
            throw .generic("Parameter 'driver' does not accept value '\(d)'")
        case .string?: break
        default: throw .generic("Invalid parameter type for 'driver', expected: string")
        }
        if options["node-name"] == nil {
            throw .generic("'node-name' must be specified for the root node")
        }
        do throws(BlockError) {
            try BlockdevFactory.withPrepared(prepared) { () throws(BlockError) in
                try blockdevAdd(Daemon.normalizedBlockdevOptions(options))
            }
        } catch {
            throw .generic(error.message, hint: error.hint)
        }
    }

    /// `backing: null` may arrive as the string `null` (blockd's leniency, for `key=value` where
    /// JSON null cannot be written) or as `""` (QEMU's older spelling), at any depth.
    static func normalizedBlockdevOptions(_ options: JSONObject) -> JSONObject {
        var out = JSONObject()
        for (key, value) in options {
            if key == "backing", value == .string("null") || value == .string("") {
                out[key] = .null
            } else if case .object(let child) = value {
                out[key] = .object(normalizedBlockdevOptions(child))
            } else {
                out[key] = value
            }
        }
        return out
    }

    /// What `nbd-server-start` and `--nbd-server` say (QAPI `NbdServerOptions`).
    struct NBDServerConfig {
        /// Where to listen. Empty only for `--nbd-server` without `addr`: the sockets systemd
        /// passed (`Startup` fills them in, or says `addr` is missing).
        var addresses: [ListenAddress]
        var settings: NBDServerSettings
        /// Ids of a `tls-creds-*` object (server endpoint) and an `authz-simple` object.
        var tlsCreds: String?
        var tlsAuthz: String?
    }

    /// Reads `nbd-server-start`'s arguments (`legacy`: `SocketAddressLegacy`) or `--nbd-server`'s
    /// (`NbdServerOptions`, flat `SocketAddress`, where `addr` may be left out under socket
    /// activation).
    static func nbdServerArguments(_ args: inout QMPArguments, legacy: Bool) throws(QMPError) -> NBDServerConfig {
        var addresses: [ListenAddress] = []
        if legacy || args.has("addr") {
            var addr = try args.requiredObject("addr")
            addresses = [try Daemon.socketAddress(&addr, legacy: legacy)]
            try addr.finish()
        } else {
            _ = args.value("addr")
        }
        let tlsCreds = try args.string("tls-creds")
        let tlsAuthz = try args.string("tls-authz")
        var settings = NBDServerSettings()
        settings.maxConnections = Int(try args.uint32("max-connections") ?? 0)
        if let seconds = try args.uint32("handshake-max-seconds") { settings.handshakeMaxSeconds = Int(seconds) }
        return NBDServerConfig(addresses: addresses, settings: settings, tlsCreds: tlsCreds, tlsAuthz: tlsAuthz)
    }

    /// The TLS objects `config` names exist and fit (QEMU looks them up when the server starts;
    /// the command line starts it after every option, so it checks them in option order here).
    func checkNBDServerTLS(_ config: NBDServerConfig) throws(QMPError) {
        do throws(DaemonError) {
            _ = try tlsObjects.serverPolicy(creds: config.tlsCreds, authz: config.tlsAuthz)
        } catch {
            throw .generic(error.message)
        }
    }

    func startNBDServer(_ config: NBDServerConfig) throws(QMPError) {
        do throws(DaemonError) {
            _ = try nbdServerStart(config.addresses, settings: config.settings, tlsCreds: config.tlsCreds,
                                   tlsAuthz: config.tlsAuthz)
        } catch {
            throw .generic(error.message)
        }
    }

    /// `block-export-add` and `--export` (QAPI `BlockExportOptions`, type `nbd`).
    func blockExportAddCommand(_ args: inout QMPArguments, serverRunning: Bool) throws(QMPError) {
        _ = try args.requiredEnum("type", allowed: ["nbd"])
        let id = try args.requiredString("id")
        let nodeName = try args.requiredString("node-name")
        let name = try args.string("name")
        let description = try args.string("description")
        let writable = try args.bool("writable") ?? false
        let writethrough = try args.bool("writethrough") ?? false
        let allocationDepth = try args.bool("allocation-depth") ?? false
        // blockd has no iothread objects (its event loops serve every export), so a named one
        // is never found; fixed-iothread only matters with one, in QEMU too.
        let iothread = try args.string("iothread")
        _ = try args.bool("fixed-iothread")
        let bitmaps = try Daemon.bitmapNames(&args)
        try args.finish()
        try addExport(id: id, nodeName: nodeName, name: name, description: description, writable: writable,
                      bitmaps: bitmaps, allocationDepth: allocationDepth, writethrough: writethrough,
                      iothread: iothread, nodeError: "Cannot find device='' nor node-name='\(nodeName)'", serverRunning: serverRunning)
    }

    /// QAPI `BlockDirtyBitmapOrStr` list: a name (looked up from the export's node down) or
    /// `{"node", "name"}` (that node's bitmap, as QEMU: no other check than busy/inconsistent).
    static func bitmapNames(_ args: inout QMPArguments) throws(QMPError) -> [ExportBitmapRef] {
        // blockd's command-line shorthand `bitmaps=A:B` (QEMU's keyval is `bitmaps.0=A,bitmaps.1=B`).
        if args.keyval, case .string(let joined)? = args.object["bitmaps"] {
            _ = args.value("bitmaps")
            return joined.split(separator: ":").map { .local(String($0)) }
        }
        guard let list = try args.array("bitmaps") else { return [] }
        var refs: [ExportBitmapRef] = []
        for (i, item) in list.enumerated() {
            switch item {
            case .string(let s): refs.append(.local(s))
            case .object(let o):
                var a = QMPArguments(o, path: "bitmaps[\(i)].")
                let node = try a.requiredString("node")
                let name = try a.requiredString("name")
                try a.finish()
                refs.append(.external(node: node, name: name))
            default: throw .generic("Invalid parameter type for 'bitmaps[\(i)]', expected: BlockDirtyBitmapOrStr")
            }
        }
        return refs
    }

    /// QAPI `SocketAddressLegacy` (`{"type": "unix", "data": {"path": …}}`) as nbd-server-start
    /// takes it, and the flat `SocketAddress` form (`{"type": "unix", "path": …}`) as well.
    static func socketAddress(_ addr: inout QMPArguments, legacy: Bool) throws(QMPError) -> ListenAddress {
        let type = try addr.requiredEnum("type", allowed: ["unix", "inet", "vsock", "fd"])
        var fields = addr
        if legacy, addr.has("data") {
            fields = try addr.requiredObject("data")
        }
        let address: ListenAddress
        switch type {
        case "unix":
            let path = try fields.requiredString("path")
            _ = try fields.bool("abstract")
            _ = try fields.bool("tight")
            address = .unix(path: path)
        case "inet":
            let host = try fields.requiredString("host")
            let port = try fields.requiredString("port")
            _ = try fields.bool("numeric")
            _ = try fields.uint("to")
            _ = try fields.bool("ipv4")
            _ = try fields.bool("ipv6")
            _ = try fields.bool("keep-alive")
            address = .inet(host: host, port: port)
        case "fd":
            // A descriptor number this process holds, or a socket-activation name
            // (LISTEN_FDNAMES); blockd has no `getfd`.
            address = .fd(try fields.requiredString("str"))
        default:
            throw .generic("Address type '\(type)' is not supported by blockd")
        }
        if legacy, addr.has("data") { try fields.finish() } else { addr = fields }
        return address
    }
}

/// `nbd-server-start` / `--nbd-server` settings besides the address and TLS (QAPI
/// `NbdServerOptions`); qemu-nbd's `-e` and `--handshake-limit` map onto them.
public struct NBDServerSettings: Sendable, Equatable {
    /// `max-connections`: 0 = no limit. At the limit the server stops accepting; clients that
    /// connect meanwhile wait in the listen backlog. With 1, multi-conn is not advertised.
    public var maxConnections = 0
    /// `handshake-max-seconds` (QEMU 9.1): from connecting to transmission, TLS included;
    /// 0 = no limit.
    public var handshakeMaxSeconds = NBDServer.defaultHandshakeMaxSeconds
    public init(maxConnections: Int = 0, handshakeMaxSeconds: Int = NBDServer.defaultHandshakeMaxSeconds) {
        self.maxConnections = maxConnections
        self.handshakeMaxSeconds = handshakeMaxSeconds
    }
}
