import BlockCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Persistent dirty bitmaps of one qcow2 image: loaded when the image opens, kept crash-safe
/// while it is open writable, stored exactly on clean close.
///
/// While blockd has the image writable, every consistent persistent bitmap is `in-use` on disk
/// and named in blockd's write-intent extension, and its data clusters are all allocated. Its
/// on-disk bits are a superset of the changes (`StoredBitmap.ensureDirtyOnDisk`): before the
/// first write into a group of 64 granules whose bits are not known dirty on disk, the whole
/// group is written as dirty and synced. So after a crash the bitmap loads as valid, with at
/// most 63 extra granules around each group written since the last clean store.
final class QCOW2BitmapStore: PersistentBitmapStorage, @unchecked Sendable {
    let image: String
    let file: BlockChild
    let clusterSize: UInt64
    let imageSize: UInt64
    let writable: Bool
    /// Set right after the driver's init; the store reaches the metadata through it.
    nonisolated(unsafe) weak var driver: QCOW2Driver?
    let state: Mutex<[StoredBitmap]>
    /// Serialises directory and header rewrites.
    private let directoryLock = Mutex<Void>(())
    private nonisolated(unsafe) var directoryOffset: UInt64 = 0
    private nonisolated(unsafe) var directorySize: UInt64 = 0
    private nonisolated(unsafe) var active = false
    var isActive: Bool { active }

    /// Reads and checks the bitmap directory (nothing is written).
    init(image: String, file: BlockChild, header: QCOW2Header, writable: Bool) throws(BlockError) {
        self.image = image
        self.file = file
        self.clusterSize = header.clusterSize
        self.imageSize = header.size
        self.writable = writable
        state = Mutex([])
        var loaded: [StoredBitmap] = []
        if header.autoclearFeatures & QCOW2Feature.autoclearBitmaps != 0,
           let ext = header.extensions.first(where: { $0.type == QCOW2Extension.bitmaps }) {
            let (count, size, offset) = try QCOW2BitmapDirectory.parseExtension(ext.data, image: image)
            let fileLength = file.node.length
            if count > 0 {
                guard size > 0, size <= QCOW2BitmapFormat.maxDirectorySize, offset % clusterSize == 0, offset > 0,
                      offset + size <= fileLength else {
                    throw BlockError.invalid("Image '\(image)': corrupt bitmap directory: offset \(offset), size \(size) is invalid; refusing to open the image (it is left untouched)")
                }
                var dir = [UInt8](repeating: 0, count: Int(size))
                try QCOW2BitmapStore.read(file.node, at: offset, into: &dir)
                let entries = try QCOW2BitmapDirectory.parseEntries(dir, count: count, clusterSize: clusterSize,
                                                                     imageSize: header.size, fileLength: fileLength, image: image)
                directoryOffset = offset
                directorySize = size
                let markValid = header.autoclearFeatures & QCOW2BitmapFormat.autoclearWriteIntent != 0
                let trusted = markValid
                    ? QCOW2BitmapFormat.decodeTrusted(header.extensions.first { $0.type == QCOW2BitmapFormat.writeIntentExtension }?.data ?? [])
                    : []
                for e in entries {
                    let inUse = e.flags & QCOW2BitmapFormat.flagInUse != 0
                    let consistent = !inUse || trusted.contains(e.name)
                    let bitmap = DirtyBitmap(name: e.name, granularity: UInt64(1) << UInt64(e.granularityBits),
                                             length: header.size, enabled: e.flags & QCOW2BitmapFormat.flagAuto != 0,
                                             persistent: true, inconsistent: !consistent)
                    let sb = StoredBitmap(bitmap: bitmap, entry: e, store: self)
                    if consistent {
                        sb.table = try readTable(e)
                        try QCOW2BitmapDirectory.checkTable(sb.table, clusterSize: clusterSize, fileLength: fileLength,
                                                            name: e.name, image: image)
                        try loadData(sb)
                    }
                    loaded.append(sb)
                }
            }
        }
        state.withLock { $0 = loaded }
    }

