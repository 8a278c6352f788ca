import BlockCore
#if canImport(Glibc)
import Glibc
#endif

// MARK: big-endian helpers

@inline(__always)
func loadBE64(_ p: UnsafeRawPointer, _ offset: Int) -> UInt64 {
    UInt64(bigEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
}

@inline(__always)
func loadBE32(_ p: UnsafeRawPointer, _ offset: Int) -> UInt32 {
    UInt32(bigEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
}

@inline(__always)
func storeBE64(_ p: UnsafeMutableRawPointer, _ offset: Int, _ value: UInt64) {
    p.storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt64.self)
}

@inline(__always)
func storeBE32(_ p: UnsafeMutableRawPointer, _ offset: Int, _ value: UInt32) {
    p.storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self)
}

func be64(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<8 { v = v << 8 | UInt64(bytes[offset + i]) }
    return v
}

func be32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
    var v: UInt32 = 0
    for i in 0..<4 { v = v << 8 | UInt32(bytes[offset + i]) }
    return v
}

func appendBE64(_ bytes: inout [UInt8], _ v: UInt64) {
    for i in (0..<8).reversed() { bytes.append(UInt8(truncatingIfNeeded: v >> (UInt64(i) * 8))) }
}

func appendBE32(_ bytes: inout [UInt8], _ v: UInt32) {
    for i in (0..<4).reversed() { bytes.append(UInt8(truncatingIfNeeded: v >> (UInt32(i) * 8))) }
}

/// Feature bits of the qcow2 header (`incompatible_features`, `compatible_features`,
/// `autoclear_features`).
public enum QCOW2Feature {
    public static let dirty: UInt64 = 1 << 0
    public static let corrupt: UInt64 = 1 << 1
    public static let externalDataFile: UInt64 = 1 << 2
    public static let compressionType: UInt64 = 1 << 3
    public static let extendedL2: UInt64 = 1 << 4
    public static let knownIncompatible: UInt64 = 0x1f

    public static let lazyRefcounts: UInt64 = 1 << 0

    public static let autoclearBitmaps: UInt64 = 1 << 0
    public static let autoclearRawDataFile: UInt64 = 1 << 1
    /// Bitmaps valid, and blockd's bitmap write-intent mark (`QCOW2BitmapFormat`).
    public static let knownAutoclear: UInt64 = 1 << 0 | 1 << 48
}

/// Header extension type numbers.
public enum QCOW2Extension {
    public static let end: UInt32 = 0
    public static let backingFormat: UInt32 = 0xe279_2aca
    public static let featureNameTable: UInt32 = 0x6803_f857
    public static let bitmaps: UInt32 = 0x2385_2875
    public static let fullDiskEncryption: UInt32 = 0x0537_be77
    public static let externalDataFile: UInt32 = 0x4441_5441
}

/// One header extension, kept as raw bytes so unknown ones survive a header rewrite.
public struct QCOW2HeaderExtension: Sendable, Equatable {
    public var type: UInt32
    public var data: [UInt8]
}

/// The qcow2 header (first cluster): fixed fields, header extensions, backing file name.
///
/// `parse` validates everything that later code relies on, so the rest of the driver can
/// trust these fields; `serialize` writes the same layout back (unknown fields and unknown
/// extensions preserved byte for byte).
public struct QCOW2Header: Sendable {
    public static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"
    /// Largest L1 table accepted (QEMU's limit: 32 MiB).
    static let maxL1Bytes: UInt64 = 32 << 20
    /// Largest refcount table accepted (QEMU's limit: 8 MiB).
    static let maxRefcountTableBytes: UInt64 = 8 << 20

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var nbSnapshots: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = 72
    /// Bytes 104..<headerLength (compression type, padding, fields unknown to us).
    public var additionalFields: [UInt8] = []
    public var extensions: [QCOW2HeaderExtension] = []
    public var backingFile: String?

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var compressionType: UInt8 { additionalFields.first ?? 0 }
    public var hasExtendedL2: Bool { incompatibleFeatures & QCOW2Feature.extendedL2 != 0 }
    /// Bytes per L2 entry (16 with extended L2).
    public var l2EntryBytes: UInt64 { hasExtendedL2 ? 16 : 8 }
    public var l2Entries: UInt64 { clusterSize / l2EntryBytes }

