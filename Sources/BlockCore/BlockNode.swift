import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Observes successful guest-visible changes to a node (dirty bitmaps, jobs tracking writes).
/// Called after the change succeeded, never for `.writeUnchanged` requests.
public protocol WriteObserver: AnyObject, Sendable {
    /// Called before a change is issued to the driver (write-intent of persistent bitmaps).
    /// Throwing fails the request with nothing changed; with `.noWait` in `flags`, throw
    /// `BlockError.wouldBlock` rather than sleep. The default does nothing.
    func nodeWillChange(offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError)
    func nodeDidChange(offset: UInt64, length: UInt64)
}

extension WriteObserver {
    public func nodeWillChange(offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
}

/// A guest-visible change as a `WriteMirror` sees it.
public enum MirroredChange {
    case write(UnsafeRawBufferPointer)
    case zeroes(RequestFlags)
    case discard
}

/// Wraps every guest-visible change of one node (active commit): `mirror` is called instead of
/// the driver call, inside the request (range lock held, in-flight counted), and must call
/// `apply` exactly once unless it throws before. It may write the same change elsewhere before
/// the request completes (write-blocking copy mode) or only record the range. To move work off
/// an event loop it throws `.wouldBlock` *before* calling `apply` when `flags` has `.noWait`.
/// Not called for `.writeUnchanged` or `.commitCopy` requests.
public protocol WriteMirror: AnyObject, Sendable {
    func mirror(offset: UInt64, length: UInt64, change: MirroredChange, flags: RequestFlags,
                apply: () throws(BlockError) -> Void) throws(BlockError)
}

/// A named node of the block graph: one driver instance plus the rules every request obeys.
///
/// `BlockNode`'s request methods are the one choke point (QEMU's `bdrv_co_*_req_prepare`):
/// they check range and permission, count in-flight requests for drain, and tell write
/// observers (bitmaps) about changes unless the request is `.writeUnchanged`.
public final class BlockNode: @unchecked Sendable {
    public let nodeName: String
    public let driver: any BlockDriver
    /// Named by the user (`node-name=`), or generated (`#blockNNN`) for implicit children.
    public let isAutoNamed: Bool
    /// `discard`, `detect-zeroes` (applied here) and `cache.*` (applied by the file driver).
    public let options: NodeOptions
    /// Requests currently inside this node (for drain).
    private let inFlight = Atomic<Int>(0)
    /// Requests that ever entered this node: jobs compare it before and after their own
    /// work to tell whether clients are active, and yield to them.
    private let entered = Atomic<UInt64>(0)
    /// Nesting depth of drained sections; requests wait (or throw `.wouldBlock`) while > 0.
    private let drainDepth = Atomic<Int>(0)
    private let drainCondition = BlockCondition()
    /// Serialises job copies (`writeUnchanged` read-and-write-back) against client writes.
    public let rangeLock = RangeLock()
    private let observerState = Mutex<[any WriteObserver]>([])
    // Copy of `observerState` readable without the lock; swapped under it.
    private nonisolated(unsafe) var observers: [any WriteObserver] = []
    private let readOnlyOverride: Bool
    // Set and cleared inside a drained section of this node (`setMirror`).
    private nonisolated(unsafe) var mirrorHook: (any WriteMirror)?
    /// Bumped when the node is replaced under its parents (active commit's pivot): a request
    /// that waited for that drained section must not enter the node it no longer belongs to.
    private let generation = Atomic<Int>(0)

    public init(name: String, driver: any BlockDriver, readOnly: Bool = false, autoNamed: Bool = false,
                options: NodeOptions = NodeOptions()) {
        self.nodeName = name
        self.driver = driver
        self.readOnlyOverride = readOnly
        self.isAutoNamed = autoNamed
        self.options = options
        // Persistent bitmaps found in the image start recording at once.
        if let storage = driver.bitmapStorage {
            for bitmap in storage.loadedBitmaps() { addObserver(bitmap) }
        }
    }