    /// Nothing is written to an image found corrupt while open (`QCOW2Corruption`).
    func checkNotCorrupt() throws(BlockError) {
        if let driver, driver.corruption.isMarked { throw driver.meta.withLock { $0.corruptImageError() } }
    }

    static func read(_ node: BlockNode, at offset: UInt64, into bytes: inout [UInt8]) throws(BlockError) {
        try rethrowingBlockError { try bytes.withUnsafeMutableBytes { (raw) in try node.read(at: offset, into: raw) } }
    }

    static func write(_ node: BlockNode, at offset: UInt64, _ bytes: [UInt8]) throws(BlockError) {
        try rethrowingBlockError { try bytes.withUnsafeBytes { (raw) in try node.write(at: offset, from: raw) } }
    }

    private func readTable(_ e: QCOW2BitmapEntry) throws(BlockError) -> [UInt64] {
        var raw = [UInt8](repeating: 0, count: Int(e.tableSize) * 8)
        try QCOW2BitmapStore.read(file.node, at: e.tableOffset, into: &raw)
        return (0..<Int(e.tableSize)).map { be64(raw, $0 * 8) }
    }

    private func loadData(_ sb: StoredBitmap) throws(BlockError) {
        let total = sb.bitmap.withBits { $0.byteCount }
        var buf = [UInt8](repeating: 0, count: Int(clusterSize))
        for (i, e) in sb.table.enumerated() {
            let at = i * Int(clusterSize)
            if at >= total { break }
            let off = e & QCOW2BitmapFormat.tableOffsetMask
            if off == 0 {
                if e & QCOW2BitmapFormat.tableAllOnes == 0 { continue }
                for j in 0..<buf.count { buf[j] = 0xff }
            } else {
                try QCOW2BitmapStore.read(file.node, at: off, into: &buf)
            }
            let n = min(buf.count, total - at)
            buf.withUnsafeBytes { raw in
                sb.bitmap.withBits { $0.orBytes(at: at, from: UnsafeRawBufferPointer(rebasing: raw[0..<n])) }
            }
        }
    }

    // MARK: PersistentBitmapStorage

    func loadedBitmaps() -> [DirtyBitmap] { state.withLock { $0.map(\.bitmap) } }

    func checkCanStore(name: String, granularity: UInt64) throws(BlockError) {
        if !writable { throw BlockError.readOnly("Image '\(image)' is read-only") }
        if name.utf8.count > DirtyBitmap.maxNameBytes { throw BlockError.invalid("Name length exceeds maximum (1023 characters)") }
        let bits = UInt8(granularity.trailingZeroBitCount)
        let bytes = QCOW2BitmapFormat.dataBytes(size: imageSize, granularityBits: bits)
        if bytes > QCOW2BitmapFormat.maxPhysicalSize {
            throw BlockError.invalid("Too much space will be occupied by the bitmap. Use larger granularity")
        }
        if state.withLock({ $0.contains { $0.bitmap.name == name } }) {
            throw BlockError.invalid("Bitmap with the same name is already stored")
        }
    }

    func add(_ bitmap: DirtyBitmap) throws(BlockError) {
        try checkCanStore(name: bitmap.name, granularity: bitmap.granularity)
        let bits = UInt8(bitmap.granularity.trailingZeroBitCount)
        let tsize = QCOW2BitmapFormat.tableSize(size: imageSize, granularityBits: bits, clusterSize: clusterSize)
        let entry = QCOW2BitmapEntry(tableOffset: 0, tableSize: UInt32(tsize), flags: 0, granularityBits: bits, name: bitmap.name)
        let sb = StoredBitmap(bitmap: bitmap, entry: entry, store: self)
        sb.table = [UInt64](repeating: 0, count: Int(tsize))
        try prepareForWriting(sb)
        state.withLock { $0.append(sb) }
        do throws(BlockError) { try writeDirectory(closing: false) } catch {
            state.withLock { $0.removeAll { $0 === sb } }
            throw error
        }
        bitmap.intent = sb
    }

