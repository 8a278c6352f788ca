import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// L1/L2 entry bits.
enum QCOW2Entry {
    static let copied: UInt64 = 1 << 63
    static let compressed: UInt64 = 1 << 62
    static let zero: UInt64 = 1
    /// Bits 9-55: host offset of an L2 table or data cluster.
    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
}

/// Kinds of guest ranges, as one layer sees them.
enum QCOW2ExtentKind: UInt8 {
    /// Not allocated in this layer: reads fall through to the backing node (or zeroes).
    case unallocated
    /// Reads as zeroes (zero flag, or zero subclusters).
    case zero
    /// Stored uncompressed at `host`.
    case data
    /// A compressed cluster (`entry` holds the descriptor).
    case compressed
}

struct QCOW2Extent {
    var kind: QCOW2ExtentKind
    /// Host offset of the first byte (for `.data`).
    var host: UInt64
    var length: UInt64
    /// The L2 entry (for `.compressed`).
    var entry: UInt64
}

/// What a write can do at an offset without allocating.
enum QCOW2WriteLookup {
    /// Overwrite in place at `host`, for `length` bytes.
    case direct(host: UInt64, length: UInt64)
    /// The next `length` bytes need cluster allocation (copy-on-write).
    case allocate(length: UInt64)
    /// Metadata not in cache (only when loading is not allowed).
    case wouldBlock
}

/// Metadata state of one qcow2 image: header, L1, refcount table, caches. Lives inside the
/// driver's `Mutex`; every method runs with that lock held.
final class QCOW2Metadata {
    let image: String
    let file: BlockChild
    var header: QCOW2Header {
        didSet { bitmapDirectory = QCOW2Metadata.bitmapDirectory(of: header) }
    }
    let readOnly: Bool
    let clusterBits: UInt64
    let clusterSize: UInt64
    let l2Bits: UInt64
    let l2Entries: UInt64
    let extendedL2: Bool
    let hasZeroFlag: Bool
    let subclusterBits: UInt64
    var l1: [UInt64]
    var l1DirtyLow = Int.max
    var l1DirtyHigh = -1
    var refTable: [UInt64]
    var l2Cache: QCOW2TableCache
    var rbCache: QCOW2TableCache
    let refcountOrder: UInt64
    let refcountMax: UInt64
    let rbEntries: UInt64
    /// Clusters to decrement once the L2 entries that stopped pointing at them are on disk.
    var pendingFrees: [QCOW2Free] = []
    /// Frees whose L2 change is on disk, waiting for their I/O epoch to drain (`InFlight.swift`).
    var readyFrees: [QCOW2Free] = []
    /// Current I/O epoch; unlocked I/O is counted in `epochs` by its parity.
    var ioEpoch: UInt64 = 0
    let epochs: QCOW2IOEpochs
    /// Guest clusters with an allocating write in flight (data being written without the lock).
    var allocating: Set<UInt64> = []
    /// Refcount blocks with increases in memory only (`adjustRefcounts(deferred:)`); written
    /// by `writeRefblocks` before the fdatasync that precedes any L2 table or L1 entry.
    var dirtyRefblocks: [QCOW2Table] = []
    /// Host clusters of allocating writes still in flight (planned, not yet committed): a
    /// write-back leaves their deferred increases out, so a crash after it does not leak them.
    var reservedHost: Set<UInt64> = []
    /// Lowest cluster index that may be free.
    var freeHint: UInt64 = 0
    /// One past the highest cluster this process allocated or the file held at open.
    var allocEnd: UInt64
    /// Refcount increases or data writes to new clusters happened since the last sync:
    /// L2 tables pointing at them may only be written after the next fdatasync.
    var needSyncBeforeL2 = false
    var passDiscardRequest = true
    var passDiscardOther = false
    var discardNoUnref = false
    /// The backing edge (set once while opening); read to copy backing data on COW.
    var backing: BlockChild?
    /// Where the next compressed cluster goes (a sector inside a host cluster that holds
    /// compressed data), or 0 for "start a new host cluster" (`CompressedWrites.swift`).
    var compressedCursor: UInt64 = 0
    /// Metadata structures guarded against writes (`overlap-check`, `OverlapCheck.swift`).
    var overlapChecks: QCOW2OverlapChecks = .cached
    /// Host clusters of the active L2 tables (every L1 entry) and of the refcount blocks (every
    /// refcount table entry), kept in step with `l1` and `refTable` for the overlap checks.
    var l2Tables = QCOW2ClusterSet([])
    var refBlocks = QCOW2ClusterSet([])
    /// The bitmap directory's host range while the header says the image has bitmaps.
    private(set) var bitmapDirectory: (offset: UInt64, size: UInt64)?
    /// Set when a write would have corrupted the image: it is read-only from then on.
    let corruption: QCOW2Corruption

