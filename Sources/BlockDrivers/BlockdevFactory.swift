import BlockCore
import JSON
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Builds nodes from `blockdev-add` options (the QAPI `BlockdevOptions` union).
///
/// Children are given either as a node name (a reference to an existing node) or as an
/// object (an inline definition, opened here with an automatic name).
public enum BlockdevFactory {
    /// Drivers this build can open, for `query-named-block-nodes` and error messages.
    public static let driverNames = ["file", "raw", "null-co", "qcow2", "copy-on-read", "throttle", "null-filter", "compress", "copy-before-write", "snapshot-access"]

    public static func open(_ options: JSONObject, in registry: any NodeRegistry,
                            prefix: String = "") throws(BlockError) -> BlockNode {
        var reader = OptionReader(options, prefix: prefix)
        let driver = try reader.requiredString("driver")
        let explicitName = try reader.string("node-name")
        if let explicitName {
            try validateNodeName(explicitName)
            if registry.node(named: explicitName) != nil {
                throw BlockError.invalid("Duplicate nodes with node-name='\(explicitName)'")
            }
        }
        let readOnly = try reader.bool("read-only") ?? false
        _ = try reader.bool("auto-read-only")
        _ = try reader.enumValue("discard", ["ignore", "unmap"])
        _ = try reader.enumValue("detect-zeroes", ["off", "on", "unmap"])
        _ = try reader.bool("force-share")
        if let cache = try reader.object("cache") {
            var c = OptionReader(cache, prefix: prefix + "cache.")
            _ = try c.bool("direct")
            _ = try c.bool("no-flush")
            try c.finish()
        }

        let name = explicitName ?? registry.makeAutoName()
        let made: any BlockDriver
        switch driver {
        case "file", "host_device":
            let filename = try reader.requiredString("filename")
            _ = try reader.enumValue("aio", ["threads", "native", "io_uring"])
            _ = try reader.enumValue("locking", ["auto", "on", "off"])
            reader.ignore("aio-max-batch", "pr-manager", "x-check-cache-dropped", "drop-cache")
            try reader.finish()
            made = try FileDriver(path: filename, readOnly: readOnly)
        case "null-co":
            let size = try reader.uint("size") ?? (1 << 30)
            let zeroes = try reader.bool("read-zeroes") ?? false
            reader.ignore("latency-ns")
            try reader.finish()
            made = NullDriver(size: size, readZeroes: zeroes)
        case "raw":
            let file = try child(&reader, "file", in: registry, prefix: prefix, required: true)!
            let offset = try reader.uint("offset") ?? 0
            let size = try reader.uint("size")
            try reader.finish()
            made = try RawDriver(file: file, offset: offset, size: size)
        default:
            if let opener = formatOpeners[driver] {
                made = try opener(&reader, registry, prefix, readOnly)
            } else {
                throw BlockError.invalid("Parameter '\(prefix)driver' does not accept value '\(driver)'")
            }
        }
        let node = BlockNode(name: name, driver: made, readOnly: readOnly, autoNamed: explicitName == nil)
        do throws(BlockError) {
            // Registering attaches the node's edges and checks their permissions (the graph
            // refuses, changing nothing, a node that conflicts with the children's other users);
            // only then does the driver write anything.
            try registry.register(node)
        } catch {
            try? made.close()
            throw error
        }
        try made.activate()
        return node
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
            return try open(inline, in: registry, prefix: prefix + key + ".")
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
