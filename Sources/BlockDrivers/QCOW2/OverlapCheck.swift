import BlockCore
import JSON
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// QEMU's metadata overlap checks (`overlap-check`, `QCOW2_OL_*` with the same bit numbers):
/// before the driver writes guest data or metadata to a host range, the range is compared
/// with the image's metadata structures. A write that would land on one means the image's
/// refcounts or tables are corrupt; it is refused with EIO and the image is marked corrupt
/// (`QCOW2Corruption`), as QEMU's `qcow2_pre_write_overlap_check` does.
///
/// blockd opens images with internal snapshots read-only only, so on a writable image the
/// snapshot table and the inactive L1/L2 tables never exist: those three checks are accepted
/// and always pass. The others are done as QEMU does them in `cached` mode (the default):
/// from the header and the L1 and refcount tables held in memory, without reading the disk.
public struct QCOW2OverlapChecks: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let mainHeader = QCOW2OverlapChecks(rawValue: 1 << 0)
    public static let activeL1 = QCOW2OverlapChecks(rawValue: 1 << 1)
    public static let activeL2 = QCOW2OverlapChecks(rawValue: 1 << 2)
    public static let refcountTable = QCOW2OverlapChecks(rawValue: 1 << 3)
    public static let refcountBlock = QCOW2OverlapChecks(rawValue: 1 << 4)
    public static let snapshotTable = QCOW2OverlapChecks(rawValue: 1 << 5)
    public static let inactiveL1 = QCOW2OverlapChecks(rawValue: 1 << 6)
    public static let inactiveL2 = QCOW2OverlapChecks(rawValue: 1 << 7)
    public static let bitmapDirectory = QCOW2OverlapChecks(rawValue: 1 << 8)

    /// The templates (`Qcow2OverlapCheckMode`).
    public static let none: QCOW2OverlapChecks = []
    public static let constant: QCOW2OverlapChecks = [.mainHeader, .activeL1, .refcountTable, .snapshotTable, .bitmapDirectory]
    public static let cached: QCOW2OverlapChecks = constant.union([.activeL2, .refcountBlock, .inactiveL1])
    public static let all: QCOW2OverlapChecks = cached.union(.inactiveL2)

    /// Option name (`Qcow2OverlapCheckFlags` member) and QEMU's name in messages
    /// (`metadata_ol_names`), in bit order.
    static let members: [(check: QCOW2OverlapChecks, option: String, name: String)] = [
        (.mainHeader, "main-header", "qcow2_header"),
        (.activeL1, "active-l1", "active L1 table"),
        (.activeL2, "active-l2", "active L2 table"),
        (.refcountTable, "refcount-table", "refcount table"),
        (.refcountBlock, "refcount-block", "refcount block"),
        (.snapshotTable, "snapshot-table", "snapshot table"),
        (.inactiveL1, "inactive-l1", "inactive L1 table"),
        (.inactiveL2, "inactive-l2", "inactive L2 table"),
        (.bitmapDirectory, "bitmap-directory", "bitmap directory"),
    ]

    static func template(_ mode: String) -> QCOW2OverlapChecks? {
        switch mode {
        case "none": return QCOW2OverlapChecks.none
        case "constant": return .constant
        case "cached": return .cached
        case "all": return .all
        default: return nil
        }
    }

    /// QEMU's name of the first structure in the set (`metadata_ol_names[ctz(ret)]`).
    var name: String { QCOW2OverlapChecks.members.first { contains($0.check) }?.name ?? "metadata" }

    /// `overlap-check` as QAPI's `Qcow2OverlapChecks` alternate: a mode name, or an object of
    /// per-structure booleans over a `template` (default `cached`). Absent: `cached`.
    static func read(_ reader: inout OptionReader) throws(BlockError) -> QCOW2OverlapChecks {
        guard let value = reader.value("overlap-check") else { return .cached }
        let modes = ["none", "constant", "cached", "all"]
        switch value {
        case .string(let mode):
            guard let t = template(mode) else {
                throw BlockError.invalid("Parameter 'overlap-check' does not accept value '\(mode)'")
            }
            return t
        case .object(let flags):
            var r = OptionReader(flags, prefix: reader.prefix + "overlap-check.")
            var checks = try r.enumValue("template", modes).flatMap(template) ?? .cached
            for m in members {
                if let on = try r.bool(m.option) {
                    if on { checks.insert(m.check) } else { checks.remove(m.check) }
                }
            }
            try r.finish()
            return checks
        default:
            throw BlockError.invalid("Invalid parameter type for '\(reader.prefix)overlap-check', expected: Qcow2OverlapChecks")
        }
    }
}

/// Host cluster indices of one kind of metadata cluster (L2 tables, refcount blocks), sorted,
/// for range queries in O(log n) on every write. Tables are only ever added while an image
/// is open (blockd frees neither L2 tables nor refcount blocks), mostly at the end of the file.
struct QCOW2ClusterSet {
    private(set) var clusters: [UInt64] = []

    init<S: Sequence>(_ items: S) where S.Element == UInt64 {
        clusters = Array(Set(items)).sorted()
    }