    public var driverName: String { driver.driverName }
    public var length: UInt64 { driver.length }
    public var limits: BlockLimits { driver.limits }
    public var isReadOnly: Bool { readOnlyOverride || driver.isReadOnly }
    public var children: [BlockChild] { driver.children }
    public var backing: BlockNode? { driver.backingChild?.node }
    public var file: BlockNode? { driver.fileChild?.node }
    public var isFilter: Bool { driver.role == .filter }
    public var inFlightCount: Int { inFlight.load(ordering: .acquiring) }
    /// Requests that have entered this node since it was opened.
    public var requestsEntered: UInt64 { entered.load(ordering: .relaxed) }
    public var isDrained: Bool { drainDepth.load(ordering: .relaxed) > 0 }

    // MARK: drain

    /// Enters the node: one atomic add plus one atomic load on the fast path. While the node is
    /// drained the request backs out; with `.noWait` it throws `.wouldBlock` (the event loop
    /// hands it to a worker), otherwise it sleeps until the drained section ends.
    @inline(__always)
    private func enter(_ flags: RequestFlags) throws(BlockError) {
        entered.wrappingAdd(1, ordering: .relaxed)
        inFlight.wrappingAdd(1, ordering: .sequentiallyConsistent)
        if drainDepth.load(ordering: .sequentiallyConsistent) != 0 {
            try enterDrained(flags)
        }
    }

    @inline(never)
    private func enterDrained(_ flags: RequestFlags) throws(BlockError) {
        let seen = generation.load(ordering: .sequentiallyConsistent)
        while true {
            leave()
            if flags.contains(.noWait) { throw .wouldBlock }
            drainCondition.withLock {
                while drainDepth.load(ordering: .sequentiallyConsistent) != 0 { drainCondition.wait() }
            }
            if generation.load(ordering: .sequentiallyConsistent) != seen { throw .replaced }
            inFlight.wrappingAdd(1, ordering: .sequentiallyConsistent)
            if drainDepth.load(ordering: .sequentiallyConsistent) == 0 { return }
        }
    }

    @inline(__always)
    private func leave() {
        let left = inFlight.wrappingSubtract(1, ordering: .sequentiallyConsistent).newValue
        if left == 0 && drainDepth.load(ordering: .sequentiallyConsistent) != 0 {
            drainCondition.withLock { drainCondition.broadcast() }
        }
    }

    /// Starts a drained section (QEMU's `bdrv_drained_begin` for this node only): new requests
    /// wait, and this returns once every request already inside the node has finished.
    /// Sections nest. Drain parents before children (`BlockNode.drain(_:)` does), so a parent's
    /// in-flight request can still finish in a child.
    public func beginDrain() {
        drainDepth.wrappingAdd(1, ordering: .sequentiallyConsistent)
        drainCondition.withLock {
            while inFlight.load(ordering: .sequentiallyConsistent) != 0 {
                drainCondition.wait(nanos: 1_000_000)
            }
        }
    }

    /// Ends a drained section; waiting requests resume when the last section ends.
    public func endDrain() {
        let depth = drainDepth.wrappingSubtract(1, ordering: .sequentiallyConsistent).newValue
        precondition(depth >= 0, "endDrain without beginDrain on '\(nodeName)'")
        if depth == 0 { drainCondition.withLock { drainCondition.broadcast() } }
    }

    /// Runs `body` with `nodes` drained, in the order given (parents first); ends the sections
    /// in reverse order, also when `body` throws.
    public static func withDrained<T, E: Error>(_ nodes: [BlockNode], _ body: () throws(E) -> T) throws(E) -> T {
        var seen: [BlockNode] = []
        for node in nodes where !seen.contains(where: { $0 === node }) {
            node.beginDrain()
            seen.append(node)
        }
        defer { for node in seen.reversed() { node.endDrain() } }
        return try body()
    }

    /// Makes client writes to this node take its range lock (shared) so a job's copies (taken
    /// exclusively) never interleave with them. Drains once so no write that skipped the lock
    /// is still in flight when this returns.
    public func beginSerialising() {
        rangeLock.activate()
        beginDrain()
        endDrain()
    }

    public func endSerialising() { rangeLock.deactivate() }

    /// Takes the range lock for a guest-visible change when a copier is active.
    @inline(__always)
    private func lockForWrite(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) throws(BlockError) -> RangeLock.Token? {
        guard rangeLock.isActive, !flags.contains(.writeUnchanged) else { return nil }
        return try rangeLock.lock(offset: offset, length: length, exclusive: false,
                                  noWait: flags.contains(.noWait))
    }

