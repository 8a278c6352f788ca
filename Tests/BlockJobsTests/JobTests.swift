import BlockCore
import BlockJobs
import JSON
import Synchronization
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

final class RecordingHost: JobHost, @unchecked Sendable {
    let events = Mutex<[String]>([])
    let control = Mutex(())
    func jobEvent(_ event: JobEvent, job: Job) {
        let tag: String
        switch event {
        case .statusChange(let s): tag = s.rawValue
        case .ready: tag = "BLOCK_JOB_READY"
        case .completed: tag = "BLOCK_JOB_COMPLETED"
        case .cancelled: tag = "BLOCK_JOB_CANCELLED"
        case .pending: tag = "BLOCK_JOB_PENDING"
        case .ioError: tag = "BLOCK_JOB_ERROR"
        }
        events.withLock { $0.append(tag) }
    }
    func withControl(_ body: () -> Void) { control.withLock { _ in body() } }
    var list: [String] { events.withLock { $0 } }
    func waitFor(_ tag: String, seconds: Double = 5) -> Bool {
        for _ in 0..<Int(seconds * 100) {
            if list.contains(tag) { return true }
            usleep(10_000)
        }
        return false
    }
}

final class FakeBody: JobBody, @unchecked Sendable {
    let type = "stream"
    let steps: Int
    let failAt: Int?
    let prepareFails: Bool
    /// When set, each step waits here first: the test decides how far the job gets.
    let gate: Gate?
    init(steps: Int = 20, failAt: Int? = nil, prepareFails: Bool = false, gate: Gate? = nil) {
        self.steps = steps
        self.failAt = failAt
        self.prepareFails = prepareFails
        self.gate = gate
    }
    func run(_ job: Job) throws(BlockError) {
        job.setTotal(UInt64(steps) * 1000)
        for i in 0..<steps {
            if i == failAt { throw BlockError.io("read failed") }
            if let gate, !gate.pass() { throw BlockError.io("test gate never opened") }
            job.addProgress(1000)
            try job.checkpoint(copied: 1000)
        }
    }
    func prepare(_ job: Job) throws(BlockError) { if prepareFails { throw BlockError.io("cannot switch") } }
    func abort(_ job: Job) {}
    func clean(_ job: Job?) {}
}

@Suite struct JobStateMachineTests {
    @Test func tableMatchesQEMU() {
        #expect(JobStateMachine.canTransition(from: .running, to: .paused))
        #expect(!JobStateMachine.canTransition(from: .paused, to: .concluded))
        #expect(JobStateMachine.canTransition(from: .pending, to: .aborting))
        #expect(JobStateMachine.allows(.complete, in: .ready))
        #expect(!JobStateMachine.allows(.complete, in: .running))
        #expect(JobStateMachine.allows(.dismiss, in: .concluded))
        #expect(!JobStateMachine.allows(.cancel, in: .concluded))
    }

