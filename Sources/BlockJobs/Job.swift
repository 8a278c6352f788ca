import BlockCore
import EventLoop
import Synchronization

/// Something that happened to a job, for its host to report (the daemon turns these into
/// QMP events: QEMU's `JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`, …). Jobs know no QMP.
public enum JobEvent: Sendable, Equatable {
    /// The job's status changed (sent while the job's lock is held: the host must not call
    /// back into the job).
    case statusChange(JobStatus)
    /// The job caught up and accepts `complete` (mirror-like jobs).
    case ready
    /// Finished: successfully (`error` nil) or with an error.
    case completed(error: String?)
    case cancelled
    /// Waiting for `finalize` (`auto-finalize` off).
    case pending
    /// An I/O error and what `on-error` made of it (`action`: `ignore`, `stop`, `report`).
    case ioError(operation: String, action: String)
}

/// Where a job sends its events and how it enters the daemon's control context.
public protocol JobHost: AnyObject, Sendable {
    /// Reports an event of `job`.
    func jobEvent(_ event: JobEvent, job: Job)
    /// Runs `body` in the control context (the QMP control lock): graph changes at completion.
    func withControl(_ body: () -> Void)
}

/// What one kind of job does; the `Job` runs it and owns the state machine.
public protocol JobBody: AnyObject, Sendable {
    /// QAPI `JobType` (`stream`, `commit`…).
    var type: String { get }
    /// The job's loop, on the job's own thread. Calls `job.checkpoint()` between chunks.
    func run(_ job: Job) throws(BlockError)
    /// On success, in the control context: the graph change. Throwing aborts the job.
    func prepare(_ job: Job) throws(BlockError)
    /// On failure or cancel, in the control context: undo what `run` set up.
    func abort(_ job: Job)
    /// Always, last, in the control context: unfreeze, release resources. `nil` when the job
    /// could not be created.
    func clean(_ job: Job?)
    /// Whether `job-complete` applies (jobs that reach READY).
    var canComplete: Bool { get }
    /// `block-job-change` (QEMU 8.2): a mirror switches to write-blocking copy mode.
    func change(copyMode: MirrorCopyMode) throws(JobError)
}

extension JobBody {
    public var canComplete: Bool { false }
    public func change(copyMode: MirrorCopyMode) throws(JobError) {
        throw JobError("Job type does not support change")
    }
}

/// The job was cancelled: `run` stops early by throwing this.
public let jobCancelled = BlockError(125 /* ECANCELED */, "job cancelled")

/// One job: QEMU's job model (`job.c`) with its verbs, events and pause points.
///
/// The body runs on its own thread (never an event loop). Verbs come from the control context
/// and only change flags and wake the thread; they never wait for it.
public final class Job: Sendable {
    public let id: String
    public let body: any JobBody
    public let autoFinalize: Bool
    public let autoDismiss: Bool
    public let onError: OnError
    private weak let registry: JobRegistry?
    private let host: any JobHost

    private struct State {
        var status: JobStatus = .undefined
        var pauseCount = 0
        var userPaused = false
        var cancelled = false
        var force = false
        var busy = false
        var limiter = RateLimiter()
        var current: UInt64 = 0
        var total: UInt64 = 0
        var error: String?
        var ioStatus = "ok"
        var wakeups = 0
        /// `job-complete` arrived while ready (mirror-like jobs: pivot now).
        var completeRequested = false
        /// A soft cancel (`block-job-cancel` without force) of a ready job: QEMU ends such a
        /// job successfully without its graph change (BLOCK_JOB_COMPLETED, no pivot).
        var softCancelled = false
        /// The job's thread has run its last line of job code (`join` waits for it; the
        /// thread is detached).
        var threadDone = false
        /// The job's thread was started.
        var started = false
        /// `run` returned (with `runFailure`); its completion is still to be done.
        var ranToEnd = false
        var runFailure: BlockError?
        /// The completion after `run` was taken, by the job thread or by `cancelSync`.
        var completionTaken = false
    }
    /// Everything that changes, behind the job's lock (verbs, the job thread, queries).
    private let guarded: LockGuarded<State>
    private var lock: ConditionLock { guarded.lock }
    private var state: State {
        get { guarded.value }
        _modify { yield &guarded.value }
    }

