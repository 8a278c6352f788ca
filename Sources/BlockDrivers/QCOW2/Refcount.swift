import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// Refcount table and blocks: reading every width (1..64 bits), writing through every change,
/// and growing the table when the image outgrows it.
///
/// An increase reaches the file before any L2 entry that points at the cluster is written:
/// data clusters and new L2 tables are counted in memory only (`deferred`) and their refcount
/// blocks are written at the start of `writeBack`, before the fdatasync that precedes the L2
/// tables; everything else (refcount blocks and tables, bitmaps, directories) is written
/// through at once. A decrease is written only after the L2 entry that stopped pointing at
/// the cluster is durable (`pendingFrees`).
extension QCOW2Metadata {
    // MARK: entries

    @inline(__always)
    func refcountEntry(_ p: UnsafeRawPointer, _ index: UInt64) -> UInt64 {
        switch refcountOrder {
        case 0, 1, 2:
            let bits = UInt64(1) << refcountOrder
            let perByte = 8 / bits
            let byte = UInt64(p.load(fromByteOffset: Int(index / perByte), as: UInt8.self))
            return (byte >> ((index % perByte) * bits)) & ((1 << bits) - 1)
        case 3: return UInt64(p.load(fromByteOffset: Int(index), as: UInt8.self))
        case 4: return UInt64(UInt16(bigEndian: p.loadUnaligned(fromByteOffset: Int(index * 2), as: UInt16.self)))
        case 5: return UInt64(loadBE32(p, Int(index * 4)))
        default: return loadBE64(p, Int(index * 8))
        }
    }

    /// Stores an entry; returns the byte offset within the block that changed.
    @inline(__always)
    @discardableResult
    func setRefcountEntry(_ p: UnsafeMutableRawPointer, _ index: UInt64, _ value: UInt64) -> (Int, Int) {
        switch refcountOrder {
        case 0, 1, 2:
            let bits = UInt64(1) << refcountOrder
            let perByte = 8 / bits
            let at = Int(index / perByte)
            let shift = (index % perByte) * bits
            let mask = UInt8(truncatingIfNeeded: ((1 << bits) - 1) << shift)
            var byte = p.load(fromByteOffset: at, as: UInt8.self)
            byte = (byte & ~mask) | (UInt8(truncatingIfNeeded: value << shift) & mask)
            p.storeBytes(of: byte, toByteOffset: at, as: UInt8.self)
            return (at, 1)
        case 3:
            p.storeBytes(of: UInt8(truncatingIfNeeded: value), toByteOffset: Int(index), as: UInt8.self)
            return (Int(index), 1)
        case 4:
            p.storeBytes(of: UInt16(truncatingIfNeeded: value).bigEndian, toByteOffset: Int(index * 2), as: UInt16.self)
            return (Int(index * 2), 2)
        case 5:
            storeBE32(p, Int(index * 4), UInt32(truncatingIfNeeded: value))
            return (Int(index * 4), 4)
        default:
            storeBE64(p, Int(index * 8), value)
            return (Int(index * 8), 8)
        }
    }

    /// The refcount block holding cluster `cluster`'s count, or nil if none is allocated.
    func refblock(forCluster cluster: UInt64) throws(BlockError) -> QCOW2Table? {
        let rbi = cluster / rbEntries
        guard rbi < UInt64(refTable.count) else { return nil }
        let offset = refTable[Int(rbi)] & ~UInt64(511)
        if offset == 0 { return nil }
        if let t = rbCache.lookup(offset) { return t }
        guard offset & (clusterSize - 1) == 0 else { throw corrupt("refcount block offset \(offset) is not aligned") }
        try makeRoomInRefblockCache()
        let t = QCOW2Table(offset: offset, size: Int(clusterSize))
        t.refblockIndex = rbi
        try readFile(at: offset, into: t.bytes)
        rbCache.insert(t)
        return t
    }

    func refcount(ofCluster cluster: UInt64) throws(BlockError) -> UInt64 {
        guard let rb = try refblock(forCluster: cluster) else { return 0 }
        return refcountEntry(rb.data, cluster % rbEntries)
    }

