import CLinux
import Glibc
import Synchronization

/// Something registered with an event loop: told when its fd is ready.
public protocol EventHandler: AnyObject {
    /// Called on the loop's thread with the epoll event bits; with 0 when the handler asked
    /// to run again (`EventLoop.runAgain`).
    func handleEvents(_ events: UInt32)
}

/// The loop running on the current thread (set by `EventLoop.run`), for `EventLoop.current`.
private let currentLoopKey: pthread_key_t = {
    var key = pthread_key_t()
    precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
    return key
}()

/// One thread, one epoll set. `execute` and `schedule` are the entry points from other
/// threads; everything else must be called on the loop's own thread (checked in debug
/// builds: `LoopBound`).
public final class EventLoop: Sendable {
    public typealias Task = @Sendable () -> Void

    public let index: Int
    private let epfd: Int32
    private let wakeFD: Int32
    // Cross-thread inbox. `wakePending` avoids an eventfd write per task when the loop is
    // already going to look at the inbox.
    private let inbox = Mutex<(tasks: [Task], wakePending: Bool)>(([], false))
    /// The loop thread's own state (registrations, timers, the epoll event buffer).
    private struct LoopState {
        var draining: [Task] = []
        // Registrations by id; ids are never reused so a stale epoll event for a closed fd is dropped.
        var handlers: [UInt64: any EventHandler] = [:]
        var nextID: UInt64 = 1
        var timers: [(deadline: UInt64, id: UInt64, task: () -> Void)] = []
        var nextTimer: UInt64 = 1
        // Registrations that asked to run again on the next turn (work left over after their
        // fair share of one wake-up).
        var again: [UInt64] = []
        /// Tasks to run once the current wake-up's events are handled (`deferToEndOfIteration`).
        var deferred: [() -> Void] = []
        let events: UnsafeMutablePointer<epoll_event>
    }
    private let state: LoopBound<LoopState>
    private let eventCapacity = 256
    private let thread = Mutex<OSThread?>(nil)
    private let stopFlag = Atomic<Bool>(false)
    private let stoppedFlag = Atomic<Bool>(false)
    /// The loop's thread, once it runs (`inLoopThread`).
    let identity = LoopIdentity()

    public init(index: Int = 0) {
        self.index = index
        epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(epfd >= 0, "epoll_create1 failed")
        wakeFD = eventfd(0, clinux_EFD_NONBLOCK | clinux_EFD_CLOEXEC)
        precondition(wakeFD >= 0, "eventfd failed")
        state = LoopBound(LoopState(events: .allocate(capacity: eventCapacity)), identity: identity)
        var ev = epoll_event()
        ev.events = clinux_EPOLLIN
        clinux_epoll_set_u64(&ev, 0)
        epoll_ctl(epfd, EPOLL_CTL_ADD, wakeFD, &ev)
    }

    deinit {
        state.unchecked.events.deallocate()
        close(epfd)
        close(wakeFD)
    }

    /// Starts the loop on its own thread.
    public func start(name: String) {
        let t = OSThread.start(name: name) { [self] in self.run() }
        thread.withLock { $0 = t }
    }

    /// True on the loop's own thread.
    public var inLoopThread: Bool { identity.isCurrent }

    /// The event loop whose thread is calling, nil on any other thread (workers, QMP, jobs).
    /// Code that may sleep checks this: an event loop thread must never wait.
    public static var current: EventLoop? {
        guard let raw = pthread_getspecific(currentLoopKey) else { return nil }
        return Unmanaged<EventLoop>.fromOpaque(raw).takeUnretainedValue()
    }

    /// True once `run` has returned (after `stop`): tasks given to `execute` no longer run.
    public var hasStopped: Bool { stoppedFlag.load(ordering: .acquiring) }

    // MARK: registrations (loop thread only)

    /// Registers `fd` for `events`; returns the registration id used to modify or remove it.
    public func register(fd: Int32, events: UInt32, handler: any EventHandler) -> UInt64 {
        let id = state.value.nextID
        state.value.nextID += 1
        state.value.handlers[id] = handler
        var ev = epoll_event()
        ev.events = events
        clinux_epoll_set_u64(&ev, id)
        if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0 {
            state.value.handlers[id] = nil
            return 0
        }
        return id
    }