    init(id: String, body: any JobBody, speed: UInt64, autoFinalize: Bool, autoDismiss: Bool,
         onError: OnError, host: any JobHost, registry: JobRegistry) {
        self.id = id
        self.body = body
        self.autoFinalize = autoFinalize
        self.autoDismiss = autoDismiss
        self.onError = onError
        self.host = host
        self.registry = registry
        var initial = State()
        initial.limiter = RateLimiter(speed: speed)
        guarded = LockGuarded(initial)
    }

    private func locked<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    // MARK: snapshot

    public struct Info: Sendable {
        public var status: JobStatus
        public var busy: Bool
        public var paused: Bool
        public var speed: UInt64
        public var current: UInt64
        public var total: UInt64
        public var error: String?
        public var ioStatus: String
    }

    public var info: Info {
        locked {
            Info(status: state.status, busy: state.busy, paused: state.pauseCount > 0,
                 speed: state.limiter.speed, current: state.current, total: state.total,
                 error: state.error, ioStatus: state.ioStatus)
        }
    }

    public var status: JobStatus { locked { state.status } }
    public var isCancelled: Bool { locked { state.cancelled } }
    /// `job-complete` was accepted: a ready job should finish and do its graph change.
    public var completeRequested: Bool { locked { state.completeRequested } }
    /// A ready job was cancelled softly: finish successfully without the graph change.
    public var softCancelled: Bool { locked { state.softCancelled } }
    /// The job should leave its ready loop (completion or a soft cancel).
    public var shouldFinish: Bool { locked { state.completeRequested || state.softCancelled } }

    // MARK: transitions

    /// Call with `lock` held.
    private func transition(to next: JobStatus) {
        let from = state.status
        precondition(from == next || JobStateMachine.canTransition(from: from, to: next),
                     "job '\(id)': illegal transition \(from.rawValue) -> \(next.rawValue)")
        state.status = next
        if from != next { host.jobEvent(.statusChange(next), job: self) }
    }

    private func check(_ verb: JobVerb) throws(JobError) {
        let s = state.status
        if !JobStateMachine.allows(verb, in: s) {
            throw JobError("Job '\(id)' in state '\(s.rawValue)' cannot accept command verb '\(verb.rawValue)'")
        }
    }

    // MARK: thread side

    func created() {
        locked { transition(to: .created) }
    }

    /// Starts a job made with `JobRegistry.create` (a transaction's commit).
    public func begin() {
        locked {
            transition(to: .running)
            state.busy = true
            state.started = true
        }
        // Detached: nothing has to join a job for its thread to go away (a daemon runs jobs
        // for months); `join()` waits for `threadDone` instead.
        OSThread.start(name: "job-\(id)", detached: true) { [self] in threadMain() }
    }

    private func threadMain() {
        var failure: BlockError?
        do throws(BlockError) { try body.run(self) } catch { failure = error }
        locked {
            state.busy = false
            state.ranToEnd = true
            state.runFailure = failure
            lock.broadcast()
        }
        host.withControl { completeAfterRun() }
        locked {
            state.threadDone = true
            lock.broadcast()
        }
    }

    /// The completion after `run` (control context), done once: by the job thread, or by
    /// `cancelSync` when it holds the control context the thread waits for.
    private func completeAfterRun() {
        let failure = locked { () -> BlockError?? in
            if !state.ranToEnd || state.completionTaken { return nil }
            state.completionTaken = true
            return .some(state.runFailure)
        }
        if let failure { completed(failure) }
    }

    /// Cancels the job (force) and waits until it has ended, from the control context:
    /// QEMU's `job_cancel_sync`, as qemu-storage-daemon does for every job before it quits.
    /// The job's thread cannot enter the control context while the caller holds it, so the
    /// caller does the job's completion itself once `run` has returned. A job that has ended
    /// already, or that waits for `job-finalize`/`job-dismiss`, is left as it is.
    public func cancelSync() {
        do throws(JobError) { try cancel(force: true) } catch { return }
        locked {
            while state.started && !state.ranToEnd { lock.wait() }
        }
        completeAfterRun()
    }

