/// QEMU's `key=value,…` option syntax (util/keyval.c), turned into a JSON object, with QEMU's
/// rules and error messages:
///
/// - dotted keys nest: `file.driver=file` → `{"file": {"driver": "file"}}`;
/// - a key made of digits below the first level is a list index: `a.0=x,a.1=y` → `{"a": ["x", "y"]}`;
/// - `,,` is a comma inside a value; a trailing `,` is allowed;
/// - an optional implied key takes a bare first element (`--blockdev qcow2,…` → `driver=qcow2`);
/// - when a key is given twice, the last value wins;
/// - `help` or `?` alone asks for help.
///
/// Values stay strings: the consumer converts them per its schema (QEMU's keyval visitor), e.g.
/// `OptionReader` for blockdev options and `QMPArguments` in keyval mode.
public enum KeyValue {
    public struct ParseError: Error, Sendable, CustomStringConvertible {
        public let message: String
        public init(message: String) { self.message = message }
        public var description: String { message }
    }

    /// Parses `text`; a help request is an error ("Help is not available for this option").
    public static func parse(_ text: String, impliedKey: String? = nil) throws(ParseError) -> JSONObject {
        let (object, help) = try parseAllowingHelp(text, impliedKey: impliedKey)
        if help { throw ParseError(message: "Help is not available for this option") }
        return object
    }

    /// Parses `text` and says whether it contained `help` or `?`.
    public static func parseAllowingHelp(_ text: String, impliedKey: String? = nil) throws(ParseError) -> (JSONObject, help: Bool) {
        let bytes = Array(text.utf8)
        var root = Node.object([])
        var help = false
        var i = 0
        var implied = impliedKey
        while i < bytes.count {
            i = try parseOne(bytes, from: i, into: &root, impliedKey: implied, help: &help)
            implied = nil
        }
        guard case .object(let members) = root else { return (JSONObject(), help) }
        let value = try listify(.object(members), path: [])
        return (value.objectValue ?? JSONObject(), help)
    }

    // MARK: Tree

    /// The tree before lists are made: objects keep their members in insertion order.
    private indirect enum Node {
        case string(String)
        case object([(String, Node)])
    }

    private static func string(_ bytes: ArraySlice<UInt8>) -> String { String(decoding: bytes, as: UTF8.self) }

    private static func isAlpha(_ c: UInt8) -> Bool { (c >= 65 && c <= 90) || (c >= 97 && c <= 122) }
    private static func isDigit(_ c: UInt8) -> Bool { c >= 48 && c <= 57 }

    /// Length of the QAPI name at `bytes[from...]` (QEMU's `parse_qapi_name(s, false)`), or 0.
    private static func qapiNameLength(_ bytes: [UInt8], from: Int, end: Int) -> Int {
        var p = from
        if p < end, bytes[p] == UInt8(ascii: "_") {   // downstream __RFQDN_ prefix
            p += 1
            guard p < end, bytes[p] == UInt8(ascii: "_") else { return 0 }
            p += 1
            while p < end, isAlpha(bytes[p]) || isDigit(bytes[p]) || bytes[p] == UInt8(ascii: "-") || bytes[p] == UInt8(ascii: ".") {
                p += 1
            }
            guard p < end, bytes[p] == UInt8(ascii: "_") else { return 0 }
            p += 1
        }
        guard p < end, isAlpha(bytes[p]) else { return 0 }
        p += 1
        while p < end, isAlpha(bytes[p]) || isDigit(bytes[p]) || bytes[p] == UInt8(ascii: "-") || bytes[p] == UInt8(ascii: "_") {
            p += 1
        }
        return p - from
    }

