import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// The qcow2 bitmaps extension (header extension 0x23852875): bitmap directory entries and
/// bitmap tables, parsed with the checks QEMU applies (`check_dir_entry`, `check_table_entry`).
///
/// blockd's crash-safety mark lives beside it: the autoclear bit
/// `QCOW2BitmapFormat.autoclearWriteIntent` plus header extension `writeIntentExtension`
/// naming the bitmaps whose on-disk copy blockd keeps a superset of the changes while it has
/// the image open. Any other program that opens the image writable clears unknown autoclear
/// bits, which withdraws the mark; QEMU and qemu-img still see those bitmaps as `in-use`.
public enum QCOW2BitmapFormat {
    public static let flagInUse: UInt32 = 1 << 0
    public static let flagAuto: UInt32 = 1 << 1
    public static let flagExtraDataCompatible: UInt32 = 1 << 2
    static let reservedFlags: UInt32 = ~UInt32(7)
    static let typeDirtyTracking: UInt8 = 1
    static let maxTableSize: UInt32 = 0x800_0000
    static let maxPhysicalSize: UInt64 = 0x2000_0000
    static let maxDirectorySize: UInt64 = 64 << 20
    static let maxBitmaps: UInt32 = 65535
    static let tableOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let tableReservedMask: UInt64 = 0xff00_0000_0000_01fe
    static let tableAllOnes: UInt64 = 1

    /// Autoclear bit: the write-intent extension below is valid.
    public static let autoclearWriteIntent: UInt64 = 1 << 48
    /// Header extension "blkw": u16 count, then per bitmap u16 name length + name.
    public static let writeIntentExtension: UInt32 = 0x626c_6b77

    /// Bytes of bitmap data for `size` bytes at `granularity`.
    static func dataBytes(size: UInt64, granularityBits: UInt8) -> UInt64 {
        let bits = (size + (UInt64(1) << granularityBits) - 1) >> UInt64(granularityBits)
        return (bits + 7) / 8
    }

    static func tableSize(size: UInt64, granularityBits: UInt8, clusterSize: UInt64) -> UInt64 {
        (dataBytes(size: size, granularityBits: granularityBits) + clusterSize - 1) / clusterSize
    }

    static func encodeTrusted(_ names: [String]) -> [UInt8] {
        var b: [UInt8] = []
        b.append(UInt8(names.count >> 8)); b.append(UInt8(names.count & 0xff))
        for n in names {
            let u = Array(n.utf8)
            b.append(UInt8(u.count >> 8)); b.append(UInt8(u.count & 0xff))
            b += u
        }
        return b
    }

    static func decodeTrusted(_ b: [UInt8]) -> Set<String> {
        guard b.count >= 2 else { return [] }
        var out = Set<String>()
        let n = Int(b[0]) << 8 | Int(b[1])
        var at = 2
        for _ in 0..<n {
            guard at + 2 <= b.count else { return [] }
            let len = Int(b[at]) << 8 | Int(b[at + 1])
            at += 2
            guard at + len <= b.count else { return [] }
            out.insert(String(decoding: b[at..<(at + len)], as: UTF8.self))
            at += len
        }
        return out
    }
}

/// One bitmap directory entry.
struct QCOW2BitmapEntry: Sendable, Equatable {
    var tableOffset: UInt64
    var tableSize: UInt32
    var flags: UInt32
    var granularityBits: UInt8
    var name: String
    var extraData: [UInt8] = []

    var byteSize: Int { (24 + extraData.count + name.utf8.count + 7) & ~7 }
}

/// The extension's 24 bytes and the directory it points at.
struct QCOW2BitmapDirectory: Sendable {
    var entries: [QCOW2BitmapEntry] = []
    var offset: UInt64 = 0
    var size: UInt64 = 0

    static func parseExtension(_ data: [UInt8], image: String) throws(BlockError) -> (count: UInt32, size: UInt64, offset: UInt64) {
        func bad(_ what: String) -> BlockError { BlockError.invalid("Image '\(image)': corrupt bitmaps extension: \(what)") }
        guard data.count >= 24 else { throw bad("extension is \(data.count) bytes, expected 24") }
        let count = be32(data, 0)
        guard be32(data, 4) == 0 else { throw bad("reserved field is not zero") }
        let size = be64(data, 8)
        let offset = be64(data, 16)
        guard count <= QCOW2BitmapFormat.maxBitmaps else { throw bad("too many bitmaps (\(count))") }
        return (count, size, offset)
    }

    func extensionData() -> [UInt8] {
        var b: [UInt8] = []
        appendBE32(&b, UInt32(entries.count))
        appendBE32(&b, 0)
        appendBE64(&b, size)
        appendBE64(&b, offset)
        return b
    }

