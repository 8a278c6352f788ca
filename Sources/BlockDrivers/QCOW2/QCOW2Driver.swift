import BlockCore
import CZstdLoader
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The options of QAPI's `BlockdevOptionsQcow2`, each acted on as QEMU does or refused when
/// the image cannot honour it (docs/qcow2.md, "Options").
public struct QCOW2Options: Sendable {
    /// `lazy-refcounts`: set or clear the compatible feature bit on a writable open (the image
    /// is then marked dirty while open); `on` needs a v3 image.
    public var lazyRefcounts: Bool?
    /// `pass-discard-request`: punch holes in the file for clusters freed by discard/unmap.
    public var passDiscardRequest = true
    /// `pass-discard-other`: punch holes for clusters freed for other reasons (the old
    /// refcount table after it grows, bitmap tables and directories no longer used).
    public var passDiscardOther = false
    /// `pass-discard-snapshot`: clusters freed by snapshot operations, which blockd never runs
    /// (images with internal snapshots open read-only): accepted, nothing to apply it to.
    public var passDiscardSnapshot = true
    /// `cache-size`, `l2-cache-size`, `refcount-cache-size` (bytes) and `l2-cache-entry-size`,
    /// resolved against the image as QEMU's `read_cache_sizes` does (`QCOW2CacheSizes`).
    public var cacheSize: UInt64?
    public var l2CacheSize: UInt64?
    public var refcountCacheSize: UInt64?
    public var l2CacheEntrySize: UInt64?
    /// `cache-clean-interval` (seconds, 0 = never): metadata tables not used for that long
    /// leave the caches (QEMU's default: 600). The daemon runs the timer
    /// (`QCOW2Driver.cleanUnusedCaches`).
    public var cacheCleanInterval: UInt64 = 600
    /// `discard-no-unref`: discard keeps clusters allocated (they become zero clusters).
    public var discardNoUnref = false
    /// `overlap-check`: metadata structures no write may land on (`OverlapCheck.swift`).
    public var overlapChecks: QCOW2OverlapChecks = .cached
    /// `encrypt.format`, when given: only valid for an encrypted image, which blockd refuses.
    public var encryptFormat: String?
    /// `data-file` was given: only valid for an image with an external data file, which
    /// blockd refuses.
    public var dataFile = false
    public init() {}
}

/// How many tables each metadata cache holds: QEMU's `read_cache_sizes` and the minimums of
/// `qcow2_update_options_prepare`, with blockd's own default for the refcount cache.
struct QCOW2CacheSizes: Equatable {
    var l2Tables: Int
    var refcountBlocks: Int

