import BlockCore
import EventLoop
import JSON
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where the factory finds nodes named in options and registers the ones it creates, and
/// what drivers need from the daemon while they open (the daemon's adapter over its
/// `BlockGraph`; a dictionary in tests).
public protocol NodeRegistry: AnyObject {
    func node(named name: String) -> BlockNode?
    /// A fresh name for an implicitly created node (`#block123`, as QEMU names them).
    func makeAutoName() -> String
    /// Records a node created while opening (implicit children included). A graph checks the
    /// permissions of the node's edges here and throws, changing nothing, on a conflict.
    func register(_ node: BlockNode) throws(BlockError)
    /// The daemon's event loops, for drivers whose I/O runs on them (`nbd`).
    var eventLoops: EventLoopGroup? { get }
    /// Where `nbd` nodes get their `tls-creds` (the daemon's TLS objects).
    var nbdClientTLS: (any NBDClientTLSProvider)? { get }
}

extension NodeRegistry {
    public var eventLoops: EventLoopGroup? { nil }
    public var nbdClientTLS: (any NBDClientTLSProvider)? { nil }
}

/// Builds nodes from `blockdev-add` options (the QAPI `BlockdevOptions` union).
///
/// Children are given either as a node name (a reference to an existing node) or as an
/// object (an inline definition, opened here with an automatic name).
public enum BlockdevFactory {
    /// Drivers this build can open, for `query-named-block-nodes` and error messages.
    public static let driverNames = ["file", "raw", "null-co", "qcow2", "nbd", "rbd", "copy-on-read", "throttle", "null-filter",
                                     "compress", "copy-before-write", "snapshot-access"]

    public static func open(_ options: JSONObject, in registry: any NodeRegistry,
                            prefix: String = "") throws(BlockError) -> BlockNode {
        try open(options, in: registry, prefix: prefix, defaults: ChildDefaults())
    }

    /// What an inline child inherits from its parent when it does not say (QEMU's
    /// `bdrv_inherited_options`): `cache.direct`, `cache.no-flush`, `force-share`, and
    /// `read-only`/`auto-read-only` (a backing child is read-only by default instead); every
    /// child defaults to `discard=unmap` (the parent's own setting already filters requests).
    /// A node given by `blockdev-add` itself defaults to `discard=ignore`, as in QEMU.
    public struct ChildDefaults: Sendable {
        public var readOnly = false
        public var autoReadOnly = false
        public var cacheDirect = false
        public var cacheNoFlush = false
        public var forceShare = false
        public var discard: NodeOptions.Discard = .ignore
        public init() {}

        /// File options of a file node a driver opens itself with these defaults (backing chains).
        public var fileOptions: FileOptions {
            var o = FileOptions()
            o.direct = cacheDirect
            o.noFlush = cacheNoFlush
            o.forceShare = forceShare && readOnly
            return o
        }

        /// Node options of a node a driver opens itself with these defaults.
        public var nodeOptions: NodeOptions {
            NodeOptions(discard: discard, detectZeroes: .off, cacheDirect: cacheDirect, cacheNoFlush: cacheNoFlush)
        }

        /// The defaults of a child with edge name `key` of a node opened with these options.
        public func forChild(_ key: String) -> ChildDefaults {
            var d = self
            d.discard = .unmap
            if key == "backing" {
                d.readOnly = true
                d.autoReadOnly = false
            }
            return d
        }
    }