    @Test func successEventsInQEMUOrder() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        let job = try reg.start(id: "j0", body: FakeBody(steps: 3), host: host)
        job.join()
        #expect(host.waitFor("null"))
        #expect(host.list == ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"])
        #expect(reg.job(id: "j0") == nil)
    }

    @Test func manualFinalizeAndDismiss() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        let job = try reg.start(id: "j0", body: FakeBody(steps: 2), autoFinalize: false, autoDismiss: false, host: host)
        job.join()
        #expect(host.waitFor("BLOCK_JOB_PENDING"))
        #expect(job.status == .pending)
        #expect(throws: JobError.self) { try job.dismiss() }
        try host.control.withLock { _ in try job.finalize() }
        #expect(job.status == .concluded)
        try job.dismiss()
        #expect(host.list == ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED", "concluded", "null"])
    }

    /// `cancelSync` from the control context (as `quit` calls it): the job's thread cannot
    /// enter the control context meanwhile, so the caller ends the job itself; the job is
    /// gone (cancelled) when it returns, and its thread ends once the caller lets go.
    @Test func cancelSyncInsideTheControlContext() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        let gate = Gate()
        let job = try reg.start(id: "j0", body: FakeBody(steps: 500, gate: gate), host: host)
        gate.allow(1)
        #expect(waitUntil { job.info.current == 1000 }, "the job never started")
        host.control.withLock { _ in
            gate.open()
            job.cancelSync()
            #expect(host.list.suffix(4) == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"])
            #expect(reg.job(id: "j0") == nil)
        }
        job.join()
        #expect(host.list.filter { $0 == "BLOCK_JOB_CANCELLED" }.count == 1)
        // Ended jobs are left alone.
        job.cancelSync()
    }

    @Test func pauseResumeCancel() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        let gate = Gate()
        let job = try reg.start(id: "j0", body: FakeBody(steps: 500, gate: gate), host: host)
        try job.pause()
        #expect(throws: JobError.self) { try job.pause() }
        // One step, then the job parks at its checkpoint.
        gate.allow(1)
        #expect(host.waitFor("paused"))
        #expect(job.info.paused && !job.info.busy)
        let at = job.info.current
        #expect(at == 1000)
        // A parked job takes no step even when one is allowed; resumed, it does.
        gate.allow(1)
        #expect(job.info.current == at && gate.passed == 1)
        try job.resume()
        #expect(throws: JobError.self) { try job.resume() }
        #expect(waitUntil { job.info.current == at + 1000 }, "no progress after resume")
        try job.cancel(force: false)
        gate.open()
        job.join()
        #expect(host.waitFor("null"))
        #expect(host.list == ["created", "running", "paused", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"])
    }

    @Test func errorReportsAndConcludes() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        let job = try reg.start(id: "j0", body: FakeBody(steps: 5, failAt: 2), autoDismiss: false, host: host)
        job.join()
        #expect(host.waitFor("concluded"))
        #expect(job.info.error == "read failed")
        #expect(host.list == ["created", "running", "aborting", "BLOCK_JOB_COMPLETED", "concluded"])
    }

    @Test func duplicateAndInvalidIDs() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        let gate = Gate()
        let job = try reg.start(id: "j0", body: FakeBody(steps: 100, gate: gate), host: host)
        #expect(throws: JobError("Job ID 'j0' already in use")) { try reg.start(id: "j0", body: FakeBody(), host: host) }
        #expect(throws: JobError("Invalid job ID ''")) { try reg.start(id: "", body: FakeBody(), host: host) }
        #expect(throws: JobError("Block job 'x' not found", kind: .deviceNotActive)) { try reg.findBlockJob("x") }
        #expect(throws: JobError("Job not found")) { try reg.find("x") }
        try job.cancel(force: true)
        gate.open()
        job.join()
    }

    @Test func speedLimitsProgress() throws {
        let host = RecordingHost()
        let reg = JobRegistry()
        // 20 steps of 1000 bytes at 40 kB/s: about half a second (less the 100 ms burst).
        let start = monotonicNanosForTest()
        let job = try reg.start(id: "j0", body: FakeBody(steps: 20), speed: 40_000, host: host)
        job.join()
        let seconds = Double(monotonicNanosForTest() - start) / 1e9
        #expect(seconds > 0.3 && seconds < 2)
    }
}

@Suite struct RateLimiterTests {
    @Test func unlimitedNeverWaits() {
        var r = RateLimiter(speed: 0, now: 0)
        #expect(r.delay(after: 1 << 30, now: 1) == 0)
    }

    @Test func waitsForTheDeficit() {
        var r = RateLimiter(speed: 1_000_000, now: 0)  // burst 100 kB
        #expect(r.delay(after: 100_000, now: 0) == 0)
        // Another 500 kB at the same instant: half a second of deficit.
        let d = r.delay(after: 500_000, now: 0)
        #expect(d > 490_000_000 && d < 510_000_000)
        // After waiting it out, a small chunk goes through again.
        #expect(r.delay(after: 0, now: d) == 0)
    }

    @Test func refillIsCappedAtBurst() {
        var r = RateLimiter(speed: 1_000_000, now: 0)
        _ = r.delay(after: 0, now: 10_000_000_000)  // ten idle seconds
        #expect(r.delay(after: 100_000, now: 10_000_000_000) == 0)
        #expect(r.delay(after: 100_000, now: 10_000_000_000) > 0)
    }
}

func monotonicNanosForTest() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