    /// Progress for `offset`/`len`.
    public func setTotal(_ total: UInt64) { locked { state.total = total } }
    public func addProgress(_ bytes: UInt64) { locked { state.current += bytes } }
    public func addTotal(_ bytes: UInt64) { locked { state.total += bytes } }
    /// QEMU's `progress_set_remaining`: the total becomes what is done plus `bytes`.
    public func setRemaining(_ bytes: UInt64) { locked { state.total = state.current + bytes } }

    /// A pause point plus the rate limit: charges `bytes` just copied, sleeps as `speed` asks
    /// (waking early for pause, cancel or a new speed), parks while paused. Throws
    /// `jobCancelled` once the job is cancelled.
    public func checkpoint(copied bytes: UInt64 = 0) throws(BlockError) {
        lock.lock()
        defer { lock.unlock() }
        var delay = state.limiter.delay(after: bytes)
        while true {
            if state.cancelled { throw jobCancelled }
            if state.pauseCount > 0 {
                let resumeTo = state.status
                transition(to: resumeTo == .ready ? .standby : .paused)
                state.busy = false
                while state.pauseCount > 0 && !state.cancelled { lock.wait() }
                state.busy = true
                transition(to: resumeTo)
                delay = 0
                continue
            }
            if delay == 0 { return }
            let seen = state.wakeups
            state.busy = false
            let start = monotonicNanos()
            _ = lock.wait(seconds: Double(delay) / 1e9)
            state.busy = true
            if state.wakeups != seen {
                // Woken for a verb: recompute with the (maybe new) speed.
                delay = state.limiter.delay(after: 0)
                continue
            }
            let slept = monotonicNanos() - start
            delay = slept >= delay ? 0 : delay - slept
        }
    }

    /// The job has caught up (mirror-like jobs): `JOB_STATUS_CHANGE ready`, then
    /// `BLOCK_JOB_READY`, as QEMU's `job_transition_to_ready` sends them. From now on
    /// `job-complete` is accepted.
    public func setReady() {
        locked {
            guard state.status == .running else { return }
            transition(to: .ready)
        }
        host.jobEvent(.ready, job: self)
    }

    /// Sleeps up to `nanos` (a ready job waiting for new work), waking early for any verb;
    /// a pause point like `checkpoint`. Throws `jobCancelled` once cancelled.
    public func idle(nanos: UInt64) throws(BlockError) {
        lock.lock()
        let seen = state.wakeups
        if !state.cancelled && state.pauseCount == 0 && !state.completeRequested && !state.softCancelled {
            state.busy = false
            _ = lock.wait(seconds: Double(nanos) / 1e9)
            state.busy = true
        }
        _ = seen
        lock.unlock()
        try checkpoint()
    }

    /// Wakes the job thread (new work arrived for a ready job).
    public func wake() {
        locked {
            state.wakeups += 1
            lock.broadcast()
        }
    }

    /// An I/O error in `run`: applies `on-error` and reports `BLOCK_JOB_ERROR`. Returns true
    /// when the body should retry the operation (after a `stop` and a resume), false to skip
    /// it (`ignore`); throws to fail the job (`report`).
    /// `policy`: the error policy for this side when the job has two (mirror's
    /// `on-source-error` / `on-target-error`); the job's `onError` otherwise.
    public func handleIOError(_ error: BlockError, operation: String, policy: OnError? = nil) throws(BlockError) -> Bool {
        let action: String
        switch policy ?? onError {
        case .ignore: action = "ignore"
        case .stop, .auto: action = "stop"
        case .enospc: action = error.errno == 28 /* ENOSPC */ ? "stop" : "report"
        case .report: action = "report"
        }
        host.jobEvent(.ioError(operation: operation, action: action), job: self)
        switch action {
        case "ignore":
            locked { if state.error == nil { state.error = error.message } }
            return false
        case "stop":
            locked {
                state.ioStatus = error.errno == 28 ? "nospace" : "failed"
                state.pauseCount += 1
                state.userPaused = true
            }
            try checkpoint()
            locked { state.ioStatus = "ok" }
            return true
        default:
            throw error
        }
    }