    public func modify(fd: Int32, id: UInt64, events: UInt32) {
        assert(inLoopThread, "EventLoop.modify off its loop thread")
        var ev = epoll_event()
        ev.events = events
        clinux_epoll_set_u64(&ev, id)
        epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev)
    }

    /// Calls the handler registered as `id` again (with events 0) on the next turn of the
    /// loop, after the handlers that epoll reports then: how a connection that stopped
    /// after its share of work resumes without starving the others. Loop thread only.
    public func runAgain(id: UInt64) {
        state.value.again.append(id)
    }

    public func unregister(fd: Int32, id: UInt64) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nil)
        state.value.handlers[id] = nil
    }

    // MARK: cross-thread

    /// Waits until the loop has run everything queued before this call (from another thread;
    /// returns once the loop has stopped, whatever is left queued).
    public func waitForQueuedTasks() {
        let lock = ConditionLock()
        let done = Atomic<Bool>(false)
        execute {
            done.store(true, ordering: .releasing)
            lock.withLock { lock.broadcast() }
        }
        lock.withLock {
            while !done.load(ordering: .acquiring) && !hasStopped { _ = lock.wait(seconds: 0.1) }
        }
    }

    /// Runs `task` on the loop thread soon. Callable from any thread.
    public func execute(_ task: @escaping Task) {
        let wake = inbox.withLock { box -> Bool in
            box.tasks.append(task)
            if box.wakePending { return false }
            box.wakePending = true
            return true
        }
        if wake {
            var one: UInt64 = 1
            _ = write(wakeFD, &one, 8)
        }
    }

    /// Runs `task` on the loop thread after `seconds`. Loop thread only; returns a timer id.
    @discardableResult
    public func schedule(after seconds: Double, _ task: @escaping () -> Void) -> UInt64 {
        let id = state.value.nextTimer
        state.value.nextTimer += 1
        let deadline = monotonicNanos() + UInt64(max(0, seconds) * 1e9)
        let index = state.value.timers.firstIndex { $0.deadline > deadline } ?? state.value.timers.count
        state.value.timers.insert((deadline, id, task), at: index)
        return id
    }

    /// Runs `task` on this loop after every event of the current wake-up has been handled,
    /// before the loop waits again (loop thread only). Batches work that many events trigger
    /// — one `writev` for all the replies a wake-up produced — without the inbox's lock or an
    /// eventfd write.
    public func deferToEndOfIteration(_ task: @escaping () -> Void) {
        state.value.deferred.append(task)
    }

    /// Loop thread only.
    public func cancelTimer(_ id: UInt64) {
        state.value.timers.removeAll { $0.id == id }
    }

    public func stop() {
        stopFlag.store(true, ordering: .relaxed)
        execute {}
    }

    public func join() { thread.withLock { $0 }?.join() }

    // MARK: the loop

    private func timeoutMillis() -> Int32 {
        guard let first = state.value.timers.first else { return -1 }
        let now = monotonicNanos()
        if first.deadline <= now { return 0 }
        return Int32(min((first.deadline - now + 999_999) / 1_000_000, 60_000))
    }

    private func runTimers() {
        if state.value.timers.isEmpty { return }
        let now = monotonicNanos()
        while let first = state.value.timers.first, first.deadline <= now {
            state.value.timers.removeFirst()
            first.task()
        }
    }

    private func runInbox() {
        inbox.withLock { box in
            swap(&state.value.draining, &box.tasks)
            box.wakePending = false
        }
        // Run them from a local array and put its (emptied) storage back: no allocation per
        // wake-up, and tasks that register or schedule touch the rest of the state freely.
        var tasks: [Task] = []
        swap(&tasks, &state.value.draining)
        for task in tasks { task() }
        tasks.removeAll(keepingCapacity: true)
        swap(&tasks, &state.value.draining)
    }

    /// Runs the loop on the calling thread until `stop`.
    public func run() {
        identity.claim()
        // The loop outlives its thread (the group keeps it), so an unretained pointer is safe.
        pthread_setspecific(currentLoopKey, Unmanaged.passUnretained(self).toOpaque())
        // Marks this thread for the debug check that no file syscall that may sleep runs here.
        clinux_set_loop_thread(1)
        defer {
            clinux_set_loop_thread(0)
            pthread_setspecific(currentLoopKey, nil)
            stoppedFlag.store(true, ordering: .releasing)
        }
        let events = state.value.events
        // Swapped with the state's lists while they run (handlers may add to them meanwhile);
        // their storage is reused, so a turn allocates nothing.
        var runningAgain: [UInt64] = []
        var runningDeferred: [() -> Void] = []
        while !stopFlag.load(ordering: .relaxed) {
            let n = epoll_wait(epfd, events, Int32(eventCapacity), state.value.again.isEmpty ? timeoutMillis() : 0)
            if n < 0 {
                if errno == EINTR { continue }
                fatalError("epoll_wait failed: \(errno)")
            }
            var sawWake = false
            for i in 0..<Int(n) {
                let id = clinux_epoll_data_u64(events + i)
                if id == 0 {
                    var value: UInt64 = 0
                    _ = read(wakeFD, &value, 8)
                    sawWake = true
                    continue
                }
                state.value.handlers[id]?.handleEvents(events[i].events)
            }
            if !state.value.again.isEmpty {
                swap(&state.value.again, &runningAgain)
                for id in runningAgain { state.value.handlers[id]?.handleEvents(0) }
                runningAgain.removeAll(keepingCapacity: true)
            }
            if sawWake || !inbox.withLock({ $0.tasks.isEmpty }) { runInbox() }
            runTimers()
            while !state.value.deferred.isEmpty {
                swap(&state.value.deferred, &runningDeferred)
                for task in runningDeferred { task() }
                runningDeferred.removeAll(keepingCapacity: true)
            }
        }
    }
}