    static func open(_ options: JSONObject, in registry: any NodeRegistry, prefix: String,
                     defaults: ChildDefaults) throws(BlockError) -> BlockNode {
        var reader = OptionReader(options, prefix: prefix)
        let driver = try reader.requiredString("driver")
        let explicitName = try reader.string("node-name")
        if let explicitName {
            try validateNodeName(explicitName)
            if registry.node(named: explicitName) != nil {
                throw BlockError.invalid("Duplicate nodes with node-name='\(explicitName)'")
            }
        }
        var readOnly = try reader.bool("read-only") ?? defaults.readOnly
        let autoReadOnly = try reader.bool("auto-read-only") ?? defaults.autoReadOnly
        let discard = try reader.enumValue("discard", NodeOptions.Discard.allCases.map(\.rawValue))
            .flatMap(NodeOptions.Discard.init(rawValue:)) ?? defaults.discard
        let detectZeroes = try reader.enumValue("detect-zeroes", NodeOptions.DetectZeroes.allCases.map(\.rawValue))
            .flatMap(NodeOptions.DetectZeroes.init(rawValue:)) ?? .off
        let forceShare = try reader.bool("force-share") ?? defaults.forceShare
        var cacheDirect = defaults.cacheDirect
        var cacheNoFlush = defaults.cacheNoFlush
        if let cache = try reader.object("cache") {
            var c = OptionReader(cache, prefix: prefix + "cache.")
            cacheDirect = try c.bool("direct") ?? cacheDirect
            cacheNoFlush = try c.bool("no-flush") ?? cacheNoFlush
            try c.finish()
        }
        if detectZeroes == .unmap && discard != .unmap {
            throw BlockError.invalid("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
        }
        if forceShare && !readOnly {
            throw BlockError.invalid("force-share=on can only be used with read-only images")
        }
        let nodeOptions = NodeOptions(discard: discard, detectZeroes: detectZeroes,
                                      cacheDirect: cacheDirect, cacheNoFlush: cacheNoFlush)
        var childDefaults = defaults
        childDefaults.readOnly = readOnly
        childDefaults.autoReadOnly = autoReadOnly
        childDefaults.cacheDirect = cacheDirect
        childDefaults.cacheNoFlush = cacheNoFlush
        childDefaults.forceShare = forceShare
        reader.childDefaults = childDefaults

        let name = explicitName ?? registry.makeAutoName()
        let made: any BlockDriver
        switch driver {
        case "file", "host_device":
            let filename = try reader.requiredString("filename")
            var fileOptions = FileOptions()
            fileOptions.direct = cacheDirect
            fileOptions.noFlush = cacheNoFlush
            fileOptions.forceShare = forceShare
            fileOptions.locking = try reader.enumValue("locking", FileOptions.Locking.allCases.map(\.rawValue))
                .flatMap(FileOptions.Locking.init(rawValue:)) ?? .auto
            try checkAIO(try reader.enumValue("aio", ["threads", "native", "io_uring"]), direct: cacheDirect, prefix: prefix)
            // Tuning of QEMU's own machinery that has no counterpart here, refused unless it
            // is the value that changes nothing.
            if let batch = try reader.uint("aio-max-batch"), batch != 0 {
                throw BlockError.invalid("Parameter '\(prefix)aio-max-batch': blockd submits no AIO batches (aio=threads); only 0 is accepted")
            }
            if try reader.string("pr-manager") != nil {
                throw BlockError.notSupported("Parameter '\(prefix)pr-manager': blockd has no persistent reservation manager")
            }
            // Both concern dropping the page cache when a migration hands the image over;
            // blockd never hands images over, so QEMU itself would do nothing with them here.
            _ = try reader.bool("drop-cache")
            if try reader.bool("x-check-cache-dropped") == true {
                throw BlockError.notSupported("Parameter '\(prefix)x-check-cache-dropped': blockd does not check the page cache")
            }
            // blockd's own: qemu-nbd's front end counts the length in whole sectors, as QEMU does.
            fileOptions.sectorLength = try reader.bool("x-blockd-sector-length") ?? false
            try reader.finish()
            do throws(BlockError) {
                made = try FileDriver(path: filename, readOnly: readOnly, options: fileOptions)
            } catch where autoReadOnly && !readOnly && [EACCES, EPERM, EROFS].contains(error.errno) {
                // auto-read-only: a file that cannot be opened read-write is opened read-only.
                readOnly = true
                made = try FileDriver(path: filename, readOnly: true, options: fileOptions)
            }
        case "null-co":
            let givenSize = try reader.uint("size")
            let givenZeroes = try reader.bool("read-zeroes")
            if let latency = try reader.uint("latency-ns"), latency != 0 {
                throw BlockError.notSupported("Parameter '\(prefix)latency-ns': blockd's null-co completes requests at once; only 0 is accepted")
            }
            try reader.finish()
            made = NullDriver(size: givenSize ?? (1 << 30), readZeroes: givenZeroes ?? false,
                              givenSize: givenSize, givenReadZeroes: givenZeroes)
        case "raw":
            let file = try child(&reader, "file", in: registry, prefix: prefix, required: true)!
            let offset = try reader.uint("offset") ?? 0
            let size = try reader.uint("size")
            // blockd's own: qemu-nbd's front end opened the image by probing (QEMU's bs->probed).
            let probed = try reader.bool("x-blockd-probed") ?? false
            try reader.finish()
            made = try RawDriver(file: file, offset: offset, size: size, probed: probed)
        default:
            if let opener = formatOpeners[driver] {
                made = try opener(&reader, registry, prefix, readOnly)
            } else {
                throw BlockError.invalid("Parameter 'driver' does not accept value '\(driver)'")   // QEMU names only the member
            }
        }
        let node = BlockNode(name: name, driver: made, readOnly: readOnly, autoNamed: explicitName == nil,
                             options: nodeOptions)
        do throws(BlockError) {
            // Registering attaches the node's edges and checks their permissions (the graph
            // refuses, changing nothing, a node that conflicts with the children's other users
            // or whose image another process locked); only then does the driver write anything.
            try registry.register(node)
        } catch {
            try? made.close()
            throw error
        }
        try made.activate()
        return node
    }

    /// `aio`: blockd's file driver does its I/O on worker threads, which is `aio=threads`.
    /// `native` (Linux AIO) and `io_uring` are refused, after QEMU's own check that `native`
    /// needs `cache.direct=on`.
    static func checkAIO(_ aio: String?, direct: Bool, prefix: String) throws(BlockError) {
        switch aio {
        case nil, "threads": return
        case "native" where !direct:
            throw BlockError.invalid("aio=native was specified, but it requires cache.direct=on, which was not specified.")
        default:
            throw BlockError.notSupported("Parameter '\(prefix)aio' does not accept value '\(aio!)' in blockd: file I/O runs on worker threads (aio=threads)")
        }
    }

    /// Opens drivers that live in their own files (qcow2, filters): given the reader positioned
    /// after the common options, they read their own keys, call `finish()`, and return a driver.
    public typealias Opener = @Sendable (inout OptionReader, any NodeRegistry, String, Bool) throws(BlockError) -> any BlockDriver

    /// Openers by driver name. Registration may race with opens (tests register from many
    /// threads), so the table is behind a lock.
    public static var formatOpeners: OpenerTable { OpenerTable.shared }

    public final class OpenerTable: Sendable {
        static let shared = OpenerTable()
        private let table = Mutex<[String: Opener]>([:])
        public subscript(name: String) -> Opener? {
            get { table.withLock { $0[name] } }
            set { table.withLock { $0[name] = newValue } }
        }
    }

    /// Resolves a child option: a node name, or an inline definition opened now.
    /// Returns nil when the key is absent (and not required) or explicitly `null`.
    public static func child(_ reader: inout OptionReader, _ key: String, in registry: any NodeRegistry,
                             prefix: String, required: Bool) throws(BlockError) -> BlockNode? {
        guard let value = reader.value(key) else {
            if required { throw BlockError.invalid("Parameter '\(prefix)\(key)' is missing") }
            return nil
        }
        switch value {
        case .null:
            return nil
        case .string(let name):
            guard let node = registry.node(named: name) else {
                throw BlockError(ENODEV, "Cannot find device='\(name)' nor node-name='\(name)'")
            }
            return node
        case .object(let inline):
            return try open(inline, in: registry, prefix: prefix + key + ".", defaults: reader.childDefaults.forChild(key))
        default:
            throw BlockError.invalid("Invalid parameter type for '\(prefix)\(key)', expected: BlockdevRef")
        }
    }

    /// QEMU's rule: up to 31 characters, a letter first, then letters, digits, `-`, `.`, `_`.
    public static func validateNodeName(_ name: String) throws(BlockError) {
        let bytes = Array(name.utf8)
        let ok = !bytes.isEmpty && bytes.count < 32
            && ((bytes[0] >= 65 && bytes[0] <= 90) || (bytes[0] >= 97 && bytes[0] <= 122))
            && bytes.allSatisfy { c in
                (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || (c >= 48 && c <= 57)
                    || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_")
            }
        if !ok { throw BlockError.invalid("Invalid node-name: '\(name)'") }
    }
}
