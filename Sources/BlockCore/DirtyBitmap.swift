import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Keeps a persistent bitmap's on-disk copy a superset of the changes (write-intent): called
/// before a write is issued, and returns only when every granule in the range is dirty on
/// disk. Implemented by a format driver (qcow2's `QCOW2BitmapStore`).
public protocol BitmapWriteIntent: AnyObject, Sendable {
    /// Granules [first, end) are about to be written. With `noWait`, throw
    /// `BlockError.wouldBlock` (having changed nothing) rather than do I/O.
    func ensureDirtyOnDisk(_ bitmap: DirtyBitmap, first: Int, end: Int, noWait: Bool) throws(BlockError)
}

/// Where a node's persistent bitmaps live (qcow2's bitmaps extension). A driver that has one
/// returns it from `BlockDriver.bitmapStorage`.
public protocol PersistentBitmapStorage: AnyObject, Sendable {
    /// Bitmaps found in the image when it was opened (added to the node when it is created).
    func loadedBitmaps() -> [DirtyBitmap]
    /// Checks that a persistent bitmap can be stored here (name, granularity, space), without
    /// changing anything.
    func checkCanStore(name: String, granularity: UInt64) throws(BlockError)
    /// Starts storing a new persistent bitmap (it joins the image's bitmap directory now, so
    /// a crash cannot lose it).
    func add(_ bitmap: DirtyBitmap) throws(BlockError)
    /// Removes a persistent bitmap from the image.
    func remove(_ bitmap: DirtyBitmap) throws(BlockError)
    /// The bitmap's bits changed other than by a write (clear, merge, enable, disable): bring
    /// the on-disk copy up to date (`cleared`: bits went from dirty to clean; the caller has
    /// drained the node, so no write is between its write intent and its memory mark).
    func changed(_ bitmap: DirtyBitmap, cleared: Bool) throws(BlockError)
}

/// One dirty bitmap of a node: which granules changed since it was created or cleared.
///
/// A `WriteObserver` on its node: successful writes, zero writes and discards mark the
/// granules they touch while the bitmap is enabled; `.writeUnchanged` requests never reach
/// it. Thread-safe: the bits sit behind a `Mutex`, flags are atomics.
public final class DirtyBitmap: WriteObserver, Sendable {
    public let name: String
    /// Bytes per bit: a power of two from 512 B to 2 GiB.
    public let granularity: UInt64
    /// Size of the node in bytes when the bitmap was created.
    public let length: UInt64
    public let persistent: Bool
    /// Loaded from an image that left it `in-use` without blockd's write-intent mark: its
    /// bits are unknown. It can only be removed.
    public let inconsistent: Bool
    let shift: UInt64
    private let bits: Mutex<HBitmap>
    private let enabledFlag: Atomic<Bool>
    private let busyCount = Atomic<Int>(0)
    /// QEMU's successor: while a backup job reads this bitmap (`freeze`), writes are recorded
    /// in the successor instead; when the job ends, the successor either takes the bitmap's
    /// place (`abdicate`) or is merged back (`reclaim`).
    private let successor = Mutex<(bits: HBitmap, enabled: Bool)?>(nil)
    private let frozenFlag = Atomic<Bool>(false)
    /// The storage's write intent of a persistent bitmap: set when the image becomes writable
    /// or the bitmap persistent, cleared on close or removal, read by every write.
    public var intent: (any BitmapWriteIntent)? {
        get { intentSlot.load()?.intent }
        set {
            guard let newValue else { intentSlot.store(nil); return }
            // One box per intent object (the slot keeps every box it ever held).
            let box = intentSlot.kept { $0.intent === newValue } ?? IntentBox(newValue)
            intentSlot.store(box)
        }
    }
    private let intentSlot = AtomicReference<IntentBox>(nil)

    private final class IntentBox: Sendable {
        let intent: any BitmapWriteIntent
        init(_ intent: any BitmapWriteIntent) { self.intent = intent }
    }

    public static let minGranularity: UInt64 = 512
    public static let maxGranularity: UInt64 = 1 << 31
    public static let maxNameBytes = 1023

    public init(name: String, granularity: UInt64, length: UInt64, enabled: Bool = true,
                persistent: Bool = false, inconsistent: Bool = false) {
        precondition(granularity.nonzeroBitCount == 1 && granularity >= DirtyBitmap.minGranularity)
        self.name = name
        self.granularity = granularity
        self.length = length
        self.persistent = persistent
        self.inconsistent = inconsistent
        self.shift = UInt64(granularity.trailingZeroBitCount)
        let n = Int((length + granularity - 1) >> shift)
        self.bits = Mutex(HBitmap(count: n))
        self.enabledFlag = Atomic(enabled && !inconsistent)
    }

    /// Checks a granularity as QEMU does.
    public static func checkGranularity(_ g: UInt64) throws(BlockError) {
        if g < minGranularity || g.nonzeroBitCount != 1 {
            throw BlockError.invalid("Granularity must be power of 2 and at least 512")
        }
        if g > maxGranularity {
            throw BlockError.invalid("Granularity must be less than or equal to 2147483648")
        }
    }