    public var backingFormat: String? {
        get {
            extensions.first { $0.type == QCOW2Extension.backingFormat }.map { String(decoding: $0.data, as: UTF8.self) }
        }
        set {
            if let newValue {
                let data = Array(newValue.utf8)
                if let i = extensions.firstIndex(where: { $0.type == QCOW2Extension.backingFormat }) {
                    extensions[i].data = data
                } else {
                    extensions.insert(QCOW2HeaderExtension(type: QCOW2Extension.backingFormat, data: data), at: 0)
                }
            } else {
                extensions.removeAll { $0.type == QCOW2Extension.backingFormat }
            }
        }
    }

    /// Names from the feature name table: (type 0/1/2, bit) → name.
    public func featureName(type: UInt8, bit: Int) -> String? {
        guard let ext = extensions.first(where: { $0.type == QCOW2Extension.featureNameTable }) else { return nil }
        var i = 0
        while i + 48 <= ext.data.count {
            if ext.data[i] == type && Int(ext.data[i + 1]) == bit {
                let raw = ext.data[(i + 2)..<(i + 48)].prefix { $0 != 0 }
                return String(decoding: raw, as: UTF8.self)
            }
            i += 48
        }
        return nil
    }

    /// How many leading bytes of the file `parse` needs before it knows the cluster size.
    static let minimumBytes = 72