    /// Evicts the least recently used refcount block when the cache is full, writing its
    /// deferred increases first (writing an increase early costs at most a leak).
    func makeRoomInRefblockCache() throws(BlockError) {
        guard rbCache.isFull, let v = rbCache.victim() else { return }
        // A corrupt image writes nothing more: its dirty blocks stay (the cache grows by them).
        if v.dirty && corruption.isMarked { return }
        // Everything goes out, in-flight increases included: the block leaves memory.
        if v.dirty { try writeRefblock(v, holdingInFlight: false) }
        rbCache.remove(v.offset)
    }

    /// Writes the changed bytes of one refcount block held in memory. With `holdingInFlight`,
    /// the increases of allocations still in flight (`reservedHost`) are written as they were
    /// before (one less) and stay pending in memory: their L2 entries are not part of this
    /// write-back, so a crash after it would only leak them.
    private func writeRefblock(_ t: QCOW2Table, holdingInFlight: Bool) throws(BlockError) {
        var held: [UInt64] = []
        if holdingInFlight && !reservedHost.isEmpty, let first = blockFirstCluster(t) {
            held = reservedHost.filter { $0 >= first && $0 < first + rbEntries }.sorted()
        }
        if t.dirtyLow < t.dirtyHigh {
            if held.isEmpty {
                try writeMetadata(at: t.offset + UInt64(t.dirtyLow),
                                  from: UnsafeRawBufferPointer(start: t.data + t.dirtyLow, count: t.dirtyHigh - t.dirtyLow),
                                  ignoring: .refcountBlock)
            } else {
                let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: t.size, alignment: 8)
                defer { copy.deallocate() }
                copy.copyMemory(from: UnsafeRawBufferPointer(t.bytes))
                let first = blockFirstCluster(t)!
                for c in held {
                    let i = c - first
                    let value = refcountEntry(t.data, i)
                    setRefcountEntry(copy.baseAddress!, i, value > 0 ? value - 1 : 0)
                }
                try writeMetadata(at: t.offset + UInt64(t.dirtyLow),
                                  from: UnsafeRawBufferPointer(rebasing: copy[t.dirtyLow..<t.dirtyHigh]),
                                  ignoring: .refcountBlock)
            }
        }
        if held.isEmpty {
            t.dirty = false
            t.dirtyLow = Int.max
            t.dirtyHigh = 0
            dirtyRefblocks.removeAll { $0 === t }
        } else {
            // Only the held entries stay pending.
            let first = blockFirstCluster(t)!
            var lo = Int.max, hi = 0
            for c in held {
                let (at, n) = refcountEntryBytes(c - first)
                lo = min(lo, at)
                hi = max(hi, at + n)
            }
            t.dirtyLow = lo
            t.dirtyHigh = hi
        }
    }

    /// The first cluster a cached refcount block counts (its index in the refcount table
    /// times the clusters per block).
    private func blockFirstCluster(_ t: QCOW2Table) -> UInt64? {
        t.refblockIndex == UInt64.max ? nil : t.refblockIndex * rbEntries
    }

    /// Byte offset and length inside a refcount block of entry `index`.
    private func refcountEntryBytes(_ index: UInt64) -> (Int, Int) {
        switch refcountOrder {
        case 0, 1, 2: return (Int(index / (8 >> refcountOrder)), 1)
        default: return (Int(index << (refcountOrder - 3)), Int(1 << (refcountOrder - 3)))
        }
    }

    /// Writes every refcount block with deferred increases, except those of allocations still
    /// in flight (the caller syncs afterwards, then writes the L2 tables).
    func writeRefblocks() throws(BlockError) {
        let list = dirtyRefblocks
        for t in list { try writeRefblock(t, holdingInFlight: true) }
    }

    /// Adds `delta` (+1 or -1) to the refcounts of `count` clusters from `start`, writing each
    /// touched refcount block through, or with `deferred` (increases only) leaving the change
    /// in memory for `writeRefblocks`. Clusters whose count drops to 0 become reusable (and
    /// are discarded in the file when `discard`).
    func adjustRefcounts(start: UInt64, count: UInt64, increase: Bool, discard: Bool = false,
                         deferred: Bool = false) throws(BlockError) {
        var c = start
        let end = start + count
        while c < end {
            if increase { try ensureRefblock(c / rbEntries) }
            guard let rb = try refblock(forCluster: c) else {
                throw corrupt("cluster \(c) has no refcount block but is being freed")
            }
            let blockEnd = min(end, (c / rbEntries + 1) * rbEntries)
            var lo = Int.max
            var hi = 0
            var freedStart: UInt64 = 0
            var freedCount: UInt64 = 0
            while c < blockEnd {
                let i = c % rbEntries
                let old = refcountEntry(rb.data, i)
                let new: UInt64
                if increase {
                    guard old < refcountMax else { throw BlockError.io("Image '\(image)': refcount overflow for cluster \(c)") }
                    new = old + 1
                } else {
                    guard old > 0 else { throw corrupt("refcount of cluster \(c) would drop below zero") }
                    new = old - 1
                }
                let (at, n) = setRefcountEntry(rb.data, i, new)
                lo = min(lo, at)
                hi = max(hi, at + n)
                if new == 0 {
                    if c < freeHint { freeHint = c }
                    // A free host cluster is no place for the next compressed cluster.
                    if compressedCursor != 0 && compressedCursor >> clusterBits == c { compressedCursor = 0 }
                    if discard {
                        if freedCount > 0 && freedStart + freedCount == c { freedCount += 1 } else {
                            if freedCount > 0 { discardFile(freedStart, freedCount) }
                            freedStart = c
                            freedCount = 1
                        }
                    }
                }
                c += 1
            }
            if deferred && increase {
                if !rb.dirty {
                    rb.dirty = true
                    dirtyRefblocks.append(rb)
                }
                rb.dirtyLow = min(rb.dirtyLow, lo)
                rb.dirtyHigh = max(rb.dirtyHigh, hi)
            } else {
                try writeMetadata(at: rb.offset + UInt64(lo), from: UnsafeRawBufferPointer(start: rb.data + lo, count: hi - lo),
                                  ignoring: .refcountBlock)
            }
            if freedCount > 0 { discardFile(freedStart, freedCount) }
        }
    }

    private func discardFile(_ start: UInt64, _ count: UInt64) {
        // Advisory: a file that cannot punch holes keeps the bytes.
        try? file.node.discard(at: start << clusterBits, length: count << clusterBits)
    }

    /// Makes sure refcount block `rbi` exists, creating it (self-describing: it lives in the
    /// first cluster of the range it covers, which is free because no block counted it yet).
    func ensureRefblock(_ rbi: UInt64) throws(BlockError) {
        if rbi < UInt64(refTable.count) && refTable[Int(rbi)] != 0 { return }
        if rbi >= UInt64(refTable.count) {
            try growRefcountTable(minEntries: rbi + 1)
            if refTable[Int(rbi)] != 0 { return }
        }
        let cluster = rbi * rbEntries
        let (offset, o) = cluster.multipliedReportingOverflow(by: clusterSize)
        guard !o, offset < (UInt64(1) << 56) else { throw BlockError(ENOSPC, "Image '\(image)' is full") }
        // The cluster is free only if the refcounts are right: on a corrupt image it may be
        // metadata (QEMU: "Preventing invalid allocation of refcount block").
        try checkOverlap(at: offset, size: clusterSize)
        let t = QCOW2Table(offset: offset, size: Int(clusterSize))
        t.refblockIndex = rbi
        t.zero()
        setRefcountEntry(t.data, 0, 1)
        try writeMetadata(at: offset, from: UnsafeRawBufferPointer(t.bytes))
        // The block must be durable before the table entry points at it.
        try file.node.flush()
        refTable[Int(rbi)] = offset
        refBlocks.insert(offset >> clusterBits)
        var be = offset.bigEndian
        try withUnsafeBytes(of: &be) { (raw) throws(BlockError) in
            try writeMetadata(at: header.refcountTableOffset + rbi * 8, from: raw, ignoring: .refcountTable)
        }
        try makeRoomInRefblockCache()
        rbCache.insert(t)
        allocEnd = max(allocEnd, cluster + 1)
        if freeHint == cluster { freeHint = cluster + 1 }
    }

    /// Replaces the refcount table by a larger one placed past everything allocated, with
    /// the refcount blocks needed to count the new table's own clusters.
    func growRefcountTable(minEntries: UInt64) throws(BlockError) {
        let perCluster = clusterSize / 8
        var start = allocEnd
        var newEntries: UInt64 = 0
        var tableClusters: UInt64 = 0
        var newBlocks: [UInt64] = []  // refcount block indices created
        search: while true {
            newEntries = max(minEntries, UInt64(refTable.count) * 2)
            newBlocks = []
            var iterations = 0
            while true {
                iterations += 1
                if iterations > 64 { throw BlockError.io("Image '\(image)': cannot grow the refcount table") }
                tableClusters = (newEntries + perCluster - 1) / perCluster
                let end = start + tableClusters + UInt64(newBlocks.count)
                var needed: [UInt64] = []
                var rbi = start / rbEntries
                while rbi * rbEntries < end {
                    if rbi >= UInt64(refTable.count) || refTable[Int(rbi)] == 0 { needed.append(rbi) }
                    rbi += 1
                }
                let maxIndex = max(needed.last ?? 0, minEntries - 1)
                if maxIndex >= newEntries { newEntries = maxIndex + 1 }
                let newTableClusters = (newEntries + perCluster - 1) / perCluster
                if needed == newBlocks && newTableClusters == tableClusters { break }
                newBlocks = needed
            }
            // Clusters counted by existing blocks must be free.
            let end = start + tableClusters + UInt64(newBlocks.count)
            var c = start
            while c < end {
                if try refcount(ofCluster: c) != 0 { start = c + 1; continue search }
                c += 1
            }
            break
        }
        guard (start + tableClusters + UInt64(newBlocks.count)) << clusterBits < (UInt64(1) << 56),
              tableClusters * clusterSize <= QCOW2Header.maxRefcountTableBytes else {
            throw BlockError(ENOSPC, "Image '\(image)': the refcount table cannot grow any more")
        }
        let end = start + tableClusters + UInt64(newBlocks.count)
        // Free by the refcounts, but on a corrupt image possibly metadata.
        try checkOverlap(at: start << clusterBits, size: (end - start) << clusterBits)
        var table = refTable
        if table.count < Int(tableClusters * perCluster) {
            table.append(contentsOf: repeatElement(0, count: Int(tableClusters * perCluster) - table.count))
        }
        // Build the new blocks.
        var blocks: [UInt64: QCOW2Table] = [:]
        for (j, rbi) in newBlocks.enumerated() {
            let off = (start + tableClusters + UInt64(j)) << clusterBits
            let t = QCOW2Table(offset: off, size: Int(clusterSize))
            t.refblockIndex = rbi
            t.zero()
            blocks[rbi] = t
            table[Int(rbi)] = off
        }
        for c in start..<end {
            let rbi = c / rbEntries
            if let t = blocks[rbi] {
                setRefcountEntry(t.data, c % rbEntries, 1)
            }
        }
        for t in blocks.values {
            try writeMetadata(at: t.offset, from: UnsafeRawBufferPointer(t.bytes), ignoring: .refcountBlock)
        }
        // Existing blocks covering part of the new area.
        for c in start..<end where blocks[c / rbEntries] == nil {
            guard let rb = try refblock(forCluster: c) else { continue }
            let (at, n) = setRefcountEntry(rb.data, c % rbEntries, 1)
            try writeMetadata(at: rb.offset + UInt64(at), from: UnsafeRawBufferPointer(start: rb.data + at, count: n),
                              ignoring: .refcountBlock)
        }
        // The new table.
        let tableOffset = start << clusterBits
        let be = table.map { $0.bigEndian }
        try rethrowingBlockError { try be.withUnsafeBytes { (raw) in
            try writeMetadata(at: tableOffset, from: raw, ignoring: .refcountTable)
        } }
        try file.node.flush()
        // Switch the header to it (12 bytes inside one sector).
        var fields: [UInt8] = []
        appendBE64(&fields, tableOffset)
        appendBE32(&fields, UInt32(tableClusters))
        try rethrowingBlockError { try fields.withUnsafeBytes { (raw) in
            try file.node.write(at: 48, from: raw)
        } }
        try file.node.flush()
        let oldOffset = header.refcountTableOffset
        let oldClusters = UInt64(header.refcountTableClusters)
        header.refcountTableOffset = tableOffset
        header.refcountTableClusters = UInt32(tableClusters)
        refTable = table
        for rbi in newBlocks { refBlocks.insert(table[Int(rbi)] >> clusterBits) }
        for t in blocks.values {
            try makeRoomInRefblockCache()
            rbCache.insert(t)
        }
        allocEnd = max(allocEnd, end)
        // Nothing points at the old table any more (a hole in the file with pass-discard-other).
        try adjustRefcounts(start: oldOffset >> clusterBits, count: oldClusters, increase: false, discard: passDiscardOther)
        _ = be.count
    }

    // MARK: allocation

    /// Allocates up to `maxCount` contiguous clusters (at least one) and returns the first
    /// one's host offset and how many were allocated. Refcounts are written through, or with
    /// `deferred` kept in memory until the next `writeBack` (for clusters that only an L2
    /// table or the L1 table will reference: both are written after that write-back's sync).
    func allocateClusters(maxCount: UInt64, deferred: Bool = false) throws(BlockError) -> (offset: UInt64, count: UInt64) {
        var c = freeHint
        while true {
            // Find a free cluster.
            while true {
                let rbi = c / rbEntries
                if rbi >= UInt64(refTable.count) || refTable[Int(rbi)] == 0 {
                    try ensureRefblock(rbi)
                    // The new block may sit in the cluster we looked at.
                    if try refcount(ofCluster: c) == 0 { break }
                    c += 1
                    continue
                }
                guard let rb = try refblock(forCluster: c) else { break }
                let blockEnd = (rbi + 1) * rbEntries
                var found = false
                while c < blockEnd {
                    if refcountEntry(rb.data, c % rbEntries) == 0 { found = true; break }
                    c += 1
                }
                if found { break }
            }
            if c == 0 { c = 1; continue }
            // Extend the run.
            var n: UInt64 = 1
            while n < maxCount {
                let next = c + n
                let rbi = next / rbEntries
                if rbi >= UInt64(refTable.count) || refTable[Int(rbi)] == 0 { break }
                if try refcount(ofCluster: next) != 0 { break }
                n += 1
            }
            guard (c + n) << clusterBits <= (UInt64(1) << 56) else {
                throw BlockError(ENOSPC, "Image '\(image)' is full (host offsets are limited to 64 PiB)")
            }
            // Free by the refcounts; on an image whose refcounts are wrong the clusters may
            // hold metadata, which nothing may be written over.
            try checkOverlap(at: c << clusterBits, size: n << clusterBits)
            try adjustRefcounts(start: c, count: n, increase: true, deferred: deferred)
            freeHint = c + n
            allocEnd = max(allocEnd, c + n)
            needSyncBeforeL2 = true
            return (c << clusterBits, n)
        }
    }

    /// Queues clusters to be freed once the L2 changes that dropped them are durable.
    func queueFree(start: UInt64, count: UInt64, discard: Bool) {
        if let last = pendingFrees.last, last.start + last.count == start, last.discard == discard,
           last.epoch == ioEpoch {
            pendingFrees[pendingFrees.count - 1].count += count
        } else {
            pendingFrees.append(QCOW2Free(start: start, count: count, discard: discard, epoch: ioEpoch))
        }
    }

    /// Queues the host clusters an L2 entry references (data or compressed). `discard`: freed
    /// by a discard request (or an unmapping zero write), punched in the file when
    /// `pass-discard-request` says so — a shared compressed host cluster only once its last
    /// reference goes (`adjustRefcounts` discards only clusters whose count reaches 0).
    func queueFree(entry: UInt64, discard: Bool) {
        if entry & QCOW2Entry.compressed != 0 {
            let (offset, size) = compressedRange(entry)
            let first = offset >> clusterBits
            let last = (offset + size - 1) >> clusterBits
            queueFree(start: first, count: last - first + 1, discard: discard && passDiscardRequest)
            return
        }
        let host = entry & QCOW2Entry.offsetMask
        if host != 0 { queueFree(start: host >> clusterBits, count: 1, discard: discard && passDiscardRequest) }
    }
}
