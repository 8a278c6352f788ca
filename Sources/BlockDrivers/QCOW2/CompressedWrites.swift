import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// Compressed cluster writes (`RequestFlags.writeCompressed`, QEMU's
/// `qcow2_co_pwritev_compressed_part`).
///
/// Each guest cluster is compressed on its own (zlib or zstd, as the header says) and stored
/// in a run of 512-byte sectors inside a host cluster that other compressed clusters share.
/// The rules that keep `qemu-img check` clean (docs/qcow2.md, "Compressed clusters"):
/// - Each compressed cluster holds one reference on every host cluster its sectors touch
///   (one or two), exactly as `qemu-img check` counts them from the L2 descriptor.
/// - Placement is sector-aligned: two compressed clusters never share a sector, so writes of
///   different clusters into one host cluster never touch the same bytes.
/// - Order as for every allocation: refcounts raised (a fresh host cluster's increase in
///   memory until the next write-back writes it before its fdatasync, as for data clusters;
///   a shared host cluster's extra reference written through), data written, and only then
///   (at write-back, after an fdatasync) the L2 entry; a crash in between only leaks.
/// - Overwriting or discarding a compressed cluster drops its references once the L2 change
///   is durable and unlocked readers have left (`queueFree(entry:)`).
struct QCOW2CompressedPlan: Sendable {
    /// Guest cluster index.
    var cluster: UInt64
    /// Host byte offset of the compressed data (sector-aligned).
    var host: UInt64
    /// Compressed length in bytes (the L2 descriptor covers it); the write is `size` rounded
    /// up to whole sectors.
    var size: UInt64
}

extension QCOW2Metadata {
    /// Reserves `size` bytes for one compressed cluster and takes its references, QEMU's
    /// `qcow2_alloc_bytes` with sector-aligned placement. Data goes after the previous
    /// compressed cluster (`compressedCursor`) while it fits in that host cluster or spills
    /// into the next one if that is the next cluster allocated; otherwise a new host cluster
    /// is started. A host cluster whose refcount is at its maximum takes no more users.
    func allocateCompressedBytes(_ size: UInt64) throws(BlockError) -> UInt64 {
        precondition(size > 0 && size <= clusterSize)
        var offset = compressedCursor
        if offset != 0 {
            let rc = try refcount(ofCluster: offset >> clusterBits)
            if rc == 0 || rc >= refcountMax { offset = 0 }
        }
        let room = offset == 0 ? 0 : clusterSize - (offset & (clusterSize - 1))
        if offset != 0 && size <= room {
            try adjustRefcounts(start: offset >> clusterBits, count: 1, increase: true)
        } else {
            // A fresh cluster, from the data cluster allocator so that compressed and
            // uncompressed clusters (incompressible data falls back to normal writes) fill the
            // file in order without holes; its refcount of 1 (raised in memory, written by the
            // next write-back before the L2 table that points at it) is this compressed
            // cluster's reference. Unlike a data cluster it is not held back from write-backs
            // while its data write is in flight (`reservedHost`): later compressed clusters
            // share it, and an early increase costs at most a leak.
            let (fresh, _, _) = try takeDataClusters(1)
            if offset != 0 && fresh == ((offset >> clusterBits) + 1) << clusterBits {
                // Contiguous: the data starts in the current cluster and runs into the new one.
                try adjustRefcounts(start: offset >> clusterBits, count: 1, increase: true)
            } else {
                offset = fresh
            }
        }
        needSyncBeforeL2 = true
        let end = (offset + size + 511) & ~UInt64(511)
        compressedCursor = end & (clusterSize - 1) == 0 ? 0 : end
        return offset
    }

    /// The highest host offset (exclusive) a compressed descriptor can hold for this cluster
    /// size (2 MiB clusters: 512 TiB), and QEMU's general limit.
    var compressedOffsetLimit: UInt64 {
        min(UInt64(1) << (62 - (clusterBits - 8)), UInt64(1) << 56)
    }

    /// Under the lock: reserves space for compressed cluster `cluster` and marks it in flight,
    /// or returns nil when another request is allocating that cluster (retry shortly).
    func planCompressed(cluster: UInt64, size: UInt64) throws(BlockError) -> QCOW2CompressedPlan? {
        if allocationsOverlap(first: cluster, count: 1) { return nil }
        try releaseSafeFrees()
        // The L2 table first (as for any allocation): it may itself need a cluster.
        _ = try writableL2Table(for: cluster << clusterBits)
        let host = try allocateCompressedBytes(size)
        let plan = QCOW2CompressedPlan(cluster: cluster, host: host, size: size)
        if host + size > compressedOffsetLimit {
            releaseCompressed(plan)
            throw BlockError(ENOSPC, "Image '\(image)' is full: compressed clusters must lie below \(compressedOffsetLimit) bytes")
        }
        allocating.insert(cluster)
        return plan
    }