    /// Parses and checks the directory bytes.
    static func parseEntries(_ dir: [UInt8], count: UInt32, clusterSize: UInt64, imageSize: UInt64,
                             fileLength: UInt64, image: String) throws(BlockError) -> [QCOW2BitmapEntry] {
        func bad(_ what: String) -> BlockError {
            BlockError.invalid("Image '\(image)': corrupt bitmap directory: \(what); refusing to open the image (it is left untouched)")
        }
        var out: [QCOW2BitmapEntry] = []
        var at = 0
        while at < dir.count {
            guard at + 24 <= dir.count else { throw bad("entry \(out.count) is truncated") }
            guard out.count < Int(count) else { throw bad("more bitmaps found than the header extension says (\(count))") }
            let e0 = be64(dir, at)
            let tsize = be32(dir, at + 8)
            let flags = be32(dir, at + 12)
            let type = dir[at + 16]
            let gbits = dir[at + 17]
            let nameSize = Int(dir[at + 18]) << 8 | Int(dir[at + 19])
            let extra = Int(be32(dir, at + 20))
            let entrySize = (24 + extra + nameSize + 7) & ~7
            guard extra <= dir.count, at + entrySize <= dir.count else { throw bad("entry \(out.count) is past the end of the directory") }
            let name = String(decoding: dir[(at + 24 + extra)..<(at + 24 + extra + nameSize)], as: UTF8.self)
            if extra != 0 && flags & QCOW2BitmapFormat.flagExtraDataCompatible == 0 {
                throw BlockError.notSupported("Image '\(image)': bitmap '\(name)' has extra data that is not supported")
            }
            guard tsize != 0, e0 != 0, e0 % clusterSize == 0, tsize <= QCOW2BitmapFormat.maxTableSize,
                  gbits >= 9, gbits <= 31, flags & QCOW2BitmapFormat.reservedFlags == 0,
                  nameSize <= DirtyBitmap.maxNameBytes, nameSize > 0, type == QCOW2BitmapFormat.typeDirtyTracking else {
                throw bad("bitmap '\(name)' doesn't satisfy the constraints")
            }
            let phys = UInt64(tsize) * clusterSize
            guard phys <= QCOW2BitmapFormat.maxPhysicalSize else { throw bad("bitmap '\(name)' is too large") }
            if flags & QCOW2BitmapFormat.flagInUse == 0 && imageSize > (phys * 8) << UInt64(gbits) {
                throw bad("bitmap '\(name)' has a table too small for the image")
            }
            let (tend, o) = e0.addingReportingOverflow(UInt64(tsize) * 8)
            guard !o, tend <= fileLength else { throw bad("bitmap '\(name)' table is past the end of the file") }
            guard !out.contains(where: { $0.name == name }) else { throw bad("duplicate bitmap name '\(name)'") }
            out.append(QCOW2BitmapEntry(tableOffset: e0, tableSize: tsize, flags: flags, granularityBits: gbits,
                                        name: name, extraData: Array(dir[(at + 24)..<(at + 24 + extra)])))
            at += entrySize
        }
        guard out.count == Int(count) else { throw bad("fewer bitmaps found (\(out.count)) than the header extension says (\(count))") }
        return out
    }

    static func serialize(_ entries: [QCOW2BitmapEntry]) -> [UInt8] {
        var b: [UInt8] = []
        for e in entries {
            appendBE64(&b, e.tableOffset)
            appendBE32(&b, e.tableSize)
            appendBE32(&b, e.flags)
            b.append(QCOW2BitmapFormat.typeDirtyTracking)
            b.append(e.granularityBits)
            let name = Array(e.name.utf8)
            b.append(UInt8(name.count >> 8)); b.append(UInt8(name.count & 0xff))
            appendBE32(&b, UInt32(e.extraData.count))
            b += e.extraData
            b += name
            while b.count % 8 != 0 { b.append(0) }
        }
        return b
    }

    /// Checks one bitmap table's entries.
    static func checkTable(_ table: [UInt64], clusterSize: UInt64, fileLength: UInt64, name: String,
                           image: String) throws(BlockError) {
        for (i, e) in table.enumerated() {
            let off = e & QCOW2BitmapFormat.tableOffsetMask
            let bad = e & QCOW2BitmapFormat.tableReservedMask != 0
                || (off != 0 && (e & QCOW2BitmapFormat.tableAllOnes != 0 || off % clusterSize != 0 || off + clusterSize > fileLength))
            if bad {
                throw BlockError.invalid("Image '\(image)': corrupt bitmap directory: bitmap '\(name)' table entry \(i) is invalid (0x\(String(e, radix: 16))); refusing to open the image (it is left untouched)")
            }
        }
    }
}
