import BlockCore
import JSON

/// A Ceph monitor address (QAPI `InetSocketAddressBase`).
public struct RBDServer: Sendable, Equatable {
    public var host: String
    public var port: String

    /// `HOST:PORT`, `[V6]:PORT`: one entry of Ceph's `mon_host`.
    public var monHost: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// The options of one `rbd` node: QEMU's `BlockdevOptionsRbd` (`pool`, `namespace`, `image`,
/// `snapshot`, `conf`, `user`, `key-secret`, `auth-client-required`, `server`), or the legacy
/// `filename` `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE…]` whose extra pairs set Ceph
/// options (`rados_osd_op_timeout=30`, …). `encrypt` (LUKS inside the image) is refused.
public struct RBDOptions: Sendable, Equatable {
    public var pool: String
    public var namespace: String?
    public var image: String
    public var snapshot: String?
    public var conf: String?
    public var user: String?
    public var keySecret: String?
    public var authClientRequired: [String]?
    public var servers: [RBDServer] = []
    /// Ceph options from the legacy file name, set with `rados_conf_set` in order.
    public var confPairs: [ConfPair] = []

    public struct ConfPair: Sendable, Equatable {
        public var key: String
        public var value: String
    }

    public init(pool: String, image: String) {
        self.pool = pool
        self.image = image
    }

    /// `POOL/[NAMESPACE/]IMAGE[@SNAPSHOT]`, how messages name the image.
    public var spec: String {
        var s = pool + "/"
        if let namespace, !namespace.isEmpty { s += namespace + "/" }
        s += image
        if let snapshot { s += "@" + snapshot }
        return s
    }

    /// Reads the driver's own keys (the common ones are read by `BlockdevFactory`).
    public static func parse(_ reader: inout OptionReader, prefix: String) throws(BlockError) -> RBDOptions {
        if reader.has("encrypt") {
            throw BlockError.notSupported("blockd's rbd driver does not support 'encrypt' (LUKS encryption inside RBD images)")
        }
        var options: RBDOptions
        if let filename = try reader.string("filename") {
            for key in ["pool", "image", "namespace", "snapshot", "conf", "user"] where reader.has(key) {
                throw BlockError.invalid("Parameter '\(prefix)\(key)' cannot be combined with 'filename'")
            }
            options = try parseFilename(filename)
        } else {
            let pool = try reader.requiredString("pool")
            let image = try reader.requiredString("image")
            options = RBDOptions(pool: pool, image: image)
            options.namespace = try reader.string("namespace")
            options.snapshot = try reader.string("snapshot")
            options.conf = try reader.string("conf")
            options.user = try reader.string("user")
        }
        options.keySecret = try reader.string("key-secret")
        if let value = reader.value("auth-client-required") {
            var modes: [String] = []
            for (i, item) in try list(value, key: prefix + "auth-client-required").enumerated() {
                guard case .string(let mode) = item else {
                    throw BlockError.invalid("Invalid parameter type for '\(prefix)auth-client-required[\(i)]', expected: string")
                }
                guard mode == "cephx" || mode == "none" else {
                    throw BlockError.invalid("Parameter '\(prefix)auth-client-required[\(i)]' does not accept value '\(mode)'")
                }
                modes.append(mode)
            }
            options.authClientRequired = modes
        }
        if let value = reader.value("server") {
            for (i, item) in try list(value, key: prefix + "server").enumerated() {
                let path = "\(prefix)server[\(i)]."
                guard case .object(let o) = item else {
                    throw BlockError.invalid("Invalid parameter type for '\(prefix)server[\(i)]', expected: object")
                }
                var r = OptionReader(o, prefix: path)
                let host = try r.requiredString("host")
                let port = try r.requiredString("port")
                try r.finish()
                options.servers.append(RBDServer(host: host, port: port))
            }
        }
        for name in [options.pool, options.image] where name.isEmpty || name.utf8.contains(0) {
            throw BlockError.invalid("RBD pool and image names must not be empty")
        }
        try reader.finish()
        return options
    }

    /// A QAPI list: a JSON array, or the `key.0=…,key.1=…` object of the `key=value` form.
    private static func list(_ value: JSONValue, key: String) throws(BlockError) -> [JSONValue] {
        switch value {
        case .array(let items):
            return items
        case .object(let o):
            var items: [JSONValue] = []
            for i in 0..<o.keys.count {
                guard let item = o["\(i)"] else {
                    throw BlockError.invalid("Invalid parameter type for '\(key)', expected: array")
                }
                items.append(item)
            }
            return items
        default:
            throw BlockError.invalid("Invalid parameter type for '\(key)', expected: array")
        }
    }

    /// QEMU's `qemu_rbd_parse_filename`: `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE…]`,
    /// `\` escaping `:`, `@`, `/` and `=`; `conf` and `id` are the configuration file and user.
    public static func parseFilename(_ filename: String) throws(BlockError) -> RBDOptions {
        guard filename.hasPrefix("rbd:") else { throw BlockError.invalid("File name must start with 'rbd:'") }
        var rest = Substring(filename.dropFirst(4))
        guard let pool = nextToken(&rest, "/") else { throw BlockError.invalid("Pool name is required") }
        var imagePart: Substring
        var snapshot: String?
        if findUnescaped(rest, "@") != nil {
            imagePart = nextToken(&rest, "@") ?? rest
            let snap = nextToken(&rest, ":")
            if let snap {
                snapshot = unescape(snap)
            } else {
                snapshot = unescape(rest)
                rest = ""
            }
        } else if let image = nextToken(&rest, ":") {
            imagePart = image
        } else {
            imagePart = rest
            rest = ""
        }
        var namespace = ""
        if findUnescaped(imagePart, "/") != nil, let ns = nextToken(&imagePart, "/") {
            namespace = unescape(ns)
        }
        var options = RBDOptions(pool: unescape(pool), image: unescape(imagePart))
        options.namespace = namespace
        options.snapshot = snapshot
        while !rest.isEmpty {
            guard let name = nextToken(&rest, "=") else {
                throw BlockError.invalid("conf option \(unescape(rest)) has no value")
            }
            let value: Substring
            if let v = nextToken(&rest, ":") { value = v } else { value = rest; rest = "" }
            let key = unescape(name), text = unescape(value)
            switch key {
            case "conf": options.conf = text
            case "id": options.user = text
            default: options.confPairs.append(ConfPair(key: key, value: text))
            }
        }
        return options
    }

    private static func findUnescaped(_ s: Substring, _ delimiter: Character) -> Substring.Index? {
        var i = s.startIndex
        while i < s.endIndex {
            if s[i] == delimiter { return i }
            if s[i] == "\\" {
                let next = s.index(after: i)
                if next < s.endIndex { i = next }
            }
            i = s.index(after: i)
        }
        return nil
    }

    /// The text before the first unescaped `delimiter`, consuming it; nil (and `s` unchanged)
    /// when there is none.
    private static func nextToken(_ s: inout Substring, _ delimiter: Character) -> Substring? {
        guard let at = findUnescaped(s, delimiter) else { return nil }
        let token = s[s.startIndex..<at]
        s = s[s.index(after: at)...]
        return token
    }

    private static func unescape(_ s: Substring) -> String {
        var out = ""
        var i = s.startIndex
        while i < s.endIndex {
            if s[i] == "\\" {
                let next = s.index(after: i)
                if next < s.endIndex { i = next }
            }
            out.append(s[i])
            i = s.index(after: i)
        }
        return out
    }
}