    static func resolve(_ o: QCOW2Options, header: QCOW2Header) throws(BlockError) -> QCOW2CacheSizes {
        let cs = header.clusterSize
        // An L2 table is one cluster: the most worth caching covers the whole disk.
        let maxL2Entries = (header.size + cs - 1) / cs
        let maxL2Cache = (maxL2Entries * header.l2EntryBytes + cs - 1) / cs * cs
        let minRefcountCache = 4 * cs
        var l2 = min(maxL2Cache, o.l2CacheSize ?? (32 << 20))
        var refcount = o.refcountCacheSize ?? 0
        if let combined = o.cacheSize {
            if o.l2CacheSize != nil && o.refcountCacheSize != nil {
                throw BlockError.invalid("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
            } else if let l2Set = o.l2CacheSize, l2Set > combined {
                throw BlockError.invalid("l2-cache-size may not exceed cache-size")
            } else if refcount > combined {
                throw BlockError.invalid("refcount-cache-size may not exceed cache-size")
            }
            if o.l2CacheSize != nil {
                refcount = combined &- l2
            } else if o.refcountCacheSize != nil {
                l2 = combined - refcount
            } else if combined >= maxL2Cache + minRefcountCache {
                l2 = maxL2Cache
                refcount = combined - l2
            } else {
                refcount = min(combined, minRefcountCache)
                l2 = combined - refcount
            }
        }
        if let entry = o.l2CacheEntrySize {
            guard entry >= 512, entry <= cs, entry & (entry - 1) == 0 else {
                throw BlockError.invalid("L2 cache entry size must be a power of two between 512 and the cluster size (\(cs))")
            }
            // QEMU can cache slices of L2 tables; blockd caches whole tables only.
            if entry != cs {
                throw BlockError.notSupported("Parameter 'l2-cache-entry-size': blockd caches whole L2 tables; only the cluster size (\(cs)) is accepted")
            }
        }
        let l2Count = max(2, l2 / cs)
        guard l2Count <= UInt64(Int32.max) else { throw BlockError.invalid("L2 cache size too big") }
        // Without any size given blockd keeps 4 MiB of refcount blocks (QEMU: 4 clusters);
        // what the options ask for is used as given.
        let refcountCount: UInt64
        if o.refcountCacheSize == nil && o.cacheSize == nil {
            refcountCount = max(4, (4 << 20) / cs)
        } else {
            refcountCount = max(4, refcount / cs)
        }
        guard refcountCount <= UInt64(Int32.max) else { throw BlockError.invalid("Refcount cache size too big") }
        // The caches hold tables in memory: at most 2^20 of each (QEMU's would fail to allocate).
        return QCOW2CacheSizes(l2Tables: Int(min(l2Count, 1 << 20)), refcountBlocks: Int(min(refcountCount, 1 << 20)))
    }
}

/// The `qcow2` format driver: qcow2 v2 and v3 images, read and write.
///
/// Metadata (header, L1, L2 cache, refcounts) lives in `QCOW2Metadata` behind one `Mutex`.
/// Reads and overwrites of allocated clusters look up the host offset under the lock and do
/// the data I/O without it; allocating writes, zeroing and discard hold the lock throughout.
/// L2 changes are written back on `flush()`/`close()` (or when evicted), in the order that
/// keeps a crashed image free of corruption (see `Allocation.swift`).
///
/// Limits: internal snapshots, extended L2 entries and images marked dirty or corrupt open
/// read-only only; encryption and external data files are refused. Compressed clusters are
/// read, and written by `.writeCompressed` requests (`CompressedWrites.swift`); a normal
/// write into one rewrites that cluster uncompressed.
public final class QCOW2Driver: BlockDriver {
    public let driverName = "qcow2"
    public let role = DriverRole.format
    public let file: BlockChild
    public let isReadOnly: Bool
    /// The image file's path (or node name) for messages.
    public let imageName: String
    public let length: UInt64
    public let clusterSize: UInt64
    public let version: UInt32
    let clusterBits: UInt64
    let hasZeroFlag: Bool
    let compressionType: UInt8
    // internal (not private) for the bitmap store, BitmapStore.swift
    let meta: Mutex<QCOW2Metadata>
    /// Unlocked data I/O by epoch (see `InFlight.swift`).
    private let epochs = QCOW2IOEpochs()
    /// Set while opening; changed by `setBacking` inside a drained section of the node.
    private let backingSlot = DrainGuarded<BlockChild?>(nil)
    private var backingEdge: BlockChild? { backingSlot.value }
    private let closed = Atomic<Bool>(false)
    /// The options it was opened with (a reopen read-write keeps them).
    public let options: QCOW2Options
    /// Set when a write would have landed on metadata: read-only from then on.
    let corruption = QCOW2Corruption()
    private let weSetDirty = Atomic<Bool>(false)
    // MARK: dirty bitmaps hook (BitmapStore.swift)
    let bitmapStore: QCOW2BitmapStore
    /// Set once `activate` begins: before it, nothing was written and `close` writes nothing
    /// (a node refused by the graph's check, e.g. another process holds the image).
    private let activated = Atomic<Bool>(false)

