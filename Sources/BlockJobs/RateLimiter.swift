import EventLoop

/// A token bucket for a job's `speed` in bytes per second (0 = unlimited).
///
/// The bucket holds up to `burst` bytes (a tenth of a second's worth, as QEMU's 100 ms slices
/// allow); `delay(after:)` charges the bytes just copied and answers how long to sleep before
/// the next chunk so the long-run rate stays at `speed`.
public struct RateLimiter: Sendable {
    public private(set) var speed: UInt64
    private var tokens: Double = 0
    private var last: UInt64

    public static let sliceNanos: UInt64 = 100_000_000

    public init(speed: UInt64 = 0, now: UInt64 = monotonicNanos()) {
        self.speed = speed
        self.last = now
        self.tokens = Double(speed) * Double(RateLimiter.sliceNanos) / 1e9
    }

    public var burst: Double { max(Double(speed) * Double(RateLimiter.sliceNanos) / 1e9, 1) }

    public mutating func setSpeed(_ speed: UInt64, now: UInt64 = monotonicNanos()) {
        self.speed = speed
        self.last = now
        tokens = min(tokens, burst)
    }

    /// Charges `bytes` and returns nanoseconds to wait before continuing (0 when unlimited or
    /// the bucket still has tokens).
    public mutating func delay(after bytes: UInt64, now: UInt64 = monotonicNanos()) -> UInt64 {
        guard speed > 0 else { return 0 }
        let elapsed = Double(now &- last) / 1e9
        last = now
        tokens = min(burst, tokens + elapsed * Double(speed)) - Double(bytes)
        if tokens >= 0 { return 0 }
        return UInt64(-tokens / Double(speed) * 1e9)
    }
}
