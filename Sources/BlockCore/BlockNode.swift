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
public final class BlockNode: Sendable {
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
    private let drainCondition = ConditionLock()
    /// Serialises job copies (`writeUnchanged` read-and-write-back) against client writes.
    public let rangeLock = RangeLock()
    /// The observer list as QMP sees it (bitmap lookups); `hooks` has its copy for requests.
    private let observerState = Mutex<[any WriteObserver]>([])
    /// What a guest-visible change goes through: the write observers (dirty bitmaps) and the
    /// mirror hook (active commit). Read by writes in flight (one object: one load on the
    /// write path); replaced only inside a drained section of this node.
    private let hooks: DrainGuarded<ChangeHooks>
    private struct ChangeHooks: Sendable {
        var observers: [any WriteObserver]
        var mirror: (any WriteMirror)?
    }
    private let readOnlyOverride: Bool
    /// What this node's users (parent edges and roots) take on it, as `BlockGraph` last
    /// decided: writes need `.write` (or `.writeUnchanged` for unchanged writes) here. A node
    /// no graph manages (unit tests) grants everything.
    private let grantedBits = Atomic<UInt8>(BlockPermissions.all.rawValue)
    /// `supportsAsync`: whether the driver had an asynchronous path at the last graph change.
    private let asyncHint: Atomic<Bool>

    public init(name: String, driver: any BlockDriver, readOnly: Bool = false, autoNamed: Bool = false,
                options: NodeOptions = NodeOptions()) {
        self.nodeName = name
        self.driver = driver
        self.readOnlyOverride = readOnly
        self.isAutoNamed = autoNamed
        self.options = options
        // Persistent bitmaps found in the image start recording at once.
        let loaded: [any WriteObserver] = driver.bitmapStorage?.loadedBitmaps() ?? []
        observerState.withLock { $0 = loaded }
        hooks = DrainGuarded(ChangeHooks(observers: loaded, mirror: nil))
        // Not shared yet: the driver's edges may be read here.
        asyncHint = Atomic(driver.asyncInterface != nil)
    }

    public var driverName: String { driver.driverName }
    public var length: UInt64 { driver.length }
    public var limits: BlockLimits { driver.limits }
    public var isReadOnly: Bool { readOnlyOverride || driver.isReadOnly }
    /// The `read-only` option the node was opened with.
    public var readOnlyOption: Bool { readOnlyOverride }

    /// What the node's users take on it (`BlockGraph` keeps it current).
    public var granted: BlockPermissions { BlockPermissions(rawValue: grantedBits.load(ordering: .relaxed)) }

    /// Called by `BlockGraph` (under its change lock) after each permission refresh.
    public func setGranted(_ permissions: BlockPermissions) {
        grantedBits.store(permissions.rawValue, ordering: .sequentiallyConsistent)
    }
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
    ///
    /// `root`: the export (or other root) the caller loaded this node from. After entering,
    /// the request checks that the root still points here: a root is re-pointed only inside a
    /// drained section of its old node, so a request that loaded the old node and enters after
    /// the switch backs out (`.replaced`, or `.wouldBlock` with `.noWait`) and is retried on
    /// the root's new node.
    @inline(__always)
    private func enter(_ flags: RequestFlags, _ root: BlockRoot?) throws(BlockError) {
        entered.wrappingAdd(1, ordering: .relaxed)
        inFlight.wrappingAdd(1, ordering: .sequentiallyConsistent)
        if drainDepth.load(ordering: .sequentiallyConsistent) != 0 {
            try enterDrained(flags)
        }
        if root != nil && !root.unsafelyUnwrapped.points(at: self) {
            leave()
            throw flags.contains(.noWait) ? .wouldBlock : .replaced
        }
    }

