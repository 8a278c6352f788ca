import JSON

/// Reads a command's `arguments` in QAPI style, with QEMU's error messages (class GenericError).
///
/// Every getter marks its key as consumed; `finish()` then rejects whatever is left, as QEMU's
/// input visitor does. Call `finish()` after reading all arguments and **before** acting, so a
/// typo never half-applies a command. (The server calls it again after the handler returns, as a
/// safety net.) Nested objects are readers too, so errors name the full path (`file.driver`).
public struct QMPArguments: Sendable {
    public let object: JSONObject
    /// Prefix for error messages: "" at the top, "file." inside `file`.
    public let path: String
    /// Arguments from QEMU's `key=value` command-line syntax (`KeyValue`): every scalar is a
    /// string, converted here as QEMU's keyval input visitor does (`on`/`off` for booleans,
    /// numbers in C syntax, sizes with suffixes), with its messages. Nested readers inherit it.
    public let keyval: Bool
    private var consumed: Set<String> = []

    public init(_ object: JSONObject = JSONObject(), path: String = "", keyval: Bool = false) {
        self.object = object
        self.path = path
        self.keyval = keyval
    }

    /// The full name of `key` in error messages.
    public func name(_ key: String) -> String { path + key }

    public func missing(_ key: String) -> QMPError { .generic("Parameter '\(name(key))' is missing") }

    public func invalidType(_ key: String, expected: String) -> QMPError {
        .generic("Invalid parameter type for '\(name(key))', expected: \(expected)")
    }

    /// Whether `key` is present (does not consume it).
    public func has(_ key: String) -> Bool { object[key] != nil }

    /// The raw value, or nil when absent; marks the key consumed.
    public mutating func value(_ key: String) -> JSONValue? {
        consumed.insert(key)
        return object[key]
    }

    public mutating func requiredValue(_ key: String) throws(QMPError) -> JSONValue {
        guard let v = value(key) else { throw missing(key) }
        return v
    }

    // MARK: Scalars