    init(image: String, file: BlockChild, header: QCOW2Header, readOnly: Bool, epochs: QCOW2IOEpochs,
         cacheSizes: QCOW2CacheSizes,
         corruption: QCOW2Corruption = QCOW2Corruption()) throws(BlockError) {
        self.epochs = epochs
        self.corruption = corruption
        self.image = image
        self.file = file
        self.header = header
        self.readOnly = readOnly
        clusterBits = UInt64(header.clusterBits)
        clusterSize = header.clusterSize
        l2Entries = header.l2Entries
        l2Bits = UInt64(l2Entries.trailingZeroBitCount)
        extendedL2 = header.hasExtendedL2
        hasZeroFlag = header.version >= 3 && !header.hasExtendedL2
        subclusterBits = extendedL2 ? clusterBits - 5 : clusterBits
        refcountOrder = UInt64(header.refcountOrder)
        refcountMax = refcountOrder == 6 ? UInt64.max : (UInt64(1) << (UInt64(1) << refcountOrder)) - 1
        rbEntries = (clusterSize * 8) >> refcountOrder
        let fileLength = file.node.length
        allocEnd = (fileLength + clusterSize - 1) >> clusterBits
        // Caches: as many tables as the options say (QEMU's defaults: L2 enough for the whole
        // disk, at most 32 MiB; `QCOW2CacheSizes`).
        l2Cache = QCOW2TableCache(capacity: cacheSizes.l2Tables)
        rbCache = QCOW2TableCache(capacity: cacheSizes.refcountBlocks)
        l1 = []
        refTable = []
        // L1 table.
        if header.l1Size > 0 {
            let count = Int(header.l1Size)
            var table = [UInt64](repeating: 0, count: count)
            try rethrowingBlockError { try table.withUnsafeMutableBytes { (raw) in
                try QCOW2IO.readClipped(file.node, at: header.l1TableOffset, into: raw)
            } }
            for i in 0..<count { table[i] = UInt64(bigEndian: table[i]) }
            l1 = table
        }
        // Refcount table.
        let rtCount = Int(UInt64(header.refcountTableClusters) * clusterSize / 8)
        var rt = [UInt64](repeating: 0, count: rtCount)
        try rethrowingBlockError { try rt.withUnsafeMutableBytes { (raw) in
            try QCOW2IO.readClipped(file.node, at: header.refcountTableOffset, into: raw)
        } }
        for i in 0..<rtCount { rt[i] = UInt64(bigEndian: rt[i]) }
        refTable = rt
        let bits = clusterBits
        l2Tables = QCOW2ClusterSet(l1.lazy.map { $0 & QCOW2Entry.offsetMask }.filter { $0 != 0 }.map { $0 >> bits })
        refBlocks = QCOW2ClusterSet(rt.lazy.map { $0 & ~UInt64(511) }.filter { $0 != 0 }.map { $0 >> bits })
        bitmapDirectory = QCOW2Metadata.bitmapDirectory(of: header)
    }

    /// The bitmap directory's range from the header's bitmaps extension (QEMU checks it only
    /// while the autoclear bit says the extension is valid).
    static func bitmapDirectory(of header: QCOW2Header) -> (offset: UInt64, size: UInt64)? {
        guard header.autoclearFeatures & QCOW2Feature.autoclearBitmaps != 0,
              let ext = header.extensions.first(where: { $0.type == QCOW2Extension.bitmaps }),
              let (count, size, offset) = try? QCOW2BitmapDirectory.parseExtension(ext.data, image: ""),
              count > 0, size > 0 else { return nil }
        return (offset, size)
    }

    func corrupt(_ what: String) -> BlockError {
        BlockError.io("Image '\(image)' is corrupt: \(what); run 'qemu-img check'")
    }

    /// Reads from the image file; the part past its end reads as zeroes.
    func readFile(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags = []) throws(BlockError) {
        try QCOW2IO.readClipped(file.node, at: offset, into: buffer, flags: flags)
    }

    // MARK: L2 tables