    @inline(never)
    private func enterDrained(_ flags: RequestFlags) throws(BlockError) {
        while true {
            leave()
            if flags.contains(.noWait) { throw .wouldBlock }
            drainCondition.withLock {
                while drainDepth.load(ordering: .sequentiallyConsistent) != 0 { drainCondition.wait() }
            }
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
                _ = drainCondition.wait(seconds: 0.001)
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

    /// Installs (or removes, with nil) the hook that wraps guest-visible changes; drains the
    /// node so no write is half-way through when it changes.
    public func setMirror(_ mirror: (any WriteMirror)?) {
        beginDrain()
        setMirrorDrained(mirror)
        endDrain()
    }

    /// `setMirror` for a caller already inside a drained section of this node.
    public func setMirrorDrained(_ mirror: (any WriteMirror)?) {
        var h = hooks.value
        h.mirror = mirror
        hooks.set(h, drained: self)
    }

    /// Whether a mirror hook is installed (control plane: under the graph lock).
    public var hasMirror: Bool { hooks.value.mirror != nil }

    // MARK: observers

    /// Adds a write observer (a dirty bitmap). The list that requests read is swapped in a
    /// drained section of the node, so no write is between its "will change" and "did change"
    /// when the list changes (a new bitmap sees whole writes only).
    public func addObserver(_ observer: any WriteObserver) {
        beginDrain()
        defer { endDrain() }
        let list = observerState.withLock { list in
            list.append(observer)
            return list
        }
        var h = hooks.value
        h.observers = list
        hooks.set(h, drained: self)
    }

    public func removeObserver(_ observer: any WriteObserver) {
        beginDrain()
        defer { endDrain() }
        let list = observerState.withLock { list in
            list.removeAll { $0 === observer }
            return list
        }
        var h = hooks.value
        h.observers = list
        hooks.set(h, drained: self)
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
        let list = hooks.value.observers
        if list.isEmpty { return }
        for observer in list { try observer.nodeWillChange(offset: offset, length: length, flags: flags) }
    }

    @inline(__always)
    private func didChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) {
        if !flags.isDisjoint(with: .notDirtying) { return }
        let list = hooks.value.observers
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

    /// A write needs a writable node and, from the node's users, the `write` permission
    /// (`writeUnchanged` is enough for `.writeUnchanged` requests): QEMU's assertion in
    /// `bdrv_co_write_req_prepare`, as an error here.
    ///
    /// `root`, `entering`: the root the caller loaded this node from and the flags it enters
    /// the node with (`.noWait` on a loop); see `refusedWrite`.
    @inline(__always)
    private func checkWritable(_ flags: RequestFlags, _ root: BlockRoot?, entering: RequestFlags) throws(BlockError) {
        if isReadOnly {
            throw BlockError(EPERM, "node '\(nodeName)' is read-only")
        }
        let granted = grantedBits.load(ordering: .relaxed)
        let needed: BlockPermissions = flags.contains(.writeUnchanged) ? [.write, .writeUnchanged] : .write
        if granted & needed.rawValue == 0 {
            try refusedWrite(needed, flags, root, entering: entering)
        }
    }

    /// A change none of the node's users holds the permission for. It may have raced with a
    /// switch of the root it came through to another node (a job's completion re-points the
    /// root and drops the old node's permissions in one drained section of the node): a
    /// request that loaded the node before the switch and checks after it must be retried on
    /// the new node, not fail. Entering waits for that section to end (or backs out with
    /// `.wouldBlock` under `.noWait`) and then sees the switch (`.replaced`); otherwise the
    /// permission is asked again and its absence is the error. Only on this cold path.
    @inline(never)
    private func refusedWrite(_ needed: BlockPermissions, _ flags: RequestFlags, _ root: BlockRoot?,
                              entering: RequestFlags) throws(BlockError) {
        if root != nil {
            try enter(entering, root)
            leave()
            if grantedBits.load(ordering: .sequentiallyConsistent) & needed.rawValue != 0 { return }
        }
        throw BlockError(EPERM, "node '\(nodeName)': no user of the node holds the '\(flags.contains(.writeUnchanged) ? "write unchanged" : "write")' permission")
    }

    @inline(__always)
    private func checkResizable() throws(BlockError) {
        if isReadOnly {
            throw BlockError(EPERM, "node '\(nodeName)' is read-only")
        }
        if grantedBits.load(ordering: .relaxed) & BlockPermissions.resize.rawValue == 0 {
            throw BlockError(EPERM, "node '\(nodeName)': no user of the node holds the 'resize' permission")
        }
    }

    /// The checks of a data write, shared by the synchronous and asynchronous paths: range,
    /// read-only, and `.writeCompressed` only for a driver that can write compressed data
    /// (QEMU's `BDRV_REQ_WRITE_COMPRESSED` check in `bdrv_co_pwritev_part`).
    @inline(__always)
    private func checkWrite(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags, _ root: BlockRoot?,
                            entering: RequestFlags) throws(BlockError) {
        try checkWriteRange(offset, length)
        try checkWritable(flags, root, entering: entering)
        if flags.contains(.writeCompressed) && driver.compressedWriteClusterSize == nil {
            throw BlockError.notSupported("node '\(nodeName)' (\(driverName)) cannot write compressed data")
        }
    }

    /// The admission of a guest-visible change, shared by the synchronous and asynchronous
    /// paths: take the range lock while a copier is active and enter the node
    /// (`enterForChange`), then tell write observers (write intent). Undone in reverse if a
    /// step fails; `endChange` undoes it after the change (telling observers when it
    /// succeeded).
    @inline(__always)
    private func beginChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags,
                             _ root: BlockRoot?) throws(BlockError) -> RangeLock.Token? {
        let token = try enterForChange(offset, length, flags, root)
        try announceChange(token, offset, length, flags)
        return token
    }

    /// The part of `beginChange` after entering: the write intent. On failure it leaves the
    /// node (and the range lock) again.
    @inline(__always)
    private func announceChange(_ token: RangeLock.Token?, _ offset: UInt64, _ length: UInt64,
                                _ flags: RequestFlags) throws(BlockError) {
        do {
            try willChange(offset, length, flags)
        } catch {
            leaveAfterChange(token)
            throw error
        }
    }

    @inline(__always)
    private func endChange(_ token: RangeLock.Token?, _ offset: UInt64, _ length: UInt64, _ flags: RequestFlags,
                           succeeded: Bool) {
        if succeeded { didChange(offset, length, flags) }
        leaveAfterChange(token)
    }

    /// Takes the range lock (when a copier is active) *before* entering the node, so a
    /// request that waits for a job's copy is not counted in flight: a drained section that
    /// begins meanwhile does not wait for it while the job waits for the section to end. A
    /// copier that became active between the check and the entry (`beginSerialising` drains
    /// after activating) is caught by the second check, and the request starts over. With
    /// `.noWait` (inline and asynchronous requests) a held range lock throws `.wouldBlock`.
    @inline(__always)
    private func enterForChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags,
                                _ root: BlockRoot?) throws(BlockError) -> RangeLock.Token? {
        while true {
            let token = try lockForWrite(offset, length, flags)
            do throws(BlockError) { try enter(flags, root) } catch {
                if let token { rangeLock.unlock(token) }
                throw error
            }
            if token != nil || flags.contains(.writeUnchanged) || !rangeLock.isActive { return token }
            leave()
        }
    }

