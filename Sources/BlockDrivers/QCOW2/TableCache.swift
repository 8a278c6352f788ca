#if canImport(Glibc)
import Glibc
#endif

/// One cached metadata cluster (an L2 table or a refcount block), bytes as on disk (big-endian).
final class QCOW2Table {
    /// Host offset of the cluster in the image file.
    let offset: UInt64
    let data: UnsafeMutableRawPointer
    let size: Int
    /// Changed in memory and not yet written back: L2 tables, and refcount blocks holding
    /// deferred increases (`dirtyLow..<dirtyHigh`, see `QCOW2Metadata.adjustRefcounts`).
    var dirty = false
    /// Byte range of a refcount block changed in memory only.
    var dirtyLow = Int.max
    var dirtyHigh = 0
    /// A refcount block's index in the refcount table (`UInt64.max` for an L2 table).
    var refblockIndex = UInt64.max
    var lastUse: UInt64 = 0

    init(offset: UInt64, size: Int) {
        self.offset = offset
        self.size = size
        self.data = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
    }

    deinit { data.deallocate() }

    var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: data, count: size) }

    func zero() { memset(data, 0, size) }
}

/// A bounded LRU cache of metadata tables keyed by host offset. The hit path is one
/// dictionary lookup and a counter bump; eviction scans for the least recently used table,
/// which only happens on a miss (which costs a disk read anyway).
struct QCOW2TableCache {
    private(set) var tables: [UInt64: QCOW2Table] = [:]
    let capacity: Int
    private var tick: UInt64 = 0
    /// `tick` at the previous `cleanUnused`.
    private var cleanMark: UInt64 = 0

    init(capacity: Int) {
        self.capacity = max(2, capacity)
        tables.reserveCapacity(min(self.capacity, 1 << 16))
    }

    @inline(__always)
    mutating func lookup(_ offset: UInt64) -> QCOW2Table? {
        guard let t = tables[offset] else { return nil }
        tick &+= 1
        t.lastUse = tick
        return t
    }

    /// Peeks without touching the LRU order.
    func contains(_ offset: UInt64) -> Bool { tables[offset] != nil }

    var isFull: Bool { tables.count >= capacity }

    /// The least recently used table, preferring clean ones.
    func victim() -> QCOW2Table? {
        var best: QCOW2Table?
        var bestDirty: QCOW2Table?
        for t in tables.values {
            if t.dirty {
                if bestDirty == nil || t.lastUse < bestDirty!.lastUse { bestDirty = t }
            } else if best == nil || t.lastUse < best!.lastUse {
                best = t
            }
        }
        return best ?? bestDirty
    }

    mutating func insert(_ t: QCOW2Table) {
        tick &+= 1
        t.lastUse = tick
        tables[t.offset] = t
    }

    mutating func remove(_ offset: UInt64) { tables[offset] = nil }

    /// QEMU's `qcow2_cache_clean_unused`: drops the clean tables nobody used since the
    /// previous call (dirty ones wait for their write-back); returns how many.
    mutating func cleanUnused() -> Int {
        let unused = tables.values.filter { !$0.dirty && $0.lastUse <= cleanMark }.map(\.offset)
        for offset in unused { tables[offset] = nil }
        cleanMark = tick
        return unused.count
    }

    var count: Int { tables.count }

    var dirtyTables: [QCOW2Table] { tables.values.filter { $0.dirty }.sorted { $0.offset < $1.offset } }
}
