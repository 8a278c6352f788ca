#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A latch that test doubles block on until the test lets them through: `allow(n)` lets `n`
/// passes through, `open()` lets everyone through from now on. `waiting` says how many
/// threads are blocked in `pass`, so a test can wait until a request is inside a driver
/// instead of sleeping and hoping.
public final class Gate: Sendable {
    private struct State {
        var open = false
        var tokens = 0
        var waiting = 0
        var passed = 0
    }
    private let state = Mutex(State())

    public init(open: Bool = false) { state.withLock { $0.open = open } }

    /// Lets `count` more passes through.
    public func allow(_ count: Int = 1) { state.withLock { $0.tokens += count } }

    /// Lets every pass through, now and later.
    public func open() { state.withLock { $0.open = true } }

    /// Threads blocked in `pass` right now.
    public var waiting: Int { state.withLock { $0.waiting } }

    /// Passes completed so far.
    public var passed: Int { state.withLock { $0.passed } }

    /// Blocks until the gate is open or a pass is allowed; false if `timeout` seconds went by
    /// first (a test that forgot to open its gate fails instead of hanging).
    @discardableResult
    public func pass(timeout: Double = 30) -> Bool {
        state.withLock { $0.waiting += 1 }
        let ok = waitUntil(timeout: timeout) {
            state.withLock { s in
                if s.open { return true }
                if s.tokens > 0 { s.tokens -= 1; return true }
                return false
            }
        }
        state.withLock { s in
            s.waiting -= 1
            if ok { s.passed += 1 }
        }
        return ok
    }
}

/// A joinable pthread that knows its kernel thread id, so a test can tell when it is asleep
/// in the kernel (blocked on a lock or condition) rather than running or runnable.
public final class TestThread: Sendable {
    private let handle: Mutex<pthread_t?> = Mutex(nil)
    private let kernelID = Atomic<Int32>(0)
    private let finished = Atomic<Bool>(false)

    public init(_ body: @escaping @Sendable () -> Void) {
        final class Start: @unchecked Sendable {
            // Handed from the creating thread to the new one, read once there.
            let body: @Sendable () -> Void
            let owner: TestThread
            init(_ body: @escaping @Sendable () -> Void, _ owner: TestThread) { self.body = body; self.owner = owner }
        }
        let start = Unmanaged.passRetained(Start(body, self)).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { raw in
            let start = Unmanaged<Start>.fromOpaque(raw!).takeRetainedValue()
            start.owner.kernelID.store(TestThread.currentKernelID(), ordering: .releasing)
            start.body()
            start.owner.finished.store(true, ordering: .releasing)
            return nil
        }, start)
        precondition(rc == 0, "pthread_create failed")
        handle.withLock { $0 = tid }
    }

    /// The calling thread's kernel id, from /proc/thread-self ("PID/task/TID").
    static func currentKernelID() -> Int32 {
        var buffer = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/thread-self", &buffer, buffer.count - 1)
        guard n > 0 else { return 0 }
        let link = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return link.split(separator: "/").last.flatMap { Int32($0) } ?? 0
    }

    /// Waits for the thread to end.
    public func join() {
        if let tid = handle.withLock({ h -> pthread_t? in defer { h = nil }; return h }) { pthread_join(tid, nil) }
    }

    /// True once the body has returned.
    public var isFinished: Bool { finished.load(ordering: .acquiring) }

    /// True when the kernel has the thread asleep (state S or D in /proc): blocked in a
    /// futex, a read, a sleep. A thread that is running or merely preempted is not.
    public var isBlocked: Bool {
        let tid = kernelID.load(ordering: .acquiring)
        guard tid != 0, !isFinished else { return false }
        let fd = open("/proc/self/task/\(tid)/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        guard n > 0 else { return false }
        // "TID (comm) STATE …": the state follows the last ')'.
        guard let close = buffer[0..<n].lastIndex(of: UInt8(ascii: ")")), close + 2 < n else { return false }
        let state = buffer[close + 2]
        return state == UInt8(ascii: "S") || state == UInt8(ascii: "D")
    }
}