    @inline(__always)
    private func leaveAfterChange(_ token: RangeLock.Token?) {
        leave()
        if let token { rangeLock.unlock(token) }
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
    //
    // `via root`: the root (export) the caller loaded this node from, so that a request that
    // raced with the root's switch to another node is retried there (see `enter`).

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags = [], via root: BlockRoot? = nil) throws(BlockError) {
        try checkRange(offset, UInt64(buffer.count))
        if rangeLock.serialisesReads {
            try readSerialised(at: offset, into: buffer, flags: flags, via: root)
            return
        }
        try enter(flags, root)
        defer { leave() }
        try driver.read(at: offset, into: buffer, flags: flags)
    }

    /// A read of a fleecing target (`BlockCopy`): holds the range shared, taken before entering
    /// the node as writes do (`enterForChange`), so a copy holding it exclusively never waits
    /// for a drained section that waits for this read.
    @inline(never)
    private func readSerialised(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                                flags: RequestFlags, via root: BlockRoot?) throws(BlockError) {
        let token = try rangeLock.lock(offset: offset, length: UInt64(buffer.count), exclusive: false,
                                       noWait: flags.contains(.noWait))
        defer { rangeLock.unlock(token) }
        try enter(flags, root)
        defer { leave() }
        try driver.read(at: offset, into: buffer, flags: flags)
    }

    /// Makes reads of this node take its range lock (shared) from now on; drains once so no
    /// read that skipped the lock is still in flight when this returns (a fleecing target).
    /// Asynchronous reads (`submit`) take the synchronous path meanwhile.
    public func beginSerialisingReads() {
        rangeLock.activateReads()
        beginDrain()
        endDrain()
    }

    public func endSerialisingReads() { rangeLock.deactivateReads() }

