/// A small `qemu-img check` for the qcow2 fuzz harness, written apart from the driver so it
/// can judge it: counts every reference (header, refcount table and blocks, L1, L2, data and
/// compressed clusters, the bitmap directory and bitmap tables and data) and compares with the
/// stored refcounts. An image is consistent when nothing is referenced beyond the end of the
/// file, no cluster is referenced twice, and no stored refcount is below its references
/// (leaks — refcounts above — are allowed, as qemu-img check allows them).
///
/// The fuzz oracles use it both ways: only a consistent image is held to "reads back what was
/// written" (on a corrupt one QEMU has no such promise either), and a consistent image that
/// blockd opened, wrote and closed without error must still be consistent.
enum QCOW2Consistency {
    enum Verdict: Equatable {
        case consistent
        /// Not judged: snapshots, external data files, a dirty image with lazy refcounts.
        case unsupported(String)
        case inconsistent(String)
    }

    static func check(_ image: [UInt8]) -> Verdict {
        var h = ByteReader(image)
        guard let magic = h.u32(), magic == 0x5146_49fb, let version = h.u32(), version == 2 || version == 3,
              let _ = h.u64(), let _ = h.u32(), let clusterBits = h.u32(), (9...21).contains(clusterBits),
              let _ = h.u64(), let _ = h.u32(), let l1Size = h.u32(), let l1Offset = h.u64(),
              let reftableOffset = h.u64(), let reftableClusters = h.u32(), let snapshots = h.u32(), let _ = h.u64()
        else { return .unsupported("not a qcow2 header this checker reads") }
        var incompatible: UInt64 = 0
        var refcountOrder: UInt32 = 4
        var headerLength: UInt32 = 72
        if version == 3 {
            guard let i = h.u64(), let _ = h.u64(), let _ = h.u64(), let order = h.u32(), let length = h.u32(),
                  order <= 6, length >= 104 else { return .unsupported("short v3 header") }
            incompatible = i
            refcountOrder = order
            headerLength = length
        }
        if snapshots != 0 { return .unsupported("snapshots") }
        if incompatible & 0b101 != 0 { return .unsupported("dirty or external data file") }
        let extendedL2 = incompatible & (1 << 4) != 0
        let clusterSize = UInt64(1) << clusterBits
        let fileClusters = (UInt64(image.count) + clusterSize - 1) >> clusterBits
        guard fileClusters < 1 << 22 else { return .unsupported("too large to check") }
        var references = [UInt16](repeating: 0, count: Int(fileClusters))
        var exclusive = [Bool](repeating: false, count: Int(fileClusters))
        var problem: String?

        /// Counts one reference to every cluster of [offset, offset + length). Compressed
        /// clusters may share host clusters (`shared`); nothing else may.
        func reference(_ offset: UInt64, _ length: UInt64, _ what: String, shared: Bool = false) {
            guard problem == nil, length > 0 else { return }
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard !overflow, end <= fileClusters << clusterBits else {
                problem = "\(what) at \(offset)+\(length) is past the end of the file"
                return
            }
            for c in (offset >> clusterBits)...((end - 1) >> clusterBits) {
                let i = Int(c)
                if references[i] > 0 && (exclusive[i] || !shared) {
                    problem = "cluster \(c) referenced twice (last by \(what))"
                    return
                }
                references[i] &+= 1
                exclusive[i] = !shared
            }
        }
        func u64(at offset: UInt64) -> UInt64? {
            var r = ByteReader(image, at: 0)
            guard offset <= UInt64(image.count), r.skip(offset) else { return nil }
            return r.u64()
        }

        reference(0, clusterSize, "the header")
        // Header extensions: find the bitmaps extension.
        var bitmapDirectory: (offset: UInt64, size: UInt64, count: UInt32)?
        var e = ByteReader(image, at: Int(min(UInt64(headerLength), UInt64(image.count))))
        while let type = e.u32(), type != 0, let length = e.u32() {
            if type == 0x2385_2875, length >= 24 {
                var b = ByteReader(image, at: e.at)
                if let count = b.u32(), let _ = b.u32(), let size = b.u64(), let offset = b.u64() {
                    bitmapDirectory = (offset, size, count)
                }
            }
            guard e.skip((UInt64(length) + 7) & ~7) else { break }
        }

        // Refcount table and blocks.
        let reftableBytes = UInt64(reftableClusters) << clusterBits
        reference(reftableOffset, reftableBytes, "the refcount table")
        var refblocks: [UInt64] = []
        for i in 0..<(reftableBytes / 8) {
            guard let entry = u64(at: reftableOffset + i * 8) else { break }
            let offset = entry & ~UInt64(511)
            refblocks.append(offset)
            if offset != 0 { reference(offset, clusterSize, "refcount block \(i)") }
        }

        // L1, L2, data.
        let l1Bytes = UInt64(l1Size) * 8
        reference(l1Offset, l1Bytes, "the L1 table")
        let l2EntryBytes: UInt64 = extendedL2 ? 16 : 8
        let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
        let csizeShift = 62 - UInt64(clusterBits - 8)
        let csizeMask = (UInt64(1) << (clusterBits - 8)) - 1
        let compressedOffsetMask = (UInt64(1) << csizeShift) - 1
        for i in 0..<UInt64(l1Size){
            if problem != nil { break }
            guard let l1 = u64(at: l1Offset + i * 8) else { break }
            let l2 = l1 & offsetMask
            if l2 == 0 { continue }
            reference(l2, clusterSize, "L2 table \(i)")
            for j in 0..<(clusterSize / l2EntryBytes){
                if problem != nil { break }
                guard let entry = u64(at: l2 + j * l2EntryBytes) else { break }
                if entry & (1 << 62) != 0 {
                    let offset = entry & compressedOffsetMask
                    let sectors = ((entry >> csizeShift) & csizeMask) + 1
                    reference(offset & ~UInt64(511), sectors * 512, "compressed data of L2 \(i)/\(j)", shared: true)
                } else if entry & offsetMask != 0 {
                    reference(entry & offsetMask, clusterSize, "data of L2 \(i)/\(j)")
                }
            }
        }

        // Bitmaps: the directory, each table, each table's data clusters.
        if let dir = bitmapDirectory, problem == nil {
            reference(dir.offset, dir.size, "the bitmap directory")
            var d = ByteReader(image, at: 0)
            if dir.offset <= UInt64(image.count), d.skip(dir.offset) {
                for n in 0..<dir.count{
                    if problem != nil { break }
                    guard let table = d.u64(), let tableSize = d.u32(), let _ = d.u32(), let _ = d.u8(), let _ = d.u8(),
                          let nameSize = d.u16(), let extra = d.u32() else { break }
                    reference(table, UInt64(tableSize) * 8, "bitmap table \(n)")
                    for k in 0..<UInt64(tableSize){
                        if problem != nil { break }
                        guard let entry = u64(at: table + k * 8) else { break }
                        if entry & offsetMask != 0 { reference(entry & offsetMask, clusterSize, "bitmap \(n) data") }
                    }
                    let entryBytes = 24 + UInt64(extra) + UInt64(nameSize)
                    guard d.skip(((entryBytes + 7) & ~7) - 24) else { break }
                }
            }
        }
        if let problem { return .inconsistent(problem) }

        // Stored refcounts must cover every reference.
        let bits = UInt64(1) << refcountOrder
        let perBlock = (clusterSize * 8) / bits
        for c in 0..<fileClusters where references[Int(c)] > 0 {
            let block = c / perBlock
            guard block < UInt64(refblocks.count), refblocks[Int(block)] != 0 else {
                return .inconsistent("cluster \(c) is referenced but has no refcount block")
            }
            let bit = (c % perBlock) * bits
            let byteOffset = refblocks[Int(block)] + bit / 8
            guard byteOffset + max(bits / 8, 1) <= UInt64(image.count) else {
                return .inconsistent("the refcount of cluster \(c) is past the end of the file")
            }
            var value: UInt64 = 0
            if bits >= 8 {
                for k in 0..<(bits / 8) { value = value << 8 | UInt64(image[Int(byteOffset + k)]) }
            } else {
                // Sub-byte refcounts are packed from the least significant bit.
                value = (UInt64(image[Int(byteOffset)]) >> (bit % 8)) & ((1 << bits) - 1)
            }
            if value < UInt64(references[Int(c)]) {
                return .inconsistent("cluster \(c) has refcount \(value) but \(references[Int(c)]) reference(s)")
            }
        }
        return .consistent
    }
}