    /// Number of granules.
    public var granuleCount: Int { bits.withLock { $0.count } }

    public var isEnabled: Bool { enabledFlag.load(ordering: .relaxed) }
    /// QMP's `recording`: enabled, or frozen with a successor that records.
    public var isRecording: Bool {
        if frozenFlag.load(ordering: .relaxed) { return successor.withLock { $0?.enabled ?? false } }
        return isEnabled
    }
    /// A job reads the bitmap and writes go to its successor (`freeze`).
    public var isFrozen: Bool { frozenFlag.load(ordering: .relaxed) }
    /// Recording writes (QMP `recording`).
    public func setEnabled(_ on: Bool) { enabledFlag.store(on && !inconsistent, ordering: .relaxed) }

    /// In use by an export or a job: cannot be changed or removed by the user.
    public var isBusy: Bool { busyCount.load(ordering: .relaxed) > 0 }
    public func acquireBusy() { busyCount.wrappingAdd(1, ordering: .relaxed) }
    public func releaseBusy() { busyCount.wrappingSubtract(1, ordering: .relaxed) }

    /// Dirty bytes (granules × granularity), as QEMU's `count`.
    public var dirtyBytes: UInt64 { bits.withLock { UInt64($0.popcount) << shift } }
    public var dirtyGranules: Int { bits.withLock { $0.popcount } }

    /// Granules [first, end) covering bytes [offset, offset+length), clipped to the bitmap.
    @inline(__always)
    public func granules(offset: UInt64, length: UInt64) -> (Int, Int) {
        let first = offset >> shift
        let end = (offset + length + granularity - 1) >> shift
        let n = UInt64(granuleCountUnlocked)
        return (Int(min(first, n)), Int(min(end, n)))
    }

    private var granuleCountUnlocked: Int { Int((length + granularity - 1) >> shift) }

    // MARK: WriteObserver

    public func nodeWillChange(offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        guard let intent, length > 0, isEnabled || (isFrozen && isRecording) else { return }
        let (a, b) = granules(offset: offset, length: length)
        // Frozen: the on-disk copy stays a superset of the bits and the successor's together.
        if a < b { try intent.ensureDirtyOnDisk(self, first: a, end: b, noWait: flags.contains(.noWait)) }
    }

    /// Marks the granules in memory only: the write intent (`nodeWillChange`) already made
    /// them dirty on disk before the change was issued. A clear of a persistent bitmap, which
    /// resets that intent on disk, runs in a drained section of the node, so it never falls
    /// between a change's intent and its completion.
    public func nodeDidChange(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        if frozenFlag.load(ordering: .relaxed) {
            let (a, b) = granules(offset: offset, length: length)
            let recorded = successor.withLock { s -> Bool in
                guard let s, s.enabled, a < b else { return false }
                s.bits.set(a, b)
                return true
            }
            if recorded, let intent { try? intent.ensureDirtyOnDisk(self, first: a, end: b, noWait: false) }
            return
        }
        guard isEnabled else { return }
        let (a, b) = granules(offset: offset, length: length)
        guard a < b else { return }
        bits.withLock { _ = $0.set(a, b) }
    }

    // MARK: successor (backup jobs)

    /// QEMU's `bdrv_dirty_bitmap_create_successor`: the bitmap becomes busy and stops recording;
    /// a successor records writes from now on (if the bitmap recorded). Call with the node
    /// drained, so no write is half-way between the two.
    public func freeze() throws(BlockError) {
        if isBusy {
            throw BlockError(EBUSY, "Bitmap '\(name)' is currently in use by another operation and cannot be used")
        }
        if isFrozen { throw BlockError(EBUSY, "Cannot create a successor for a bitmap that already has one") }
        let count = granuleCount
        successor.withLock { $0 = (HBitmap(count: count), isEnabled) }
        enabledFlag.store(false, ordering: .relaxed)
        frozenFlag.store(true, ordering: .sequentiallyConsistent)
        acquireBusy()
    }

    /// QEMU's `bdrv_dirty_bitmap_abdicate`: the successor takes the bitmap's place (its bits:
    /// the writes since `freeze`; its recording state).
    public func abdicate() {
        let enabled = successor.withLock { s -> Bool? in
            guard let s else { return nil }
            bits.withLock { b in
                b.clearAll()
                b.formUnion(s.bits)
            }
            return s.enabled
        }
        if let enabled { unfreeze(enabled: enabled) }
    }

    /// QEMU's `bdrv_reclaim_dirty_bitmap`: the successor's bits are merged back; the bitmap
    /// records again if the successor did.
    public func reclaim() {
        let enabled = successor.withLock { s -> Bool? in
            guard let s else { return nil }
            bits.withLock { $0.formUnion(s.bits) }
            return s.enabled
        }
        if let enabled { unfreeze(enabled: enabled) }
    }