    /// Opens the image in `file`: reads and validates the header, L1 and refcount tables.
    /// Nothing is written until `activate()`.
    public init(file: BlockNode, readOnly: Bool, options: QCOW2Options = QCOW2Options(),
                imageName: String? = nil) throws(BlockError) {
        let name = imageName ?? ((file.driver as? FileDriver)?.path ?? file.nodeName)
        let fileLength = file.length
        // The first 4 KiB tell the cluster size; then read the whole header cluster.
        var first = [UInt8](repeating: 0, count: Int(min(fileLength, 4096)))
        try rethrowingBlockError { try first.withUnsafeMutableBytes { (raw) in
            if raw.count > 0 { try file.read(at: 0, into: raw) }
        } }
        if first.count >= 24 {
            let bits = be32(first, 20)
            if bits >= 9 && bits <= 21 && (UInt64(1) << UInt64(bits)) > UInt64(first.count) && fileLength > UInt64(first.count) {
                first = [UInt8](repeating: 0, count: Int(min(fileLength, UInt64(1) << UInt64(bits))))
                try rethrowingBlockError { try first.withUnsafeMutableBytes { (raw) in try file.read(at: 0, into: raw) } }
            }
        }
        let header = try QCOW2Header.parse(first, fileLength: fileLength, image: name)
        // The node's own option decides; a writable node over a read-only file is refused by
        // the permission check before anything is written ("Block node is read-only").
        let writable = !readOnly
        if writable {
            if header.incompatibleFeatures & QCOW2Feature.corrupt != 0 {
                throw BlockError(EPERM, "Image '\(name)' is marked corrupt (incompatible bit 1); open it read-only or repair it with 'qemu-img check -r all'")
            }
            if header.incompatibleFeatures & QCOW2Feature.dirty != 0 {
                throw BlockError(EPERM, "Image '\(name)': image is dirty; run qemu-img check -r all")
            }
            if header.hasExtendedL2 {
                throw BlockError.notSupported("Image '\(name)' uses extended L2 entries (subclusters), which can only be opened read-only")
            }
            if header.nbSnapshots > 0 {
                throw BlockError.notSupported("Image '\(name)' has internal snapshots, which can only be opened read-only")
            }
        }
        self.file = BlockChild(name: "file", node: file)
        self.isReadOnly = !writable
        self.imageName = name
        self.length = header.size
        self.clusterSize = header.clusterSize
        self.clusterBits = UInt64(header.clusterBits)
        self.version = header.version
        self.hasZeroFlag = header.version >= 3 && !header.hasExtendedL2
        self.compressionType = header.compressionType
        if header.compressionType == 1 && blockd_zstd_available() == 0 {
            throw BlockError.notSupported("'\(name)' uses zstd compression, which needs libzstd.so.1 (Debian package libzstd1)")
        }
        self.options = options
        // The options checked against the image, as QEMU's qcow2_update_options and
        // qcow2_do_open check them.
        let cacheSizes = try QCOW2CacheSizes.resolve(options, header: header)
        if options.lazyRefcounts == true && header.version < 3 {
            throw BlockError.invalid("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
        }
        if let format = options.encryptFormat {
            // An encrypted image was refused by the header check already.
            throw BlockError.invalid("No encryption in image header, but options specified format '\(format)'")
        }
        if options.dataFile {
            // So was an image with an external data file.
            throw BlockError.invalid("'data-file' can only be set for images with an external data file")
        }
        let m = try QCOW2Metadata(image: name, file: self.file, header: header, readOnly: !writable, epochs: epochs,
                                  cacheSizes: cacheSizes, corruption: corruption)
        m.overlapChecks = options.overlapChecks
        m.passDiscardRequest = options.passDiscardRequest
        m.passDiscardOther = options.passDiscardOther
        m.discardNoUnref = options.discardNoUnref
        meta = Mutex(m)
        // Dirty bitmaps hook: loads persistent bitmaps (a corrupt directory fails the open).
        bitmapStore = try QCOW2BitmapStore(image: name, file: self.file, header: header, writable: writable)
        bitmapStore.driver = self
        // The image's OFD locks follow the graph's permissions on `file` (the file driver's
        // `setPermissions`), taken when the node is registered, before anything is written.
    }

    /// Called once, the first time a write would have corrupted the image (QEMU's
    /// `BLOCK_IMAGE_CORRUPTED`); runs with the metadata lock held, so it must not call back
    /// into this driver.
    public func onCorruption(_ handler: (@Sendable (QCOW2CorruptionEvent) -> Void)?) {
        corruption.setHandler(handler)
    }

    public var answersImageInfo: Bool { true }
    public var cacheCleanInterval: UInt64 { options.cacheCleanInterval }

    /// `cleanUnusedCaches` for the daemon's timer, unless the node is closed.
    public func cleanCachesIfOpen() -> Bool {
        if isClosed { return false }
        cleanUnusedCaches()
        return true
    }

    /// QEMU's cache clean timer body (`cache-clean-interval`): drops the L2 tables and
    /// refcount blocks not used since the previous call (dirty ones stay until written back).
    /// The daemon calls it every `options.cacheCleanInterval` seconds, on a worker (it takes
    /// the metadata lock). Returns how many tables left memory.
    @discardableResult
    public func cleanUnusedCaches() -> Int {
        meta.withLock { m in m.l2Cache.cleanUnused() + m.rbCache.cleanUnused() }
    }

    /// Tables held in the L2 and refcount block caches.
    public var cachedTables: (l2: Int, refcount: Int) { meta.withLock { ($0.l2Cache.count, $0.rbCache.count) } }

    /// Closed (or being closed): the daemon's cache timer stops.
    public var isClosed: Bool { closed.load(ordering: .relaxed) }

    /// Whether the image was found corrupt while open (it is read-only from then on).
    public var isMarkedCorrupt: Bool { corruption.isMarked }

    /// Attaches the backing node (while opening, before the node is used).
    public func attachBacking(_ node: BlockNode) {
        let edge = BlockChild(name: "backing", role: .backing, node: node)
        backingSlot.setUnpublished(edge)
        meta.withLock { $0.backing = edge }
    }

    /// `blockdev-reopen backing=…`, stream and commit completion. A new edge (QEMU attaches
    /// a new child, which becomes the newest parent of `node`); nil drops the edge.
    public func setBacking(_ node: BlockNode?, drained owner: BlockNode) throws(BlockError) {
        let edge = node.map { BlockChild(name: "backing", role: .backing, node: $0) }
        backingSlot.set(edge, drained: owner)
        meta.withLock { $0.backing = edge }
    }

    public var canRecordBackingFile: Bool { !isReadOnly }
    public var clusterSizeInfo: UInt64? { clusterSize }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        let q = try QCOW2Driver(file: file ?? self.file.node, readOnly: readOnly, options: options, imageName: imageName)
        if let backing { q.attachBacking(backing) }
        return q
    }

