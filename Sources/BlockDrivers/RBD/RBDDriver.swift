import BlockCore
import CLinux
import CRBD
import EventLoop
import JSON
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The `rbd` protocol driver: a node whose data is a Ceph RBD image, through librbd.
///
/// Natively asynchronous (`AsyncBlockDriver`): reads, writes, write-zeroes, discards and
/// flushes are started with librbd's `rbd_aio_*` calls on whichever thread submits them (an
/// event loop, usually), and never wait. librbd signals finished requests on an eventfd
/// (`rbd_set_image_notification`) that is registered on one event loop, the node's *home*
/// loop; there the completions are collected with `rbd_poll_io_events` and handed to their
/// `BlockIO`s (which hop to the submitter's loop when it is another). No thread per request,
/// and no loop ever waits on the cluster.
///
/// Block status (`rbd_diff_iterate2`) and resizing (`rbd_resize`) are synchronous cluster
/// calls: they run on workers and job threads (on a loop they throw `.wouldBlock`).
///
/// Semantics: FUA is a flush after the change (librbd's cache may hold writes until a flush);
/// write-zeroes without `.mayUnmap` (NBD `NO_HOLE`) keeps the range allocated
/// (`RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`, which QEMU 7.2 means to pass but never does);
/// with `.mayUnmap` whole objects are removed. A fast zero (`.noFallback`) that must stay
/// allocated is refused with ENOTSUP (it writes zero data). Writes past the end grow the
/// image first, as QEMU does (on a worker).
///
/// The home loop follows the work: when 512 requests in a row are submitted on another loop
/// (an export's only client lives there), the eventfd moves to that loop, so its completions
/// no longer hop through an inbox.
///
/// Thread safety (`@unchecked Sendable`): the handle's fields are fixed once open; `size`,
/// `closed`, `inFlight`, `homeIndex`, `foreignSubmits` are atomics; the registration is under
/// `home`'s lock and changed only on the loop it names; the completion buffer is used only by
/// whichever loop holds the registration (one at a time: a move unregisters on the old loop
/// before it registers on the new one), and by `close` once the registration is gone.
public final class RBDDriver: BlockDriver, AsyncBlockDriver, EventHandler, @unchecked Sendable {
    public let driverName = "rbd"
    public let role = DriverRole.protocol
    let handle: RBDImageHandle
    private let api: blockd_rbd_api
    private let image: rbd_image_t
    private let loops: [EventLoop]
    /// Where the eventfd is registered, and whether it is moving to another loop.
    private let home: Mutex<(index: Int, registration: UInt64, moving: Bool)>
    /// `home.index`, readable without the lock on the submit path.
    private let homeIndex: Atomic<Int>
    /// Requests submitted in a row on loops other than the home loop.
    private let foreignSubmits = Atomic<Int>(0)
    static let moveAfter = 512
    private var homeLoop: EventLoop { loops[homeIndex.load(ordering: .relaxed)] }
    private let sizeValue: Atomic<UInt64>
    private let closed = Atomic<Bool>(false)
    /// Requests handed to librbd whose completion has not been collected yet.
    private let inFlight = Atomic<Int>(0)
    private let resizeLock = Mutex<Void>(())
    private let completions: UnsafeMutablePointer<rbd_completion_t?>
    private static let batch = 64
    /// How long `close` waits for requests still with librbd.
    static let closeWait: UInt64 = 30_000_000_000
    private let failures = FailureLog()
    /// `cache.no-flush` (see `init`).
    private let noFlush: Bool

