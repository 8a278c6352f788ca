import Glibc
import Synchronization

/// One-line log records on stderr in QEMU's form: `blockd: <message>` for errors,
/// `blockd: warning: <message>` and so on (the program name is `qemu-nbd` when blockd runs as
/// its front end). Messages are built only when the level is enabled (autoclosure), so the data
/// path pays nothing for debug lines.
public enum Log {
    public enum Level: Int, Sendable, Comparable {
        case debug = 0, info, warning, error
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
        /// What follows the program name: QEMU prints errors without a label.
        var label: String {
            switch self {
            case .debug: "debug: "
            case .info: "info: "
            case .warning: "warning: "
            case .error: ""
            }
        }
    }

    // Quiet by default (warnings and errors), as QEMU's tools; `-v` sets .info, tracing .debug.
    private static let threshold = Atomic<Int>(Level.warning.rawValue)
    private static let lock = Mutex<Void>(())
    private static let program = Mutex<String>("blockd")

    /// The name records start with (`blockd`, or `qemu-nbd` for the front end).
    public static var programName: String {
        get { program.withLock { $0 } }
        set { program.withLock { $0 = newValue } }
    }

    public static var level: Level {
        get { Level(rawValue: threshold.load(ordering: .relaxed)) ?? .warning }
        set { threshold.store(newValue.rawValue, ordering: .relaxed) }
    }

    @inline(__always)
    public static func isEnabled(_ level: Level) -> Bool { level.rawValue >= threshold.load(ordering: .relaxed) }

    public static func write(_ level: Level, _ message: @autoclosure () -> String) {
        guard isEnabled(level) else { return }
        let line = "\(programName): \(level.label)\(message())\n"
        lock.withLock { _ in
            var bytes = Array(line.utf8)
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress! + done, $0.count - done) }
                if n <= 0 { break }
                done += n
            }
            bytes.removeAll()
        }
    }

    public static func debug(_ m: @autoclosure () -> String) { write(.debug, m()) }
    public static func info(_ m: @autoclosure () -> String) { write(.info, m()) }
    public static func warning(_ m: @autoclosure () -> String) { write(.warning, m()) }
    public static func error(_ m: @autoclosure () -> String) { write(.error, m()) }
}