    /// The L2 table at `offset`, from cache or disk. Returns nil on a miss when `allowLoad`
    /// is false.
    func l2Table(at offset: UInt64, allowLoad: Bool) throws(BlockError) -> QCOW2Table? {
        if let t = l2Cache.lookup(offset) { return t }
        if !allowLoad { return nil }
        guard offset & (clusterSize - 1) == 0, offset >= clusterSize else {
            throw corrupt("L2 table offset \(offset) is invalid")
        }
        try makeRoomInL2Cache()
        let t = QCOW2Table(offset: offset, size: Int(clusterSize))
        try readFile(at: offset, into: t.bytes)
        l2Cache.insert(t)
        return t
    }

    func makeRoomInL2Cache() throws(BlockError) {
        guard l2Cache.isFull, let victim = l2Cache.victim() else { return }
        // A corrupt image writes nothing more: its dirty tables stay (the cache grows by them).
        if victim.dirty && corruption.isMarked { return }
        if victim.dirty { try writeBack(sync: false) }
        l2Cache.remove(victim.offset)
    }

    @inline(__always)
    func l2Entry(_ t: QCOW2Table, _ index: UInt64) -> UInt64 {
        loadBE64(t.data, Int(index << (extendedL2 ? 4 : 3)))
    }

    @inline(__always)
    func l2Bitmap(_ t: QCOW2Table, _ index: UInt64) -> UInt64 {
        loadBE64(t.data, Int(index << 4) + 8)
    }

    @inline(__always)
    func setL2Entry(_ t: QCOW2Table, _ index: UInt64, _ value: UInt64) {
        storeBE64(t.data, Int(index << (extendedL2 ? 4 : 3)), value)
        t.dirty = true
    }

    @inline(__always)
    func l1Index(_ guest: UInt64) -> Int { Int(guest >> (clusterBits + l2Bits)) }
    @inline(__always)
    func l2Index(_ guest: UInt64) -> UInt64 { (guest >> clusterBits) & (l2Entries - 1) }

    // MARK: lookups

    /// Classifies the range from `offset` (at most `length` bytes) into one extent of uniform
    /// kind. In `statusMode`, data runs merge regardless of host placement and compressed
    /// clusters count as data. Returns nil on a cache miss when `allowLoad` is false.
    func extent(at offset: UInt64, length: UInt64, allowLoad: Bool, statusMode: Bool) throws(BlockError) -> QCOW2Extent? {
        let end = offset + length
        var pos = offset
        var result: QCOW2Extent?
        let l2Span = clusterBits + l2Bits
        while pos < end {
            let l1i = l1Index(pos)
            let l1e = l1i < l1.count ? l1[l1i] & QCOW2Entry.offsetMask : 0
            if l1e == 0 {
                let rangeEnd = min(end, (UInt64(l1i) + 1) << l2Span)
                let piece = QCOW2Extent(kind: .unallocated, host: 0, length: rangeEnd - pos, entry: 0)
                if !merge(&result, piece, statusMode) { return result }
                pos = rangeEnd
                continue
            }
            guard let t = try l2Table(at: l1e, allowLoad: allowLoad) else { return result }
            let tableEnd = min(end, (UInt64(l1i) + 1) << l2Span)
            let tableFirst = UInt64(l1i) << l2Bits
            let lastIndex = ((tableEnd - 1) >> clusterBits) - tableFirst
            while pos < tableEnd {
                var piece = try classify(t, pos, tableEnd)
                if piece.kind == .unallocated && piece.entry == 0 && !extendedL2 {
                    // Skip a run of empty entries a word at a time (block status on big sparse images).
                    var i = l2Index(pos) + 1
                    while i <= lastIndex && t.data.load(fromByteOffset: Int(i << 3), as: UInt64.self) == 0 { i += 1 }
                    piece.length = min(tableEnd, (tableFirst + i) << clusterBits) - pos
                }
                if !merge(&result, piece, statusMode) { return result }
                pos += piece.length
            }
        }
        return result
    }

    @inline(__always)
    private func merge(_ result: inout QCOW2Extent?, _ piece: QCOW2Extent, _ statusMode: Bool) -> Bool {
        guard var r = result else {
            var p = piece
            if statusMode && p.kind == .compressed { p.kind = .data }
            result = p
            return true
        }
        var kind = piece.kind
        if statusMode && kind == .compressed { kind = .data }
        guard r.kind == kind else { return false }
        switch kind {
        case .compressed: return false
        case .data:
            if !statusMode && r.host + r.length != piece.host { return false }
        default: break
        }
        r.length += piece.length
        result = r
        return true
    }