    public var options: RBDOptions { handle.config.options }
    /// `POOL/[NAMESPACE/]IMAGE[@SNAPSHOT]`.
    public var spec: String { handle.spec }
    /// QEMU's pseudo file name for `query-named-block-nodes`: `json:{"driver": "rbd", …}` with
    /// the options that name the image (never the key).
    public var filename: String? {
        let o = options
        var object: JSONObject = ["driver": "rbd", "pool": .string(o.pool), "image": .string(o.image)]
        if let ns = o.namespace, !ns.isEmpty { object["namespace"] = .string(ns) }
        if let snap = o.snapshot { object["snapshot"] = .string(snap) }
        if let conf = o.conf { object["conf"] = .string(conf) }
        if let user = o.user { object["user"] = .string(user) }
        if !o.servers.isEmpty {
            object["server"] = .array(o.servers.map { .object(["host": .string($0.host), "port": .string($0.port)]) })
        }
        return "json:" + JSONValue.object(object).serialized
    }
    public var objectSize: UInt64 { handle.objectSize }
    /// QEMU's `qemu_rbd_getinfo` answers (the object size as cluster size, never dirty).
    public var answersImageInfo: Bool { true }
    public var clusterSizeInfo: UInt64? { handle.objectSize }
    /// qemu-storage-daemon's `{"type": "rbd", "data": {}}` (no LUKS header: no encryption-format).
    public var formatSpecificInfo: FormatSpecificInfo? { FormatSpecificInfo(type: "rbd", data: []) }
    public var features: UInt64 { handle.features }
    /// True while this node holds the image's exclusive lock.
    public var holdsExclusiveLock: Bool { handle.holdsExclusiveLock }

    /// - Parameter noFlush: `cache.no-flush`: flushes succeed at once, and FUA adds no flush
    ///   (QEMU's `BDRV_O_NO_FLUSH`).
    init(handle: RBDImageHandle, loops: EventLoopGroup, noFlush: Bool = false) throws(BlockError) {
        self.handle = handle
        self.noFlush = noFlush
        self.api = handle.api
        self.image = handle.image!
        self.loops = loops.loops
        let loop = loops.nextLoop()
        let index = self.loops.firstIndex { $0 === loop } ?? 0
        home = Mutex((index, 0, false))
        homeIndex = Atomic(index)
        self.sizeValue = Atomic(handle.size)
        completions = .allocate(capacity: RBDDriver.batch)
        completions.initialize(repeating: nil, count: RBDDriver.batch)
        let fd = handle.eventFD
        let registered = RBDDriver.onLoop(loop) { [self] in
            let id = loop.register(fd: fd, events: clinux_EPOLLIN, handler: self)
            home.withLock { $0.registration = id }
            return id != 0
        }
        if !registered { throw BlockError.io("cannot watch rbd completions of '\(handle.spec)' on an event loop") }
    }

    deinit {
        completions.deallocate()
    }

    // MARK: BlockDriver

    public var length: UInt64 { sizeValue.load(ordering: .acquiring) }
    public var isReadOnly: Bool { handle.config.readOnly }
    public var growsOnWrite: Bool { !handle.config.readOnly }
    public var limits: BlockLimits { BlockLimits(minimum: 1, preferred: 4096, maximum: 32 << 20) }
    public var asyncInterface: (any AsyncBlockDriver)? { self }

    /// The graph's permissions on this node, checked against the other `rbd` nodes of the
    /// same image in this daemon (`RBDImageUsers`), as the file driver's image locks check
    /// them against the other nodes of a file: a writer beside a reader that does not share
    /// writes (a qcow2 node over a read-only node of the image) is refused, either way round.
    public func setPermissions(_ cumulative: PermissionPair) throws(BlockError) {
        if closed.load(ordering: .relaxed) { return }
        try RBDImageUsers.claim(handle.identity, ObjectIdentifier(self), cumulative, spec: spec)
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(.read(at: offset, into: buffer, flags: flags))
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        try growForWrite(to: offset + UInt64(buffer.count), flags: flags)
        _ = try performSynchronously(.write(at: offset, from: buffer, flags: flags))
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try growForWrite(to: offset + length, flags: flags)
        _ = try performSynchronously(BlockRequest(.writeZeroes, offset: offset, length: length, flags: flags))
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(BlockRequest(.discard, offset: offset, length: length, flags: flags))
    }

    public func flush() throws(BlockError) {
        _ = try performSynchronously(BlockRequest(.flush))
    }

    public func truncate(to newLength: UInt64) throws(BlockError) {
        if EventLoop.current != nil { throw .wouldBlock }
        try resizeLock.withLock { _ throws(BlockError) in
            try handle.resize(to: newLength)
            sizeValue.store(newLength, ordering: .releasing)
        }
    }