    public mutating func string(_ key: String) throws(QMPError) -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else {
            if keyval { throw keyvalNotScalar(key, v) }
            throw invalidType(key, expected: "string")
        }
        return s
    }

    /// A keyval argument that should be a scalar but has members (`addr.x=…` for a string).
    private func keyvalNotScalar(_ key: String, _ v: JSONValue) -> QMPError {
        .generic("Parameters '\(name(key)).*' are unexpected")
    }

    /// The string a keyval scalar is written as.
    private mutating func keyvalString(_ key: String) throws(QMPError) -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else { throw keyvalNotScalar(key, v) }
        return s
    }

    /// QEMU's `qemu_strtoi64`/`qemu_strtou64` with base 0: decimal, `0x` hex or `0` octal,
    /// optional sign, nothing after the digits.
    public static func parseCInteger(_ text: String) -> (negative: Bool, magnitude: UInt64)? {
        var s = Substring(text)
        while let c = s.first, c == " " || c == "\t" || c == "\n" { s.removeFirst() }
        var negative = false
        if s.first == "-" { negative = true; s.removeFirst() } else if s.first == "+" { s.removeFirst() }
        var radix = 10
        if s.hasPrefix("0x") || s.hasPrefix("0X") {
            radix = 16
            s.removeFirst(2)
        } else if s.hasPrefix("0"), s.count > 1 {
            radix = 8
            s.removeFirst()
        }
        guard !s.isEmpty, let n = UInt64(s, radix: radix) else { return nil }
        return (negative, n)
    }

    public mutating func requiredString(_ key: String) throws(QMPError) -> String {
        guard let s = try string(key) else { throw missing(key) }
        return s
    }

    public mutating func bool(_ key: String) throws(QMPError) -> Bool? {
        if keyval {
            guard let s = try keyvalString(key) else { return nil }
            switch s {
            case "on", "yes", "true", "y": return true
            case "off", "no", "false", "n": return false
            default: throw QMPError.generic("Parameter '\(name(key))' expects 'on' or 'off'")
            }
        }
        guard let v = value(key) else { return nil }
        guard case .bool(let b) = v else { throw invalidType(key, expected: "boolean") }
        return b
    }

    public mutating func requiredBool(_ key: String) throws(QMPError) -> Bool {
        guard let b = try bool(key) else { throw missing(key) }
        return b
    }

    /// QAPI `int` (int64): "Invalid parameter type for 'x', expected: integer".
    public mutating func int(_ key: String) throws(QMPError) -> Int64? {
        if keyval {
            guard let s = try keyvalString(key) else { return nil }
            guard let (negative, magnitude) = Self.parseCInteger(s),
                  let i = negative ? (magnitude <= UInt64(Int64.max) + 1 ? Int64(truncatingIfNeeded: 0 &- magnitude) : nil)
                                   : Int64(exactly: magnitude) else {
                throw QMPError.generic("Parameter '\(name(key))' expects integer")
            }
            return i
        }
        guard let v = value(key) else { return nil }
        guard case .int(let i) = v else { throw invalidType(key, expected: "integer") }
        return i
    }

    public mutating func requiredInt(_ key: String) throws(QMPError) -> Int64 {
        guard let i = try int(key) else { throw missing(key) }
        return i
    }

    /// QAPI `uint64` and `size`: QEMU says "Parameter 'x' expects uint64" for a non-number, and
    /// accepts negative numbers as their two's complement for backward compatibility.
    public mutating func uint(_ key: String) throws(QMPError) -> UInt64? {
        if keyval {
            guard let s = try keyvalString(key) else { return nil }
            // qemu_strtou64 takes "-N" as its two's complement, like the JSON visitor.
            guard let (negative, magnitude) = Self.parseCInteger(s) else {
                throw QMPError.generic("Parameter '\(name(key))' expects integer")
            }
            return negative ? 0 &- magnitude : magnitude
        }
        guard let v = value(key) else { return nil }
        switch v {
        case .int(let i): return UInt64(bitPattern: i)
        case .double(let d) where d >= 9.2e18 && d <= 18446744073709551616.0 && d == d.rounded():
            // JSONValue holds integers above Int64.max as doubles; 2^64 is UInt64.max rounded.
            return d == 18446744073709551616.0 ? UInt64.max : UInt64(d)
        default: throw QMPError.generic("Parameter '\(name(key))' expects uint64")
        }
    }

    public mutating func requiredUInt(_ key: String) throws(QMPError) -> UInt64 {
        guard let u = try uint(key) else { throw missing(key) }
        return u
    }

    /// QAPI `uint32`: "Parameter 'x' expects uint32_t" when out of range.
    public mutating func uint32(_ key: String) throws(QMPError) -> UInt32? {
        if keyval {
            guard let u = try uint(key) else { return nil }
            guard let u32 = UInt32(exactly: u) else { throw QMPError.generic("Parameter '\(name(key))' expects uint32_t") }
            return u32
        }
        guard let v = value(key) else { return nil }
        guard case .int(let i) = v else { throw QMPError.generic("Parameter '\(name(key))' expects uint64") }
        guard let u = UInt32(exactly: i) else { throw QMPError.generic("Parameter '\(name(key))' expects uint32_t") }
        return u
    }

    /// QAPI `number`: any JSON number.
    public mutating func number(_ key: String) throws(QMPError) -> Double? {
        if keyval {
            guard let s = try keyvalString(key) else { return nil }
            guard let d = Double(s), d.isFinite else { throw invalidType(key, expected: "number") }
            return d
        }
        guard let v = value(key) else { return nil }
        switch v {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: throw invalidType(key, expected: "number")
        }
    }

    /// A QAPI enum: must be a string from `allowed`. QEMU names only the member in this one
    /// message ("Parameter 'type' does not accept value 'x'" for `addr.type`).
    public mutating func enumValue(_ key: String, allowed: [String]) throws(QMPError) -> String? {
        guard let s = try string(key) else { return nil }
        guard allowed.contains(s) else {
            throw QMPError.generic("Parameter '\(key)' does not accept value '\(s)'")
        }
        return s
    }

    public mutating func requiredEnum(_ key: String, allowed: [String]) throws(QMPError) -> String {
        guard let s = try enumValue(key, allowed: allowed) else { throw missing(key) }
        return s
    }

    // MARK: Compound

    /// A nested struct as its own reader; the caller should `finish()` it too.
    public mutating func object(_ key: String) throws(QMPError) -> QMPArguments? {
        guard let v = value(key) else { return nil }
        guard case .object(let o) = v else { throw invalidType(key, expected: "object") }
        return QMPArguments(o, path: name(key) + ".", keyval: keyval)
    }

    public mutating func requiredObject(_ key: String) throws(QMPError) -> QMPArguments {
        guard let o = try object(key) else { throw missing(key) }
        return o
    }

    public mutating func array(_ key: String) throws(QMPError) -> [JSONValue]? {
        guard let v = value(key) else { return nil }
        guard case .array(let a) = v else { throw invalidType(key, expected: "array") }
        return a
    }

    public mutating func requiredArray(_ key: String) throws(QMPError) -> [JSONValue] {
        guard let a = try array(key) else { throw missing(key) }
        return a
    }

    /// A list of strings; elements are named `key[N]` in errors (QEMU 7.2 says 'null').
    public mutating func stringArray(_ key: String) throws(QMPError) -> [String]? {
        guard let a = try array(key) else { return nil }
        var out: [String] = []
        out.reserveCapacity(a.count)
        for (n, element) in a.enumerated() {
            guard case .string(let s) = element else {
                throw QMPError.generic("Invalid parameter type for '\(name(key))[\(n)]', expected: string")
            }
            out.append(s)
        }
        return out
    }

    // MARK: Finish

    /// Keys present but never read.
    public var unexpectedKeys: [String] { object.keys.filter { !consumed.contains($0) } }

    /// Rejects unexpected arguments: "Parameter 'foo' is unexpected".
    public func finish() throws(QMPError) {
        if let key = unexpectedKeys.first { throw QMPError.generic("Parameter '\(name(key))' is unexpected") }
    }
}