    /// Points the guest cluster's L2 entry at the written compressed data and queues the free
    /// of what it pointed at before (data, compressed or preallocated zero cluster).
    func commitCompressed(_ plan: QCOW2CompressedPlan) throws(BlockError) {
        defer { allocating.remove(plan.cluster) }
        let guest = plan.cluster << clusterBits
        let t: QCOW2Table
        do throws(BlockError) { t = try writableL2Table(for: guest) } catch {
            releaseCompressed(plan)
            throw error
        }
        let idx = l2Index(guest)
        queueFree(entry: l2Entry(t, idx), discard: false)
        setL2Entry(t, idx, QCOW2IO.compressedEntry(offset: plan.host, size: plan.size, clusterBits: clusterBits))
        needSyncBeforeL2 = true
        try writeBackIfManyFrees()
    }

    /// A failed data write: nothing points at the reserved bytes, so their references go now.
    func abortCompressed(_ plan: QCOW2CompressedPlan) {
        allocating.remove(plan.cluster)
        releaseCompressed(plan)
    }

    /// Drops the references of a compressed cluster that no L2 entry points at. If that frees
    /// the cursor's host cluster, `adjustRefcounts` moves the cursor off it.
    private func releaseCompressed(_ plan: QCOW2CompressedPlan) {
        let first = plan.host >> clusterBits
        let last = (plan.host + plan.size - 1) >> clusterBits
        try? adjustRefcounts(start: first, count: last - first + 1, increase: false)
    }
}

extension QCOW2Driver {
    /// `.writeCompressed`: whole clusters (the last one may end at the image end), each
    /// compressed and stored as a compressed cluster, or written normally when compressing
    /// does not save at least one sector. Overwrites allocated clusters too (QEMU 7.2 fails
    /// with EIO there; see docs/qcow2.md).
    func writeCompressed(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        // Compressing costs CPU time and allocating may do metadata I/O: never on a loop.
        if flags.contains(.noWait) { throw .wouldBlock }
        if meta.withLock({ $0.extendedL2 }) {
            throw BlockError.notSupported("Image '\(imageName)' uses extended L2 entries: blockd does not write compressed clusters to it")
        }
        let cs = clusterSize
        let total = UInt64(buffer.count)
        let end = offset + total
        guard offset & (cs - 1) == 0, total & (cs - 1) == 0 || end == length else {
            throw BlockError.invalid("Image '\(imageName)': a compressed write must cover whole clusters of \(cs) bytes (offset \(offset), length \(total))")
        }
        if total == 0 { return }
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
        defer { out.deallocate() }
        var padded: UnsafeMutableRawBufferPointer?
        defer { padded?.deallocate() }
        var pos = offset
        while pos < end {
            let n = Int(min(cs, end - pos))
            let from = Int(pos - offset)
            let chunk = UnsafeRawBufferPointer(rebasing: buffer[from..<(from + n)])
            var input = chunk
            if n < Int(cs) {
                // The last cluster of an image whose size is not cluster-aligned: zero-padded.
                let p = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
                padded = p
                memcpy(p.baseAddress!, chunk.baseAddress!, n)
                memset(p.baseAddress! + n, 0, Int(cs) - n)
                input = UnsafeRawBufferPointer(p)
            }
            // Worth it only if it saves at least one sector on disk.
            let capacity = Int(cs) - 512
            let compressed = capacity > 0
                ? try QCOW2Compression.compress(type: compressionType, input: input,
                                                output: UnsafeMutableRawBufferPointer(rebasing: out[0..<capacity]))
                : nil
            if let len = compressed {
                let sectors = (len + 511) & ~511
                memset(out.baseAddress! + len, 0, sectors - len)
                try storeCompressed(cluster: pos >> clusterBits, size: UInt64(len),
                                    data: UnsafeRawBufferPointer(rebasing: out[0..<sectors]))
            } else {
                try write(at: pos, from: chunk, flags: flags.subtracting([.writeCompressed, .fua]))
            }
            pos += UInt64(n)
        }
        if flags.contains(.fua) { try flush() }
    }

    /// Reserves space for one compressed cluster, writes it without the lock, then publishes
    /// the L2 entry.
    private func storeCompressed(cluster: UInt64, size: UInt64, data: UnsafeRawBufferPointer) throws(BlockError) {
        var spins = 0
        var planned: QCOW2CompressedPlan?
        while planned == nil {
            planned = try meta.withLock { (m) throws(BlockError) -> QCOW2CompressedPlan? in
                try m.planCompressed(cluster: cluster, size: size)
            }
            if planned == nil {
                // Another request is allocating this cluster; it writes without the lock.
                spins += 1
                if spins < 16 { sched_yield() } else { usleep(50) }
            }
        }
        let plan = planned!
        do throws(BlockError) {
            try file.node.write(at: plan.host, from: data, flags: [])
        } catch {
            meta.withLock { $0.abortCompressed(plan) }
            throw error
        }
        try meta.withLock { (m) throws(BlockError) in try m.commitCompressed(plan) }
    }
}