    /// Grows the image before a write past its end (QEMU's rule). Workers only.
    private func growForWrite(to end: UInt64, flags: RequestFlags) throws(BlockError) {
        if end <= length { return }
        if flags.contains(.noWait) || EventLoop.current != nil { throw .wouldBlock }
        try resizeLock.withLock { _ throws(BlockError) in
            if end <= sizeValue.load(ordering: .acquiring) { return }
            try handle.resize(to: end)
            sizeValue.store(end, ordering: .releasing)
        }
    }

    public func close() throws(BlockError) {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        RBDImageUsers.release(handle.identity, ObjectIdentifier(self))
        // Requests already with librbd finish first (their completions still arrive on the
        // home loop); a node is closed drained, so this only covers stragglers — such as the
        // requests of clients that went away while the cluster does not answer.
        let deadline = monotonicNanos() + RBDDriver.closeWait
        while inFlight.load(ordering: .acquiring) > 0 && !homeLoop.hasStopped && monotonicNanos() < deadline {
            usleep(1_000)
        }
        let left = inFlight.load(ordering: .acquiring)
        if left > 0 && !homeLoop.hasStopped {
            // rbd_close would wait for them without end: leave the image open (its requests
            // still complete on the loop) rather than hang the control thread or shutdown.
            Log.error("rbd '\(spec)': \(left) requests still with the cluster after \(RBDDriver.closeWait / 1_000_000_000) s; the node is closed without waiting for them (the image stays open until blockd exits)")
            return
        }
        // A move of the home loop in progress ends first (its tasks run on live loops).
        while home.withLock({ $0.moving }) && !loops.contains(where: { $0.hasStopped }) { usleep(1_000) }
        let fd = handle.eventFD
        let loop = homeLoop
        RBDDriver.onLoop(loop) { [self] in
            let id = home.withLock { h -> UInt64 in
                defer { h.registration = 0 }
                return h.registration
            }
            if id != 0 { loop.unregister(fd: fd, id: id) }
        }
        // Anything librbd finished after the loop stopped watching (only at shutdown), then
        // the image itself (whose handle `image` names: nothing may use it after this).
        collectCompletions()
        handle.close()
    }

    // MARK: block status

