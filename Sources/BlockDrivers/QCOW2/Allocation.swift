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
///   written and synced (`pendingFrees`).
extension QCOW2Metadata {
    // MARK: write-back

    /// Writes back dirty L2 tables and L1 entries in dependency order, then applies queued
    /// frees; with `sync`, ends with an fdatasync so everything is durable.
    func writeBack(sync: Bool) throws(BlockError) {
        if readOnly { return }
        let dirty = l2Cache.dirtyTables
        let l1Dirty = l1DirtyHigh >= 0
        if !dirty.isEmpty || l1Dirty {
            if needSyncBeforeL2 {
                try file.node.flush()
                needSyncBeforeL2 = false
            }
            for t in dirty {
                try file.node.write(at: t.offset, from: UnsafeRawBufferPointer(t.bytes))
                t.dirty = false
            }
            if l1Dirty {
                if !dirty.isEmpty { try file.node.flush() }
                let lo = l1DirtyLow
                let hi = l1DirtyHigh
                var be = [UInt64](repeating: 0, count: hi - lo + 1)
                for i in lo...hi { be[i - lo] = l1[i].bigEndian }
                try rethrowingBlockError { try be.withUnsafeBytes { (raw) in
                    try file.node.write(at: header.l1TableOffset + UInt64(lo) * 8, from: raw)
                } }
                l1DirtyLow = Int.max
                l1DirtyHigh = -1
            }
        }
        if !pendingFrees.isEmpty {
            try file.node.flush()
            let frees = pendingFrees
            pendingFrees = []
            for f in frees {
                try adjustRefcounts(start: f.start, count: f.count, increase: false, discard: f.discard)
            }
        }
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
        let (host, _) = try allocateClusters(maxCount: 1)
        let t = QCOW2Table(offset: host, size: Int(clusterSize))
        t.zero()
        t.dirty = true
        l2Cache.insert(t)
        l1[l1i] = host | QCOW2Entry.copied
        l1DirtyLow = min(l1DirtyLow, l1i)
        l1DirtyHigh = max(l1DirtyHigh, l1i)
        return t
    }

    /// Fills `buf` (one cluster) with the current content of guest cluster `guestCluster`
    /// whose L2 entry is `entry`: backing data, zeroes, decompressed or shared data.
    func cowFill(guestCluster: UInt64, entry: UInt64, into buf: UnsafeMutableRawBufferPointer) throws(BlockError) {
        if entry & QCOW2Entry.compressed != 0 {
            try decompress(entry, into: buf)
            return
        }
        if hasZeroFlag && entry & QCOW2Entry.zero != 0 {
            memset(buf.baseAddress!, 0, buf.count)
            return
        }
        let host = entry & QCOW2Entry.offsetMask
        if host != 0 {
            try readFile(at: host, into: buf)
            return
        }
        memset(buf.baseAddress!, 0, buf.count)
        guard let backing = backing?.node else { return }
        let start = guestCluster << clusterBits
        let blen = backing.length
        if start >= blen { return }
        let n = Int(min(UInt64(buf.count), blen - start))
        try backing.read(at: start, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<n]))
    }

    /// Writes `data` at guest `offset`, allocating clusters as needed (copy-on-write around
    /// partial clusters). Runs under the metadata lock.
    func allocatingWrite(at offset: UInt64, data: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        let end = offset + UInt64(data.count)
        var pos = offset
        let cs = clusterSize
        let scratchBuf = UnsafeMutableRawBufferPointer(start: scratch, count: Int(cs))
        while pos < end {
            // Someone may have allocated (part of) this meanwhile.
            switch try lookupForWrite(at: pos, length: end - pos, allowLoad: true) {
            case .direct(let host, let length):
                let from = Int(pos - offset)
                try file.node.write(at: host, from: UnsafeRawBufferPointer(rebasing: data[from..<(from + Int(length))]),
                                    flags: flags.intersection(.fua))
                pos += length
                continue
            case .wouldBlock:
                throw BlockError.io("internal error: metadata load refused")
            case .allocate(let allocLength):
                let allocEnd = pos + allocLength
                let t = try writableL2Table(for: pos)
                // Stay within this L2 table.
                let tableEnd = min(allocEnd, (UInt64(l1Index(pos)) + 1) << (clusterBits + l2Bits))
                let firstCluster = pos >> clusterBits
                let lastCluster = (tableEnd - 1) >> clusterBits
                let (host, got) = try allocateClusters(maxCount: lastCluster - firstCluster + 1)
                let runEnd = min(tableEnd, (firstCluster + got) << clusterBits)
                // Write the run: partial clusters assembled in scratch, whole ones straight from `data`.
                var c = firstCluster
                var p = pos
                while c < firstCluster + got {
                    let cStart = c << clusterBits
                    let cEnd = cStart + cs
                    let hostC = host + (c - firstCluster) * cs
                    let index = l2Index(cStart)
                    let old = l2Entry(t, index)
                    if p == cStart && runEnd >= cEnd {
                        // Whole clusters from here: one write for all of them.
                        var k: UInt64 = 0
                        while c + k < firstCluster + got && ((c + k + 1) << clusterBits) <= runEnd { k += 1 }
                        let from = Int(p - offset)
                        try file.node.write(at: hostC, from: UnsafeRawBufferPointer(rebasing: data[from..<(from + Int(k * cs))]))
                        for j in 0..<k {
                            let idx = l2Index(cStart + j * cs)
                            let o = l2Entry(t, idx)
                            queueFree(entry: o, discard: false)
                            setL2Entry(t, idx, (hostC + j * cs) | QCOW2Entry.copied)
                        }
                        c += k
                        p = c << clusterBits
                        continue
                    }
                    try cowFill(guestCluster: c, entry: old, into: scratchBuf)
                    let wEnd = min(runEnd, cEnd)
                    let from = Int(p - offset)
                    let n = Int(wEnd - p)
                    memcpy(scratch + Int(p - cStart), data.baseAddress! + from, n)
                    try file.node.write(at: hostC, from: UnsafeRawBufferPointer(scratchBuf))
                    queueFree(entry: old, discard: false)
                    setL2Entry(t, index, hostC | QCOW2Entry.copied)
                    c += 1
                    p = wEnd
                }
                pos = runEnd
            }
        }
        try writeBackIfManyFrees()
    }

    // MARK: zero clusters and discard

    /// Whether guest cluster `c` already reads as zeroes in this layer and below.
    func clusterReadsAsZero(_ c: UInt64) throws(BlockError) -> Bool {
        let guest = c << clusterBits
        guard let e = try extent(at: guest, length: 1, allowLoad: true, statusMode: false) else { return false }
        switch e.kind {
        case .zero: return true
        case .unallocated: return backing == nil
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
            if l1[l1i] & QCOW2Entry.offsetMask == 0 && backing == nil {
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
                    queueFree(entry: old, discard: false)
                    new = QCOW2Entry.zero
                } else if host == 0 {
                    if backing != nil || old & QCOW2Entry.zero != 0 { new = QCOW2Entry.zero }
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
