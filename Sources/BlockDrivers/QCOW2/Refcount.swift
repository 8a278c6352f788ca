import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// Refcount table and blocks: reading every width (1..64 bits), writing through every change,
/// and growing the table when the image outgrows it.
///
/// Refcount blocks are written through: an increase reaches the file before any L2 entry
/// that points at the cluster is written (L2 tables are written back only after an
/// fdatasync, see `writeBack`), and a decrease only after the L2 entry that stopped
/// pointing at the cluster is durable (`pendingFrees`).
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
        if rbCache.isFull, let v = rbCache.victim() { rbCache.remove(v.offset) }
        let t = QCOW2Table(offset: offset, size: Int(clusterSize))
        try readFile(at: offset, into: t.bytes)
        rbCache.insert(t)
        return t
    }

    func refcount(ofCluster cluster: UInt64) throws(BlockError) -> UInt64 {
        guard let rb = try refblock(forCluster: cluster) else { return 0 }
        return refcountEntry(rb.data, cluster % rbEntries)
    }

    /// Adds `delta` (+1 or -1) to the refcounts of `count` clusters from `start`, writing each
    /// touched refcount block through. Clusters whose count drops to 0 become reusable (and are
    /// discarded in the file when `discard`).
    func adjustRefcounts(start: UInt64, count: UInt64, increase: Bool, discard: Bool = false) throws(BlockError) {
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
            try file.node.write(at: rb.offset + UInt64(lo), from: UnsafeRawBufferPointer(start: rb.data + lo, count: hi - lo))
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
        let t = QCOW2Table(offset: offset, size: Int(clusterSize))
        t.zero()
        setRefcountEntry(t.data, 0, 1)
        try file.node.write(at: offset, from: UnsafeRawBufferPointer(t.bytes))
        // The block must be durable before the table entry points at it.
        try file.node.flush()
        refTable[Int(rbi)] = offset
        var be = offset.bigEndian
        try rethrowingBlockError { try withUnsafeBytes(of: &be) { (raw) in
            try file.node.write(at: header.refcountTableOffset + rbi * 8, from: raw)
        } }
        if rbCache.isFull, let v = rbCache.victim() { rbCache.remove(v.offset) }
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
        var table = refTable
        if table.count < Int(tableClusters * perCluster) {
            table.append(contentsOf: repeatElement(0, count: Int(tableClusters * perCluster) - table.count))
        }
        // Build the new blocks.
        var blocks: [UInt64: QCOW2Table] = [:]
        for (j, rbi) in newBlocks.enumerated() {
            let off = (start + tableClusters + UInt64(j)) << clusterBits
            let t = QCOW2Table(offset: off, size: Int(clusterSize))
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
            try file.node.write(at: t.offset, from: UnsafeRawBufferPointer(t.bytes))
        }
        // Existing blocks covering part of the new area.
        for c in start..<end where blocks[c / rbEntries] == nil {
            guard let rb = try refblock(forCluster: c) else { continue }
            let (at, n) = setRefcountEntry(rb.data, c % rbEntries, 1)
            try file.node.write(at: rb.offset + UInt64(at), from: UnsafeRawBufferPointer(start: rb.data + at, count: n))
        }
        // The new table.
        let tableOffset = start << clusterBits
        let be = table.map { $0.bigEndian }
        try rethrowingBlockError { try be.withUnsafeBytes { (raw) in
            try file.node.write(at: tableOffset, from: raw)
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
        for t in blocks.values {
            if rbCache.isFull, let v = rbCache.victim() { rbCache.remove(v.offset) }
            rbCache.insert(t)
        }
        allocEnd = max(allocEnd, end)
        // Nothing points at the old table any more.
        try adjustRefcounts(start: oldOffset >> clusterBits, count: oldClusters, increase: false)
        _ = be.count
    }

    // MARK: allocation

    /// Allocates up to `maxCount` contiguous clusters (at least one) and returns the first
    /// one's host offset and how many were allocated. Refcounts are written through.
    func allocateClusters(maxCount: UInt64) throws(BlockError) -> (offset: UInt64, count: UInt64) {
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
            try adjustRefcounts(start: c, count: n, increase: true)
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

    /// Queues the host clusters an L2 entry references (data or compressed).
    func queueFree(entry: UInt64, discard: Bool) {
        if entry & QCOW2Entry.compressed != 0 {
            let (offset, size) = compressedRange(entry)
            let first = offset >> clusterBits
            let last = (offset + size - 1) >> clusterBits
            queueFree(start: first, count: last - first + 1, discard: false)
            return
        }
        let host = entry & QCOW2Entry.offsetMask
        if host != 0 { queueFree(start: host >> clusterBits, count: 1, discard: discard && passDiscardRequest) }
    }
}
