import CLinux
import Glibc

/// Starts a POSIX thread running `body`: joinable (call `join()` once), or detached. We avoid
/// Foundation's `Thread` so the data path carries no Foundation dependency.
///
/// `@unchecked Sendable`: `body` is written before `pthread_create` and only ever read and
/// cleared by the new thread; `handle` is read only by `join()` after `start` returned.
public final class OSThread: @unchecked Sendable {
    private var handle = pthread_t()
    /// Taken by the thread before it runs, so a finished thread keeps nothing its body
    /// captured alive (an owner holding its `OSThread` would otherwise never be freed).
    private var body: (@Sendable () -> Void)?
    private let detached: Bool
    private let name: String

    private init(_ body: @escaping @Sendable () -> Void, name: String, detached: Bool) {
        self.body = body
        self.name = String(name.utf8.prefix(15))!
        self.detached = detached
    }

    /// - Parameter detached: the thread's resources go back to the system when it ends;
    ///   `join()` must not be called.
    @discardableResult
    public static func start(name: String, detached: Bool = false, _ body: @escaping @Sendable () -> Void) -> OSThread {
        guard let thread = tryStart(name: name, detached: detached, body) else {
            preconditionFailure("pthread_create failed for thread \(name)")
        }
        return thread
    }

    /// Starts the thread, or returns nil when the system refuses one (`EAGAIN`: thread or
    /// memory limits); for callers that can report the failure instead of crashing.
    public static func tryStart(name: String, detached: Bool = false, _ body: @escaping @Sendable () -> Void) -> OSThread? {
        let thread = OSThread(body, name: name, detached: detached)
        let context = Unmanaged.passRetained(thread).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        if detached { pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED)) }
        let rc = pthread_create(&thread.handle, &attr, { raw in
            let thread = Unmanaged<OSThread>.fromOpaque(raw!).takeRetainedValue()
            // Named from inside: a detached thread's handle may be stale by the time start returns.
            _ = thread.name.withCString { clinux_set_thread_name(pthread_self(), $0) }
            let body = thread.body!
            thread.body = nil
            body()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<OSThread>.fromOpaque(context).release()
            return nil
        }
        return thread
    }

    public func join() {
        precondition(!detached, "join() on a detached OSThread")
        pthread_join(handle, nil)
    }
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