    func remove(_ bitmap: DirtyBitmap) throws(BlockError) {
        guard let sb = state.withLock({ list in list.first { $0.bitmap === bitmap } }) else { return }
        bitmap.intent = nil
        state.withLock { $0.removeAll { $0 === sb } }
        try writeDirectory(closing: false)
        try freeClusters(of: sb)
    }

    /// With `cleared`, the on-disk intent is reset: the caller drains the node first, so no
    /// write is between its intent and its completion (its memory mark would be lost on disk).
    func changed(_ bitmap: DirtyBitmap, cleared: Bool) throws(BlockError) {
        guard let sb = state.withLock({ list in list.first { $0.bitmap === bitmap } }), active else { return }
        try sb.writeAll(resetIntent: cleared)
        try writeDirectory(closing: false)
    }

    // MARK: open and close

    /// Writable open: every consistent bitmap gets all its data clusters, goes `in-use` and
    /// joins the write-intent list; the header's mark is set.
    func activate() throws(BlockError) {
        guard writable else { return }
        let list = state.withLock { $0 }
        for sb in list where !sb.bitmap.inconsistent { try prepareForWriting(sb) }
        active = true
        if !list.isEmpty { try writeDirectory(closing: false) }
        for sb in list where !sb.bitmap.inconsistent { sb.bitmap.intent = sb }
    }

    /// Clean close: exact bits, no `in-use`, no write-intent mark.
    func close() throws(BlockError) {
        guard writable, active else { return }
        let list = state.withLock { $0 }
        for sb in list where !sb.bitmap.inconsistent {
            sb.bitmap.intent = nil
            try sb.writeAll(resetIntent: true)
        }
        try writeDirectory(closing: true)
        active = false
    }

    /// Allocates the table and every data cluster (writing the current bits), so that the
    /// write path only ever overwrites data clusters in place.
    private func prepareForWriting(_ sb: StoredBitmap) throws(BlockError) {
        guard let driver else { throw BlockError.io("qcow2 bitmap store without a driver") }
        try checkNotCorrupt()
        // Clusters the image already gives the bitmap are written in place from now on: on a
        // corrupt image they may be metadata (QEMU checks each bitmap write the same way).
        try driver.meta.withLock { (m) throws(BlockError) in
            for e in sb.table where e & QCOW2BitmapFormat.tableOffsetMask != 0 {
                try m.checkOverlap(at: e & QCOW2BitmapFormat.tableOffsetMask, size: clusterSize)
            }
            if sb.entry.tableOffset != 0 {
                try m.checkOverlap(at: sb.entry.tableOffset, size: UInt64(sb.table.count) * 8)
            }
        }
        let total = UInt64(sb.bitmap.withBits { $0.byteCount })
        var changed = false
        for i in 0..<sb.table.count where sb.table[i] & QCOW2BitmapFormat.tableOffsetMask == 0 {
            let ones = sb.table[i] & QCOW2BitmapFormat.tableAllOnes != 0
            let off = try driver.meta.withLock { (m) throws(BlockError) -> UInt64 in try m.allocateClusters(maxCount: 1).offset }
            sb.table[i] = off
            _ = ones  // the bits were loaded already; writeCluster writes them
            try sb.writeCluster(i, totalBytes: total)
            changed = true
        }
        if sb.entry.tableOffset == 0 {
            let n = (UInt64(sb.table.count) * 8 + clusterSize - 1) / clusterSize
            sb.entry.tableOffset = try allocateContiguous(n)
            changed = true
        }
        if changed {
            try file.node.flush()
            var raw: [UInt8] = []
            for e in sb.table { appendBE64(&raw, e) }
            try QCOW2BitmapStore.write(file.node, at: sb.entry.tableOffset, raw)
            try file.node.flush()
        }
    }

