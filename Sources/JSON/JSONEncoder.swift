extension JSONValue {
    /// Compact JSON text, as QMP sends it (`{"return": {}}` with a space after colons and commas,
    /// matching QEMU's monitor output).
    public var serialized: String {
        var out = ""
        JSONValue.write(self, into: &out)
        return out
    }

    private static func write(_ value: JSONValue, into out: inout String) {
        switch value {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d):
            if d.isFinite, d == d.rounded(), abs(d) < 1e15 { out += String(Int64(d)) } else { out += "\(d)" }
        case .string(let s): writeString(s, into: &out)
        case .array(let a):
            out += "["
            for (n, v) in a.enumerated() {
                if n > 0 { out += ", " }
                write(v, into: &out)
            }
            out += "]"
        case .object(let o):
            out += "{"
            var first = true
            for (k, v) in o {
                if !first { out += ", " }
                first = false
                writeString(k, into: &out)
                out += ": "
                write(v, into: &out)
            }
            out += "}"
        }
    }

    private static func writeString(_ s: String, into out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }
}

extension JSONValue {
    /// JSON text as QEMU's monitor prints it with `pretty=on` (qobject/json-writer.c): every
    /// member and element on its own line, indented by four spaces per level, and an empty
    /// object or array still opened and closed on two lines (`{` newline `}`).
    public var prettySerialized: String {
        var out = ""
        JSONValue.writePretty(self, depth: 0, into: &out)
        return out
    }

    private static func newline(_ depth: Int, into out: inout String) {
        out += "\n"
        out += String(repeating: " ", count: depth * 4)
    }

    private static func writePretty(_ value: JSONValue, depth: Int, into out: inout String) {
        switch value {
        case .array(let a):
            out += "["
            for (n, v) in a.enumerated() {
                if n > 0 { out += "," }
                newline(depth + 1, into: &out)
                writePretty(v, depth: depth + 1, into: &out)
            }
            newline(depth, into: &out)
            out += "]"
        case .object(let o):
            out += "{"
            var first = true
            for (k, v) in o {
                if !first { out += "," }
                first = false
                newline(depth + 1, into: &out)
                out += JSONValue.string(k).serialized
                out += ": "
                writePretty(v, depth: depth + 1, into: &out)
            }
            newline(depth, into: &out)
            out += "}"
        default:
            out += value.serialized
        }
    }
}