    /// Runs `body` counted as a request in flight in this node: a backup job's copy, which
    /// reaches the node's children directly as the node's own requests do. A drained section
    /// of the node waits for it, and it waits for one (or throws `.wouldBlock` with `.noWait`).
    public func withRequest<T>(_ flags: RequestFlags = [], _ body: () throws(BlockError) -> T) throws(BlockError) -> T {
        try enter(flags, nil)
        defer { leave() }
        return try body()
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags = [], via root: BlockRoot? = nil) throws(BlockError) {
        let length = UInt64(buffer.count)
        try checkWrite(offset, length, flags, root, entering: flags)
        if let zeroFlags = detectedZeroWrite(buffer, flags) {
            return try writeZeroes(at: offset, length: length, flags: zeroFlags, via: root)
        }
        let token = try beginChange(offset, length, flags, root)
        var succeeded = false
        defer { endChange(token, offset, length, flags, succeeded: succeeded) }
        if let m = hooks.value.mirror, flags.isDisjoint(with: .notDirtying) {
            try m.mirror(offset: offset, length: length, change: .write(buffer), flags: flags) { () throws(BlockError) in
                try driver.write(at: offset, from: buffer, flags: flags)
            }
        } else {
            try driver.write(at: offset, from: buffer, flags: flags)
        }
        succeeded = true
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags = [],
                            via root: BlockRoot? = nil) throws(BlockError) {
        try checkWriteRange(offset, length)
        try checkWritable(flags, root, entering: flags)
        let flags = zeroWriteFlags(flags)
        let token = try beginChange(offset, length, flags, root)
        var succeeded = false
        defer { endChange(token, offset, length, flags, succeeded: succeeded) }
        if let m = hooks.value.mirror, flags.isDisjoint(with: .notDirtying) {
            try m.mirror(offset: offset, length: length, change: .zeroes(flags), flags: flags) { () throws(BlockError) in
                try driver.writeZeroes(at: offset, length: length, flags: flags)
            }
        } else {
            try driver.writeZeroes(at: offset, length: length, flags: flags)
        }
        succeeded = true
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags = [],
                        via root: BlockRoot? = nil) throws(BlockError) {
        try checkRange(offset, length)
        try checkWritable(flags, root, entering: flags)
        if ignoresDiscards { return }
        let token = try beginChange(offset, length, flags, root)
        var succeeded = false
        defer { endChange(token, offset, length, flags, succeeded: succeeded) }
        if let m = hooks.value.mirror, flags.isDisjoint(with: .notDirtying) {
            try m.mirror(offset: offset, length: length, change: .discard, flags: flags) { () throws(BlockError) in
                try driver.discard(at: offset, length: length, flags: flags)
            }
        } else {
            try driver.discard(at: offset, length: length, flags: flags)
        }
        succeeded = true
    }

    public func flush(via root: BlockRoot? = nil) throws(BlockError) {
        try enter([], root)
        defer { leave() }
        try driver.flush()
    }

    public func prefetch(at offset: UInt64, length: UInt64, via root: BlockRoot? = nil) throws(BlockError) {
        try checkRange(offset, length)
        try enter([], root)
        defer { leave() }
        try driver.prefetch(at: offset, length: length)
    }

    public func truncate(to length: UInt64) throws(BlockError) {
        try checkResizable()
        try enter([], nil)
        defer { leave() }
        try driver.truncate(to: length)
    }

    // MARK: asynchronous requests

    /// True when this node can probably take `submit`: its driver had a native asynchronous
    /// path, or forwarded one (raw, null-filter) to a child that had, when the graph last
    /// changed. A hint for callers that have not entered the node (an export choosing its
    /// path), so it reads no edge; `submit` decides inside the node and throws `.wouldBlock`
    /// when the hint was stale.
    public var supportsAsync: Bool { asyncHint.load(ordering: .relaxed) }

    /// Whether the driver has an asynchronous path now. Reads edges: only for a request in
    /// flight in this node (or a node above it), or the graph-lock holder.
    public var hasAsyncPath: Bool { driver.asyncInterface != nil }

    /// Recomputes `supportsAsync` (`BlockGraph`, under its change lock, after each change).
    public func refreshAsyncHint() {
        asyncHint.store(hasAsyncPath, ordering: .relaxed)
    }

    /// Starts `request` without blocking; `io`'s completion runs later, on `io.loop`.
    ///
    /// The same rules as the synchronous methods, from the same helpers: range and
    /// permission checks, entering the node (drain, and `root` still pointing here), the
    /// range lock while a copier is active, write observers before and after a change.
    /// Everything that would have to wait — a drained node, a held range lock, an observer
    /// that must write its intent, an active commit's mirror, a driver without an
    /// asynchronous path, a root switched to another node — throws `.wouldBlock` having
    /// changed nothing: the caller then uses the synchronous API on a worker thread. Any
    /// other error thrown here means the request failed before it started. Never sleeps.
    public func submit(_ io: BlockIO, _ request: BlockRequest, via root: BlockRoot? = nil) throws(BlockError) {
        io.begin()
        do {
            try admit(io, request, root)
        } catch {
            io.abandon()
            throw error
        }
    }

