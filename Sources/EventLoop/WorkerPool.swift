/// Threads that run blocking work (disk I/O that could not complete without sleeping,
/// fdatasync, metadata reads) so event loops never block. Work is taken in FIFO order.
public final class WorkerPool: @unchecked Sendable {
    public typealias Work = @Sendable () -> Void
    private let lock = ConditionLock()
    // Guarded by `lock`: a ring of pending work.
    private var queue: [Work?] = []
    private var head = 0
    private var count = 0
    private var idle = 0
    private var stopping = false
    private var threads: [OSThread] = []

    public init(threads: Int, name: String = "blockd-worker") {
        queue = Array(repeating: nil, count: 1024)
        for i in 0..<max(1, threads) {
            threads_append(OSThread.start(name: "\(name)-\(i)") { [unowned self] in self.run() })
        }
    }

    private func threads_append(_ t: OSThread) { threads.append(t) }

    /// Queues one piece of work; wakes a worker only if one is idle.
    public func submit(_ work: @escaping Work) {
        lock.lock()
        if count == queue.count { grow() }
        queue[(head + count) % queue.count] = work
        count += 1
        let wake = idle > 0
        lock.unlock()
        if wake { lock.signal() }
    }

    private func grow() {
        var bigger: [Work?] = Array(repeating: nil, count: queue.count * 2)
        for i in 0..<count { bigger[i] = queue[(head + i) % queue.count] }
        queue = bigger
        head = 0
    }

    private func run() {
        lock.lock()
        while true {
            while count == 0 && !stopping {
                idle += 1
                lock.wait()
                idle -= 1
            }
            if count == 0 && stopping { break }
            let work = queue[head]!
            queue[head] = nil
            head = (head + 1) % queue.count
            count -= 1
            lock.unlock()
            work()
            lock.lock()
        }
        lock.unlock()
    }

    /// Finishes queued work, then stops the threads.
    public func shutdown() {
        lock.withLock { stopping = true }
        lock.broadcast()
        for t in threads { t.join() }
        threads.removeAll()
    }
}
