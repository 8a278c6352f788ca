import BlockCore

/// `compress` (QEMU's `block/filter-compress.c`): every write through the filter is stored
/// compressed by its `file` child (`RequestFlags.writeCompressed`), which must be able to
/// write compressed clusters (qcow2). Reads, zero writes, discards, flushes and block status
/// pass through unchanged.
///
/// The child's cluster size is the filter's request alignment, advertised as the minimum
/// and preferred block size, so NBD clients (nbdcopy, qemu-img) write whole clusters. A write
/// that covers a cluster only partly is completed with that cluster's current content
/// (read-modify-write, as QEMU's block layer pads requests to `request_alignment`). All
/// changes through the filter hold its cluster-aligned range exclusively while they run, so a
/// read-modify-write never loses a concurrent write to the same cluster.
public final class CompressFilter: FilterDriver {
    public let driverName = "compress"
    public let filtered: BlockChild
    /// The child's compressed-write unit (qcow2 cluster size), fixed while the filter lives:
    /// `blockdev-reopen` cannot change the child of a `compress` node (as in QEMU).
    public let clusterSize: UInt64
    private let clusters = RangeLock()

    /// Fails, in QEMU's words, when `file` cannot write compressed data.
    public init(file: BlockNode) throws(BlockError) {
        guard let cs = file.driver.compressedWriteClusterSize, cs > 0, cs & (cs - 1) == 0 else {
            throw BlockError.notSupported("Compression is not supported for underlying format: \(file.driverName)")
        }
        filtered = BlockChild(name: "file", role: .filteredPrimary, node: file)
        clusterSize = cs
    }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        try CompressFilter(file: file ?? filtered.node)
    }

    public var limits: BlockLimits {
        var l = filtered.node.limits
        let cs = UInt32(clusterSize)
        // NBD clients ignore a minimum block size over 64 KiB (libnbd drops every constraint
        // then), so clusters of 128 KiB to 2 MiB keep 64 KiB as the minimum: the preferred
        // size still makes nbdcopy write whole clusters.
        l.minimum = min(cs, 65536)
        l.preferred = max(cs, 4096)
        l.maximum = max(cs, l.maximum / cs * cs)
        return l
    }

    /// [offset, end) widened to whole clusters; the last cluster of a node whose size is not
    /// cluster-aligned ends at the node's end.
    private func alignedOut(_ offset: UInt64, _ end: UInt64) -> (UInt64, UInt64) {
        let mask = clusterSize - 1
        return (offset & ~mask, min((end + mask) & ~mask, max(end, filtered.node.length)))
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        // Compression is CPU work: never on an event loop.
        if flags.contains(.noWait) { throw .wouldBlock }
        if buffer.isEmpty { return }
        let end = offset + UInt64(buffer.count)
        let (aStart, aEnd) = alignedOut(offset, end)
        let token = try clusters.lock(offset: aStart, length: aEnd - aStart, exclusive: true)
        defer { clusters.unlock(token) }
        let f = flags.union(.writeCompressed)
        try split(offset, end, aStart, aEnd) { (start, stop, whole) throws(BlockError) in
            let from = Int(max(start, offset) - offset)
            if whole {
                try filtered.node.write(at: start, from: UnsafeRawBufferPointer(rebasing: buffer[from..<(from + Int(stop - start))]),
                                        flags: f)
                return
            }
            try readModifyWrite(start, stop, flags: f) { (cluster) in
                let at = Int(max(start, offset) - start)
                let n = Int(min(stop, end) - max(start, offset))
                cluster.baseAddress!.advanced(by: at).copyMemory(from: buffer.baseAddress!.advanced(by: from), byteCount: n)
            }
        }
    }

    /// Zeroes pass through for whole clusters; a partly covered cluster is rewritten
    /// compressed with its zeroed part, as QEMU's block layer pads a zero write to the
    /// filter's alignment (and, as there, that cannot be fast: `.noFallback` fails).
    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        if length == 0 { return }
        let end = offset + length
        let (aStart, aEnd) = alignedOut(offset, end)
        let token = try clusters.lock(offset: aStart, length: aEnd - aStart, exclusive: true,
                                      noWait: flags.contains(.noWait))
        defer { clusters.unlock(token) }
        if offset != aStart || end != aEnd {
            if flags.contains(.noFallback) {
                throw BlockError.notSupported("compress filter: zeroing part of a \(clusterSize)-byte cluster needs a write")
            }
            if flags.contains(.noWait) { throw .wouldBlock }
        }
        try split(offset, end, aStart, aEnd) { (start, stop, whole) throws(BlockError) in
            if whole {
                try filtered.node.writeZeroes(at: start, length: stop - start, flags: flags)
                return
            }
            try readModifyWrite(start, stop, flags: flags.intersection(.fua).union(.writeCompressed)) { (cluster) in
                let at = Int(max(start, offset) - start)
                let n = Int(min(stop, end) - max(start, offset))
                cluster.baseAddress!.advanced(by: at).initializeMemory(as: UInt8.self, repeating: 0, count: n)
            }
        }
    }

    /// Splits [offset, end) (widened to [aStart, aEnd)) into at most three pieces: a partly
    /// covered first cluster, the whole clusters, a partly covered last cluster. `body` gets
    /// each piece's cluster-aligned bounds and whether the request covers it whole.
    private func split(_ offset: UInt64, _ end: UInt64, _ aStart: UInt64, _ aEnd: UInt64,
                       _ body: (UInt64, UInt64, Bool) throws(BlockError) -> Void) throws(BlockError) {
        var pos = aStart
        let headEnd = min(aStart + clusterSize, aEnd)
        if offset > aStart || end < headEnd {
            try body(aStart, headEnd, false)
            pos = headEnd
        }
        if pos >= aEnd { return }
        let tailStart = end < aEnd ? end & ~(clusterSize - 1) : aEnd
        if pos < tailStart { try body(pos, tailStart, true) }
        if tailStart < aEnd { try body(tailStart, aEnd, false) }
    }

    /// Rewrites the cluster [start, stop): its current content, changed by `change`.
    private func readModifyWrite(_ start: UInt64, _ stop: UInt64, flags: RequestFlags,
                                 _ change: (UnsafeMutableRawBufferPointer) -> Void) throws(BlockError) {
        let node = filtered.node
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(stop - start), alignment: 4096)
        defer { buf.deallocate() }
        try node.read(at: start, into: buf, flags: [])
        change(buf)
        try node.write(at: start, from: UnsafeRawBufferPointer(buf), flags: flags)
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try withClusters(offset, length, flags) { () throws(BlockError) in
            try filtered.node.discard(at: offset, length: length, flags: flags)
        }
    }

    /// Runs a pass-through change holding its clusters (see the type's comment).
    private func withClusters(_ offset: UInt64, _ length: UInt64, _ flags: RequestFlags,
                              _ body: () throws(BlockError) -> Void) throws(BlockError) {
        if length == 0 { return try body() }
        let (aStart, aEnd) = alignedOut(offset, offset + length)
        let token = try clusters.lock(offset: aStart, length: aEnd - aStart, exclusive: true,
                                      noWait: flags.contains(.noWait))
        defer { clusters.unlock(token) }
        try body()
    }
}