    /// `submit` for a driver passing a request it received to a child node (`raw` to its
    /// `file`): the request is already under way, so `io` stays submitted.
    public func forward(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        try admit(io, request, nil)
    }

    private func admit(_ io: BlockIO, _ request: BlockRequest, _ root: BlockRoot?) throws(BlockError) {
        var request = request
        request.flags.subtract([.noWait, .bufferedWriteMayBlock])
        let admission = request.flags.union(.noWait)
        let offset = request.offset, length = request.length
        var token: RangeLock.Token?
        let changes = request.operation.changesData
        switch request.operation {
        case .read:
            try checkRange(offset, length)
            // A fleecing target's reads take its range lock: the synchronous path does that.
            if rangeLock.serialisesReads { throw .wouldBlock }
            try enter(admission, root)
        case .blockStatus:
            try checkRange(offset, length)
            if length == 0 { throw BlockError.invalid("block status of an empty range on node '\(nodeName)'") }
            try enter(admission, root)
        case .write, .writeZeroes, .discard:
            switch request.operation {
            case .discard:
                try checkRange(offset, length)
                try checkWritable(request.flags, root, entering: admission)
                if ignoresDiscards { return try completeUnchanged(io) }
            case .write:
                try checkWrite(offset, length, request.flags, root, entering: admission)
                if let zeroFlags = detectedZeroWrite(UnsafeRawBufferPointer(start: request.buffer, count: Int(length)),
                                                     request.flags) {
                    request = BlockRequest(.writeZeroes, offset: offset, length: length, flags: zeroWriteFlags(zeroFlags))
                }
            default:
                try checkWriteRange(offset, length)
                try checkWritable(request.flags, root, entering: admission)
                request.flags = zeroWriteFlags(request.flags)
            }
            token = try enterForChange(offset, length, request.flags.union(.noWait), root)
            if hooks.value.mirror != nil && request.flags.isDisjoint(with: .notDirtying) {
                // An active commit mirrors each change synchronously: take the synchronous
                // path. (Checked inside the node: the hook changes only in a drained section.)
                leaveAfterChange(token)
                throw .wouldBlock
            }
            try announceChange(token, offset, length, request.flags.union(.noWait))
        case .flush:
            try enter(admission, root)
        }
        // Inside the node now: its edges (which decide a forwarding driver's path) hold still.
        guard let target = driver.asyncInterface else {
            finishAsync(token: token, offset: offset, length: length, flags: request.flags, changes: changes, succeeded: false)
            throw .wouldBlock
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
        try enter(flags, nil)
        defer { leave() }
        return try driver.blockStatus(at: offset, length: length, flags: flags.intersection(.noWait))
    }

    /// Status of the whole chain from this node down to (not including) `base`, as QEMU's
    /// `bdrv_block_status_above`: where a layer leaves a range unallocated, the next layer
    /// down answers. `depth` counts non-filter layers (1 = this node); 0 = nowhere allocated.
    /// Past the end of a shorter backing file, the range reads as zeroes.
    public func blockStatusAbove(base: BlockNode? = nil, at offset: UInt64, length: UInt64,
                                 flags: RequestFlags = [], via root: BlockRoot? = nil) throws(BlockError) -> BlockStatus {
        try checkRange(offset, length)
        if length == 0 { return BlockStatus(length: 0, flags: []) }
        let flags = flags.intersection(.noWait)
        // The walk reads lower nodes' edges: a graph change drains this node (and its
        // parents) first, so entering here is enough.
        try enter(flags, root)
        defer { leave() }
        return try statusAbove(base: base, at: offset, length: length, flags: flags)
    }

    /// `blockStatusAbove` down to whatever node lies below `aboveBase` now (a stream job's
    /// base, which the user may change while the job runs): the edge is read inside this
    /// node's in-flight section, where graph changes cannot happen.
    public func blockStatusAbove(baseBelow aboveBase: BlockNode, at offset: UInt64,
                                 length: UInt64) throws(BlockError) -> (status: BlockStatus, base: BlockNode?) {
        try checkRange(offset, length)
        try enter([], nil)
        defer { leave() }
        let base = aboveBase.chainChild?.node
        if length == 0 { return (BlockStatus(length: 0, flags: []), base) }
        return (try statusAbove(base: base, at: offset, length: length, flags: []), base)
    }

    private func statusAbove(base: BlockNode?, at offset: UInt64, length: UInt64,
                             flags: RequestFlags) throws(BlockError) -> BlockStatus {
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
