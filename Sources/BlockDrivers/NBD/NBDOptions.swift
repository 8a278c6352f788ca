import BlockCore
import JSON
#if canImport(Glibc)
import Glibc
#endif

/// Where an `nbd` node connects (QAPI `SocketAddress`, the flat form `blockdev-add` takes).
public enum NBDServerAddress: Sendable, Equatable {
    /// `type=unix`: `path`, with Linux's `abstract` namespace (and `tight` length) optional.
    case unix(path: String, abstract: Bool, tight: Bool)
    /// `type=inet`: `host`, `port`; `ipv4`/`ipv6` restrict the address family, `keep-alive`
    /// enables TCP keep-alive. (`numeric`, `to` and `mptcp` are accepted; `to` has no meaning
    /// for a client, as in QEMU.)
    case inet(host: String, port: String, ipv4: Bool?, ipv6: Bool?, keepAlive: Bool)
    /// `type=fd`: an already connected socket inherited by the daemon, by number. It cannot be
    /// reconnected: once it closes, the node fails its requests.
    case fd(Int32)

    /// `SERVER` as QEMU names it in "Failed to connect to 'SERVER'".
    public var description: String {
        switch self {
        case .unix(let path, _, _): return path
        case .inet(let host, let port, _, _, _): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .fd(let fd): return "fd \(fd)"
        }
    }
}

/// The options of one `nbd` node (QAPI `BlockdevOptionsNbd`).
public struct NBDClientOptions: Sendable, Equatable {
    public var server: NBDServerAddress
    public var export: String
    public var tlsCreds: String?
    public var tlsHostname: String?
    /// Seconds requests wait for a lost connection to come back (0: they fail at once).
    public var reconnectDelay: UInt32 = 0
    /// Seconds the open keeps retrying to connect (0: one attempt).
    public var openTimeout: UInt32 = 0
    /// A meta context queried instead of `base:allocation` (QEMU's `x-dirty-bitmap`).
    public var dirtyBitmapContext: String?

    public init(server: NBDServerAddress, export: String = "") {
        self.server = server
        self.export = export
    }

    /// QEMU's pseudo file name (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`),
    /// shown by `query-named-block-nodes`.
    public var uri: String {
        switch server {
        case .unix(let path, let abstract, _):
            if abstract { return "nbd+unix:///\(export)?socket=@\(path)" }
            return export.isEmpty ? "nbd+unix://?socket=\(path)" : "nbd+unix:///\(export)?socket=\(path)"
        case .inet(let host, let port, _, _, _):
            let h = host.contains(":") ? "[\(host)]" : host
            return export.isEmpty ? "nbd://\(h):\(port)" : "nbd://\(h):\(port)/\(export)"
        case .fd(let fd):
            return "nbd:fd:\(fd)/\(export)"
        }
    }

    /// Reads the driver's own keys (the common ones are read by `BlockdevFactory`).
    public static func parse(_ reader: inout OptionReader, prefix: String) throws(BlockError) -> NBDClientOptions {
        guard let serverValue = reader.value("server") else {
            throw BlockError.invalid("Parameter '\(prefix)server' is missing")
        }
        guard case .object(let serverObject) = serverValue else {
            throw BlockError.invalid("Invalid parameter type for '\(prefix)server', expected: SocketAddress")
        }
        var options = NBDClientOptions(server: try parseAddress(serverObject, prefix: prefix + "server."))
        let export = try reader.string("export") ?? ""
        if export.utf8.count > 4096 { throw BlockError.invalid("export name too long to send to server") }
        options.export = export
        options.tlsCreds = try reader.string("tls-creds")
        options.tlsHostname = try reader.string("tls-hostname")
        if let bitmap = try reader.string("x-dirty-bitmap") {
            if bitmap.utf8.count > 4096 { throw BlockError.invalid("x-dirty-bitmap query too long to send to server") }
            options.dirtyBitmapContext = bitmap
        }
        options.reconnectDelay = try uint32(&reader, "reconnect-delay", prefix: prefix) ?? 0
        options.openTimeout = try uint32(&reader, "open-timeout", prefix: prefix) ?? 0
        try reader.finish()
        return options
    }

    private static func uint32(_ reader: inout OptionReader, _ key: String, prefix: String) throws(BlockError) -> UInt32? {
        let value: UInt64?
        do {
            value = try reader.uint(key)
        } catch {
            throw BlockError.invalid("Parameter '\(prefix)\(key)' expects uint32_t")
        }
        guard let value else { return nil }
        guard value <= UInt64(UInt32.max) else { throw BlockError.invalid("Parameter '\(prefix)\(key)' expects uint32_t") }
        return UInt32(value)
    }

    static func parseAddress(_ object: JSONObject, prefix: String) throws(BlockError) -> NBDServerAddress {
        var r = OptionReader(object, prefix: prefix)
        let type = try r.requiredString("type")
        let address: NBDServerAddress
        switch type {
        case "unix":
            let path = try r.requiredString("path")
            let abstract = try r.bool("abstract") ?? false
            let tight = try r.bool("tight") ?? true
            address = .unix(path: path, abstract: abstract, tight: tight)
        case "inet":
            let host = try r.requiredString("host")
            let port = try r.requiredString("port")
            _ = try r.bool("numeric")
            _ = try r.uint("to")
            let ipv4 = try r.bool("ipv4")
            let ipv6 = try r.bool("ipv6")
            let keepAlive = try r.bool("keep-alive") ?? false
            _ = try r.bool("mptcp")
            address = .inet(host: host, port: port, ipv4: ipv4, ipv6: ipv6, keepAlive: keepAlive)
        case "fd":
            let name = try r.requiredString("str")
            guard let fd = Int32(name), fd >= 0 else {
                // QEMU looks names up among descriptors passed with getfd; blockd has no getfd.
                throw BlockError.invalid("File descriptor named '\(name)' has not been found")
            }
            var st = stat()
            guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw BlockError.invalid("File descriptor '\(fd)' is not a socket")
            }
            address = .fd(fd)
        case "vsock":
            throw BlockError.notSupported("blockd's nbd driver does not support vsock addresses")
        default:
            throw BlockError.invalid("Parameter '\(prefix)type' does not accept value '\(type)'")
        }
        try r.finish()
        return address
    }
}
