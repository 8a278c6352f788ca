import BlockCore
import BlockDrivers
import EventLoop
import Glibc
import JSON
import NBDServer
import QMP
import TLS

/// Runs qemu-nbd's job with blockd's daemon: one image, one export, one NBD server, in the
/// order and with the checks of QEMU 7.2's `qemu-nbd.c`. Every option becomes the blockdev,
/// export or server option QEMU would make of it (`--cache=none` → `cache.direct=on`,
/// `-e N` → `max-connections=N`, …) and goes through the same code as `blockdev-add`,
/// `block-export-add` and `nbd-server-start`, so an option the daemon does not have yet is
/// refused with the daemon's own message.
enum QemuNBDRunner {
    /// `blockd nbd`/`qemu-nbd` failed before starting: print as qemu-nbd does.
    static func usageFailure(_ error: UsageError) -> Int32 {
        if error.isInformational {
            Report.stdout(error.message)
            return 0
        }
        if error.isPreformatted { Report.raw(error.message) } else { Report.line(error.message) }
        return 1
    }

    static func run(_ o: QemuNBDOptions) -> Int32 {
        var settings = Settings()
        settings.verbose = o.verbose
        settings.trace = o.trace
        Runner.setLogLevel(settings)
        func fail(_ message: String) -> Int32 {
            Report.line(message)
            return 1
        }

        // qemu-nbd creates its objects while it reads its options, before every check below.
        let objects = TLSObjects()
        for text in o.objects {
            do throws(QMPError) {
                let (options, keyval) = try Startup.argumentObject(text, impliedKey: "qom-type")
                let typed = try Daemon.typedObjectOptions(options, keyval: keyval)
                do throws(BlockError) { try Daemon.addObject(typed, tlsObjects: objects) } catch { throw .generic(error.message) }
            } catch {
                return fail(error.desc)
            }
        }

        // Socket activation (systemd's LISTEN_PID/LISTEN_FDS, taken in `Runner.main`),
        // checked as qemu-nbd does.
        var bind = o.bind, port = o.port
        let passed = SocketActivation.passed
        if let (fd, code) = passed.invalid {
            return fail("Socket activation failed: invalid file descriptor fd = \(fd): \(String(cString: strerror(code)))")
        }
        let activation = passed.count
        if activation == 0 {
            if o.socket == nil {
                bind = bind ?? "0.0.0.0"
                port = port ?? "10809"
            }
        } else {
            if o.device != nil { return fail("NBD device can't be set when using socket activation") }
            if o.socket != nil { return fail("Unix socket can't be set when using socket activation") }
            if o.bind != nil { return fail("The interface can't be set when using socket activation") }
            if o.port != nil { return fail("TCP port number can't be set when using socket activation") }
            if o.selinuxLabel != nil { return fail("SELinux label can't be set when using socket activation") }
            if o.list { return fail("List mode is incompatible with socket activation") }
            if activation > 1 { return fail("qemu-nbd does not support socket activation with LISTEN_FDS > 1") }
        }

        // TLS: server credentials to serve, client credentials to list (`nbd_get_tls_creds`).
        var listCredentials: TLSCredentials?
        if let id = o.tlsCreds {
            if o.device != nil { return fail("TLS is not supported with a host device") }
            if o.tlsAuthz != nil && o.list { return fail("TLS authorization is incompatible with export list") }
            if o.tlsHostname != nil && !o.list { return fail("TLS hostname is only supported with export list") }
            do throws(DaemonError) {
                if o.list {
                    listCredentials = try objects.clientCredentials(id)
                } else {
                    _ = try objects.serverPolicy(creds: id, authz: nil)
                }
            } catch {
                return fail("Failed to get TLS creds: \(error.message)")
            }
        } else {
            if o.tlsAuthz != nil { return fail("--tls-authz is not permitted without --tls-creds") }
            if o.tlsHostname != nil { return fail("--tls-hostname is not permitted without --tls-creds") }
        }
        if o.selinuxLabel != nil { return fail("SELinux support not enabled in this binary") }

        if o.list {
            let address: NBDExportLister.Address = o.socket.map { .unix($0) } ?? .inet(host: bind!, port: port!)
            // The certificate names the server: --tls-hostname, else the -b address (none
            // for -k without -b, which QEMU refuses as "No hostname for certificate validation").
            return NBDExportLister.run(address, tls: listCredentials, hostname: o.tlsHostname ?? bind)
        }
        if o.disconnect || o.device != nil {
            return fail("Kernel /dev/nbdN support not available (blockd has no kernel NBD client: use nbd-client, or nbdfuse for a file)")
        }
        if o.snapshot {
            return fail("-s/--snapshot is not supported by blockd: create an overlay with 'qemu-img create -f qcow2 -b FILE -F FMT overlay.qcow2' and serve that")
        }
        if o.loadSnapshot != nil {
            return fail("-l/--load-snapshot is not supported by blockd (no internal snapshots): 'qemu-img convert -l' makes an image of one")
        }

        var readiness: Daemonize.Readiness?
        if o.fork { readiness = Daemonize.start(restrictUmask: false) }
        Runner.blockSignals()
        let daemon = Daemon(configuration: .init(), tlsObjects: objects)
        var pidfile: PidFile?
        do throws(UsageError) {
            try setUp(o, on: daemon, bind: bind, port: port, activated: activation > 0)
            if let path = o.pidFile {
                do { pidfile = try PidFile.write(path) } catch { throw UsageError(error.message) }
            }
            if chdir("/") != 0 { throw UsageError("Could not chdir to root directory: \(String(cString: strerror(errno)))") }
        } catch {
            daemon.shutdown()
            return usageFailure(error)
        }
        readiness?.ready()
        _ = Runner.waitForSignal()
        daemon.shutdown()
        _ = pidfile   // qemu-nbd leaves its pid file behind; the lock goes with the process
        return 0
    }