    /// The extent of one cluster (or subcluster) at `pos`, clipped to `limit`.
    private func classify(_ t: QCOW2Table, _ pos: UInt64, _ limit: UInt64) throws(BlockError) -> QCOW2Extent {
        let index = l2Index(pos)
        let entry = l2Entry(t, index)
        let inCluster = pos & (clusterSize - 1)
        if entry & QCOW2Entry.compressed != 0 {
            let len = min(limit - pos, clusterSize - inCluster)
            return QCOW2Extent(kind: .compressed, host: 0, length: len, entry: entry)
        }
        let host = entry & QCOW2Entry.offsetMask
        if host & (clusterSize - 1) != 0 {
            throw corrupt("data cluster offset \(host) is not aligned (L2 table at \(t.offset))")
        }
        if extendedL2 {
            let bitmap = l2Bitmap(t, index)
            let sc = inCluster >> subclusterBits
            let scEnd = (sc + 1) << subclusterBits
            let len = min(limit - pos, scEnd - inCluster)
            if (bitmap >> sc) & 1 != 0 {
                if host == 0 { throw corrupt("allocated subcluster without a host offset (L2 table at \(t.offset))") }
                return QCOW2Extent(kind: .data, host: host + inCluster, length: len, entry: entry)
            }
            if (bitmap >> (32 + sc)) & 1 != 0 { return QCOW2Extent(kind: .zero, host: 0, length: len, entry: entry) }
            return QCOW2Extent(kind: .unallocated, host: 0, length: len, entry: entry)
        }
        let len = min(limit - pos, clusterSize - inCluster)
        if hasZeroFlag && entry & QCOW2Entry.zero != 0 {
            return QCOW2Extent(kind: .zero, host: 0, length: len, entry: entry)
        }
        if host == 0 { return QCOW2Extent(kind: .unallocated, host: 0, length: len, entry: entry) }
        return QCOW2Extent(kind: .data, host: host + inCluster, length: len, entry: entry)
    }

    func compressedRange(_ entry: UInt64) -> (offset: UInt64, size: UInt64) {
        QCOW2IO.compressedRange(entry, clusterBits: clusterBits)
    }

    /// Decompresses the cluster described by `entry` into `out` (one cluster).
    func decompress(_ entry: UInt64, into out: UnsafeMutableRawBufferPointer) throws(BlockError) {
        try QCOW2IO.decompress(file.node, entry: entry, clusterBits: clusterBits, type: header.compressionType,
                               image: image, into: out)
    }

    // MARK: writes

    /// For a write at `offset` of at most `length` bytes: either a run overwritable in place,
    /// or the length of the run that needs allocation.
    func lookupForWrite(at offset: UInt64, length: UInt64, allowLoad: Bool) throws(BlockError) -> QCOW2WriteLookup {
        let end = offset + length
        var pos = offset
        var direct: (host: UInt64, length: UInt64)?
        var allocate: UInt64 = 0
        while pos < end {
            let l1i = l1Index(pos)
            let l1e = l1[l1i]
            let clusterEnd = min(end, (pos | (clusterSize - 1)) + 1)
            let pieceLen = clusterEnd - pos
            var host: UInt64 = 0
            if l1e & QCOW2Entry.copied != 0, l1e & QCOW2Entry.offsetMask != 0 {
                guard let t = try l2Table(at: l1e & QCOW2Entry.offsetMask, allowLoad: allowLoad) else {
                    if direct == nil && allocate == 0 { return .wouldBlock }
                    break
                }
                let entry = l2Entry(t, l2Index(pos))
                if entry & (QCOW2Entry.copied | QCOW2Entry.compressed | QCOW2Entry.zero) == QCOW2Entry.copied {
                    host = entry & QCOW2Entry.offsetMask
                    if host & (clusterSize - 1) != 0 { throw corrupt("data cluster offset \(host) is not aligned") }
                }
            }
            if host != 0 {
                if allocate > 0 { break }
                let h = host + (pos & (clusterSize - 1))
                if let d = direct {
                    if d.host + d.length != h { break }
                    direct = (d.host, d.length + pieceLen)
                } else {
                    direct = (h, pieceLen)
                }
            } else {
                if direct != nil { break }
                allocate += pieceLen
            }
            pos = clusterEnd
        }
        if let d = direct { return .direct(host: d.host, length: d.length) }
        return .allocate(length: allocate)
    }
}