    /// Status from `rbd_diff_iterate2` (QEMU's `qemu_rbd_co_block_status`): with a valid
    /// fast-diff object map, whole objects from the map (no I/O); otherwise the exact extents
    /// of at most 16 objects from the OSDs. Unallocated ranges read as zeroes. Workers only.
    /// Asks the cluster (rbd_diff_iterate2, synchronous): with `.noWait`, or on any event
    /// loop thread, it throws `.wouldBlock` so that a worker asks.
    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        if flags.contains(.noWait) || EventLoop.current != nil { throw .wouldBlock }
        let size = self.length
        guard offset < size else { return BlockStatus(length: max(length, 1), flags: [.zero, .allocated]) }
        var end = min(offset + length, size)
        let object = handle.objectSize
        let fastDiff = useFastDiff()
        if !fastDiff {
            // Listing extents costs one OSD request per object: bound the query.
            end = min(end, (offset / object + 16) * object)
        }
        // librbd before 1.17 reports wrong offsets from the object map for a start that is
        // not object-aligned (Ceph tracker 53784); with whole objects, start at the object.
        let start = fastDiff && RBDLibrary.needsDiffOffsetWorkaround ? offset - offset % object : offset
        var scan = DiffScan(offset: offset)
        let r = withUnsafeMutablePointer(to: &scan) { p in
            api.rbd_diff_iterate2(image, nil, start, end - start, 1, fastDiff ? 1 : 0, { offs, len, exists, arg in
                arg!.assumingMemoryBound(to: DiffScan.self).pointee.add(offs, UInt64(len), exists != 0)
            }, p)
        }
        if r < 0 && r != DiffScan.stop {
            // As QEMU: an unknown status is data (always correct).
            return BlockStatus(length: end - offset, flags: [.data, .allocated])
        }
        let (isData, runEnd) = scan.result(end: end)
        return BlockStatus(length: max(1, min(runEnd, end) - offset), flags: isData ? [.data, .allocated] : [.zero, .allocated])
    }

    private func useFastDiff() -> Bool {
        guard handle.features & blockd_RBD_FEATURE_FAST_DIFF != 0 else { return false }
        var flags: UInt64 = 0
        guard api.rbd_get_flags(image, &flags) == 0, flags & blockd_RBD_FLAG_FAST_DIFF_INVALID == 0 else { return false }
        // Before librbd 1.17 the offset workaround is only right for plain striping and no
        // parent (QEMU's rule); otherwise list the extents.
        if RBDLibrary.needsDiffOffsetWorkaround {
            if handle.features & blockd_RBD_FEATURE_STRIPINGV2 != 0 || handle.hasParent { return false }
        }
        return true
    }

    /// Folds `rbd_diff_iterate2`'s allocated extents (in offset order) into the first run of
    /// uniform status from `offset`.
    struct DiffScan {
        static let stop: Int32 = -9000
        let offset: UInt64
        /// nil until the first extent or gap; true: data, false: hole.
        var kind: Bool?
        var runEnd: UInt64

        init(offset: UInt64) {
            self.offset = offset
            runEnd = offset
        }

        mutating func add(_ offs: UInt64, _ len: UInt64, _ exists: Bool) -> Int32 {
            // Without a start snapshot every extent exists; anything else is a hole.
            if !exists || offs + len <= runEnd { return 0 }
            if offs > runEnd {
                // A gap before this extent.
                if kind == nil {
                    kind = false
                    runEnd = offs
                }
                return DiffScan.stop
            }
            if kind == false { return DiffScan.stop }
            kind = true
            runEnd = offs + len
            return 0
        }

        func result(end: UInt64) -> (isData: Bool, runEnd: UInt64) {
            switch kind {
            case nil: return (false, end)
            case true?: return (true, runEnd)
            case false?: return (false, runEnd)
            }
        }
    }

    // MARK: AsyncBlockDriver

    public func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        if closed.load(ordering: .relaxed) { throw BlockError.io("rbd node for '\(spec)' is closed") }
        var request = request
        request.flags.subtract([.noWait, .bufferedWriteMayBlock])
        switch request.operation {
        case .blockStatus:
            throw .wouldBlock
        case .read:
            if request.length == 0 { return completeLater(io) }
        case .write, .writeZeroes:
            if request.length == 0 { return completeLater(io) }
            // Growing the image is a synchronous cluster call: on a worker.
            if request.offset + request.length > length { throw .wouldBlock }
            if request.operation == .writeZeroes && request.flags.contains(.noFallback) && !request.flags.contains(.mayUnmap) {
                throw BlockError.notSupported("rbd cannot write zeroes that stay allocated faster than zero data")
            }
        case .discard:
            if request.length == 0 { return completeLater(io) }
        case .flush:
            if noFlush { return completeLater(io) }
        }
        if let current = EventLoop.current { followWork(current) }
        let op = RBDRequest(io: io, request: request)
        inFlight.wrappingAdd(1, ordering: .relaxed)
        let r = start(op, flush: request.operation == .flush)
        if r < 0 {
            inFlight.wrappingSubtract(1, ordering: .relaxed)
            throw error(-r, op)
        }
    }

    /// Hands `op` to librbd (its main operation, or the flush after a FUA change); returns
    /// librbd's result (negative errno: nothing was started).
    private func start(_ op: RBDRequest, flush: Bool) -> Int32 {
        var c: rbd_completion_t?
        let arg = Unmanaged.passRetained(op).toOpaque()
        var r = api.rbd_aio_create_completion(arg, nil, &c)
        if r < 0 {
            Unmanaged<RBDRequest>.fromOpaque(arg).release()
            return r
        }
        let req = op.request
        if flush {
            r = api.rbd_aio_flush(image, c)
        } else {
            switch req.operation {
            case .read:
                r = api.rbd_aio_read(image, req.offset, Int(req.length), req.buffer!.assumingMemoryBound(to: CChar.self), c)
            case .write:
                r = api.rbd_aio_write(image, req.offset, Int(req.length), req.buffer!.assumingMemoryBound(to: CChar.self), c)
            case .writeZeroes:
                let zeroFlags: Int32 = req.flags.contains(.mayUnmap) ? 0 : Int32(blockd_RBD_WRITE_ZEROES_FLAG_THICK_PROVISION)
                r = api.rbd_aio_write_zeroes(image, req.offset, Int(req.length), c, zeroFlags, 0)
            case .discard:
                r = api.rbd_aio_discard(image, req.offset, req.length, c)
            case .flush:
                r = api.rbd_aio_flush(image, c)
            case .blockStatus:
                r = -EINVAL
            }
        }
        if r < 0 {
            api.rbd_aio_release(c)
            Unmanaged<RBDRequest>.fromOpaque(arg).release()
        }
        return r
    }

    /// Completes `io` soon, never inside `submit`.
    private func completeLater(_ io: BlockIO) {
        let loop = io.loop ?? EventLoop.current ?? homeLoop
        loop.execute { io.complete(error: nil) }
    }

    // MARK: the home loop

    /// Counts requests submitted away from the home loop; after `moveAfter` in a row, moves
    /// the eventfd to `current`. One relaxed load per request on the home loop.
    @inline(__always)
    private func followWork(_ current: EventLoop) {
        if current.index == homeIndex.load(ordering: .relaxed) {
            if foreignSubmits.load(ordering: .relaxed) != 0 { foreignSubmits.store(0, ordering: .relaxed) }
            return
        }
        if foreignSubmits.wrappingAdd(1, ordering: .relaxed).newValue >= RBDDriver.moveAfter {
            move(to: current)
        }
    }

    /// Unregisters the eventfd on the old home loop (collecting what it has), then registers it
    /// on `target`. Completions signalled in between wait in librbd's queue, and the eventfd
    /// stays readable, so `target`'s first wake-up collects them.
    private func move(to target: EventLoop) {
        let from: Int? = home.withLock { h in
            if h.moving || closed.load(ordering: .relaxed) || h.index == target.index { return nil }
            h.moving = true
            return h.index
        }
        foreignSubmits.store(0, ordering: .relaxed)
        guard let from, let targetIndex = loops.firstIndex(where: { $0 === target }) else { return }
        let old = loops[from]
        let fd = handle.eventFD
        old.execute { [self] in
            let id = home.withLock { $0.registration }
            if id != 0 { old.unregister(fd: fd, id: id) }
            collectCompletions()
            target.execute { [self] in
                let id = target.register(fd: fd, events: clinux_EPOLLIN, handler: self)
                if id == 0 {
                    // Cannot happen short of epoll failing; go back rather than lose completions.
                    Log.error("rbd '\(spec)': cannot watch completions on loop \(targetIndex); staying on loop \(from)")
                    old.execute { [self] in
                        let back = old.register(fd: fd, events: clinux_EPOLLIN, handler: self)
                        home.withLock { $0 = (from, back, false) }
                        collectCompletions()
                    }
                    return
                }
                home.withLock { $0 = (targetIndex, id, false) }
                homeIndex.store(targetIndex, ordering: .relaxed)
                Log.info("rbd '\(spec)': completions now collected on loop \(targetIndex), where its requests come from")
                collectCompletions()
            }
        }
    }

    // MARK: completions (home loop)

    public func handleEvents(_ events: UInt32) {
        var counter: UInt64 = 0
        _ = Glibc.read(handle.eventFD, &counter, 8)
        collectCompletions()
    }

    private func collectCompletions() {
        while true {
            let n = Int(api.rbd_poll_io_events(image, completions, Int32(RBDDriver.batch)))
            if n <= 0 { return }
            for i in 0..<n {
                let c = completions[i]
                completions[i] = nil
                finish(c)
            }
            if n < RBDDriver.batch { return }
        }
    }

    private func finish(_ c: rbd_completion_t?) {
        let ret = api.rbd_aio_get_return_value(c)
        let arg = api.rbd_aio_get_arg(c)
        api.rbd_aio_release(c)
        let op = Unmanaged<RBDRequest>.fromOpaque(arg!).takeRetainedValue()
        if ret < 0 {
            return done(op, error: error(Int32(-ret), op))
        }
        let req = op.request
        switch req.operation {
        case .read:
            if ret < Int(req.length) {
                // librbd returned less than asked (past a shrunk end): the rest reads as zeroes.
                memset(req.buffer! + Int(ret), 0, Int(req.length) - Int(ret))
            }
        case .write, .writeZeroes, .discard:
            if req.flags.contains(.fua) && !op.flushing && !noFlush {
                op.flushing = true
                let r = start(op, flush: true)
                if r < 0 { done(op, error: error(-r, op)) }
                return
            }
        case .flush, .blockStatus:
            break
        }
        done(op, error: nil)
    }

    private func done(_ op: RBDRequest, error: BlockError?) {
        inFlight.wrappingSubtract(1, ordering: .releasing)
        if error == nil { failures.succeeded(spec) }
        op.io.complete(error: error)
    }

    /// A librbd failure as the block layer reports it: cluster errors (timeouts, lost
    /// connections, blocklisting) are EIO, a full pool ENOSPC, a lost exclusive lock EROFS.
    private func error(_ code: Int32, _ op: RBDRequest) -> BlockError {
        let req = op.request
        let what = op.flushing ? "flush after \(req.operation)" : "\(req.operation)"
        let range = req.operation == .flush ? "" : " at \(req.offset)+\(req.length)"
        var text = "rbd \(what)\(range) on '\(spec)' failed: \(String(cString: strerror(code)))"
        let mapped: Int32
        switch code {
        case ENOSPC, EDQUOT: mapped = ENOSPC
        case EROFS: mapped = EROFS; text += " (another client took the image's exclusive lock)"
        case EINVAL, ENOTSUP, EOPNOTSUPP: mapped = code
        case ETIMEDOUT: mapped = EIO; text += " (rados_osd_op_timeout expired)"
        default: mapped = EIO
        }
        failures.failed(text)
        return BlockError(mapped, text)
    }

    // MARK: helpers

    /// Runs `body` on `loop` and waits for it; runs it here when already there or when the
    /// loop has stopped (shutdown: nothing else touches the registration then).
    @discardableResult
    static func onLoop<T: Sendable>(_ loop: EventLoop, _ body: @escaping @Sendable () -> T) -> T {
        if loop.inLoopThread || loop.hasStopped { return body() }
        let lock = ConditionLock()
        let result = Mutex<T?>(nil)
        loop.execute {
            let value = body()
            result.withLock { $0 = value }
            lock.withLock { lock.broadcast() }
        }
        while true {
            if let r = result.withLock({ $0 }) { return r }
            if loop.hasStopped { return body() }
            lock.withLock {
                if result.withLock({ $0 == nil }) { _ = lock.wait(seconds: 0.1) }
            }
        }
    }
}