    private func allocateContiguous(_ n: UInt64) throws(BlockError) -> UInt64 {
        guard let driver else { throw BlockError.io("qcow2 bitmap store without a driver") }
        return try driver.meta.withLock { (m) throws(BlockError) -> UInt64 in
            var short: [(UInt64, UInt64)] = []
            defer { for s in short { try? m.adjustRefcounts(start: s.0 >> m.clusterBits, count: s.1, increase: false) } }
            while true {
                let r = try m.allocateClusters(maxCount: n)
                if r.count == n { return r.offset }
                short.append((r.offset, r.count))
            }
        }
    }

    private func freeClusters(of sb: StoredBitmap) throws(BlockError) {
        guard let driver else { return }
        try driver.meta.withLock { (m) throws(BlockError) in
            // QEMU's QCOW2_DISCARD_OTHER: holes in the file only with pass-discard-other.
            for e in sb.table {
                let off = e & QCOW2BitmapFormat.tableOffsetMask
                if off != 0 { try m.adjustRefcounts(start: off >> m.clusterBits, count: 1, increase: false, discard: m.passDiscardOther) }
            }
            if sb.entry.tableOffset != 0 {
                let n = (UInt64(sb.entry.tableSize) * 8 + clusterSize - 1) / clusterSize
                try m.adjustRefcounts(start: sb.entry.tableOffset >> m.clusterBits, count: n, increase: false,
                                      discard: m.passDiscardOther)
            }
        }
    }

    /// Writes a new directory, then the header pointing at it (with or without the
    /// write-intent mark), then frees the old directory.
    private func writeDirectory(closing: Bool) throws(BlockError) {
        guard let driver else { throw BlockError.io("qcow2 bitmap store without a driver") }
        try checkNotCorrupt()
        try directoryLock.withLock { (_) throws(BlockError) in
            let list = state.withLock { $0 }
            var entries: [QCOW2BitmapEntry] = []
            var trusted: [String] = []
            for sb in list {
                var e = sb.entry
                if sb.bitmap.inconsistent {
                    e.flags |= QCOW2BitmapFormat.flagInUse
                } else {
                    e.flags = sb.bitmap.isEnabled ? QCOW2BitmapFormat.flagAuto : 0
                    if !closing {
                        e.flags |= QCOW2BitmapFormat.flagInUse
                        trusted.append(e.name)
                    }
                }
                e.extraData = []
                e.flags &= ~QCOW2BitmapFormat.flagExtraDataCompatible
                entries.append(e)
            }
            let bytes = QCOW2BitmapDirectory.serialize(entries)
            var newOffset: UInt64 = 0
            if !bytes.isEmpty {
                let n = (UInt64(bytes.count) + clusterSize - 1) / clusterSize
                newOffset = try allocateContiguous(n)
                try QCOW2BitmapStore.write(file.node, at: newOffset, bytes)
                try file.node.flush()
            }
            var dir = QCOW2BitmapDirectory(entries: entries, offset: newOffset, size: UInt64(bytes.count))
            let oldOffset = directoryOffset
            let oldSize = directorySize
            try driver.meta.withLock { (m) throws(BlockError) in
                var h = m.header
                h.extensions.removeAll { $0.type == QCOW2Extension.bitmaps || $0.type == QCOW2BitmapFormat.writeIntentExtension }
                if entries.isEmpty {
                    h.autoclearFeatures &= ~(QCOW2Feature.autoclearBitmaps | QCOW2BitmapFormat.autoclearWriteIntent)
                } else {
                    h.extensions.append(QCOW2HeaderExtension(type: QCOW2Extension.bitmaps, data: dir.extensionData()))
                    h.autoclearFeatures |= QCOW2Feature.autoclearBitmaps
                    if trusted.isEmpty {
                        h.autoclearFeatures &= ~QCOW2BitmapFormat.autoclearWriteIntent
                    } else {
                        h.extensions.append(QCOW2HeaderExtension(type: QCOW2BitmapFormat.writeIntentExtension,
                                                                 data: QCOW2BitmapFormat.encodeTrusted(trusted)))
                        h.autoclearFeatures |= QCOW2BitmapFormat.autoclearWriteIntent
                    }
                }
                _ = try h.serialize()
                let old = m.header
                m.header = h
                do throws(BlockError) { try m.writeHeader() } catch { m.header = old; throw error }
                if oldOffset != 0 && oldSize != 0 {
                    let n = (oldSize + clusterSize - 1) / clusterSize
                    try m.adjustRefcounts(start: oldOffset >> m.clusterBits, count: n, increase: false,
                                          discard: m.passDiscardOther)
                }
            }
            directoryOffset = newOffset
            directorySize = UInt64(bytes.count)
            dir.entries = []
        }
    }
}

