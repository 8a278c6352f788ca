import Glibc
import Synchronization

/// One-line log records on stderr in QEMU's form: `blockd: <message>` for errors,
/// `blockd: warning: <message>` and so on (the program name is `qemu-nbd` when blockd runs as
/// its front end). Messages are built only when the level is enabled (autoclosure), so the data
/// path pays nothing for debug lines.
///
/// Lines are queued and written by a background thread, so a caller (an event loop above all)
/// never blocks on stderr, even when it is a full pipe nobody reads. The queue holds at most
/// `LogSink.maxPending` bytes; beyond that lines are dropped and counted, and the count is
/// logged once stderr takes data again. Pending lines are written at exit (`atexit`).
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
    private static let program = Mutex<String>("blockd")
    static let sink = LogSink()

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
        sink.enqueue("\(programName): \(level.label)\(message())\n")
    }

    public static func debug(_ m: @autoclosure () -> String) { write(.debug, m()) }
    public static func info(_ m: @autoclosure () -> String) { write(.info, m()) }
    public static func warning(_ m: @autoclosure () -> String) { write(.warning, m()) }
    public static func error(_ m: @autoclosure () -> String) { write(.error, m()) }

    /// Waits (up to `timeout` seconds) until every queued line is written.
    public static func flush(timeout: Double = 2) { sink.flush(timeout: timeout) }

    /// Lines dropped so far because the queue was full (for tests and diagnostics).
    public static var droppedLines: Int { sink.droppedTotal }
}

/// The queue between loggers and stderr. Invariant: every mutable field is read and written
/// only with `lock` held; the writer thread drops the lock while it writes.
final class LogSink: @unchecked Sendable {
    /// Most bytes waiting to be written; lines beyond are dropped and counted.
    static let maxPending = 1 << 20

    fileprivate let lock = ConditionLock()
    private var pending: [UInt8] = []
    private var spare: [UInt8] = []
    private var dropped = 0
    private(set) var droppedTotalLocked = 0
    private var writing = false
    private var started = false
    private var noThread = false
    private let fd: Int32 = 2

    var droppedTotal: Int { lock.withLock { droppedTotalLocked } }

    func enqueue(_ line: String) {
        var line = line
        lock.lock()
        if !started { start() }
        if noThread {
            lock.unlock()
            // No writer thread could be started: write here, as before (may block).
            line.withUTF8 { Self.writeAll(fd, UnsafeRawBufferPointer($0)) }
            return
        }
        let n = line.utf8.count
        if pending.count + n > LogSink.maxPending {
            dropped += 1
            droppedTotalLocked += 1
            lock.unlock()
            return
        }
        line.withUTF8 { pending.append(contentsOf: $0) }
        lock.unlock()
        lock.broadcast()
    }

    /// Called with `lock` held.
    private func start() {
        started = true
        if OSThread.tryStart(name: "blockd-log", { [self] in run() }) == nil {
            noThread = true
            return
        }
        if !hooksInstalled {
            hooksInstalled = true
            atexit { Log.flush() }
            // `--daemonize`/`--fork` fork after lines may have been logged: the child has no
            // writer thread, so it starts its own with its first line; lines still queued
            // belong to the parent, which writes them. The lock is held across `fork` so the
            // child never inherits it locked by the writer.
            pthread_atfork({ Log.sink.lock.lock() }, { Log.sink.lock.unlock() }, { Log.sink.forkedChild() })
        }
    }

    private var hooksInstalled = false

    /// In the child of a `fork`, with `lock` held (taken before the fork).
    private func forkedChild() {
        started = false
        writing = false
        pending.removeAll()
        dropped = 0
        lock.unlock()
    }

    private func run() {
        lock.lock()
        while true {
            while pending.isEmpty && dropped == 0 { lock.wait() }
            swap(&pending, &spare)
            let lost = dropped
            dropped = 0
            writing = true
            lock.unlock()
            if lost > 0 {
                var note = "\(Log.programName): warning: \(lost) log lines dropped (stderr is not keeping up)\n"
                note.withUTF8 { Self.writeAll(fd, UnsafeRawBufferPointer($0)) }
            }
            spare.withUnsafeBytes { Self.writeAll(fd, $0) }
            spare.removeAll(keepingCapacity: spare.capacity <= 64 * 1024)
            lock.lock()
            writing = false
            lock.broadcast()
        }
    }

    func flush(timeout: Double) {
        let deadline = monotonicNanos() + UInt64(max(0, timeout) * 1e9)
        lock.lock()
        while (!pending.isEmpty || dropped > 0 || writing) && !noThread && started {
            let now = monotonicNanos()
            if now >= deadline { break }
            _ = lock.wait(seconds: Double(deadline - now) / 1e9)
        }
        lock.unlock()
    }

    private static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, base + done, bytes.count - done)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            done += n
        }
    }
}

/// Limits how often one source (a client) may log: `burst` lines at once, then `perSecond`
/// on average. Lines over the limit are counted, and the count goes with the next line that
/// passes. Not thread-safe: one owner (a connection on its loop).
public struct LogRateLimiter: Sendable {
    private var tokens: Double
    private var last: UInt64
    private let burst: Double
    private let perSecond: Double
    /// Lines refused since the last one that passed.
    public private(set) var suppressed = 0

    public init(burst: Int = 10, perSecond: Double = 1) {
        self.burst = Double(burst)
        self.perSecond = perSecond
        tokens = Double(burst)
        last = monotonicNanos()
    }

    /// True when a line may be logged now (`now` in monotonic nanoseconds).
    public mutating func allow(now: UInt64 = monotonicNanos()) -> Bool {
        if now > last {
            tokens = min(burst, tokens + Double(now - last) / 1e9 * perSecond)
            last = now
        }
        if tokens >= 1 {
            tokens -= 1
            return true
        }
        suppressed += 1
        return false
    }

    /// Returns and clears the count of refused lines.
    public mutating func takeSuppressed() -> Int {
        defer { suppressed = 0 }
        return suppressed
    }
}