    /// Parses and validates the header. `bytes` holds the start of the file (at least the first
    /// cluster, or the whole file if shorter); `fileLength` is the image file's size.
    public static func parse(_ bytes: [UInt8], fileLength: UInt64, image: String) throws(BlockError) -> QCOW2Header {
        func bad(_ what: String) -> BlockError {
            BlockError.invalid("Image '\(image)' is not a valid qcow2 image: \(what)")
        }
        guard bytes.count >= 72 else { throw bad("truncated header (\(bytes.count) bytes)") }
        guard be32(bytes, 0) == magic else { throw bad("bad magic") }
        let version = be32(bytes, 4)
        guard version == 2 || version == 3 else {
            throw BlockError.notSupported("Image '\(image)': unsupported qcow2 version \(version)")
        }
        var h = QCOW2Header(version: version, backingFileOffset: be64(bytes, 8), backingFileSize: be32(bytes, 16),
                            clusterBits: be32(bytes, 20), size: be64(bytes, 24), cryptMethod: be32(bytes, 32),
                            l1Size: be32(bytes, 36), l1TableOffset: be64(bytes, 40),
                            refcountTableOffset: be64(bytes, 48), refcountTableClusters: be32(bytes, 56),
                            nbSnapshots: be32(bytes, 60), snapshotsOffset: be64(bytes, 64))
        guard h.clusterBits >= 9 && h.clusterBits <= 21 else {
            throw bad("cluster_bits \(h.clusterBits) out of range (9..21: 512 B to 2 MiB clusters)")
        }
        let cs = h.clusterSize
        if version == 3 {
            guard bytes.count >= 104 else { throw bad("truncated header (\(bytes.count) bytes)") }
            h.incompatibleFeatures = be64(bytes, 72)
            h.compatibleFeatures = be64(bytes, 80)
            h.autoclearFeatures = be64(bytes, 88)
            h.refcountOrder = be32(bytes, 96)
            h.headerLength = be32(bytes, 100)
            guard h.headerLength >= 104, h.headerLength % 8 == 0, UInt64(h.headerLength) <= cs else {
                throw bad("invalid header_length \(h.headerLength)")
            }
            guard bytes.count >= Int(h.headerLength) else { throw bad("truncated header (\(bytes.count) bytes)") }
            h.additionalFields = Array(bytes[104..<Int(h.headerLength)])
        }
        guard UInt64(bytes.count) >= min(cs, fileLength) else { throw bad("truncated header cluster") }
        // Incompatible features first: an unknown bit means nothing else can be trusted.
        let unknown = h.incompatibleFeatures & ~QCOW2Feature.knownIncompatible
        if unknown != 0 {
            var names: [String] = []
            for bit in 0..<64 where unknown & (1 << UInt64(bit)) != 0 {
                // The feature table lives in the extensions; parse them leniently for names.
                var probe = h
                try? probe.parseExtensions(bytes, image: image)
                if let n = probe.featureName(type: 0, bit: bit) { names.append("bit \(bit) (\(n))") } else { names.append("bit \(bit)") }
            }
            throw BlockError.notSupported("Image '\(image)' uses unsupported qcow2 incompatible feature(s): \(names.joined(separator: ", "))")
        }
        if h.incompatibleFeatures & QCOW2Feature.externalDataFile != 0 {
            throw BlockError.notSupported("Image '\(image)' uses an external data file (incompatible feature bit 2), which is not supported")
        }
        guard h.refcountOrder <= 6 else { throw bad("refcount_order \(h.refcountOrder) is larger than 6") }
        if h.cryptMethod != 0 {
            throw BlockError.notSupported("Image '\(image)' is encrypted (crypt_method \(h.cryptMethod)), which is not supported")
        }
        let ctype = h.compressionType
        if h.incompatibleFeatures & QCOW2Feature.compressionType != 0 {
            guard ctype == 1 else { throw bad("unknown compression type \(ctype)") }
        } else if ctype != 0 {
            throw bad("compression type \(ctype) set without the compression type feature bit")
        }
        if h.hasExtendedL2 && h.clusterBits < 14 {
            throw bad("extended L2 entries need clusters of at least 16 KiB")
        }
        // Sizes and table placement, with overflow-checked arithmetic throughout.
        guard h.size <= (UInt64(1) << 62) else { throw bad("virtual size \(h.size) is too large") }
        let bytesPerL2 = h.l2Entries * cs
        let neededL1 = (h.size / bytesPerL2) + (h.size % bytesPerL2 == 0 ? 0 : 1)
        guard UInt64(h.l1Size) >= neededL1 else {
            throw bad("L1 table is too small (\(h.l1Size) entries for a virtual size of \(h.size) needs \(neededL1))")
        }
        guard UInt64(h.l1Size) * 8 <= maxL1Bytes else { throw bad("L1 table is too large (\(h.l1Size) entries)") }
        if h.l1Size > 0 {
            guard h.l1TableOffset % cs == 0, h.l1TableOffset >= cs else {
                throw bad("L1 table offset \(h.l1TableOffset) is invalid (unaligned or overlapping the header)")
            }
            let (end, o) = h.l1TableOffset.addingReportingOverflow(UInt64(h.l1Size) * 8)
            guard !o, end <= fileLength else { throw bad("L1 table (offset \(h.l1TableOffset)) is past the end of the file") }
        }
        guard h.refcountTableClusters > 0,
              UInt64(h.refcountTableClusters) * cs <= maxRefcountTableBytes else {
            throw bad("refcount table size of \(h.refcountTableClusters) clusters is invalid")
        }
        guard h.refcountTableOffset % cs == 0, h.refcountTableOffset >= cs else {
            throw bad("refcount table offset \(h.refcountTableOffset) is invalid (unaligned or overlapping the header)")
        }
        let (rtEnd, rtO) = h.refcountTableOffset.addingReportingOverflow(UInt64(h.refcountTableClusters) * cs)
        guard !rtO, rtEnd <= fileLength + cs else {
            throw bad("refcount table (offset \(h.refcountTableOffset)) is past the end of the file")
        }
        if h.l1Size > 0 {
            let l1End = h.l1TableOffset + UInt64(h.l1Size) * 8
            if h.l1TableOffset < rtEnd && h.refcountTableOffset < l1End {
                throw bad("the L1 table overlaps the refcount table")
            }
        }
        if h.nbSnapshots > 0 && (h.snapshotsOffset % cs != 0 || h.snapshotsOffset < cs) {
            throw bad("snapshot table offset \(h.snapshotsOffset) is invalid")
        }
        try h.parseExtensions(bytes, image: image)
        if h.backingFileOffset != 0 {
            guard h.backingFileSize <= 1023 else { throw bad("backing file name is too long (\(h.backingFileSize) bytes)") }
            let (end, o) = h.backingFileOffset.addingReportingOverflow(UInt64(h.backingFileSize))
            guard !o, end <= min(cs, UInt64(bytes.count)) else { throw bad("backing file name is outside the header cluster") }
            let raw = bytes[Int(h.backingFileOffset)..<Int(end)]
            h.backingFile = String(decoding: raw, as: UTF8.self)
        }
        return h
    }