/// One persistent bitmap's on-disk state and its write-intent bookkeeping.
final class StoredBitmap: BitmapWriteIntent, @unchecked Sendable {
    let bitmap: DirtyBitmap
    var entry: QCOW2BitmapEntry
    /// Data cluster offsets (entries as on disk).
    var table: [UInt64] = []
    unowned let store: QCOW2BitmapStore
    /// One bit per 64-granule group: all its bits are dirty on disk.
    private let intent: Mutex<[UInt64]>
    private let io = Mutex<Void>(())
    static let blockBytes = 4096

    init(bitmap: DirtyBitmap, entry: QCOW2BitmapEntry, store: QCOW2BitmapStore) {
        self.bitmap = bitmap
        self.entry = entry
        self.store = store
        let groups = (bitmap.granuleCount + 63) / 64
        intent = Mutex([UInt64](repeating: 0, count: (groups + 63) / 64))
    }

    @inline(__always)
    private static func covered(_ bits: [UInt64], _ g0: Int, _ g1: Int) -> Bool {
        var g = g0
        while g <= g1 {
            if bits[g >> 6] & (1 << UInt64(g & 63)) == 0 { return false }
            g += 1
        }
        return true
    }

    func ensureDirtyOnDisk(_ bitmap: DirtyBitmap, first: Int, end: Int, noWait: Bool) throws(BlockError) {
        let g0 = first >> 6
        let g1 = (end - 1) >> 6
        if intent.withLock({ StoredBitmap.covered($0, g0, g1) }) { return }
        if noWait { throw .wouldBlock }
        try store.checkNotCorrupt()
        try io.withLock { (_) throws(BlockError) in
            let current = intent.withLock { $0 }
            if StoredBitmap.covered(current, g0, g1) { return }
            // Write every 4 KiB block of bitmap data that holds a new group, with the groups
            // made all-ones; other words keep what memory (a subset of the disk) says.
            let wordsPerBlock = StoredBitmap.blockBytes / 8
            var block = g0 / wordsPerBlock
            while block <= g1 / wordsPerBlock {
                try writeBlock(block, current: current, extra: (g0, g1))
                block += 1
            }
            try store.file.node.flush()
            intent.withLock { bits in
                for g in g0...g1 { bits[g >> 6] |= 1 << UInt64(g & 63) }
            }
        }
    }