    /// QAPI `ImageInfoSpecificQCow2`, as QSD 7.2 orders it.
    public var formatSpecificInfo: FormatSpecificInfo? {
        let h = header
        var data: [(String, FormatSpecificInfo.Value)] = [
            ("compat", .string(h.version >= 3 ? "1.1" : "0.10")),
            ("compression-type", .string(h.compressionType == 1 ? "zstd" : "zlib")),
            ("lazy-refcounts", .bool(h.compatibleFeatures & QCOW2Feature.lazyRefcounts != 0)),
        ]
        // The bitmap directory on disk, as QEMU lists it (only when there is one).
        let stored = storedBitmaps
        if !stored.isEmpty {
            data.append(("bitmaps", .list(stored.map { b in
                var flags: [FormatSpecificInfo.Value] = []
                if b.inUse { flags.append(.string("in-use")) }
                if b.auto { flags.append(.string("auto")) }
                return .object([("flags", .list(flags)), ("name", .string(b.name)), ("granularity", .int(Int64(b.granularity)))])
            })))
        }
        data.append(("refcount-bits", .int(Int64(1) << Int64(h.refcountOrder))))
        data.append(("corrupt", .bool(h.incompatibleFeatures & QCOW2Feature.corrupt != 0)))
        data.append(("extended-l2", .bool(h.hasExtendedL2)))
        return FormatSpecificInfo(type: "qcow2", data: data)
    }

    /// Finishes a writable open: clears unknown autoclear bits, applies `lazy-refcounts`, and
    /// marks the image dirty while open if lazy refcounts are on.
    public func activate() throws(BlockError) {
        if isReadOnly { return }
        activated.store(true, ordering: .sequentiallyConsistent)
        let lazy = options.lazyRefcounts
        let setDirty = try meta.withLock { (m) throws(BlockError) -> Bool in
            var h = m.header
            guard h.version >= 3 else { return false }
            var rewrite = false
            let unknownAutoclear = h.autoclearFeatures & ~QCOW2Feature.knownAutoclear
            if unknownAutoclear != 0 {
                h.autoclearFeatures &= QCOW2Feature.knownAutoclear
                rewrite = true
            }
            if h.autoclearFeatures & QCOW2Feature.autoclearBitmaps != 0
                && !h.extensions.contains(where: { $0.type == QCOW2Extension.bitmaps }) {
                h.autoclearFeatures &= ~QCOW2Feature.autoclearBitmaps
                rewrite = true
            }
            if let lazy {
                let bit = QCOW2Feature.lazyRefcounts
                let want = lazy ? h.compatibleFeatures | bit : h.compatibleFeatures & ~bit
                if want != h.compatibleFeatures { h.compatibleFeatures = want; rewrite = true }
            }
            var dirty = false
            if h.compatibleFeatures & QCOW2Feature.lazyRefcounts != 0 {
                h.incompatibleFeatures |= QCOW2Feature.dirty
                dirty = true
                rewrite = true
            }
            if rewrite {
                m.header = h
                try m.writeHeader()
            }
            return dirty
        }
        weSetDirty.store(setDirty, ordering: .sequentiallyConsistent)
        try bitmapStore.activate()  // dirty bitmaps hook
    }

