import BlockCore
import BlockJobs
import JSON
import Synchronization
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A mirror-like body: copies a few steps, becomes ready, idles until completed or cancelled.
final class ReadyBody: JobBody, @unchecked Sendable {
    let type = "commit"
    var canComplete: Bool { true }
    let prepared = Mutex<String>("")
    func run(_ job: Job) throws(BlockError) {
        job.setTotal(3000)
        for _ in 0..<3 {
            job.addProgress(1000)
            try job.checkpoint(copied: 1000)
        }
        job.setReady()
        while !job.shouldFinish { try job.idle(nanos: 5_000_000) }
    }
    func prepare(_ job: Job) throws(BlockError) {
        let what = job.softCancelled ? "no pivot" : "pivot"
        prepared.withLock { $0 = what }
    }
    func abort(_ job: Job) {}
    func clean(_ job: Job?) {}
}

@Suite struct ReadyJobTests {
    @Test func completeWhileReadyPivots() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        let body = ReadyBody()
        let job = try reg.start(id: "c", body: body, host: host)
        #expect(host.waitFor("BLOCK_JOB_READY"))
        #expect(job.info.status == .ready)
        try job.complete()
        #expect(throws: JobError.self) { try job.complete() }
        job.join()
        #expect(host.waitFor("null"))
        #expect(host.list == ["created", "running", "ready", "BLOCK_JOB_READY", "waiting", "pending",
                              "BLOCK_JOB_COMPLETED", "concluded", "null"])
        #expect(body.prepared.withLock { $0 } == "pivot")
    }

    @Test func softCancelWhileReadyCompletesWithoutPivot() throws {
        let host = RecordingHost()
        let body = ReadyBody()
        let job = try JobRegistry().start(id: "c", body: body, host: host)
        #expect(host.waitFor("BLOCK_JOB_READY"))
        try job.cancel(force: false)
        job.join()
        #expect(host.waitFor("null"))
        #expect(host.list.suffix(5) == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"])
        #expect(body.prepared.withLock { $0 } == "no pivot")
    }

    @Test func forceCancelWhileReadyIsCancelled() throws {
        let host = RecordingHost()
        let job = try JobRegistry().start(id: "c", body: ReadyBody(), host: host)
        #expect(host.waitFor("BLOCK_JOB_READY"))
        try job.pause()
        #expect(host.waitFor("standby"))
        try job.cancel(force: true)
        job.join()
        #expect(host.waitFor("null"))
        #expect(host.list.suffix(4) == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"])
    }

    @Test func completeBeforeReadyIsRefused() throws {
        let host = RecordingHost()
        let gate = Gate()
        let job = try JobRegistry().start(id: "c", body: FakeBody(steps: 50, gate: gate), host: host)
        #expect(throws: JobError.self) { try job.complete() }
        try job.cancel(force: true)
        gate.open()
        job.join()
    }
}
