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
    /// Requests currently inside this node (for drain).
    private let inFlight = Atomic<Int>(0)
    private let observerState = Mutex<[any WriteObserver]>([])
    // Copy of `observerState` readable without the lock; swapped under it.
    private nonisolated(unsafe) var observers: [any WriteObserver] = []
    private let readOnlyOverride: Bool

    public init(name: String, driver: any BlockDriver, readOnly: Bool = false, autoNamed: Bool = false) {
        self.nodeName = name
        self.driver = driver
        self.readOnlyOverride = readOnly
        self.isAutoNamed = autoNamed
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
        if flags.contains(.writeUnchanged) { return }
        let list = observers
        if list.isEmpty { return }
        for observer in list { try observer.nodeWillChange(offset: offset, length: length, flags: flags) }
    }

    @inline(__always)
    private func didChange(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags) {
        if flags.contains(.writeUnchanged) { return }
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

    // MARK: requests

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags = []) throws(BlockError) {
        try checkRange(offset, UInt64(buffer.count))
        inFlight.wrappingAdd(1, ordering: .relaxed)
        defer { inFlight.wrappingSubtract(1, ordering: .releasing) }
        try driver.read(at: offset, into: buffer, flags: flags)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags = []) throws(BlockError) {
        try checkWriteRange(offset, UInt64(buffer.count))
        try checkWritable(flags)
        inFlight.wrappingAdd(1, ordering: .relaxed)
        defer { inFlight.wrappingSubtract(1, ordering: .releasing) }
        try willChange(offset, UInt64(buffer.count), flags)
        try driver.write(at: offset, from: buffer, flags: flags)
        didChange(offset, UInt64(buffer.count), flags)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags = []) throws(BlockError) {
        try checkWriteRange(offset, length)
        try checkWritable(flags)
        inFlight.wrappingAdd(1, ordering: .relaxed)
        defer { inFlight.wrappingSubtract(1, ordering: .releasing) }
        try willChange(offset, length, flags)
        try driver.writeZeroes(at: offset, length: length, flags: flags)
        didChange(offset, length, flags)
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags = []) throws(BlockError) {
        try checkRange(offset, length)
        try checkWritable(flags)
        inFlight.wrappingAdd(1, ordering: .relaxed)
        defer { inFlight.wrappingSubtract(1, ordering: .releasing) }
        try willChange(offset, length, flags)
        try driver.discard(at: offset, length: length, flags: flags)
        didChange(offset, length, flags)
    }

    public func flush() throws(BlockError) {
        inFlight.wrappingAdd(1, ordering: .relaxed)
        defer { inFlight.wrappingSubtract(1, ordering: .releasing) }
        try driver.flush()
    }

    public func prefetch(at offset: UInt64, length: UInt64) throws(BlockError) {
        try checkRange(offset, length)
        try driver.prefetch(at: offset, length: length)
    }

    public func truncate(to length: UInt64) throws(BlockError) {
        try checkWritable([])
        try driver.truncate(to: length)
    }

    /// Status of this node alone (one layer).
    public func blockStatus(at offset: UInt64, length: UInt64) throws(BlockError) -> BlockStatus {
        try checkRange(offset, length)
        if length == 0 { return BlockStatus(length: 0, flags: []) }
        return try driver.blockStatus(at: offset, length: length)
    }

    /// Status of the whole chain from this node down to (not including) `base`, as QEMU's
    /// `bdrv_block_status_above`: where a layer leaves a range unallocated, the next layer
    /// down answers. `depth` counts non-filter layers (1 = this node); 0 = nowhere allocated.
    /// Past the end of a shorter backing file, the range reads as zeroes.
    public func blockStatusAbove(base: BlockNode? = nil, at offset: UInt64,
                                 length: UInt64) throws(BlockError) -> BlockStatus {
        try checkRange(offset, length)
        if length == 0 { return BlockStatus(length: 0, flags: []) }
        var node: BlockNode = self
        var depth = 1
        var want = length
        while true {
            // Filters forward block status themselves; walk them without counting depth.
            var status = try node.driver.blockStatus(at: offset, length: want)
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
