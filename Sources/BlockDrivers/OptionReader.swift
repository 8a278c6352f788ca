import BlockCore
import JSON
#if canImport(Glibc)
import Glibc
#endif

/// Reads one level of blockdev options, QAPI-style: typed getters that accept either JSON
/// values or the strings of the `key=value` command-line form, and a final check that names
/// the first unexpected key. Messages follow QEMU's wording.
public struct OptionReader {
    private let object: JSONObject
    private var used: Set<String> = []
    /// Prefix for nested names in messages (`file.` for `file.filename`).
    public let prefix: String
    /// What inline children opened through this reader inherit (`BlockdevFactory.child`).
    public var childDefaults = BlockdevFactory.ChildDefaults()

    public init(_ object: JSONObject, prefix: String = "") {
        self.object = object
        self.prefix = prefix
    }

    public var raw: JSONObject { object }

    public func has(_ key: String) -> Bool { object[key] != nil }

    private func typeError(_ key: String, _ expected: String) -> BlockError {
        BlockError.invalid("Invalid parameter type for '\(prefix)\(key)', expected: \(expected)")
    }

    public mutating func value(_ key: String) -> JSONValue? {
        used.insert(key)
        return object[key]
    }

    public mutating func string(_ key: String) throws(BlockError) -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else { throw typeError(key, "string") }
        return s
    }

    public mutating func requiredString(_ key: String) throws(BlockError) -> String {
        guard let s = try string(key) else { throw BlockError.invalid("Parameter '\(prefix)\(key)' is missing") }
        return s
    }

    public mutating func bool(_ key: String) throws(BlockError) -> Bool? {
        guard let v = value(key) else { return nil }
        switch v {
        case .bool(let b): return b
        case .string(let s):
            switch s {
            case "on", "yes", "true": return true
            case "off", "no", "false": return false
            default:
                throw BlockError.invalid("Parameter '\(prefix)\(key)' expects 'on' or 'off'")
            }
        default: throw typeError(key, "boolean")
        }
    }

    public mutating func uint(_ key: String) throws(BlockError) -> UInt64? {
        guard let v = value(key) else { return nil }
        switch v {
        case .int(let i) where i >= 0: return UInt64(i)
        case .double(let d) where d >= 0 && d == d.rounded() && d < 1.8e19: return UInt64(d)
        case .string(let s):
            if let n = OptionReader.parseSize(s) { return n }
            throw BlockError.invalid("Parameter '\(prefix)\(key)' expects a non-negative number below 2^64")
        default: throw typeError(key, "integer")
        }
    }

    /// Sizes as QEMU's command line takes them: `1024`, `64k`, `1M`, `2G`, `1T`.
    public static func parseSize(_ text: String) -> UInt64? {
        guard let last = text.last else { return nil }
        let units: [Character: UInt64] = ["b": 1, "k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20,
                                          "g": 1 << 30, "G": 1 << 30, "t": 1 << 40, "T": 1 << 40,
                                          "p": 1 << 50, "P": 1 << 50, "e": 1 << 60, "E": 1 << 60]
        if let unit = units[last] {
            guard let n = UInt64(text.dropLast()) else { return nil }
            let (r, o) = n.multipliedReportingOverflow(by: unit)
            return o ? nil : r
        }
        return UInt64(text)
    }

    public mutating func enumValue(_ key: String, _ allowed: [String]) throws(BlockError) -> String? {
        guard let s = try string(key) else { return nil }
        if !allowed.contains(s) {
            throw BlockError.invalid("Parameter '\(key)' does not accept value '\(s)'")   // QEMU names only the member
        }
        return s
    }

    public mutating func object(_ key: String) throws(BlockError) -> JSONObject? {
        guard let v = value(key) else { return nil }
        guard case .object(let o) = v else { throw typeError(key, "object") }
        return o
    }

    /// Marks keys as known without reading them (options accepted for compatibility).
    public mutating func ignore(_ keys: String...) {
        for key in keys { used.insert(key) }
    }

    /// Throws for the first key nobody asked for.
    public func finish() throws(BlockError) {
        for (key, _) in object where !used.contains(key) {
            throw BlockError.invalid("Parameter '\(prefix)\(key)' is unexpected")
        }
    }
}
