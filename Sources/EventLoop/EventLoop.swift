import CLinux
import Glibc
import Synchronization

/// Something registered with an event loop: told when its fd is ready.
public protocol EventHandler: AnyObject {
    /// Called on the loop's thread with the epoll event bits.
    func handleEvents(_ events: UInt32)
}

/// One thread, one epoll set. `execute` and `schedule` are the entry points from other
/// threads; everything else must be called on the loop's own thread.
public final class EventLoop: @unchecked Sendable {
    public typealias Task = @Sendable () -> Void

    public let index: Int
    private let epfd: Int32
    private let wakeFD: Int32
    // Cross-thread inbox. `wakePending` avoids an eventfd write per task when the loop is
    // already going to look at the inbox.
    private let inbox = Mutex<(tasks: [Task], wakePending: Bool)>(([], false))
    private var draining: [Task] = []
    // Registrations by id; ids are never reused so a stale epoll event for a closed fd is dropped.
    private var handlers: [UInt64: any EventHandler] = [:]
    private var nextID: UInt64 = 1
    private var timers: [(deadline: UInt64, id: UInt64, task: () -> Void)] = []
    private var nextTimer: UInt64 = 1
    private var events: UnsafeMutablePointer<epoll_event>
    private let eventCapacity = 256
    private var thread: OSThread?
    private let stopFlag = Atomic<Bool>(false)
    private nonisolated(unsafe) var threadID: pthread_t = pthread_t()

    public init(index: Int = 0) {
        self.index = index
        epfd = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(epfd >= 0, "epoll_create1 failed")
        wakeFD = eventfd(0, clinux_EFD_NONBLOCK | clinux_EFD_CLOEXEC)
        precondition(wakeFD >= 0, "eventfd failed")
        events = .allocate(capacity: eventCapacity)
        var ev = epoll_event()
        ev.events = clinux_EPOLLIN
        clinux_epoll_set_u64(&ev, 0)
        epoll_ctl(epfd, EPOLL_CTL_ADD, wakeFD, &ev)
    }

    deinit {
        events.deallocate()
        close(epfd)
        close(wakeFD)
    }

    /// Starts the loop on its own thread.
    public func start(name: String) {
        thread = OSThread.start(name: name) { [self] in self.run() }
    }

    public var inLoopThread: Bool { pthread_equal(pthread_self(), threadID) != 0 }

    // MARK: registrations (loop thread only)

    /// Registers `fd` for `events`; returns the registration id used to modify or remove it.
    public func register(fd: Int32, events: UInt32, handler: any EventHandler) -> UInt64 {
        let id = nextID
        nextID += 1
        handlers[id] = handler
        var ev = epoll_event()
        ev.events = events
        clinux_epoll_set_u64(&ev, id)
        if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0 {
            handlers[id] = nil
            return 0
        }
        return id
    }

    public func modify(fd: Int32, id: UInt64, events: UInt32) {
        var ev = epoll_event()
        ev.events = events
        clinux_epoll_set_u64(&ev, id)
        epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev)
    }

    public func unregister(fd: Int32, id: UInt64) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nil)
        handlers[id] = nil
    }

    // MARK: cross-thread

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
        let id = nextTimer
        nextTimer += 1
        let deadline = monotonicNanos() + UInt64(max(0, seconds) * 1e9)
        let index = timers.firstIndex { $0.deadline > deadline } ?? timers.count
        timers.insert((deadline, id, task), at: index)
        return id
    }

    public func cancelTimer(_ id: UInt64) {
        timers.removeAll { $0.id == id }
    }

    public func stop() {
        stopFlag.store(true, ordering: .relaxed)
        execute {}
    }

    public func join() { thread?.join() }

    // MARK: the loop

    private func timeoutMillis() -> Int32 {
        guard let first = timers.first else { return -1 }
        let now = monotonicNanos()
        if first.deadline <= now { return 0 }
        return Int32(min((first.deadline - now + 999_999) / 1_000_000, 60_000))
    }

    private func runTimers() {
        if timers.isEmpty { return }
        let now = monotonicNanos()
        while let first = timers.first, first.deadline <= now {
            timers.removeFirst()
            first.task()
        }
    }

    private func runInbox() {
        inbox.withLock { box in
            swap(&draining, &box.tasks)
            box.wakePending = false
        }
        for task in draining { task() }
        draining.removeAll(keepingCapacity: true)
    }

    public func run() {
        threadID = pthread_self()
        // Marks this thread for the debug check that no file syscall that may sleep runs here.
        clinux_set_loop_thread(1)
        defer { clinux_set_loop_thread(0) }
        while !stopFlag.load(ordering: .relaxed) {
            let n = epoll_wait(epfd, events, Int32(eventCapacity), timeoutMillis())
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
                handlers[id]?.handleEvents(events[i].events)
            }
            if sawWake || !inbox.withLock({ $0.tasks.isEmpty }) { runInbox() }
            runTimers()
        }
    }
}

/// A fixed set of event loops, one thread each; connections are spread round-robin.
public final class EventLoopGroup: @unchecked Sendable {
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
