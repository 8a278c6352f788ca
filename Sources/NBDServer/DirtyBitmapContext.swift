import BlockCore
import NBDProtocol

/// `qemu:dirty-bitmap:NAME`: one extent per run of dirty or clean granules, flag 1 = dirty
/// (QEMU's `NBD_STATE_DIRTY`). The bitmap is marked busy while an export offers it.
public final class DirtyBitmapContext: MetaContextProvider {
    public let name: String
    public let bitmap: DirtyBitmap
    /// Flag bit of a dirty extent.
    public static let dirty: UInt32 = 1
    /// Answered from memory under the bitmap's lock: served on the loop thread.
    public var isNonBlocking: Bool { true }

    public init(bitmap: DirtyBitmap) {
        self.bitmap = bitmap
        self.name = "qemu:dirty-bitmap:" + bitmap.name
    }

    public func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockError) -> [Transmission.Extent] {
        let limit = UInt64(UInt32.max) & ~(bitmap.granularity - 1)
        var out: [Transmission.Extent] = []
        out.reserveCapacity(min(maxExtents, 256))
        let covered = bitmap.forEachExtent(offset: offset, length: length, maxExtents: maxExtents,
                                           maxExtentLength: max(limit, 512)) { length, dirty in
            if length > 0 { out.append(Transmission.Extent(length: length, flags: dirty ? DirtyBitmapContext.dirty : 0)) }
        }
        // Past the bitmap's end (the node grew): clean.
        if covered < length && out.count < maxExtents {
            out.append(Transmission.Extent(length: length - covered, flags: 0))
        }
        return out
    }
}