    private mutating func parseExtensions(_ bytes: [UInt8], image: String) throws(BlockError) {
        extensions = []
        var at = version == 2 ? 72 : Int(headerLength)
        let limit = min(Int(clusterSize), bytes.count)
        while at + 8 <= limit {
            let type = be32(bytes, at)
            let length = Int(be32(bytes, at + 4))
            if type == QCOW2Extension.end { return }
            let dataEnd = at + 8 + length
            guard length <= limit, dataEnd <= limit else {
                throw BlockError.invalid("Image '\(image)' is not a valid qcow2 image: header extension 0x\(String(type, radix: 16)) is past the end of the header cluster")
            }
            extensions.append(QCOW2HeaderExtension(type: type, data: Array(bytes[(at + 8)..<dataEnd])))
            at = (dataEnd + 7) & ~7
        }
    }

    /// The header cluster's used bytes: fields, extensions, end marker, backing file name.
    /// Throws if it no longer fits in the first cluster.
    public func serialize() throws(BlockError) -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(4096)
        appendBE32(&b, QCOW2Header.magic)
        appendBE32(&b, version)
        let backingPlaceholder = b.count
        appendBE64(&b, 0)
        appendBE32(&b, 0)
        appendBE32(&b, clusterBits)
        appendBE64(&b, size)
        appendBE32(&b, cryptMethod)
        appendBE32(&b, l1Size)
        appendBE64(&b, l1TableOffset)
        appendBE64(&b, refcountTableOffset)
        appendBE32(&b, refcountTableClusters)
        appendBE32(&b, nbSnapshots)
        appendBE64(&b, snapshotsOffset)
        if version >= 3 {
            appendBE64(&b, incompatibleFeatures)
            appendBE64(&b, compatibleFeatures)
            appendBE64(&b, autoclearFeatures)
            appendBE32(&b, refcountOrder)
            appendBE32(&b, headerLength)
            b.append(contentsOf: additionalFields)
        }
        for ext in extensions {
            appendBE32(&b, ext.type)
            appendBE32(&b, UInt32(ext.data.count))
            b.append(contentsOf: ext.data)
            while b.count % 8 != 0 { b.append(0) }
        }
        appendBE64(&b, 0)  // end of extensions
        if let backingFile {
            let name = Array(backingFile.utf8)
            guard name.count <= 1023 else { throw BlockError.invalid("backing file name is too long (\(name.count) bytes)") }
            let offset = UInt64(b.count)
            b.append(contentsOf: name)
            var tmp: [UInt8] = []
            appendBE64(&tmp, offset)
            appendBE32(&tmp, UInt32(name.count))
            b.replaceSubrange(backingPlaceholder..<(backingPlaceholder + 12), with: tmp)
        }
        guard UInt64(b.count) <= clusterSize else {
            throw BlockError.invalid("qcow2 header with its extensions and backing file name does not fit in one cluster")
        }
        return b
    }
}

/// Runs `body` (an untyped-throwing closure such as `Array.withUnsafeBytes`) whose only
/// thrown errors are `BlockError`s, rethrowing them typed.
@inline(__always)
func rethrowingBlockError<T>(_ body: () throws -> T) throws(BlockError) -> T {
    do { return try body() } catch let e as BlockError { throw e } catch { throw BlockError.io("\(error)") }
}