    /// Index of the first element ≥ `c`.
    private func lowerBound(_ c: UInt64) -> Int {
        var lo = 0, hi = clusters.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if clusters[mid] < c { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    mutating func insert(_ c: UInt64) {
        let i = lowerBound(c)
        if i < clusters.count && clusters[i] == c { return }
        clusters.insert(c, at: i)
    }

    /// Whether any element lies in [first, end).
    func containsAny(from first: UInt64, to end: UInt64) -> Bool {
        let i = lowerBound(first)
        return i < clusters.count && clusters[i] < end
    }
}

/// A fatal corruption found while the image is open (QEMU's `qcow2_signal_corruption` with
/// `fatal`): what the node reports as `BLOCK_IMAGE_CORRUPTED` (`BlockDriver.onCorruption`).
public typealias QCOW2CorruptionEvent = ImageCorruption

/// Whether the image was found corrupt while open, shared by the driver (checked on every
/// change, without the metadata lock) and its metadata (which finds it).
///
/// Once marked, the image is read-only for this open: every write, zero write, discard and
/// flush fails with EIO, nothing more is written to the file (no metadata write-back, no
/// bitmap store) beyond the corrupt bit itself; reads still work from the metadata in memory.
/// QEMU makes the node unusable altogether; blockd keeps reads so the data can be copied out.
final class QCOW2Corruption: Sendable {
    private let marked = Atomic<Bool>(false)
    private let state = Mutex<(message: String, handler: (@Sendable (QCOW2CorruptionEvent) -> Void)?)>(("", nil))

    var isMarked: Bool { marked.load(ordering: .acquiring) }
    var message: String { state.withLock { $0.message } }

    func setHandler(_ handler: (@Sendable (QCOW2CorruptionEvent) -> Void)?) {
        state.withLock { $0.handler = handler }
    }

    /// Marks the image; returns false if it was marked already (QEMU suppresses further events).
    func mark(_ event: QCOW2CorruptionEvent) -> Bool {
        if marked.exchange(true, ordering: .acquiringAndReleasing) { return false }
        let handler = state.withLock { s -> (@Sendable (QCOW2CorruptionEvent) -> Void)? in
            s.message = event.message
            return s.handler
        }
        handler?(event)
        return true
    }
}

extension QCOW2Metadata {
    /// QEMU's `qcow2_check_metadata_overlap`: the first metadata structure (by QEMU's bit
    /// order) that the cluster-aligned host range [offset, offset + size) overlaps, leaving
    /// out `ignoring` (the structure being written itself); nil when there is none.
    func metadataOverlap(at offset: UInt64, size: UInt64, ignoring: QCOW2OverlapChecks = []) -> QCOW2OverlapChecks? {
        let chk = overlapChecks.subtracting(ignoring)
        if size == 0 || chk.isEmpty { return nil }
        if chk.contains(.mainHeader) && offset < clusterSize { return .mainHeader }
        let start = offset & ~(clusterSize - 1)
        let (sum, o) = offset.addingReportingOverflow(size)
        let end = o ? UInt64.max & ~(clusterSize - 1) : (sum + clusterSize - 1) & ~(clusterSize - 1)
        func overlaps(_ at: UInt64, _ length: UInt64) -> Bool {
            length > 0 && at < end && start < at &+ length
        }
        if chk.contains(.activeL1) && overlaps(header.l1TableOffset, UInt64(l1.count) * 8) { return .activeL1 }
        if chk.contains(.refcountTable) && overlaps(header.refcountTableOffset, UInt64(refTable.count) * 8) {
            return .refcountTable
        }
        // Snapshot table, inactive L1 and L2: a writable image has no snapshots (see the type).
        if chk.contains(.activeL2) && l2Tables.containsAny(from: start >> clusterBits, to: end >> clusterBits) {
            return .activeL2
        }
        if chk.contains(.refcountBlock) && refBlocks.containsAny(from: start >> clusterBits, to: end >> clusterBits) {
            return .refcountBlock
        }
        if chk.contains(.bitmapDirectory), let d = bitmapDirectory, overlaps(d.offset, d.size) { return .bitmapDirectory }
        return nil
    }

    /// QEMU's `qcow2_pre_write_overlap_check`: throws EIO, after marking the image corrupt,
    /// when a write to [offset, offset + size) would land on metadata.
    func checkOverlap(at offset: UInt64, size: UInt64, ignoring: QCOW2OverlapChecks = []) throws(BlockError) {
        guard let hit = metadataOverlap(at: offset, size: size, ignoring: ignoring) else { return }
        throw signalCorruption(offset: offset, size: size,
                               "Preventing invalid write on metadata (overlaps with \(hit.name))")
    }

    /// Marks the image corrupt (the first time): the corrupt bit goes to the header (qcow2 v3;
    /// v2 has no such bit, so only this open knows), the handler hears of it, and the image is
    /// read-only from now on. Returns the error for the request that found it.
    func signalCorruption(offset: UInt64?, size: UInt64?, _ message: String) -> BlockError {
        if corruption.mark(QCOW2CorruptionEvent(message: message, offset: offset, size: size, fatal: true)) {
            header.incompatibleFeatures |= QCOW2Feature.corrupt
            try? writeIncompatibleFeatures()
        }
        return BlockError(EIO, "Image '\(image)': \(message); the image is marked corrupt (repair it with 'qemu-img check -r all')")
    }

    /// Writes metadata to the image file: refused once the image is marked corrupt, and
    /// checked against the other metadata structures first (`ignoring` the one written).
    func writeMetadata(at offset: UInt64, from bytes: UnsafeRawBufferPointer,
                       ignoring: QCOW2OverlapChecks = []) throws(BlockError) {
        if corruption.isMarked { throw corruptImageError() }
        try checkOverlap(at: offset, size: UInt64(bytes.count), ignoring: ignoring)
        try file.node.write(at: offset, from: bytes)
    }

    /// The error for a change (or flush) once the image is marked corrupt.
    func corruptImageError() -> BlockError {
        BlockError(EIO, "Image '\(image)' is marked corrupt (\(corruption.message)): it is read-only until repaired with 'qemu-img check -r all'")
    }
}
