import CLinux
import Glibc

/// Starts a detached-joinable POSIX thread running `body`. We avoid Foundation's `Thread`
/// so the data path carries no Foundation dependency.
public final class OSThread: @unchecked Sendable {
    private var handle = pthread_t()
    private let body: @Sendable () -> Void

    private init(_ body: @escaping @Sendable () -> Void) { self.body = body }

    @discardableResult
    public static func start(name: String, _ body: @escaping @Sendable () -> Void) -> OSThread {
        guard let thread = tryStart(name: name, body) else {
            preconditionFailure("pthread_create failed for thread \(name)")
        }
        return thread
    }

    /// Starts the thread, or returns nil when the system refuses one (`EAGAIN`: thread or
    /// memory limits); for callers that can report the failure instead of crashing.
    public static func tryStart(name: String, _ body: @escaping @Sendable () -> Void) -> OSThread? {
        let thread = OSThread(body)
        let context = Unmanaged.passRetained(thread).toOpaque()
        let rc = pthread_create(&thread.handle, nil, { raw in
            let thread = Unmanaged<OSThread>.fromOpaque(raw!).takeRetainedValue()
            thread.body()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<OSThread>.fromOpaque(context).release()
            return nil
        }
        _ = String(name.utf8.prefix(15))!.withCString { clinux_set_thread_name(thread.handle, $0) }
        return thread
    }

    public func join() { pthread_join(handle, nil) }
}

/// A mutex with a condition variable, for the few places that must sleep (the worker queue).
public final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }
    public func wait() { pthread_cond_wait(cond, mutex) }
    public func signal() { pthread_cond_signal(cond) }
    public func broadcast() { pthread_cond_broadcast(cond) }

    /// Waits until signalled or `seconds` pass; returns false on timeout.
    public func wait(seconds: Double) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let total = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + seconds
        var deadline = timespec(tv_sec: Int(total), tv_nsec: Int((total - total.rounded(.down)) * 1e9))
        return pthread_cond_timedwait(cond, mutex, &deadline) == 0
    }

    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock(); defer { unlock() }
        return try body()
    }
}

/// Monotonic time in nanoseconds.
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Moves a non-Sendable value across a thread boundary where the code guarantees that only
/// one thread uses it at a time (hand-over through a queue). Keep uses few and commented.
public struct UnsafeTransfer<Value>: @unchecked Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
}
