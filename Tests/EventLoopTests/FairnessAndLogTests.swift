import EventLoop
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

final class Journal: Sendable {
    let lines = Mutex<[String]>([])
    func append(_ s: String) { lines.withLock { $0.append(s) } }
    var all: [String] { lines.withLock { $0 } }
}

/// A handler that records its calls; on events 0 (a `runAgain` turn) it asks again until
/// `turns` runs are done.
final class Repeater: EventHandler, @unchecked Sendable {
    // Touched on the loop thread only, read by the test after a barrier through `execute`.
    let loop: EventLoop
    let name: String
    let log: Journal
    var id: UInt64 = 0
    var turns: Int
    init(loop: EventLoop, name: String, turns: Int, log: Journal) {
        self.loop = loop
        self.name = name
        self.turns = turns
        self.log = log
    }
    func handleEvents(_ events: UInt32) {
        log.append("\(name):\(events)")
        turns -= 1
        if turns > 0 { loop.runAgain(id: id) }
    }
}

@Suite struct FairnessAndLogTests {
    /// Two handlers that each have more work than one turn: `runAgain` alternates them, and
    /// nothing else (tasks from other threads) waits behind either.
    @Test func runAgainInterleavesHandlersAndTasks() throws {
        let group = EventLoopGroup(count: 1, name: "test-again")
        defer { group.shutdown() }
        let loop = group.loops[0]
        let log = Journal()
        let a = Repeater(loop: loop, name: "a", turns: 3, log: log)
        let b = Repeater(loop: loop, name: "b", turns: 3, log: log)
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let (r0, r1) = (fds[0], fds[1])
        let done = ConditionLock()
        let finished = Atomic<Bool>(false)
        let boxes = UnsafeTransfer((a, b))
        loop.execute {
            let (a, b) = boxes.value
            // Registered for nothing that will fire: only runAgain calls them.
            a.id = loop.register(fd: r0, events: 0, handler: a)
            b.id = loop.register(fd: r1, events: 0, handler: b)
            loop.runAgain(id: a.id)
            loop.runAgain(id: b.id)
            loop.execute { log.append("task") }
        }
        loop.execute {
            // Runs after the handlers are done (each turn re-arms at most once).
            loop.schedule(after: 0.05) {
                finished.store(true, ordering: .relaxed)
                done.withLock { done.signal() }
            }
        }
        done.withLock { while !finished.load(ordering: .relaxed) { _ = done.wait(seconds: 0.1) } }
        let seen = log.all
        #expect(seen.filter { $0 != "task" } == ["a:0", "b:0", "a:0", "b:0", "a:0", "b:0"])
        // The task queued from the loop ran before the handlers' last turns.
        #expect(seen.firstIndex(of: "task").map { $0 < 5 } == true, "\(seen)")
    }

    @Test func rateLimiterAllowsABurstThenARate() {
        var limiter = LogRateLimiter(burst: 3, perSecond: 2)
        let t0 = monotonicNanos() + 1_000_000_000
        var burst: [Bool] = []
        for _ in 0..<5 { burst.append(limiter.allow(now: t0)) }
        #expect(burst == [true, true, true, false, false])
        #expect(limiter.suppressed == 2)
        let early = limiter.allow(now: t0 + 100_000_000)
        #expect(!early, "0.1 s refills a fifth of a line")
        let refilled = limiter.allow(now: t0 + 600_000_000)
        #expect(refilled, "0.6 s refills one line")
        let suppressed = limiter.takeSuppressed()
        #expect(suppressed == 3)
        #expect(limiter.suppressed == 0)
        // Long quiet: back to a full burst, not more.
        var later: [Bool] = []
        for _ in 0..<4 { later.append(limiter.allow(now: t0 + 100_000_000_000)) }
        #expect(later == [true, true, true, false])
    }
}