    deinit {
        if !closed.load(ordering: .relaxed) { try? close() }
    }

    // MARK: properties

    public var children: [BlockChild] {
        if let b = backingEdge { return [file, b] }
        return [file]
    }

    public var limits: BlockLimits {
        BlockLimits(minimum: 1, preferred: UInt32(min(max(clusterSize, 4096), 65536)), maximum: 32 << 20)
    }

    /// Compressed writes cover whole clusters.
    public var compressedWriteClusterSize: UInt64? { clusterSize }

    /// The backing file name recorded in the header.
    public var backingFileName: String? { meta.withLock { $0.header.backingFile } }
    /// The backing format recorded in the header (backing format extension).
    public var backingFormat: String? { meta.withLock { $0.header.backingFormat } }
    /// A copy of the current header.
    public var header: QCOW2Header { meta.withLock { $0.header } }

    /// Rewrites the backing file name and format in the header (block-stream, commit), then
    /// syncs. `nil` name removes the backing file reference (and the format).
    public func setBackingFile(name: String?, format: String?) throws(BlockError) {
        if isReadOnly { throw BlockError.readOnly("Image '\(imageName)' is read-only") }
        try meta.withLock { (m) throws(BlockError) in
            var h = m.header
            h.backingFile = name
            h.backingFormat = name == nil ? nil : format
            _ = try h.serialize()  // fits?
            let old = m.header
            m.header = h
            do throws(BlockError) { try m.writeHeader() } catch {
                m.header = old
                throw error
            }
        }
    }

