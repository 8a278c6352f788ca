import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// The `raw` format driver: the file child's bytes as they are, optionally a window of them
/// (`offset`, `size`), as QEMU's raw driver.
public final class RawDriver: BlockDriver {
    public let driverName = "raw"
    public let role = DriverRole.format
    public let file: BlockChild
    public let offset: UInt64
    private let fixedSize: UInt64?

    public init(file: BlockNode, offset: UInt64 = 0, size: UInt64? = nil) throws(BlockError) {
        let available = file.length
        if offset > available {
            throw BlockError.invalid("The sum of offset (\(offset)) and size (\(size ?? 0)) has to be smaller or equal to the actual size of the containing file (\(available))")
        }
        if let size, offset + size > available {
            throw BlockError.invalid("The sum of offset (\(offset)) and size (\(size)) has to be smaller or equal to the actual size of the containing file (\(available))")
        }
        // QEMU: the whole file is a filtered child, a window of it a data child.
        self.file = BlockChild(name: "file", role: offset == 0 && size == nil ? .filteredPrimary : [.data, .primary],
                               node: file)
        self.offset = offset
        self.fixedSize = size
    }

    public var children: [BlockChild] { [file] }
    /// A window (`size`) passes writes past its end to the driver, which refuses them with
    /// `ENOSPC` as QEMU's `raw_adjust_offset` does: a format over the window (a fleecing image
    /// of a fixed size) runs out of space rather than hitting an invalid request.
    public var growsOnWrite: Bool { fixedSize != nil }

    private func checkWindow(_ offset: UInt64, _ length: UInt64) throws(BlockError) {
        guard let size = fixedSize else { return }
        if offset > size || length > size - offset {
            throw BlockError(ENOSPC, "No space left on device")
        }
    }
    public var length: UInt64 { fixedSize ?? (file.node.length - min(offset, file.node.length)) }
    public var limits: BlockLimits { file.node.limits }
    /// The node's own `read-only` option decides (QEMU): a raw node over a read-only file is
    /// writable, and a writer on it is refused by the permission check on the file.
    public var isReadOnly: Bool { false }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        try RawDriver(file: file ?? self.file.node, offset: offset, size: fixedSize)
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        try file.node.read(at: self.offset + offset, into: buffer, flags: flags)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        try checkWindow(offset, UInt64(buffer.count))
        try file.node.write(at: self.offset + offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try checkWindow(offset, length)
        try file.node.writeZeroes(at: self.offset + offset, length: length, flags: flags)
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try checkWindow(offset, length)
        try file.node.discard(at: self.offset + offset, length: length, flags: flags)
    }

    public func flush() throws(BlockError) { try file.node.flush() }

    public func prefetch(at offset: UInt64, length: UInt64) throws(BlockError) {
        try file.node.prefetch(at: self.offset + offset, length: length)
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws(BlockError) -> BlockStatus {
        var status = try file.node.blockStatus(at: self.offset + offset, length: length)
        status.flags.insert(.allocated)
        return status
    }

    public func truncate(to length: UInt64) throws(BlockError) {
        if fixedSize != nil || offset != 0 {
            throw BlockError.notSupported("cannot resize a raw node with 'offset' or 'size'")
        }
        try file.node.truncate(to: length)
    }
}