    /// Writes data block `block` (4 KiB of bitmap data = 512 groups): each word is all ones if
    /// its group has intent (or is in `extra`), else the in-memory word.
    private func writeBlock(_ block: Int, current: [UInt64], extra: (Int, Int)) throws(BlockError) {
        let bb = StoredBitmap.blockBytes
        let byteOffset = block * bb
        let cs = Int(store.clusterSize)
        var buf = [UInt8](repeating: 0, count: bb)
        let total = bitmap.withBits { $0.byteCount }
        if byteOffset >= total { return }
        buf.withUnsafeMutableBytes { raw in
            bitmap.withBits { $0.copyBytes(from: byteOffset, into: raw) }
            let words = raw.bindMemory(to: UInt64.self)
            for w in 0..<(bb / 8) {
                let g = block * (bb / 8) + w
                let has = (g >> 6) < current.count && current[g >> 6] & (1 << UInt64(g & 63)) != 0
                if has || (g >= extra.0 && g <= extra.1) { words[w] = ~0 }
            }
        }
        // Bits past the end of the bitmap stay zero.
        let valid = min(bb, total - byteOffset)
        for i in valid..<bb { buf[i] = 0 }
        let tailBits = bitmap.granuleCount - (byteOffset + valid - 1) * 8
        if tailBits < 8 && tailBits > 0 { buf[valid - 1] &= UInt8((1 << tailBits) - 1) }
        // A block lies within one cluster (clusters are at least 512 B; blocks split if smaller).
        var done = 0
        while done < bb && byteOffset + done < total {
            let at = byteOffset + done
            let ci = at / cs
            let inCluster = at % cs
            let n = min(bb - done, cs - inCluster)
            let host = table[ci] & QCOW2BitmapFormat.tableOffsetMask
            guard host != 0 else { throw BlockError.io("bitmap '\(bitmap.name)': data cluster \(ci) is not allocated") }
            try QCOW2BitmapStore.write(store.file.node, at: host + UInt64(inCluster), Array(buf[done..<(done + n)]))
            done += n
        }
    }

    /// Writes data cluster `i` from memory (no intent overlay). The caller syncs.
    func writeCluster(_ i: Int, totalBytes: UInt64) throws(BlockError) {
        let cs = Int(store.clusterSize)
        var buf = [UInt8](repeating: 0, count: cs)
        buf.withUnsafeMutableBytes { raw in bitmap.withBits { $0.copyBytes(from: i * cs, into: raw) } }
        try QCOW2BitmapStore.write(store.file.node, at: table[i] & QCOW2BitmapFormat.tableOffsetMask, buf)
    }

    /// Rewrites all data: memory bits, plus (unless `resetIntent`) intent groups as ones.
    func writeAll(resetIntent: Bool) throws(BlockError) {
        try store.checkNotCorrupt()
        try io.withLock { (_) throws(BlockError) in
            if resetIntent {
                intent.withLock { bits in for i in bits.indices { bits[i] = 0 } }
                let total = UInt64(bitmap.withBits { $0.byteCount })
                for i in table.indices { try writeCluster(i, totalBytes: total) }
            } else {
                let current = intent.withLock { $0 }
                let blocks = (bitmap.withBits { $0.byteCount } + StoredBitmap.blockBytes - 1) / StoredBitmap.blockBytes
                for b in 0..<blocks { try writeBlock(b, current: current, extra: (1, 0)) }
            }
            try store.file.node.flush()
        }
    }
}

extension QCOW2Driver {
    public var bitmapStorage: (any PersistentBitmapStorage)? { bitmapStore }

    /// The image's bitmap directory as it is on disk (QEMU's `format-specific` `bitmaps`):
    /// name, granularity, and the `in-use` and `auto` flags, in directory order.
    public var storedBitmaps: [(name: String, granularity: UInt64, inUse: Bool, auto: Bool)] {
        bitmapStore.directoryFlags()
    }
}

extension QCOW2BitmapStore {
    /// Flags of each entry as the last directory write left them (see `writeDirectory`).
    func directoryFlags() -> [(name: String, granularity: UInt64, inUse: Bool, auto: Bool)] {
        let list = state.withLock { $0 }
        let open = isActive
        return list.map { sb in
            var flags = sb.entry.flags
            if open && !sb.bitmap.inconsistent {
                flags = (sb.bitmap.isEnabled ? QCOW2BitmapFormat.flagAuto : 0) | QCOW2BitmapFormat.flagInUse
            }
            return (sb.entry.name, UInt64(1) << UInt64(sb.entry.granularityBits),
                    flags & QCOW2BitmapFormat.flagInUse != 0, flags & QCOW2BitmapFormat.flagAuto != 0)
        }
    }
}
