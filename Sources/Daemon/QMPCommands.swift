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
    /// Adds a QMP monitor on a unix socket (`--chardev socket,…` + `--monitor`, or `--qmp`).
    public func addMonitor(path: String) throws(UsageError) {
        let server: QMPServer
        if let existing = qmp {
            server = existing
        } else {
            let quit = quitRequested
            server = QMPServer(onQuit: { quit() })
            registerCommands(on: server)
            registerJobCommands(on: server)
            registerReopenCommand(on: server)
            qmp = server
        }
        do {
            try server.addMonitor(path: path)
        } catch {
            throw UsageError("--monitor: \(error.desc)")
        }
    }

    func registerCommands(on server: QMPServer) {
        server.register("blockdev-add") { [self] args, _ throws(QMPError) in
            // The arguments are the blockdev options themselves; the factory checks them.
            for key in args.object.keys { _ = args.value(key) }
            if args.object["node-name"] == nil {
                throw .generic("'node-name' must be specified for the root node")
            }
            var options = args.object
            if options["backing"] == .string("null") { options["backing"] = .null }
            do throws(BlockError) { try blockdevAdd(options) } catch { throw .generic(error.message) }
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
            var addr = try args.requiredObject("addr")
            let address = try Daemon.socketAddress(&addr, legacy: true)
            try addr.finish()
            if try args.string("tls-creds") != nil { throw .generic("TLS is not supported by blockd yet") }
            _ = try args.string("tls-authz")
            let max = try args.uint32("max-connections") ?? 0
            try args.finish()
            do throws(DaemonError) { _ = try nbdServerStart([address], maxConnections: Int(max)) } catch { throw .generic(error.message) }
            return .object([:])
        }
        server.register("nbd-server-stop") { [self] args, _ throws(QMPError) in
            try args.finish()
            do throws(DaemonError) { try nbdServerStop() } catch { throw .generic(error.message) }
            return .object([:])
        }
        server.register("block-export-add") { [self] args, _ throws(QMPError) in
            _ = try args.requiredEnum("type", allowed: ["nbd"])
            let id = try args.requiredString("id")
            let nodeName = try args.requiredString("node-name")
            let name = try args.string("name")
            let description = try args.string("description")
            let writable = try args.bool("writable") ?? false
            _ = try args.bool("writethrough")
            _ = try args.bool("allocation-depth")
            _ = try args.string("iothread")
            _ = try args.bool("fixed-iothread")
            let bitmaps = try Daemon.bitmapNames(&args)
            try args.finish()
            try addExport(id: id, nodeName: nodeName, name: name, description: description, writable: writable,
                          bitmaps: bitmaps, nodeError: "Cannot find device='' nor node-name='\(nodeName)'")
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
                   bitmaps: [ExportBitmapRef], nodeError: String) throws(QMPError) {
        guard nbd != nil else { throw .generic("NBD server not running") }
        guard graph.node(named: nodeName) != nil else { throw .generic(nodeError) }
        do throws(DaemonError) {
            try exportAdd(id: id, nodeName: nodeName, name: name, description: description, writable: writable,
                          bitmapRefs: bitmaps)
        } catch {
            throw .generic(error.message)
        }
    }

    /// QAPI `BlockDirtyBitmapOrStr` list: a name (looked up from the export's node down) or
    /// `{"node", "name"}` (that node's bitmap, as QEMU: no other check than busy/inconsistent).
    static func bitmapNames(_ args: inout QMPArguments) throws(QMPError) -> [ExportBitmapRef] {
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
        default:
            throw .generic("Address type '\(type)' is not supported by blockd")
        }
        if legacy, addr.has("data") { try fields.finish() } else { addr = fields }
        return address
    }
}
