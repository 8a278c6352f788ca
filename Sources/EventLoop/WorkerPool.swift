/// Threads that run blocking work (disk I/O that could not complete without sleeping,
/// fdatasync, metadata reads) so event loops never block. Work is taken in FIFO order.
public final class WorkerPool: Sendable {
    public typealias Work = @Sendable () -> Void
    private struct Queue {
        // A ring of pending work.
        var items: [Work?] = Array(repeating: nil, count: 1024)
        var head = 0
        var count = 0
        var idle = 0
        var stopping = false
        var threads: [OSThread] = []
    }
    private let queue = LockGuarded(Queue())
    private var lock: ConditionLock { queue.lock }

    public init(threads: Int, name: String = "blockd-worker") {
        for i in 0..<max(1, threads) {
            let t = OSThread.start(name: "\(name)-\(i)") { [unowned self] in self.run() }
            queue.withLock { $0.threads.append(t) }
        }
    }

    /// Queues one piece of work; wakes a worker only if one is idle.
    public func submit(_ work: @escaping Work) {
        let wake = queue.withLock { q -> Bool in
            if q.count == q.items.count { WorkerPool.grow(&q) }
            q.items[(q.head + q.count) % q.items.count] = work
            q.count += 1
            return q.idle > 0
        }
        if wake { lock.signal() }
    }

    private static func grow(_ q: inout Queue) {
        var bigger: [Work?] = Array(repeating: nil, count: q.items.count * 2)
        for i in 0..<q.count { bigger[i] = q.items[(q.head + i) % q.items.count] }
        q.items = bigger
        q.head = 0
    }

    private func run() {
        lock.lock()
        while true {
            while queue.value.count == 0 && !queue.value.stopping {
                queue.value.idle += 1
                lock.wait()
                queue.value.idle -= 1
            }
            if queue.value.count == 0 && queue.value.stopping { break }
            let work = queue.value.items[queue.value.head]!
            queue.value.items[queue.value.head] = nil
            queue.value.head = (queue.value.head + 1) % queue.value.items.count
            queue.value.count -= 1
            lock.unlock()
            work()
            lock.lock()
        }
        lock.unlock()
    }

    /// Finishes queued work, then stops the threads.
    public func shutdown() {
        let threads = queue.withLock { q -> [OSThread] in
            q.stopping = true
            defer { q.threads.removeAll() }
            return q.threads
        }
        lock.broadcast()
        for t in threads { t.join() }
    }
}
