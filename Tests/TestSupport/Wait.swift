#if canImport(Glibc)
import Glibc
#endif

/// A point in time on the monotonic clock, for waits that must end.
public struct Deadline: Sendable {
    public let at: Double

    public init(seconds: Double) { at = Deadline.now() + seconds }

    public var passed: Bool { Deadline.now() >= at }

    /// Seconds on CLOCK_MONOTONIC.
    public static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// Waits until `condition` holds, checking it at short intervals, for at most `timeout`
/// seconds. Returns whether it held. This is how tests synchronise with other threads and
/// processes: on a condition with a deadline, never on a fixed sleep.
///
/// ```swift
/// #expect(waitUntil(timeout: 5) { node.inFlightCount == 1 }, "the write never started")
/// ```
@discardableResult
public func waitUntil(timeout: Double = 10, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Deadline(seconds: timeout)
    var pause: UInt32 = 50
    while true {
        if try condition() { return true }
        if deadline.passed { return false }
        usleep(pause)
        pause = min(pause * 2, 5_000)
    }
}
