#if canImport(Glibc)
import Glibc
#endif
import JSON
import QMP

/// A usage error: one line on stderr, exit status 2.
struct UsageError: Error {
    var message: String
}

/// One subcommand: its name, a one-line synopsis and help, and what it does. To add one, write a
/// `static let` in an extension of `Subcommand` and list it in `Subcommand.all`.
struct Subcommand: Sendable {
    var name: String
    var synopsis: String   // e.g. "NODE [--name N] [--writable] [--id ID]"
    var help: String       // one line
    var run: @Sendable (inout Invocation) throws -> Void
}

/// The parsed command line for one subcommand run, plus the output helpers.
struct Invocation {
    var subcommand: Subcommand
    var arguments: [String]
    var socketPath: String
    var json: Bool
    private var client: QMPClient?

    init(subcommand: Subcommand, arguments: [String], socketPath: String, json: Bool) {
        self.subcommand = subcommand
        self.arguments = arguments
        self.socketPath = socketPath
        self.json = json
    }

    // MARK: Arguments

    /// Removes and returns the value of `--option VALUE` (or `--option=VALUE`).
    mutating func option(_ name: String) throws(UsageError) -> String? {
        for (n, arg) in arguments.enumerated() {
            if arg == name {
                guard n + 1 < arguments.count else { throw usage("\(name) needs a value") }
                let value = arguments[n + 1]
                arguments.removeSubrange(n...n + 1)
                return value
            }
            if arg.hasPrefix(name + "=") {
                arguments.remove(at: n)
                return String(arg.dropFirst(name.count + 1))
            }
        }
        return nil
    }

    /// Removes `--flag` and tells whether it was there.
    mutating func flag(_ name: String) -> Bool {
        guard let n = arguments.firstIndex(of: name) else { return false }
        arguments.remove(at: n)
        return true
    }

    /// The next positional argument.
    mutating func positional(_ what: String) throws(UsageError) -> String {
        guard let n = arguments.firstIndex(where: { !$0.hasPrefix("--") }) else { throw usage("missing \(what)") }
        return arguments.remove(at: n)
    }

    mutating func optionalPositional() -> String? {
        guard let n = arguments.firstIndex(where: { !$0.hasPrefix("--") }) else { return nil }
        return arguments.remove(at: n)
    }

    /// Rejects anything left over.
    func finish() throws(UsageError) {
        if let extra = arguments.first { throw usage("unexpected argument '\(extra)'") }
    }

    func usage(_ message: String) -> UsageError {
        UsageError(message: "\(message) (usage: blockctl \(subcommand.name) \(subcommand.synopsis))")
    }

    // MARK: QMP

    mutating func connect() throws(QMPError) -> QMPClient {
        if let client { return client }
        let c = try QMPClient(path: socketPath)
        client = c
        return c
    }

    @discardableResult
    mutating func execute(_ command: String, _ arguments: JSONObject? = nil) throws(QMPError) -> JSONValue {
        try connect().execute(command, arguments: arguments)
    }

    // MARK: Output

    /// Prints a command's return value when `--json` was given (actions print nothing otherwise).
    func printResult(_ value: JSONValue) {
        if json { print(value.serialized) }
    }
}

/// Fixed-width text table; the last column is not padded.
func renderTable(_ header: [String], _ rows: [[String]]) -> String {
    var widths = header.map(\.count)
    for row in rows {
        for (n, cell) in row.enumerated() where n < widths.count { widths[n] = max(widths[n], cell.count) }
    }
    func line(_ cells: [String]) -> String {
        var out = ""
        for (n, cell) in cells.enumerated() {
            if n == cells.count - 1 { out += cell } else { out += cell + String(repeating: " ", count: widths[n] - cell.count + 2) }
        }
        return out
    }
    return ([line(header)] + rows.map(line)).joined(separator: "\n")
}

/// 1073741824 → "1 GiB", 1610612736 → "1.5 GiB", 1000 → "1000 B".
func humanSize(_ bytes: Int64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var value = Double(bytes)
    var unit = 0
    while abs(value) >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
    if value == value.rounded() { return "\(Int64(value)) \(units[unit])" }
    let tenths = (value * 10).rounded() / 10
    return "\(tenths) \(units[unit])"
}

/// Text for a JSON value in a table cell.
func cell(_ value: JSONValue?) -> String {
    switch value {
    case nil, .null?: return "-"
    case .string(let s)?: return s
    case .bool(let b)?: return b ? "yes" : "no"
    case let v?: return v.serialized
    }
}

/// `KEY=VALUE,…` with QEMU's dotted keys, or a JSON object, into QMP arguments. Values that look
/// like booleans, numbers or null become those, except for keys known to be strings.
func parseOptions(_ text: String) throws(UsageError) -> JSONObject {
    let trimmed = text.drop { $0 == " " }
    if trimmed.hasPrefix("{") {
        do {
            guard case .object(let o) = try JSONParser.parse(String(trimmed)) else { throw UsageError(message: "expected a JSON object") }
            return o
        } catch let e as UsageError {
            throw e
        } catch {
            throw UsageError(message: "invalid JSON: \(error)")
        }
    }
    do {
        return typed(try KeyValue.parse(text))
    } catch {
        throw UsageError(message: error.description)
    }
}

private let stringKeys: Set<String> = [
    "driver", "node-name", "filename", "file", "backing", "data-file", "id", "name", "path", "host", "port",
    "locking", "detect-zeroes", "discard", "aio", "cache-clean-interval-unit", "password-secret", "key-secret",
]

private func typed(_ object: JSONObject) -> JSONObject {
    var out = JSONObject()
    for (key, value) in object {
        switch value {
        case .object(let o): out[key] = .object(typed(o))
        case .string(let s) where !stringKeys.contains(key):
            switch s {
            case "on", "true": out[key] = .bool(true)
            case "off", "false": out[key] = .bool(false)
            case "null": out[key] = .null
            default: out[key] = Int64(s).map(JSONValue.int) ?? .string(s)
            }
        case .string("null") where key == "backing" || key == "file":
            out[key] = .null
        default: out[key] = value
        }
    }
    return out
}