    /// Marks the node as replaced under its parents (call inside its drained section):
    /// requests waiting for the section throw `BlockError.replaced` instead of entering, and
    /// their caller (an export) retries on the node that took its place.
    public func retire() {
        generation.wrappingAdd(1, ordering: .sequentiallyConsistent)
    }

    /// Installs (or removes, with nil) the hook that wraps guest-visible changes; drains the
    /// node so no write is half-way through when it changes.
    public func setMirror(_ mirror: (any WriteMirror)?) {
        beginDrain()
        mirrorHook = mirror
        endDrain()
    }

    /// `setMirror` for a caller already inside a drained section of this node.
    public func setMirrorDrained(_ mirror: (any WriteMirror)?) {
        precondition(isDrained, "setMirrorDrained outside a drained section of '\(nodeName)'")
        mirrorHook = mirror
    }

    public var hasMirror: Bool { mirrorHook != nil }

    // MARK: observers

    public func addObserver(_ observer: any WriteObserver) {
        observerState.withLock { list in
            list.append(observer)
            observers = list
        }
    }

    public func removeObserver(_ observer: any WriteObserver) {
        observerState.withLock { list in
            list.removeAll { $0 === observer }
            observers = list
        }
    }

    /// This node's dirty bitmaps, newest first (as QEMU lists them).
    public var dirtyBitmaps: [DirtyBitmap] {
        observerState.withLock { $0.compactMap { $0 as? DirtyBitmap }.reversed() }
    }

    public func dirtyBitmap(named name: String) -> DirtyBitmap? {
        observerState.withLock { $0.first { ($0 as? DirtyBitmap)?.name == name } as? DirtyBitmap }
    }

    @inline(__always)
    private func willChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) throws(BlockError) {
        if !flags.isDisjoint(with: .notDirtying) { return }
        let list = observers
        if list.isEmpty { return }
        for observer in list { try observer.nodeWillChange(offset: offset, length: length, flags: flags) }
    }