    /// Errors remembered by `ignore`: the job ends with this error instead of completing.
    var ignoredError: String? { locked { state.error } }

    // MARK: completion (control context)

    private func completed(_ failure: BlockError?) {
        let cancelled = isCancelled
        if cancelled || failure != nil || ignoredError != nil {
            let message = cancelled ? nil : (failure?.message ?? ignoredError)
            abortPath(error: message, cancelled: cancelled && (failure == nil || failure!.errno == jobCancelled.errno))
            return
        }
        locked {
            transition(to: .waiting)
            transition(to: .pending)
        }
        if autoFinalize {
            finalizeNow()
        } else {
            host.jobEvent(.pending, job: self)
        }
    }

    private func finalizeNow() {
        do throws(BlockError) {
            try body.prepare(self)
        } catch {
            abortPath(error: error.message, cancelled: false)
            return
        }
        body.clean(self)
        host.jobEvent(.completed(error: nil), job: self)
        conclude()
    }

    private func abortPath(error: String?, cancelled: Bool) {
        locked {
            state.error = error ?? "Operation canceled"
            state.busy = false
            transition(to: .aborting)
        }
        body.abort(self)
        body.clean(self)
        if cancelled {
            host.jobEvent(.cancelled, job: self)
        } else {
            host.jobEvent(.completed(error: error ?? "Operation canceled"), job: self)
        }
        conclude()
    }

    private func conclude() {
        locked { transition(to: .concluded) }
        if autoDismiss { dismissNow() }
    }

    private func dismissNow() {
        locked { transition(to: .null) }
        registry?.remove(self)
    }

    // MARK: verbs (control context)

    public func pause() throws(JobError) {
        try locked { () throws(JobError) in
            try check(.pause)
            if state.userPaused { throw JobError("Job is already paused") }
            state.userPaused = true
            state.pauseCount += 1
            state.wakeups += 1
            lock.broadcast()
        }
    }

    public func resume() throws(JobError) {
        try locked { () throws(JobError) in
            // QEMU's job_user_resume checks user_paused before the verb table.
            if !state.userPaused { throw JobError("Can't resume a job that was not paused") }
            try check(.resume)
            state.userPaused = false
            state.pauseCount -= 1
            state.wakeups += 1
            lock.broadcast()
        }
    }

    public func setSpeed(_ speed: Int64) throws(JobError) {
        try locked { () throws(JobError) in
            try check(.setSpeed)
            if speed < 0 { throw JobError("Parameter 'speed' expects a non-negative value") }
            state.limiter.setSpeed(UInt64(speed))
            state.wakeups += 1
            lock.broadcast()
        }
    }

    public func cancel(force: Bool) throws(JobError) {
        let pendingNow = try locked { () throws(JobError) -> Bool in
            try check(.cancel)
            if !force && (state.status == .ready || state.status == .standby) {
                // QEMU: a soft cancel of a ready mirror/commit completes without pivot.
                state.softCancelled = true
                if state.userPaused {
                    state.userPaused = false
                    state.pauseCount -= 1
                }
                state.wakeups += 1
                lock.broadcast()
                return false
            }
            state.cancelled = true
            state.force = force
            if state.userPaused {
                state.userPaused = false
                state.pauseCount -= 1
            }
            state.wakeups += 1
            lock.broadcast()
            return state.status == .pending
        }
        // A job waiting for job-finalize has no thread left: abort it here.
        if pendingNow { abortPath(error: nil, cancelled: true) }
    }

    public func complete() throws(JobError) {
        try locked { () throws(JobError) in
            try check(.complete)
            guard body.canComplete else { throw JobError("Job '\(id)' cannot be completed") }
            if state.completeRequested || state.softCancelled {
                throw JobError("Job '\(id)' has already been completed or cancelled")
            }
            state.completeRequested = true
            state.wakeups += 1
            lock.broadcast()
        }
    }