/// Which thread an event loop runs on: set once when the loop starts running.
public final class LoopIdentity: Sendable {
    private let thread = Atomic<UInt>(0)
    public init() {}
    /// The calling thread becomes the loop's thread.
    func claim() { thread.store(UInt(pthread_self()), ordering: .releasing) }
    public var isCurrent: Bool { thread.load(ordering: .acquiring) == UInt(pthread_self()) }
}

/// State that belongs to one event loop's thread (NIO's `NIOLoopBound`): connections,
/// registrations, timers.
///
/// Invariant (an `@unchecked Sendable` wrapper): `value` is used only on the loop's thread —
/// checked on every access in debug builds — so no two threads ever touch it; the value may
/// be handed to the loop (created elsewhere, then only used there) because `execute`'s inbox
/// lock orders the hand-over.
public final class LoopBound<Value>: @unchecked Sendable {
    private var stored: Value
    private let identity: LoopIdentity

    public init(_ value: Value, loop: EventLoop) {
        stored = value
        identity = loop.identity
    }

    init(_ value: Value, identity: LoopIdentity) {
        stored = value
        self.identity = identity
    }

    public var value: Value {
        _read {
            assert(identity.isCurrent, "loop-bound state used off its event loop's thread")
            yield stored
        }
        _modify {
            assert(identity.isCurrent, "loop-bound state used off its event loop's thread")
            yield &stored
        }
    }

    /// For `deinit`, when no thread can use the value any more.
    var unchecked: Value { stored }
}

/// A fixed set of event loops, one thread each; connections are spread round-robin.
public final class EventLoopGroup: Sendable {
    public let loops: [EventLoop]
    private let next = Atomic<Int>(0)

    public init(count: Int, name: String = "blockd-loop") {
        loops = (0..<max(1, count)).map { EventLoop(index: $0) }
        for loop in loops { loop.start(name: "\(name)-\(loop.index)") }
    }

    public func nextLoop() -> EventLoop {
        loops[next.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count]
    }

    public func shutdown() {
        for loop in loops { loop.stop() }
        for loop in loops { loop.join() }
    }
}
