/// QEMU's `key=value,…` option syntax (util/keyval.c) turned into a JSON object:
/// dotted keys nest (`file.driver=file` → `{"file": {"driver": "file"}}`), `,,` is a comma
/// inside a value, and an optional implied first key takes a bare first element
/// (`--chardev socket,id=…` → `backend=socket`). Values stay strings; the consumer converts.
public enum KeyValue {
    public struct ParseError: Error, Sendable, CustomStringConvertible {
        public let message: String
        public var description: String { message }
    }

    public static func parse(_ text: String, impliedKey: String? = nil) throws(ParseError) -> JSONObject {
        var pairs: [(String, String)] = []
        var chars = Array(text)
        var i = 0
        var first = true
        if chars.isEmpty { return JSONObject() }
        // Trailing comma is tolerated like QEMU does not; keep strict: "a=b," is an error.
        while i < chars.count {
            // Key: up to '=' or ','.
            var key = ""
            while i < chars.count, chars[i] != "=", chars[i] != "," {
                key.append(chars[i])
                i += 1
            }
            var value = ""
            if i < chars.count, chars[i] == "=" {
                i += 1
                while i < chars.count {
                    if chars[i] == "," {
                        if i + 1 < chars.count, chars[i + 1] == "," {
                            value.append(",")
                            i += 2
                            continue
                        }
                        break
                    }
                    value.append(chars[i])
                    i += 1
                }
            } else {
                // A bare element: only the implied first key may take it.
                if first, let implied = impliedKey {
                    value = key
                    key = implied
                } else if key.isEmpty {
                    throw ParseError(message: "Expected parameter before '\(i < chars.count ? String(chars[i]) : "")'")
                } else {
                    throw ParseError(message: "Expected '=' after parameter '\(key)'")
                }
            }
            if key.isEmpty { throw ParseError(message: "Invalid parameter ''") }
            pairs.append((key, value))
            first = false
            if i < chars.count, chars[i] == "," {
                i += 1
                if i == chars.count { throw ParseError(message: "Expected parameter after trailing ','") }
            }
        }
        chars.removeAll()
        var root = JSONObject()
        for (key, value) in pairs {
            let path = key.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            if path.contains(where: { $0.isEmpty }) { throw ParseError(message: "Invalid parameter '\(key)'") }
            try insert(&root, path[...], value, fullKey: key)
        }
        return root
    }

    private static func insert(_ object: inout JSONObject, _ path: ArraySlice<String>, _ value: String,
                               fullKey: String) throws(ParseError) {
        let head = path.first!
        if path.count == 1 {
            if object[head] != nil { throw ParseError(message: "Parameter '\(fullKey)' is set more than once") }
            object[head] = .string(value)
            return
        }
        var child: JSONObject
        switch object[head] {
        case .none: child = JSONObject()
        case .object(let o)?: child = o
        default: throw ParseError(message: "Parameters '\(head)' and '\(fullKey)' conflict")
        }
        try insert(&child, path.dropFirst(), value, fullKey: fullKey)
        object[head] = .object(child)
    }
}
