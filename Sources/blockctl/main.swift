#if canImport(Glibc)
import Glibc
#endif
import JSON
import QMP

// blockctl: a command-line client for blockd (or qemu-storage-daemon) over QMP.

func fflushStdout() { fflush(nil) }

/// The daemon's default monitor socket: `$BLOCKD_QMP`, else `/tmp/blockd-$UID/qmp.sock`.
func defaultSocketPath() -> String {
    if let env = getenv("BLOCKD_QMP"), env.pointee != 0 { return String(cString: env) }
    return "/tmp/blockd-\(getuid())/qmp.sock"
}

func helpText() -> String {
    var lines = [
        "usage: blockctl [--socket PATH] [--json] COMMAND [ARGS]",
        "",
        "Talks QMP to blockd (or qemu-storage-daemon). The socket defaults to $BLOCKD_QMP,",
        "else /tmp/blockd-$UID/qmp.sock. --json prints raw JSON results for scripts.",
        "",
        "commands:",
    ]
    // Usage on one line, what it does indented below: synopses vary too much for columns.
    for s in Subcommand.all {
        lines.append("  " + (s.synopsis.isEmpty ? s.name : s.name + " " + s.synopsis))
        lines.append("      " + s.help)
    }
    return lines.joined(separator: "\n")
}

func fail(_ message: String, status: Int32) -> Never {
    let bytes = Array("blockctl: \(message)\n".utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(status)
}

var args = Array(CommandLine.arguments.dropFirst())
var socketPath: String?
var json = false
var commandIndex: Int?
var n = 0
// Global options come before the subcommand.
while n < args.count {
    let arg = args[n]
    if arg == "--help" || arg == "-h" || arg == "help" {
        print(helpText())
        exit(0)
    } else if arg == "--json" {
        json = true
    } else if arg == "--socket" || arg == "-s" {
        guard n + 1 < args.count else { fail("--socket needs a path (see blockctl --help)", status: 2) }
        socketPath = args[n + 1]
        n += 1
    } else if arg.hasPrefix("--socket=") {
        socketPath = String(arg.dropFirst("--socket=".count))
    } else if arg.hasPrefix("-") {
        fail("unknown option '\(arg)' (see blockctl --help)", status: 2)
    } else {
        commandIndex = n
        break
    }
    n += 1
}
guard let commandIndex else { fail("missing command (see blockctl --help)", status: 2) }
let name = args[commandIndex]
guard let subcommand = Subcommand.all.first(where: { $0.name == name }) else {
    fail("unknown command '\(name)' (see blockctl --help)", status: 2)
}
var rest = Array(args[(commandIndex + 1)...])
if rest.contains("--help") || rest.contains("-h") {
    print("usage: blockctl \(subcommand.name) \(subcommand.synopsis)\n\(subcommand.help)")
    exit(0)
}
// `--json` is also accepted after the subcommand.
if let j = rest.firstIndex(of: "--json") { json = true; rest.remove(at: j) }
var invocation = Invocation(subcommand: subcommand, arguments: rest,
                            socketPath: socketPath ?? defaultSocketPath(), json: json)
do {
    try subcommand.run(&invocation)
} catch let error as UsageError {
    fail(error.message, status: 2)
} catch let error as QMPError {
    fail(error.desc, status: 1)
} catch {
    fail("\(error)", status: 1)
}
