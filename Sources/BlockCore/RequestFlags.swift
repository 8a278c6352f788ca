/// Flags carried by every block request, from an NBD client, a job or a filter alike.
///
/// Wire flags become block flags in one place (`NBDServer`), as QEMU's `nbd_handle_request` does.
public struct RequestFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// Force unit access: the data is on stable storage before the request completes.
    /// The corresponding NBD flag is `NBD_CMD_FLAG_FUA`.
    public static let fua = RequestFlags(rawValue: 1 << 0)
    /// A zero write may deallocate (punch a hole) instead of writing zeroes.
    /// NBD sets this unless the client sent `NBD_CMD_FLAG_NO_HOLE`.
    public static let mayUnmap = RequestFlags(rawValue: 1 << 1)
    /// Fail with `ENOTSUP` rather than fall back to a slow write of zero bytes.
    /// The corresponding NBD flag is `NBD_CMD_FLAG_FAST_ZERO`.
    public static let noFallback = RequestFlags(rawValue: 1 << 2)
    /// Guest-visible data stays the same (copy-on-read, stream). Needs the
    /// `.writeUnchanged` permission only, and never marks a dirty bitmap.
    public static let writeUnchanged = RequestFlags(rawValue: 1 << 3)
    /// The data read came up from a lower layer and may be copied into this one.
    public static let copyOnRead = RequestFlags(rawValue: 1 << 4)
    /// Do not sleep: if the request would block (data not in the page cache, a metadata cache
    /// miss, a contended lock), throw `BlockError.wouldBlock` having changed nothing. The event
    /// loop uses this to serve cached I/O inline and hands only the rest to worker threads.
    public static let noWait = RequestFlags(rawValue: 1 << 5)
    /// With `.noWait`: a buffered file write may proceed even though the filesystem cannot
    /// promise it will not sleep (ext4 refuses `RWF_NOWAIT` for buffered writes). Everything
    /// else still honours `.noWait` (drain, range locks, metadata, FUA). The NBD server sets it
    /// for writes it runs on an event loop and measures how long they take.
    public static let bufferedWriteMayBlock = RequestFlags(rawValue: 1 << 6)
    /// A commit job's write into base (a background copy or a mirrored client write). It
    /// changes base's own content, but not the disk a client sees through the chain, so it
    /// marks none of base's dirty bitmaps and notifies no `WriteObserver` of base (drive
    /// semantics: the dropped layers' bitmaps are merged into base when the job completes;
    /// see `docs/bitmaps.md`, "Through commit"). Unlike `.writeUnchanged` it needs the plain
    /// write permission and takes base's range lock like any write.
    public static let commitCopy = RequestFlags(rawValue: 1 << 7)
    /// Store the data compressed (QEMU's `BDRV_REQ_WRITE_COMPRESSED`): whole clusters of the
    /// node's `compressedWriteClusterSize` (the last one may end at the end of the node). Only
    /// drivers with a `compressedWriteClusterSize` accept it; the `compress` filter sets it on
    /// every write.
    public static let writeCompressed = RequestFlags(rawValue: 1 << 8)

    /// Requests that must not mark dirty bitmaps or notify write observers.
    public static let notDirtying: RequestFlags = [.writeUnchanged, .commitCopy]
}
