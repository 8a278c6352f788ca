import CLinux
import Glibc
import Synchronization

/// Starts a POSIX thread running `body`: joinable (call `join()` once), or detached. We avoid
/// Foundation's `Thread` so the data path carries no Foundation dependency.
///
/// Sendable by construction: the handle is fixed once the thread exists, and the body goes to
/// the new thread through `pthread_create`'s argument: the thread owns it while it runs, so
/// a finished thread keeps nothing its body captured alive, and the `OSThread` never holds
/// the body (an owner holding its `OSThread` would otherwise never be freed).
public final class OSThread: Sendable {
    private let handle: pthread_t
    private let detached: Bool

    private init(handle: pthread_t, detached: Bool) {
        self.handle = handle
        self.detached = detached
    }

    /// What the new thread runs and its name (handed over through `pthread_create`'s argument).
    private final class Start: Sendable {
        let body: @Sendable () -> Void
        let name: String
        init(_ body: @escaping @Sendable () -> Void, name: String) {
            self.body = body
            self.name = name
        }
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
        let context = Unmanaged.passRetained(Start(body, name: String(name.utf8.prefix(15))!)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        if detached { pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED)) }
        var handle = pthread_t()
        let rc = pthread_create(&handle, &attr, { raw in
            let body: @Sendable () -> Void
            do {
                let start = Unmanaged<Start>.fromOpaque(raw!).takeRetainedValue()
                // Named from inside: a detached thread's handle may be stale by the time start returns.
                _ = start.name.withCString { clinux_set_thread_name(pthread_self(), $0) }
                body = start.body
            }
            body()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<Start>.fromOpaque(context).release()
            return nil
        }
        return OSThread(handle: handle, detached: detached)
    }

    public func join() {
        precondition(!detached, "join() on a detached OSThread")
        pthread_join(handle, nil)
    }
}

/// A mutex with a condition variable, for the few places that must sleep (the worker queue,
/// job threads).
///
/// Invariant (an `@unchecked Sendable` wrapper): the pthread mutex and condition are the
/// only shared state and are made for it; `owner` is written only by the thread holding the
/// mutex (after locking, before unlocking and around waits), so `isHeldByCurrentThread` is
/// exact for the asking thread.
public final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let owner = Atomic<UInt>(0)

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

    public func lock() {
        pthread_mutex_lock(mutex)
        owner.store(UInt(pthread_self()), ordering: .relaxed)
    }
    public func unlock() {
        owner.store(0, ordering: .relaxed)
        pthread_mutex_unlock(mutex)
    }
    public func wait() {
        owner.store(0, ordering: .relaxed)
        pthread_cond_wait(cond, mutex)
        owner.store(UInt(pthread_self()), ordering: .relaxed)
    }
    public func signal() { pthread_cond_signal(cond) }
    public func broadcast() { pthread_cond_broadcast(cond) }

    /// Whether the calling thread holds the lock (for assertions).
    public var isHeldByCurrentThread: Bool { owner.load(ordering: .relaxed) == UInt(pthread_self()) }

    /// Waits until signalled or `seconds` pass; returns false on timeout.
    public func wait(seconds: Double) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let total = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + seconds
        var deadline = timespec(tv_sec: Int(total), tv_nsec: Int((total - total.rounded(.down)) * 1e9))
        owner.store(0, ordering: .relaxed)
        let signalled = pthread_cond_timedwait(cond, mutex, &deadline) == 0
        owner.store(UInt(pthread_self()), ordering: .relaxed)
        return signalled
    }

    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock(); defer { unlock() }
        return try body()
    }
}

/// State shared between threads that is read and written only while `lock` is held: a job's
/// state machine, the worker queue. Unlike `Mutex` the holder may sleep on the lock's
/// condition (`ConditionLock.wait`) in the middle of its work.
///
/// Invariant (an `@unchecked Sendable` wrapper): every access to `value` happens with `lock`
/// held by the accessing thread — checked on each access in debug builds — so the mutex
/// orders all of them.
public final class LockGuarded<Value>: @unchecked Sendable {
    public let lock: ConditionLock
    private var stored: Value

    public init(_ value: Value, lock: ConditionLock = ConditionLock()) {
        self.lock = lock
        stored = value
    }

    public var value: Value {
        _read {
            assert(lock.isHeldByCurrentThread, "LockGuarded read without its lock")
            yield stored
        }
        _modify {
            assert(lock.isHeldByCurrentThread, "LockGuarded written without its lock")
            yield &stored
        }
    }

    /// Runs `body` with the lock held.
    public func withLock<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&stored)
    }
}

/// A recursive pthread mutex whose holder can be asked for: the QMP control lock and the
/// block graph's change lock.
///
/// Invariant (an `@unchecked Sendable` wrapper): the pthread mutex is the only shared state
/// and is made to be shared; `owner` is written only by the thread holding the mutex and
/// compared only with the reading thread's own id, so `isHeldByCurrentThread` is exact for the
/// asking thread.
public final class RecursiveLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let owner = Atomic<UInt>(0)

    public init() {
        var attr = pthread_mutexattr_t()
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_settype(&attr, Int32(PTHREAD_MUTEX_RECURSIVE))
        pthread_mutex_init(mutex, &attr)
        pthread_mutexattr_destroy(&attr)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public var isHeldByCurrentThread: Bool { owner.load(ordering: .relaxed) == UInt(pthread_self()) }

    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        let outer = owner.load(ordering: .relaxed)
        owner.store(UInt(pthread_self()), ordering: .relaxed)
        defer {
            owner.store(outer, ordering: .relaxed)
            pthread_mutex_unlock(mutex)
        }
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