/// One request with librbd. Allocated per request (librbd allocates its completion too).
///
/// Owned by librbd's completion (a retained reference in its argument) while in flight, then
/// by the home loop that collects it: one thread at a time (it crosses threads only as that
/// raw argument, so it need not be `Sendable`).
final class RBDRequest {
    let io: BlockIO
    let request: BlockRequest
    /// The change succeeded and the flush that makes it durable (FUA) is running.
    var flushing = false

    init(io: BlockIO, request: BlockRequest) {
        self.io = io
        self.request = request
    }
}

/// Logs failing requests without flooding: the first failure, then at most one line every
/// 5 s with the count, and one line when requests succeed again.
final class FailureLog: Sendable {
    private let failing = Atomic<Bool>(false)
    private let state = Mutex<(suppressed: Int, last: UInt64)>((0, 0))

    func failed(_ text: String) {
        let now = monotonicNanos()
        let wasFailing = failing.exchange(true, ordering: .relaxed)
        let line: String? = state.withLock { s in
            if !wasFailing || now - s.last > 5_000_000_000 {
                let more = s.suppressed
                s = (0, now)
                return more > 0 ? "\(text) (and \(more) more failures)" : text
            }
            s.suppressed += 1
            return nil
        }
        if let line { Log.error(line) }
    }

    /// One relaxed load on the fast path.
    @inline(__always)
    func succeeded(_ spec: String) {
        guard failing.load(ordering: .relaxed) else { return }
        guard failing.exchange(false, ordering: .relaxed) else { return }
        let more = state.withLock { s -> Int in
            defer { s = (0, 0) }
            return s.suppressed
        }
        Log.warning("rbd '\(spec)': requests succeed again\(more > 0 ? " (\(more) failures not logged)" : "")")
    }
}