    /// `block-job-change`: the verb check, then the job type's change.
    public func change(copyMode: MirrorCopyMode) throws(JobError) {
        try locked { () throws(JobError) in try check(.change) }
        try body.change(copyMode: copyMode)
    }

    public func finalize() throws(JobError) {
        try locked { () throws(JobError) in try check(.finalize) }
        finalizeNow()
    }

    public func dismiss() throws(JobError) {
        try locked { () throws(JobError) in try check(.dismiss) }
        dismissNow()
    }

    /// Drops a job made with `JobRegistry.create` that never started (its transaction
    /// failed): QEMU's `job_cancel_sync` of a created job — aborting, concluded, null, with
    /// no `BLOCK_JOB_CANCELLED`.
    public func abandon() {
        locked {
            state.cancelled = true
            state.error = "Operation canceled"
            transition(to: .aborting)
            state.threadDone = true
        }
        body.abort(self)
        body.clean(self)
        locked { transition(to: .concluded) }
        dismissNow()
    }

    /// Waits until the job's thread has finished its work (tests, shutdown); returns at once
    /// for a job that never started.
    public func join() {
        lock.lock()
        defer { lock.unlock() }
        while state.started && !state.threadDone { lock.wait() }
    }
}

/// The daemon's jobs, in creation order.
public final class JobRegistry: Sendable {
    private let jobs = Mutex<[Job]>([])

    public init() {}

    public var all: [Job] { jobs.withLock { $0 } }

    public func job(id: String) -> Job? { jobs.withLock { $0.first { $0.id == id } } }

    /// `job-*` commands: unknown ids are a GenericError.
    public func find(_ id: String) throws(JobError) -> Job {
        guard let job = job(id: id) else { throw JobError("Job not found") }
        return job
    }

    /// `block-job-*` commands: unknown ids are DeviceNotActive, as QEMU answers.
    public func findBlockJob(_ id: String) throws(JobError) -> Job {
        guard let job = job(id: id) else { throw JobError("Block job '\(id)' not found", kind: .deviceNotActive) }
        return job
    }

    /// Creates and starts a job. The id must be unique among jobs that are not yet dismissed.
    @discardableResult
    public func start(id: String, body: any JobBody, speed: Int64 = 0, autoFinalize: Bool = true,
                      autoDismiss: Bool = true, onError: OnError = .report, host: any JobHost) throws(JobError) -> Job {
        let job = try create(id: id, body: body, speed: speed, autoFinalize: autoFinalize, autoDismiss: autoDismiss,
                             onError: onError, host: host)
        job.begin()
        return job
    }

    /// Creates a job in state `created` without starting it (a transaction's prepare): start
    /// it with `begin()`, or drop it with `abandon()`.
    public func create(id: String, body: any JobBody, speed: Int64 = 0, autoFinalize: Bool = true,
                       autoDismiss: Bool = true, onError: OnError = .report, host: any JobHost) throws(JobError) -> Job {
        try JobRegistry.validate(id: id)
        if speed < 0 { throw JobError("Parameter 'speed' expects a non-negative value") }
        let job = Job(id: id, body: body, speed: UInt64(speed), autoFinalize: autoFinalize,
                      autoDismiss: autoDismiss, onError: onError, host: host, registry: self)
        let clash = jobs.withLock { list -> Bool in
            if list.contains(where: { $0.id == id }) { return true }
            list.append(job)
            return false
        }
        if clash { throw JobError("Job ID '\(id)' already in use") }
        job.created()
        return job
    }

    func remove(_ job: Job) {
        jobs.withLock { $0.removeAll { $0 === job } }
    }

    /// QEMU's `id_wellformed`: a letter first, then letters, digits, `-`, `.`, `_`.
    public static func validate(id: String) throws(JobError) {
        let bytes = Array(id.utf8)
        let ok = !bytes.isEmpty
            && ((bytes[0] >= 65 && bytes[0] <= 90) || (bytes[0] >= 97 && bytes[0] <= 122))
            && bytes.allSatisfy { c in
                (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || (c >= 48 && c <= 57)
                    || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_")
            }
        if !ok { throw JobError("Invalid job ID '\(id)'") }
    }
}