    /// Parses one `key=value` (or the implied first value, or `help`) starting at `start`;
    /// returns where the next one starts.
    private static func parseOne(_ bytes: [UInt8], from start: Int, into root: inout Node, impliedKey: String?,
                                 help: inout Bool) throws(ParseError) -> Int {
        var len = 0
        while start + len < bytes.count, bytes[start + len] != UInt8(ascii: "="), bytes[start + len] != UInt8(ascii: ",") { len += 1 }
        let atEquals = start + len < bytes.count && bytes[start + len] == UInt8(ascii: "=")
        var keyBytes = Array(bytes[start..<(start + len)])
        var usesImplied = false
        if len > 0 && !atEquals {
            let word = string(bytes[start..<(start + len)])
            if word == "help" || word == "?" {
                help = true
                var s = start + len
                if s < bytes.count, bytes[s] == UInt8(ascii: ",") { s += 1 }
                return s
            }
            if let impliedKey {
                usesImplied = true
                keyBytes = Array(impliedKey.utf8)
            }
        }
        let keyText = String(decoding: keyBytes, as: UTF8.self)

        // Key fragments.
        var path: [String] = []
        var s = 0
        while true {
            var fragment = 0
            if s != 0, s < keyBytes.count, isDigit(keyBytes[s]) {
                while s + fragment < keyBytes.count, isDigit(keyBytes[s + fragment]) { fragment += 1 }
            } else {
                fragment = qapiNameLength(keyBytes, from: s, end: keyBytes.count)
            }
            if fragment == 0 || (s + fragment < keyBytes.count && keyBytes[s + fragment] != UInt8(ascii: ".")) {
                throw ParseError(message: "Invalid parameter '\(keyText)'")
            }
            if fragment >= 128 {
                let whole = s == 0 && s + fragment == keyBytes.count
                throw ParseError(message: "Parameter\(whole ? "" : " fragment") '\(string(keyBytes[s..<(s + fragment)]))' is too long")
            }
            path.append(string(keyBytes[s..<(s + fragment)]))
            s += fragment
            if s >= keyBytes.count { break }
            s += 1   // the '.'
        }

        var value: [UInt8] = []
        var next: Int
        if usesImplied {
            value = Array(bytes[start..<(start + len)])
            next = start + len
            if next < bytes.count, bytes[next] == UInt8(ascii: ",") { next += 1 }
        } else {
            guard atEquals else { throw ParseError(message: "Expected '=' after parameter '\(keyText)'") }
            next = start + len + 1
            while next < bytes.count {
                if bytes[next] == UInt8(ascii: ",") {
                    next += 1
                    if next >= bytes.count || bytes[next] != UInt8(ascii: ",") { break }
                }
                value.append(bytes[next])
                next += 1
            }
        }
        try put(&root, path: path[...], value: String(decoding: value, as: UTF8.self), keyText: keyText, depth: 0)
        return next
    }

    /// Puts `value` at `path`: inner fragments must be objects, the last one a string.
    private static func put(_ node: inout Node, path: ArraySlice<String>, value: String, keyText: String,
                            depth: Int) throws(ParseError) {
        guard case .object(var members) = node else { return }
        let head = path.first!
        let isLeaf = path.count == 1
        // QEMU names the key up to the fragment that conflicts: "Parameters 'a.*' used inconsistently".
        let prefix = path.startIndex == 0 ? head : keyPrefix(keyText, fragments: path.startIndex + 1)
        if let index = members.firstIndex(where: { $0.0 == head }) {
            switch (members[index].1, isLeaf) {
            case (.string, true):
                members[index].1 = .string(value)
            case (.object, false):
                var child = members[index].1
                members[index].1 = .string("")   // drop the reference while the child is mutated
                try put(&child, path: path.dropFirst(), value: value, keyText: keyText, depth: depth + 1)
                members[index].1 = child
            default:
                throw ParseError(message: "Parameters '\(prefix).*' used inconsistently")
            }
        } else if isLeaf {
            members.append((head, .string(value)))
        } else {
            var child = Node.object([])
            try put(&child, path: path.dropFirst(), value: value, keyText: keyText, depth: depth + 1)
            members.append((head, child))
        }
        node = .object(members)
    }

    /// The first `fragments` dot-separated fragments of `key`.
    private static func keyPrefix(_ key: String, fragments: Int) -> String {
        key.split(separator: ".", omittingEmptySubsequences: false).prefix(fragments).joined(separator: ".")
    }

