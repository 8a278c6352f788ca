import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// Cluster allocation, copy-on-write, zero clusters, discard and metadata write-back.
///
/// Ordering on disk (what keeps a crash at most leaking):
/// - refcount increases are written through at allocation, data goes to the new clusters,
///   and dirty L2 tables (which point at them) are written only in `writeBack` after an
///   fdatasync;
/// - a new L2 table is written before the L1 entry that points at it (another fdatasync);
/// - clusters an L2 entry stopped pointing at are decremented only after that L2 table is
///   written and synced (`pendingFrees`), and after every unlocked I/O that may still target
///   them has finished (`readyFrees`, see `InFlight.swift`).
/// See docs/qcow2.md for the full set of rules.
extension QCOW2Metadata {
    // MARK: write-back

    /// Writes back dirty L2 tables and L1 entries in dependency order, then applies queued
    /// frees; with `sync`, ends with an fdatasync so everything is durable.
    func writeBack(sync: Bool) throws(BlockError) {
        if readOnly { return }
        // Nothing more is written to an image found corrupt (QEMU drops the node's caches).
        if corruption.isMarked { throw corruptImageError() }
        let dirty = l2Cache.dirtyTables
        let l1Dirty = l1DirtyHigh >= 0
        if !dirty.isEmpty || l1Dirty {
            // Deferred refcount increases first: the sync below makes them durable before any
            // L2 table (or L1 entry) that references their clusters is written.
            try writeRefblocks()
            if needSyncBeforeL2 {
                try file.node.flush()
                needSyncBeforeL2 = false
            }
            for t in dirty {
                try writeMetadata(at: t.offset, from: UnsafeRawBufferPointer(t.bytes), ignoring: .activeL2)
                t.dirty = false
            }
            if l1Dirty {
                if !dirty.isEmpty { try file.node.flush() }
                let lo = l1DirtyLow
                let hi = l1DirtyHigh
                var be = [UInt64](repeating: 0, count: hi - lo + 1)
                for i in lo...hi { be[i - lo] = l1[i].bigEndian }
                try rethrowingBlockError { try be.withUnsafeBytes { (raw) in
                    try writeMetadata(at: header.l1TableOffset + UInt64(lo) * 8, from: raw, ignoring: .activeL1)
                } }
                l1DirtyLow = Int.max
                l1DirtyHigh = -1
            }
        }
        if !pendingFrees.isEmpty {
            // The L2 changes that dropped these clusters must be durable before the refcounts
            // drop; then they wait for their I/O epoch to drain (`releaseSafeFrees`).
            try file.node.flush()
            readyFrees += pendingFrees
            pendingFrees = []
        }
        try releaseSafeFrees()
        // Deferred increases left in memory belong to allocations still in flight (a committed
        // one has a dirty L2 table, written above): they reach the file with that table.
        if sync { try file.node.flush() }
    }

    /// Frees queued too much: write back now so the space can be reused.
    func writeBackIfManyFrees() throws(BlockError) {
        if pendingFrees.count > 1024 { try writeBack(sync: false) }
    }

    // MARK: L2 tables for writing

    /// The L2 table covering `guest`, allocating an empty one if the L1 entry is empty.
    /// (Writable images have no internal snapshots, so every L2 table is owned by us.)
    func writableL2Table(for guest: UInt64) throws(BlockError) -> QCOW2Table {
        let l1i = l1Index(guest)
        guard l1i < l1.count else { throw BlockError.invalid("offset \(guest) is beyond the L1 table of '\(image)'") }
        let l1e = l1[l1i]
        let offset = l1e & QCOW2Entry.offsetMask
        if offset != 0 {
            guard l1e & QCOW2Entry.copied != 0 else {
                throw BlockError.notSupported("Image '\(image)': writing to a shared L2 table (internal snapshots) is not supported")
            }
            return try l2Table(at: offset, allowLoad: true)!
        }
        try makeRoomInL2Cache()
        // Deferred like data clusters: the table reaches the disk (after the refcount) only
        // in `writeBack`, and the L1 entry after it.
        let (host, _) = try allocateClusters(maxCount: 1, deferred: true)
        let t = QCOW2Table(offset: host, size: Int(clusterSize))
        t.zero()
        t.dirty = true
        l2Cache.insert(t)
        l1[l1i] = host | QCOW2Entry.copied
        l2Tables.insert(host >> clusterBits)
        l1DirtyLow = min(l1DirtyLow, l1i)
        l1DirtyHigh = max(l1DirtyHigh, l1i)
        return t
    }

