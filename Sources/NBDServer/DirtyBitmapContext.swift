import BlockCore
import NBDProtocol

/// `qemu:dirty-bitmap:NAME`: one extent per run of dirty or clean granules, flag 1 = dirty
/// (QEMU's `NBD_STATE_DIRTY`). The bitmap is marked busy while an export offers it.
public final class DirtyBitmapContext: MetaContextProvider {
    public let name: String
    public let bitmap: DirtyBitmap
    /// Flag bit of a dirty extent.
    public static let dirty: UInt32 = 1

    public init(bitmap: DirtyBitmap) {
        self.bitmap = bitmap
        self.name = "qemu:dirty-bitmap:" + bitmap.name
    }

    public func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockError) -> [Transmission.Extent] {
        let limit = UInt64(UInt32.max) & ~(bitmap.granularity - 1)
        var out = bitmap.extents(offset: offset, length: length, maxExtents: maxExtents,
                                 maxExtentLength: max(limit, 512)).map {
            Transmission.Extent(length: UInt32($0.length), flags: $0.dirty ? DirtyBitmapContext.dirty : 0)
        }
        // Past the bitmap's end (the node grew): clean.
        let covered = out.reduce(UInt64(0)) { $0 + UInt64($1.length) }
        if covered < length && out.count < maxExtents {
            out.append(Transmission.Extent(length: UInt32(min(length - covered, UInt64(UInt32.max))), flags: 0))
        }
        return out
    }
}