    @inline(__always)
    private func didChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) {
        if !flags.isDisjoint(with: .notDirtying) { return }
        let list = observers
        if list.isEmpty { return }
        for observer in list { observer.nodeDidChange(offset: offset, length: length) }
    }

    // MARK: checks

    @inline(__always)
    private func checkRange(_ offset: UInt64, _ length: UInt64) throws(BlockError) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > driver.length {
            throw BlockError(EINVAL, "request \(offset)+\(length) is past the end of node '\(nodeName)' (\(driver.length) bytes)")
        }
    }

    @inline(__always)
    private func checkWriteRange(_ offset: UInt64, _ length: UInt64) throws(BlockError) {
        if driver.growsOnWrite {
            let (_, overflow) = offset.addingReportingOverflow(length)
            if overflow || offset + length > (UInt64(1) << 62) {
                throw BlockError(EINVAL, "request \(offset)+\(length) is out of range for node '\(nodeName)'")
            }
            return
        }
        try checkRange(offset, length)
    }

    @inline(__always)
    private func checkWritable(_ flags: RequestFlags) throws(BlockError) {
        if isReadOnly {
            throw BlockError(EPERM, "node '\(nodeName)' is read-only")
        }
    }

    /// The checks of a data write, shared by the synchronous and asynchronous paths: range,
    /// read-only, and `.writeCompressed` only for a driver that can write compressed data
    /// (QEMU's `BDRV_REQ_WRITE_COMPRESSED` check in `bdrv_co_pwritev_part`).
    @inline(__always)
    private func checkWrite(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) throws(BlockError) {
        try checkWriteRange(offset, length)
        try checkWritable(flags)
        if flags.contains(.writeCompressed) && driver.compressedWriteClusterSize == nil {
            throw BlockError.notSupported("node '\(nodeName)' (\(driverName)) cannot write compressed data")
        }
    }

    /// The admission of a guest-visible change, shared by the synchronous and asynchronous
    /// paths: enter the node (drain), take the range lock while a copier is active, and tell
    /// write observers (write intent). Undone in reverse if a step fails; `endChange` undoes
    /// it after the change (telling observers when it succeeded).
    @inline(__always)
    private func beginChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) throws(BlockError) -> RangeLock.Token? {
        try enter(flags)
        return try announceChange(offset, length, flags)
    }

    /// The part of `beginChange` after entering: on failure it leaves the node again.
    @inline(__always)
    private func announceChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) throws(BlockError) -> RangeLock.Token? {
        let token: RangeLock.Token?
        do {
            token = try lockForWrite(offset, length, flags)
        } catch {
            leave()
            throw error
        }
        do {
            try willChange(offset, length, flags)
        } catch {
            if let token { rangeLock.unlock(token) }
            leave()
            throw error
        }
        return token
    }

    @inline(__always)
    private func endChange(_ token: RangeLock.Token?, _ offset: UInt64, _ length: UInt64, _ flags: RequestFlags,
                           succeeded: Bool) {
        if succeeded { didChange(offset, length, flags) }
        if let token { rangeLock.unlock(token) }
        leave()
    }

    // MARK: node options

    // What `discard` and `detect-zeroes` make of a change, shared by the synchronous and
    // asynchronous paths so both obey the same rules.

    /// detect-zeroes (QEMU's `bdrv_aligned_pwritev`): the flags of the zero write that a
    /// write of all-zero `buffer` becomes, or nil when it stays a write. The zero write may
    /// deallocate only with `detect-zeroes=unmap` (and `discard=unmap`, see `zeroWriteFlags`).
    @inline(__always)
    private func detectedZeroWrite(_ buffer: UnsafeRawBufferPointer, _ flags: RequestFlags) -> RequestFlags? {
        guard options.detectZeroes != .off, buffer.count > 0, buffer.isAllZero else { return nil }
        var zeroFlags = flags.subtracting([.bufferedWriteMayBlock, .writeCompressed])
        if options.detectZeroes == .unmap { zeroFlags.insert(.mayUnmap) }
        return zeroFlags
    }

    /// discard=ignore: zero writes never deallocate (QEMU's `bdrv_co_pwrite_zeroes`).
    @inline(__always)
    private func zeroWriteFlags(_ flags: RequestFlags) -> RequestFlags {
        options.discard == .unmap ? flags : flags.subtracting(.mayUnmap)
    }

    /// discard=ignore: a discard succeeds and does nothing (QEMU's `bdrv_co_pdiscard`), after
    /// the range and permission checks.
    private var ignoresDiscards: Bool { options.discard == .ignore }

    // MARK: requests

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags = []) throws(BlockError) {
        try checkRange(offset, UInt64(buffer.count))
        try enter(flags)
        defer { leave() }
        try driver.read(at: offset, into: buffer, flags: flags)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags = []) throws(BlockError) {
        let length = UInt64(buffer.count)
        try checkWrite(offset, length, flags)
        if let zeroFlags = detectedZeroWrite(buffer, flags) {
            return try writeZeroes(at: offset, length: length, flags: zeroFlags)
        }
        let token = try beginChange(offset, length, flags)
        var succeeded = false
        defer { endChange(token, offset, length, flags, succeeded: succeeded) }
        if let m = mirrorHook, flags.isDisjoint(with: .notDirtying) {
            try m.mirror(offset: offset, length: length, change: .write(buffer), flags: flags) { () throws(BlockError) in
                try driver.write(at: offset, from: buffer, flags: flags)
            }
        } else {
            try driver.write(at: offset, from: buffer, flags: flags)
        }
        succeeded = true
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags = []) throws(BlockError) {
        try checkWriteRange(offset, length)
        try checkWritable(flags)
        let flags = zeroWriteFlags(flags)
        let token = try beginChange(offset, length, flags)
        var succeeded = false
        defer { endChange(token, offset, length, flags, succeeded: succeeded) }
        if let m = mirrorHook, flags.isDisjoint(with: .notDirtying) {
            try m.mirror(offset: offset, length: length, change: .zeroes(flags), flags: flags) { () throws(BlockError) in
                try driver.writeZeroes(at: offset, length: length, flags: flags)
            }
        } else {
            try driver.writeZeroes(at: offset, length: length, flags: flags)
        }
        succeeded = true
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags = []) throws(BlockError) {
        try checkRange(offset, length)
        try checkWritable(flags)
        if ignoresDiscards { return }
        let token = try beginChange(offset, length, flags)
        var succeeded = false
        defer { endChange(token, offset, length, flags, succeeded: succeeded) }
        if let m = mirrorHook, flags.isDisjoint(with: .notDirtying) {
            try m.mirror(offset: offset, length: length, change: .discard, flags: flags) { () throws(BlockError) in
                try driver.discard(at: offset, length: length, flags: flags)
            }
        } else {
            try driver.discard(at: offset, length: length, flags: flags)
        }
        succeeded = true
    }

    public func flush() throws(BlockError) {
        try enter([])
        defer { leave() }
        try driver.flush()
    }

    public func prefetch(at offset: UInt64, length: UInt64) throws(BlockError) {
        try checkRange(offset, length)
        try enter([])
        defer { leave() }
        try driver.prefetch(at: offset, length: length)
    }

    public func truncate(to length: UInt64) throws(BlockError) {
        try checkWritable([])
        try enter([])
        defer { leave() }
        try driver.truncate(to: length)
    }

    // MARK: asynchronous requests

    /// True when this node can take `submit`: its driver has a native asynchronous path, or
    /// forwards one (raw, null-filter) to a child that has. Decided per request, as edges
    /// may be re-pointed by graph changes.
    public var supportsAsync: Bool { driver.asyncInterface != nil }

    /// Starts `request` without blocking; `io`'s completion runs later, on `io.loop`.
    ///
    /// The same rules as the synchronous methods, from the same helpers: range and
    /// permission checks, entering the node (drain), the range lock while a copier is active,
    /// write observers before and after a change. Everything that would have to wait — a
    /// drained node, a held range lock, an observer that must write its intent, an active
    /// commit's mirror, a driver without an asynchronous path — throws `.wouldBlock` having
    /// changed nothing: the caller then uses the synchronous API on a worker thread. Any
    /// other error thrown here means the request failed before it started. Never sleeps.
    public func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        io.begin()
        do {
            try forward(io, request)
        } catch {
            io.abandon()
            throw error
        }
    }

    /// `submit` for a driver passing a request it received to a child node (`raw` to its
    /// `file`): the request is already under way, so `io` stays submitted.
    public func forward(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        guard let target = driver.asyncInterface else { throw .wouldBlock }
        var request = request
        request.flags.subtract([.noWait, .bufferedWriteMayBlock])
        let admission = request.flags.union(.noWait)
        let offset = request.offset, length = request.length
        var token: RangeLock.Token?
        let changes = request.operation.changesData
        switch request.operation {
        case .read:
            try checkRange(offset, length)
            try enter(admission)
        case .blockStatus:
            try checkRange(offset, length)
            if length == 0 { throw BlockError.invalid("block status of an empty range on node '\(nodeName)'") }
            try enter(admission)
        case .write, .writeZeroes, .discard:
            switch request.operation {
            case .discard:
                try checkRange(offset, length)
                try checkWritable(request.flags)
                if ignoresDiscards { return try completeUnchanged(io) }
            case .write:
                try checkWrite(offset, length, request.flags)
                if let zeroFlags = detectedZeroWrite(UnsafeRawBufferPointer(start: request.buffer, count: Int(length)),
                                                     request.flags) {
                    request = BlockRequest(.writeZeroes, offset: offset, length: length, flags: zeroWriteFlags(zeroFlags))
                }
            default:
                try checkWriteRange(offset, length)
                try checkWritable(request.flags)
                request.flags = zeroWriteFlags(request.flags)
            }
            try enter(admission)
            if mirrorHook != nil && request.flags.isDisjoint(with: .notDirtying) {
                // An active commit mirrors each change synchronously: take the synchronous
                // path. (Checked inside the node: the hook changes only in a drained section.)
                leave()
                throw .wouldBlock
            }
            token = try announceChange(offset, length, request.flags.union(.noWait))
        case .flush:
            try enter(admission)
        }
        io.push(.node(self, token: token, offset: offset, length: length, flags: request.flags, changes: changes))
        do {
            try target.submit(io, request)
        } catch {
            io.popFrame()
            finishAsync(token: token, offset: offset, length: length, flags: request.flags, changes: changes, succeeded: false)
            throw error
        }
    }

    /// Ends an asynchronous request that this node answers without its driver (an ignored
    /// discard): `io` completes on its loop soon, never inside `submit`. Without a loop to
    /// complete on, the caller takes the synchronous path (where it costs nothing either).
    private func completeUnchanged(_ io: BlockIO) throws(BlockError) {
        guard let loop = io.loop ?? EventLoop.current else { throw .wouldBlock }
        loop.execute { io.complete(error: nil) }
    }

    /// The end of an asynchronous request inside this node (run by `BlockIO.complete`).
    func finishAsync(token: RangeLock.Token?, offset: UInt64, length: UInt64, flags: RequestFlags,
                     changes: Bool, succeeded: Bool) {
        if changes {
            endChange(token, offset, length, flags, succeeded: succeeded)
        } else {
            leave()
        }
    }

    /// Status of this node alone (one layer). With `.noWait`, throws `.wouldBlock` rather
    /// than sleep (drained node, contended lock, metadata not in cache).
    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags = []) throws(BlockError) -> BlockStatus {
        try checkRange(offset, length)
        if length == 0 { return BlockStatus(length: 0, flags: []) }
        try enter(flags)
        defer { leave() }
        return try driver.blockStatus(at: offset, length: length, flags: flags.intersection(.noWait))
    }

    /// Status of the whole chain from this node down to (not including) `base`, as QEMU's
    /// `bdrv_block_status_above`: where a layer leaves a range unallocated, the next layer
    /// down answers. `depth` counts non-filter layers (1 = this node); 0 = nowhere allocated.
    /// Past the end of a shorter backing file, the range reads as zeroes.
    public func blockStatusAbove(base: BlockNode? = nil, at offset: UInt64,
                                 length: UInt64, flags: RequestFlags = []) throws(BlockError) -> BlockStatus {
        try checkRange(offset, length)
        if length == 0 { return BlockStatus(length: 0, flags: []) }
        let flags = flags.intersection(.noWait)
        // The walk reads lower nodes' edges: a graph change drains this node (and its
        // parents) first, so entering here is enough.
        try enter(flags)
        defer { leave() }
        // A filter given as base stops the walk at the first data node below it.
        let base = base?.skippingFilters()
        var node: BlockNode = self
        var depth = 1
        var want = length
        while true {
            // Filters forward block status themselves; walk them without counting depth.
            var status = try node.driver.blockStatus(at: offset, length: want, flags: flags)
            if status.length == 0 {
                throw BlockError.io("node '\(node.nodeName)' answered block status with an empty extent")
            }
            want = status.length
            if status.isAllocated {
                status.depth = depth
                return status
            }
            let below = node.backingSkippingFilters()
            guard let next = below, next !== base else {
                // Unallocated down to the bottom: reads as zeroes when nothing is below at all
                // (QEMU adds ZERO only then, not when stopping at an explicit base).
                var flags = status.flags
                if below == nil { flags.insert(.zero) }
                return BlockStatus(length: want, flags: flags, depth: 0)
            }
            if offset >= next.length {
                // Backing is shorter: the tail reads as zeroes, decided by the overlay.
                return BlockStatus(length: want, flags: [.zero, .allocated], depth: depth)
            }
            want = min(want, next.length - offset)
            node = next
            depth += 1
        }
    }

    /// The backing node of the first non-filter node at or below this one, skipping filters
    /// on the way down (QEMU's `bdrv_backing_chain_next`).
    public func backingSkippingFilters() -> BlockNode? {
        var node: BlockNode = self
        while node.isFilter, let below = node.children.first?.node { node = below }
        guard var next = node.backing else { return nil }
        while next.isFilter, let below = next.children.first?.node { next = below }
        return next
    }

    /// The first non-filter node at or below this one.
    public func skippingFilters() -> BlockNode {
        var node: BlockNode = self
        while node.isFilter, let below = node.children.first?.node { node = below }
        return node
    }
}