    /// QEMU's `keyval_listify`: objects whose keys are all indexes become lists.
    private static func listify(_ node: Node, path: [String]) throws(ParseError) -> JSONValue {
        switch node {
        case .string(let s):
            return .string(s)
        case .object(let members):
            var hasIndex = false
            var hasMember = false
            var converted: [(String, JSONValue)] = []
            for (key, child) in members {
                if let first = key.utf8.first, isDigit(first) { hasIndex = true } else { hasMember = true }
                converted.append((key, try listify(child, path: path + [key])))
            }
            let prefix = path.map { $0 + "." }.joined()
            if hasIndex && hasMember {
                throw ParseError(message: "Parameters '\(prefix)*' used inconsistently")
            }
            if !hasIndex { return .object(JSONObject(converted)) }
            var elements = [JSONValue?](repeating: nil, count: converted.count)
            var maxIndex = -1
            for (key, value) in converted {
                // Digits only (checked when parsing); capped like QEMU's INT_MAX.
                let index = Int(key) ?? Int(Int32.max)
                maxIndex = max(maxIndex, index)
                if index < elements.count { elements[index] = value }
            }
            var list: [JSONValue] = []
            for i in 0..<min(elements.count + 1, maxIndex + 1) {
                guard i < elements.count, let value = elements[i] else {
                    throw ParseError(message: "Parameter '\(prefix)\(i)' missing")
                }
                list.append(value)
            }
            return .array(list)
        }
    }
}

/// QEMU's older `QemuOpts` syntax (util/qemu-option.c), used by `--chardev` and by qemu-nbd's
/// `--image-opts`: flat `key=value` pairs in order (no nesting, no lists), `,,` escapes a comma,
/// the first bare element may take an implied name, and later bare elements are short-form
/// booleans (`server` → `server=on`, `nowait` → `wait=off`), which QEMU 7.2 accepts with a
/// deprecation warning.
public enum QemuOpts {
    public struct Parsed: Sendable {
        /// Pairs in the order given (a repeated key appears twice; the last one counts).
        public var pairs: [(key: String, value: String)] = []
        /// `id=…` if given.
        public var id: String?
        /// Deprecation warnings for short-form booleans, in QEMU's words (two lines each).
        public var warnings: [String] = []
        /// `help` or `?` was given.
        public var help = false

        /// The last value of `key`.
        public func value(_ key: String) -> String? { pairs.last(where: { $0.key == key })?.value }
    }

    public static func parse(_ text: String, impliedName: String?) -> Parsed {
        let bytes = Array(text.utf8)
        var result = Parsed()
        var i = 0
        var firstName = impliedName
        while i < bytes.count {
            var len = 0
            while i + len < bytes.count, bytes[i + len] != UInt8(ascii: "="), bytes[i + len] != UInt8(ascii: ",") { len += 1 }
            var name: String
            var value: String
            if i + len >= bytes.count || bytes[i + len] != UInt8(ascii: "=") {
                if let implied = firstName {
                    name = implied
                    (value, i) = readValue(bytes, from: i)
                } else {
                    name = String(decoding: bytes[i..<(i + len)], as: UTF8.self)
                    i += len
                    var prefix = ""
                    if name.hasPrefix("no") {
                        name.removeFirst(2)
                        value = "off"
                        prefix = "no"
                    } else {
                        value = "on"
                    }
                    if name == "help" || name == "?" {
                        result.help = true
                    } else {
                        let advice = name == "delay" ? "Please use nodelay=\(prefix.isEmpty ? "on" : "off") instead"
                                                     : "Please use \(name)=\(value) instead"
                        result.warnings.append("warning: short-form boolean option '\(prefix)\(name)' deprecated\n\(advice)")
                    }
                }
            } else {
                name = String(decoding: bytes[i..<(i + len)], as: UTF8.self)
                (value, i) = readValue(bytes, from: i + len + 1)
            }
            if i < bytes.count, bytes[i] == UInt8(ascii: ",") { i += 1 }
            firstName = nil
            if name == "id" {
                if result.id == nil { result.id = value }
                continue
            }
            result.pairs.append((name, value))
        }
        return result
    }

    /// A value up to the next single comma (`,,` is a comma); returns it and where it ended.
    private static func readValue(_ bytes: [UInt8], from start: Int) -> (String, Int) {
        var out: [UInt8] = []
        var i = start
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: ",") {
                if i + 1 < bytes.count, bytes[i + 1] == UInt8(ascii: ",") {
                    out.append(UInt8(ascii: ","))
                    i += 2
                    continue
                }
                break
            }
            out.append(bytes[i])
            i += 1
        }
        return (String(decoding: out, as: UTF8.self), i)
    }

    /// QEMU's identifier rule for `id=`: a letter, then letters, digits, `-`, `.`, `_`.
    public static func isValidID(_ id: String) -> Bool {
        let b = Array(id.utf8)
        guard let first = b.first, (first >= 65 && first <= 90) || (first >= 97 && first <= 122) else { return false }
        return b.allSatisfy { c in
            (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || (c >= 48 && c <= 57)
                || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_")
        }
    }
}