    private func unfreeze(enabled: Bool) {
        // Writes racing with this land in the successor or, once unfrozen, in the bits: merge
        // whatever reached the successor meanwhile after switching.
        enabledFlag.store(enabled && !inconsistent, ordering: .relaxed)
        frozenFlag.store(false, ordering: .sequentiallyConsistent)
        successor.withLock { s in
            if let late = s?.bits { bits.withLock { $0.formUnion(late) } }
            s = nil
        }
        releaseBusy()
    }

    // MARK: bits

    /// Marks bytes [offset, offset+length) dirty, rounded out to granules.
    public func mark(offset: UInt64, length: UInt64) {
        let (a, b) = granules(offset: offset, length: length)
        if a < b { bits.withLock { _ = $0.set(a, b) } }
    }

    /// Marks bytes [offset, offset+length) clean, rounded out to granules.
    public func reset(offset: UInt64, length: UInt64) {
        let (a, b) = granules(offset: offset, length: length)
        if a < b { bits.withLock { _ = $0.clear(a, b) } }
    }

    public func clearAll() { bits.withLock { $0.clearAll() } }

    public func isDirty(offset: UInt64) -> Bool {
        let g = Int(offset >> shift)
        return bits.withLock { g < $0.count && $0.get(g) }
    }

    /// The first dirty extent at or after `offset`, in bytes (clipped to `length`).
    public func nextDirty(from offset: UInt64) -> (offset: UInt64, length: UInt64)? {
        bits.withLock { b -> (UInt64, UInt64)? in
            guard let s = b.nextSet(from: Int(offset >> shift)) else { return nil }
            let e = b.nextClear(from: s) ?? b.count
            let start = max(offset, UInt64(s) << shift)
            return (start, min(UInt64(e) << shift, length) - start)
        }
    }

    /// The first clean extent at or after `offset`, in bytes (clipped to `length`).
    public func nextClean(from offset: UInt64) -> (offset: UInt64, length: UInt64)? {
        bits.withLock { b -> (UInt64, UInt64)? in
            guard let s = b.nextClear(from: Int(offset >> shift)) else { return nil }
            let e = b.nextSet(from: s) ?? b.count
            let start = max(offset, UInt64(s) << shift)
            return (start, min(UInt64(e) << shift, length) - start)
        }
    }

    /// Alternating clean/dirty extents covering [offset, offset+length) (clipped to the
    /// bitmap), at most `maxExtents` of them, each at most `maxExtentLength` bytes.
    public func extents(offset: UInt64, length: UInt64, maxExtents: Int,
                        maxExtentLength: UInt64 = UInt64(UInt32.max) & ~511) -> [(length: UInt64, dirty: Bool)] {
        var out: [(length: UInt64, dirty: Bool)] = []
        forEachExtent(offset: offset, length: length, maxExtents: maxExtents, maxExtentLength: maxExtentLength) {
            out.append(($0, $1))
        }
        return out
    }

    /// Calls `body(length, dirty)` for the alternating extents `extents` returns, under one
    /// lock and without allocating; returns the bytes covered.
    @discardableResult
    public func forEachExtent(offset: UInt64, length: UInt64, maxExtents: Int,
                              maxExtentLength: UInt64 = UInt64(UInt32.max) & ~511,
                              _ body: (UInt64, Bool) -> Void) -> UInt64 {
        let end = min(offset + length, self.length)
        guard offset < end else { return 0 }
        return bits.withLock { b in
            var at = offset
            var n = 0
            var g = Int(at >> shift)
            var dirty = b.get(g)
            while at < end && n < maxExtents {
                // Runs alternate: the next run starts where this one ends.
                let next = (dirty ? b.nextClear(from: g) : b.nextSet(from: g)) ?? b.count
                let stop = min(end, UInt64(next) << shift, at + maxExtentLength)
                body(stop - at, dirty)
                n += 1
                at = stop
                if stop == UInt64(next) << shift {
                    g = next
                    dirty.toggle()
                } else {
                    g = Int(at >> shift)
                    if at < end { dirty = b.get(g) }
                }
            }
            return at - offset
        }
    }

    /// Marks here every byte that is dirty in `other` (rounded out to this granularity).
    public func merge(from other: DirtyBitmap) {
        if other === self { return }
        if other.granularity == granularity && other.length == length {
            let copy = other.snapshot()
            bits.withLock { $0.formUnion(copy) }
            return
        }
        var at: UInt64 = 0
        while let e = other.nextDirty(from: at), e.offset < length {
            mark(offset: e.offset, length: min(e.length, length - e.offset))
            at = e.offset + e.length
        }
    }

    /// A copy of the bits (for merges and persistence).
    public func snapshot() -> HBitmap {
        bits.withLock { b in
            let c = HBitmap(count: b.count)
            c.formUnion(b)
            return c
        }
    }

    /// Runs `body` with the bits locked (serialisation, loading).
    public func withBits<T>(_ body: (HBitmap) throws -> T) rethrows -> T {
        try bits.withLock { try body($0) }
    }
}