    /// Image, export and server, as qemu-nbd makes them (the objects exist already).
    static func setUp(_ o: QemuNBDOptions, on daemon: Daemon, bind: String?, port: String?, activated: Bool) throws(UsageError) {
        let file = o.file!
        if o.imageOpts && o.format != nil { throw UsageError("--image-opts and -f are mutually exclusive") }
        if let f = o.format, !BlockdevFactory.driverNames.contains(f), BlockdevFactory.formatOpeners[f] == nil {
            throw UsageError("Failed to blk_new_open '\(file)': Unknown driver '\(f)'")
        }
        let image: JSONObject
        do {
            image = try imageOptions(o, file: file)
        } catch {
            throw UsageError("Failed to blk_new_open '\(file)': \(error.message)")
        }
        var node: BlockNode
        do {
            node = try daemon.blockdevAdd(Daemon.normalizedBlockdevOptions(image))
        } catch {
            throw UsageError("Failed to blk_new_open '\(file)': \(error.messageWithHint)")
        }
        if o.offset != 0 {
            let raw: JSONObject = ["driver": "raw", "file": .string(node.nodeName), "offset": .int(Int64(bitPattern: o.offset)),
                                   "read-only": .bool(o.readOnly)]
            do { node = try daemon.blockdevAdd(raw) } catch { throw UsageError(error.message) }
        }

        // The export, as qemu-nbd's blk_exp_add (its bitmaps are in reverse order, as QEMU
        // prepends them to its list).
        var export: JSONObject = ["type": "nbd", "id": "qemu-nbd-export", "node-name": .string(node.nodeName),
                                  "writable": .bool(!o.readOnly), "name": .string(o.exportName ?? "")]
        if let cache = o.cache, QemuNBDOptions.cacheMode(cache)?.writethrough == true { export["writethrough"] = true }
        if let d = o.description { export["description"] = .string(d) }
        if !o.bitmaps.isEmpty { export["bitmaps"] = .array(o.bitmaps.reversed().map { .string($0) }) }
        if o.allocationDepth { export["allocation-depth"] = true }
        do throws(QMPError) {
            var args = QMPArguments(export)
            try daemon.blockExportAddCommand(&args, serverRunning: true)
        } catch {
            throw UsageError(error.descWithHint)
        }

        // The server: one listener; without -t, the last client that got as far as
        // transmission ends the program (qemu-nbd's nbd_client_closed).
        let address: JSONObject
        if activated {
            address = ["type": "fd", "str": "3"]
        } else if let socket = o.socket {
            address = ["type": "unix", "path": .string(socket)]
        } else {
            address = ["type": "inet", "host": .string(bind ?? "0.0.0.0"), "port": .string(port ?? "10809")]
        }
        var server: JSONObject = ["addr": .object(address)]
        if o.shared != 0 { server["max-connections"] = .int(Int64(o.shared)) }
        if let creds = o.tlsCreds { server["tls-creds"] = .string(creds) }
        if let authz = o.tlsAuthz { server["tls-authz"] = .string(authz) }
        if let limit = o.handshakeLimit { server["handshake-max-seconds"] = .int(Int64(limit)) }
        if !o.persistent {
            daemon.nbdClientClosed = { negotiated, remaining in
                if negotiated && remaining == 0 { kill(getpid(), SIGTERM) }
            }
        }
        do throws(QMPError) {
            var args = QMPArguments(server)
            let config = try Daemon.nbdServerArguments(&args, legacy: false)
            try args.finish()
            try daemon.startNBDServer(config)
        } catch {
            throw UsageError(error.desc)
        }
    }