    // MARK: reads

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        let noWait = flags.contains(.noWait)
        var done = 0
        let total = buffer.count
        while done < total {
            let pos = offset + UInt64(done)
            let want = UInt64(total - done)
            // Data and compressed extents are read without the lock: enter the I/O epoch under
            // it so their host clusters cannot be freed and reused meanwhile.
            let found: (QCOW2Extent?, Int)
            if noWait {
                guard let r = try meta.withLockBriefly({ (m) throws(BlockError) -> (QCOW2Extent?, Int) in
                    let e = try m.extent(at: pos, length: want, allowLoad: false, statusMode: false)
                    if let e, e.kind == .data || e.kind == .compressed { return (e, m.enterIO()) }
                    return (e, -1)
                }), r.0 != nil else { throw .wouldBlock }
                found = r
            } else {
                found = try meta.withLock { (m) throws(BlockError) -> (QCOW2Extent?, Int) in
                    let e = try m.extent(at: pos, length: want, allowLoad: true, statusMode: false)
                    if let e, e.kind == .data || e.kind == .compressed { return (e, m.enterIO()) }
                    return (e, -1)
                }
            }
            let parity = found.1
            defer { if parity >= 0 { epochs.leave(parity) } }
            guard let e = found.0, e.length > 0 else { throw BlockError.io("qcow2: empty extent at \(pos)") }
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + Int(e.length))])
            switch e.kind {
            case .data:
                try QCOW2IO.readClipped(file.node, at: e.host, into: dst, flags: flags.intersection(.noWait))
            case .zero:
                memset(dst.baseAddress!, 0, dst.count)
            case .unallocated:
                try readBacking(at: pos, into: dst, flags: flags.intersection(.noWait))
            case .compressed:
                if noWait { throw .wouldBlock }
                let out = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(clusterSize), alignment: 16)
                defer { out.deallocate() }
                try QCOW2IO.decompress(file.node, entry: e.entry, clusterBits: clusterBits, type: compressionType,
                                       image: imageName, into: out)
                let inCluster = Int(pos & (clusterSize - 1))
                memcpy(dst.baseAddress!, out.baseAddress! + inCluster, dst.count)
            }
            done += Int(e.length)
        }
    }

    private func readBacking(at offset: UInt64, into dst: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        guard let backing = backingEdge?.node else {
            memset(dst.baseAddress!, 0, dst.count)
            return
        }
        let blen = backing.length
        if offset >= blen {
            memset(dst.baseAddress!, 0, dst.count)
            return
        }
        let n = Int(min(UInt64(dst.count), blen - offset))
        try backing.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: dst[0..<n]), flags: flags)
        if n < dst.count { memset(dst.baseAddress! + n, 0, dst.count - n) }
    }

    // MARK: writes

    private func checkWritable() throws(BlockError) {
        if isReadOnly { throw BlockError.readOnly("Image '\(imageName)' is opened read-only") }
        if corruption.isMarked { throw meta.withLock { $0.corruptImageError() } }
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        try checkWritable()
        if flags.contains(.writeCompressed) {
            try writeCompressed(at: offset, from: buffer, flags: flags)
            return
        }
        let total = buffer.count
        if total == 0 { return }
        if flags.contains(.noWait) {
            // Only a plain overwrite of allocated clusters with the L2 table cached goes inline.
            guard let r = try meta.withLockBriefly({ (m) throws(BlockError) -> (QCOW2WriteLookup, Int) in
                let r = try m.lookupForWrite(at: offset, length: UInt64(total), allowLoad: false)
                // A host range on metadata goes to a worker, which marks the image corrupt.
                if case .direct(let host, let len) = r, len == UInt64(total),
                   m.metadataOverlap(at: host, size: len) == nil {
                    return (r, m.enterIO())
                }
                return (r, -1)
            }), r.1 >= 0, case .direct(let host, _) = r.0 else { throw .wouldBlock }
            defer { epochs.leave(r.1) }
            try file.node.write(at: host, from: buffer, flags: flags.intersection([.fua, .noWait, .bufferedWriteMayBlock]))
            return
        }
        var done = 0
        var allocated = false
        var spins = 0
        while done < total {
            let pos = offset + UInt64(done)
            let want = UInt64(total - done)
            let step = try meta.withLock { (m) throws(BlockError) -> QCOW2AllocStep in
                try m.planAllocation(at: pos, length: want)
            }
            switch step {
            case .direct(let host, let len, let parity):
                defer { epochs.leave(parity) }
                try file.node.write(at: host, from: UnsafeRawBufferPointer(rebasing: buffer[done..<(done + Int(len))]),
                                    flags: flags.intersection(.fua))
                done += Int(len)
            case .busy:
                // Another request is allocating one of these clusters; it holds no lock while
                // it writes, so wait for it briefly and look again.
                spins += 1
                if spins < 16 { sched_yield() } else { usleep(50) }
            case .planned(let plan):
                do throws(BlockError) {
                    try writeAllocated(plan, data: buffer, dataOffset: offset)
                } catch {
                    meta.withLock { $0.abortAllocation(plan) }
                    throw error
                }
                try meta.withLock { (m) throws(BlockError) in try m.commitAllocation(plan) }
                allocated = true
                done = Int(plan.end - offset)
            }
        }
        if allocated && flags.contains(.fua) { try flush() }
    }

    /// Writes the data of an allocation run into its new host clusters, without the lock:
    /// whole clusters straight from `data`, partial ones completed with the old content
    /// (backing data, zeroes, a decompressed cluster). A partial cluster that is past the old
    /// end of the file and would be padded with zeroes gets only its data (the rest is a hole).
    private func writeAllocated(_ plan: QCOW2AllocPlan, data: UnsafeRawBufferPointer, dataOffset: UInt64) throws(BlockError) {
        let cs = clusterSize
        let lastCluster = plan.firstCluster + plan.count
        var c = plan.firstCluster
        var p = plan.start
        while c < lastCluster {
            let cStart = c << clusterBits
            let cEnd = cStart + cs
            let hostC = plan.host + (c - plan.firstCluster) * cs
            if p == cStart && plan.end >= cEnd {
                var k: UInt64 = 1
                while c + k < lastCluster && ((c + k + 1) << clusterBits) <= plan.end { k += 1 }
                let from = Int(p - dataOffset)
                try file.node.write(at: hostC, from: UnsafeRawBufferPointer(rebasing: data[from..<(from + Int(k * cs))]), flags: [])
                c += k
                p = c << clusterBits
                continue
            }
            let wEnd = min(plan.end, cEnd)
            let old = c == plan.firstCluster ? plan.headEntry : plan.tailEntry
            let from = Int(p - dataOffset)
            let n = Int(wEnd - p)
            if (hostC >> clusterBits) >= plan.freshFrom && fillsWithZeroes(old) {
                try file.node.write(at: hostC + (p - cStart), from: UnsafeRawBufferPointer(rebasing: data[from..<(from + n)]), flags: [])
            } else {
                let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
                defer { buf.deallocate() }
                try cowFill(guestCluster: c, entry: old, into: buf)
                memcpy(buf.baseAddress! + Int(p - cStart), data.baseAddress! + from, n)
                try file.node.write(at: hostC, from: UnsafeRawBufferPointer(buf), flags: [])
            }
            c += 1
            p = wEnd
        }
    }

    /// Whether the old content of a cluster with L2 entry `entry` is all zeroes.
    private func fillsWithZeroes(_ entry: UInt64) -> Bool {
        if entry & QCOW2Entry.compressed != 0 { return false }
        if hasZeroFlag && entry & QCOW2Entry.zero != 0 { return true }
        if entry & QCOW2Entry.offsetMask != 0 { return false }
        return backingEdge == nil
    }

    /// Fills `buf` (one cluster) with the current content of guest cluster `guestCluster`
    /// whose (unchanging, the cluster is marked in flight) L2 entry is `entry`.
    private func cowFill(guestCluster: UInt64, entry: UInt64, into buf: UnsafeMutableRawBufferPointer) throws(BlockError) {
        if entry & QCOW2Entry.compressed != 0 {
            try QCOW2IO.decompress(file.node, entry: entry, clusterBits: clusterBits, type: compressionType,
                                   image: imageName, into: buf)
            return
        }
        if hasZeroFlag && entry & QCOW2Entry.zero != 0 {
            memset(buf.baseAddress!, 0, buf.count)
            return
        }
        let host = entry & QCOW2Entry.offsetMask
        if host != 0 {
            try QCOW2IO.readClipped(file.node, at: host, into: buf)
            return
        }
        try readBacking(at: guestCluster << clusterBits, into: buf, flags: [])
    }

    /// Whole-cluster bounds of [offset, end): the partial cluster at the very end of an
    /// image whose size is not cluster-aligned counts as whole.
    private func alignedBounds(_ offset: UInt64, _ end: UInt64) -> (UInt64, UInt64) {
        let mask = clusterSize - 1
        let start = (offset + mask) & ~mask
        let stop = end == length ? (end + mask) & ~mask : end & ~mask
        return (start, stop)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        try checkWritable()
        if length == 0 { return }
        let end = offset + length
        guard hasZeroFlag else {
            if flags.contains(.noFallback) {
                throw BlockError.notSupported("Image '\(imageName)': qcow2 v2 has no zero clusters; fast zeroing is not supported")
            }
            try writeZeroBytes(at: offset, length: length, flags: flags)
            return
        }
        let (aStart, aEnd) = alignedBounds(offset, end)
        // Partial clusters: pieces of at most one cluster each.
        var partial: [(UInt64, UInt64)] = []
        if aStart < aEnd {
            if offset < aStart { partial.append((offset, aStart)) }
            if aEnd < end { partial.append((aEnd, end)) }
        } else {
            var p = offset
            while p < end {
                let cEnd = min(end, (p | (clusterSize - 1)) + 1)
                partial.append((p, cEnd))
                p = cEnd
            }
        }
        var needWrite: [(UInt64, UInt64)] = []
        for piece in partial {
            let isZero = try meta.withLock { (m) throws(BlockError) -> Bool in
                try m.clusterReadsAsZero(piece.0 >> clusterBits)
            }
            if !isZero { needWrite.append(piece) }
        }
        if !needWrite.isEmpty && flags.contains(.noFallback) {
            throw BlockError.notSupported("Image '\(imageName)': zeroing a partial cluster needs a slow write")
        }
        if aStart < aEnd {
            let first = aStart >> clusterBits
            let count = (aEnd - aStart) >> clusterBits
            try withLockWithoutAllocations(first: first, count: count) { (m) throws(BlockError) in
                try m.zeroClusters(first: first, count: count, unmap: flags.contains(.mayUnmap))
            }
        }
        for piece in needWrite {
            try writeZeroBytes(at: piece.0, length: piece.1 - piece.0, flags: [])
        }
        if flags.contains(.fua) { try flush() }
    }

    /// Discards whole clusters (partial ones are ignored, as QEMU does). With a backing file
    /// or an allocated cluster the result is a zero cluster on v3; otherwise unallocated.
    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        try checkWritable()
        let (aStart, aEnd) = alignedBounds(offset, offset + length)
        guard aStart < aEnd else { return }
        let unref = !options.discardNoUnref
        let first = aStart >> clusterBits
        let count = (aEnd - aStart) >> clusterBits
        try withLockWithoutAllocations(first: first, count: count) { (m) throws(BlockError) in
            if unref || !m.hasZeroFlag {
                try m.discardClusters(first: first, count: count)
            } else {
                try m.zeroClusters(first: first, count: count, unmap: false)
            }
        }
    }

    /// Runs `body` under the lock once no allocating write is in flight in the cluster range
    /// (they write data without the lock and change the L2 entries when done).
    private func withLockWithoutAllocations(first: UInt64, count: UInt64,
                                            _ body: (QCOW2Metadata) throws(BlockError) -> Void) throws(BlockError) {
        var spins = 0
        while true {
            let done = try meta.withLock { (m) throws(BlockError) -> Bool in
                if m.allocationsOverlap(first: first, count: count) { return false }
                try body(m)
                return true
            }
            if done { return }
            spins += 1
            if spins < 16 { sched_yield() } else { usleep(50) }
        }
    }

    /// The fsyncs run outside the metadata lock where order allows: after much allocation
    /// (a stream or commit writes gigabytes) the sync that must precede the L2 write-back
    /// would otherwise hold the lock for the whole fsync, and every request (inline reads
    /// too) would wait behind it. Syncing the data first leaves that sync little to do.
    public func flush() throws(BlockError) {
        if isReadOnly { return }
        if corruption.isMarked { throw meta.withLock { $0.corruptImageError() } }
        if meta.withLock({ $0.needSyncBeforeL2 }) { try file.node.flush() }
        try meta.withLock { (m) throws(BlockError) in try m.writeBack(sync: false) }
        // Covers the data and the metadata just written: all that completed before the flush.
        try file.node.flush()
    }

    /// With `.noWait`, answers only from cached metadata under a briefly tried lock: a
    /// contended lock or an L2 table not in cache throws `.wouldBlock`, having changed nothing.
    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        let found: QCOW2Extent?
        if flags.contains(.noWait) {
            guard let r = try meta.withLockBriefly({ (m) throws(BlockError) -> QCOW2Extent? in
                try m.extent(at: offset, length: length, allowLoad: false, statusMode: true)
            }), let e = r else { throw .wouldBlock }
            found = e
        } else {
            found = try meta.withLock { (m) throws(BlockError) -> QCOW2Extent? in
                try m.extent(at: offset, length: length, allowLoad: true, statusMode: true)
            }
        }
        guard let e = found, e.length > 0 else { throw BlockError.io("qcow2: empty extent at \(offset)") }
        switch e.kind {
        case .data, .compressed: return BlockStatus(length: e.length, flags: [.data, .allocated])
        case .zero: return BlockStatus(length: e.length, flags: [.zero, .allocated])
        case .unallocated: return BlockStatus(length: e.length, flags: [])
        }
    }

    /// Writes back all metadata, clears the dirty bit we set, and syncs. Idempotent.
    public func close() throws(BlockError) {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        // Never activated (refused by the graph, or never put in one): nothing to write back.
        if isReadOnly || !activated.load(ordering: .sequentiallyConsistent) { return }
        // Found corrupt: nothing more is written (the corrupt bit is on disk already).
        if corruption.isMarked { return }
        let clearDirty = weSetDirty.load(ordering: .sequentiallyConsistent)
        try bitmapStore.close()  // dirty bitmaps hook: store exact bits, drop in-use
        try meta.withLock { (m) throws(BlockError) in
            // No request runs any more: every epoch has drained, so all queued frees apply.
            try m.writeBack(sync: false)
            m.ioEpoch += 2
            try m.releaseSafeFrees()
            try m.file.node.flush()
            if clearDirty {
                m.header.incompatibleFeatures &= ~QCOW2Feature.dirty
                try m.writeIncompatibleFeatures()
            }
        }
    }
}
