import CLinux
import EventLoop
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct EventLoopTests {
    @Test func executeRunsTasksOnTheLoopThreadInOrder() {
        let group = EventLoopGroup(count: 1, name: "test-loop")
        defer { group.shutdown() }
        let loop = group.loops[0]
        let seen = Mutex<[Int]>([])
        let onLoop = Atomic<Int>(0)
        let done = ConditionLock()
        for i in 0..<1000 {
            loop.execute {
                if loop.inLoopThread { onLoop.wrappingAdd(1, ordering: .relaxed) }
                seen.withLock { $0.append(i) }
                if i == 999 { done.withLock { done.signal() } }
            }
        }
        done.withLock { while seen.withLock({ $0.count }) < 1000 { _ = done.wait(seconds: 0.1) } }
        #expect(seen.withLock { $0 } == Array(0..<1000))
        #expect(onLoop.load(ordering: .relaxed) == 1000)
    }

    @Test func workerPoolRunsEverything() {
        let pool = WorkerPool(threads: 4, name: "test-worker")
        let count = Atomic<Int>(0)
        for _ in 0..<5000 { pool.submit { count.wrappingAdd(1, ordering: .relaxed) } }
        pool.shutdown()
        #expect(count.load(ordering: .relaxed) == 5000)
    }

    /// The file driver's debug assert (no file syscall that may sleep on a loop thread) relies
    /// on this thread-local mark: set on loop threads, never on workers or other threads.
    @Test func loopThreadsAreMarkedWorkersAreNot() {
        let group = EventLoopGroup(count: 1, name: "mark-loop")
        defer { group.shutdown() }
        let pool = WorkerPool(threads: 1, name: "mark-worker")
        let marks = Mutex<[Int32]>([])
        let done = ConditionLock()
        group.loops[0].execute {
            marks.withLock { $0.append(clinux_is_loop_thread()) }
            pool.submit {
                marks.withLock { $0.append(clinux_is_loop_thread()) }
                done.withLock { done.signal() }
            }
        }
        let deadline = monotonicNanos() + 10_000_000_000
        done.withLock {
            while marks.withLock({ $0.count }) < 2 && monotonicNanos() < deadline { _ = done.wait(seconds: 0.1) }
        }
        pool.shutdown()
        #expect(marks.withLock { $0 } == [1, 0])
        #expect(clinux_is_loop_thread() == 0)
    }
}