    // MARK: zero clusters and discard

    /// Unallocated clusters read as zeroes wherever the image is opened: no backing attached
    /// and none named in the header. An overlay opened with `backing: null` (a backup's
    /// incremental target) still gets zero clusters, as QEMU writes them, so its zeroes hide
    /// the backing file once it is opened with one.
    var unallocatedReadsZero: Bool { backing == nil && (header.backingFile ?? "").isEmpty }

    /// Whether guest cluster `c` already reads as zeroes in this layer and below.
    func clusterReadsAsZero(_ c: UInt64) throws(BlockError) -> Bool {
        let guest = c << clusterBits
        guard let e = try extent(at: guest, length: 1, allowLoad: true, statusMode: false) else { return false }
        switch e.kind {
        case .zero: return true
        case .unallocated: return unallocatedReadsZero
        default: return false
        }
    }

    /// Makes `count` whole clusters from guest cluster `first` read as zeroes (v3 zero flag);
    /// with `unmap`, their host clusters are freed.
    func zeroClusters(first: UInt64, count: UInt64, unmap: Bool) throws(BlockError) {
        var c = first
        let end = first + count
        let perTable = l2Entries
        while c < end {
            let guest = c << clusterBits
            let l1i = l1Index(guest)
            let tableEnd = min(end, (c / perTable + 1) * perTable)
            if l1[l1i] & QCOW2Entry.offsetMask == 0 && unallocatedReadsZero {
                // Unallocated without backing already reads as zeroes.
                c = tableEnd
                continue
            }
            let t = try writableL2Table(for: guest)
            while c < tableEnd {
                let idx = c & (perTable - 1)
                let old = l2Entry(t, idx)
                var new = old
                let host = old & QCOW2Entry.offsetMask
                if old & QCOW2Entry.compressed != 0 {
                    // QEMU unmaps a zeroed compressed cluster always, as a discard request.
                    queueFree(entry: old, discard: true)
                    new = QCOW2Entry.zero
                } else if host == 0 {
                    if !unallocatedReadsZero || old & QCOW2Entry.zero != 0 { new = QCOW2Entry.zero }
                } else if unmap || old & QCOW2Entry.copied == 0 {
                    queueFree(entry: old, discard: unmap)
                    new = QCOW2Entry.zero
                } else {
                    new = host | QCOW2Entry.copied | QCOW2Entry.zero
                }
                if new != old { setL2Entry(t, idx, new) }
                c += 1
            }
        }
        try writeBackIfManyFrees()
    }

    /// Discards `count` whole clusters from `first`, as QEMU does: allocated clusters (or any
    /// cluster when there is a backing file) become zero clusters on v3 and unallocated on v2;
    /// their host clusters are freed.
    func discardClusters(first: UInt64, count: UInt64) throws(BlockError) {
        var c = first
        let end = first + count
        let perTable = l2Entries
        while c < end {
            let guest = c << clusterBits
            let l1i = l1Index(guest)
            let tableEnd = min(end, (c / perTable + 1) * perTable)
            if l1[l1i] & QCOW2Entry.offsetMask == 0 && (backing == nil || !hasZeroFlag) {
                c = tableEnd
                continue
            }
            let t = try writableL2Table(for: guest)
            while c < tableEnd {
                let idx = c & (perTable - 1)
                let old = l2Entry(t, idx)
                let isAllocated = old & QCOW2Entry.compressed != 0 || old & QCOW2Entry.offsetMask != 0
                var new: UInt64 = 0
                if backing != nil || isAllocated {
                    new = hasZeroFlag ? QCOW2Entry.zero : 0
                }
                if isAllocated { queueFree(entry: old, discard: true) }
                if new != old { setL2Entry(t, idx, new) }
                c += 1
            }
        }
        try writeBackIfManyFrees()
    }

    // MARK: header

    /// Rewrites the header cluster's used bytes and syncs.
    func writeHeader() throws(BlockError) {
        let bytes = try header.serialize()
        try rethrowingBlockError { try bytes.withUnsafeBytes { (raw) in
            try file.node.write(at: 0, from: raw)
        } }
        try file.node.flush()
    }

    /// Writes the incompatible-features field alone (8 bytes, one sector) and syncs.
    func writeIncompatibleFeatures() throws(BlockError) {
        guard header.version >= 3 else { return }
        var be = header.incompatibleFeatures.bigEndian
        try rethrowingBlockError { try withUnsafeBytes(of: &be) { (raw) in
            try file.node.write(at: 72, from: raw)
        } }
        try file.node.flush()
    }
}