    /// The blockdev options `blk_new_open` would build from FILE and the flags.
    static func imageOptions(_ o: QemuNBDOptions, file: String) throws(UsageError) -> JSONObject {
        let cache = o.cache.flatMap(QemuNBDOptions.cacheMode)
        /// Options every node of the image gets from qemu-nbd's flags (`BDRV_O_*`); options
        /// written in `--image-opts` win.
        func applyFlags(_ node: inout JSONObject, format: Bool) {
            if o.readOnly && node["read-only"] == nil { node["read-only"] = true }
            if let cache, cache.direct || cache.noFlush, node["cache"] == nil {
                var c = JSONObject()
                if cache.direct { c["direct"] = true }
                if cache.noFlush { c["no-flush"] = true }
                node["cache"] = .object(c)
            }
            if let d = o.discard, let unmap = QemuNBDOptions.discardUnmap(d), unmap, node["discard"] == nil {
                node["discard"] = "unmap"
            }
        }
        func fileNode(_ filename: String, existing: JSONObject = JSONObject()) -> JSONObject {
            var f = existing
            if f["driver"] == nil { f["driver"] = "file" }
            if f["filename"] == nil { f["filename"] = .string(filename) }
            if let aio = o.aio, aio != "threads", f["aio"] == nil { f["aio"] = .string(aio) }
            applyFlags(&f, format: false)
            return f
        }

        if o.imageOpts {
            let parsed = QemuOpts.parse(file, impliedName: "file")
            for w in parsed.warnings { Report.line(w) }
            var top = try nest(parsed.pairs)
            // A "file" given as an object without a driver is a file; as a string, a node name.
            if case .object(let f)? = top["file"], let name = f["filename"]?.stringValue {
                top["file"] = .object(fileNode(name, existing: f))
            }
            if top["driver"] == nil {
                guard case .object(let f)? = top["file"], let name = f["filename"]?.stringValue else {
                    throw UsageError("A block device must be specified for \"file\"")
                }
                let format: String
                do { format = try ImageProbe.format(path: name) } catch { throw UsageError(error.message) }
                top["driver"] = .string(format)
                if format == "raw" {
                    top["x-blockd-probed"] = true
                    if !o.readOnly && top["read-only"]?.stringValue != "on" { probedRawWarning(name) }
                }
            }
            if top["driver"]?.stringValue == "file" {
                return fileNode(top["filename"]?.stringValue ?? "", existing: top)
            }
            applyFlags(&top, format: true)
            if let dz = o.detectZeroes, dz != "off", top["detect-zeroes"] == nil { top["detect-zeroes"] = .string(dz) }
            return top
        }

        var format = o.format
        if format == nil {
            do { format = try ImageProbe.format(path: file) } catch { throw UsageError(error.message) }
            if format == "raw" && !o.readOnly { probedRawWarning(file) }
        }
        guard let format else { fatalError() }
        if format == "file" || format == "host_device" {
            var f = fileNode(file)
            f["driver"] = .string(format)
            if let dz = o.detectZeroes, dz != "off" { f["detect-zeroes"] = .string(dz) }
            return f
        }
        var top: JSONObject = ["driver": .string(format), "file": .object(fileNode(file))]
        if o.format == nil && format == "raw" { top["x-blockd-probed"] = true }
        applyFlags(&top, format: true)
        if let dz = o.detectZeroes, dz != "off" { top["detect-zeroes"] = .string(dz) }
        return top
    }

    /// QEMU's warning for a writable image opened as raw by probing (`raw_open`): the node then
    /// refuses writes that would make block 0 probe as another format (`RawDriver.probed`).
    static func probedRawWarning(_ filename: String) {
        Report.raw("""
            WARNING: Image format was not specified for '\(filename)' and probing guessed raw.
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
                     Specify the 'raw' format explicitly to remove the restrictions.

            """)
    }

    /// `--image-opts`' flat `a.b=c` pairs as nested objects (the last of a repeated key wins).
    static func nest(_ pairs: [(key: String, value: String)]) throws(UsageError) -> JSONObject {
        var root = JSONObject()
        func put(_ object: inout JSONObject, _ path: ArraySlice<Substring>, _ value: String, _ key: String) throws(UsageError) {
            let head = String(path.first!)
            if path.count == 1 {
                if case .object? = object[head] { throw UsageError("Parameters '\(key).*' used inconsistently") }
                object[head] = .string(value)
                return
            }
            var child: JSONObject
            switch object[head] {
            case nil: child = JSONObject()
            case .object(let o)?: child = o
            default:
                throw UsageError("Cannot reference an existing block device with additional options or a new filename")
            }
            try put(&child, path.dropFirst(), value, key)
            object[head] = .object(child)
        }
        for (key, value) in pairs {
            let path = key.split(separator: ".", omittingEmptySubsequences: false)
            if path.contains(where: \.isEmpty) { throw UsageError("Invalid parameter '\(key)'") }
            try put(&root, path[...], value, key)
        }
        return root
    }
}
