import BlockCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The `raw` format driver: the file child's bytes as they are, optionally a window of them
/// (`offset`, `size`), as QEMU's raw driver.
public final class RawDriver: BlockDriver, AsyncBlockDriver {
    public let driverName = "raw"
    public let role = DriverRole.format
    public let file: BlockChild
    public let offset: UInt64
    private let fixedSize: UInt64?
    /// The format was guessed by probing (qemu-nbd without `-f`), as QEMU's `bs->probed`: block
    /// 0 may never be written so that it probes as another format (`FormatSignature`), and the
    /// node asks for 512-byte requests (when its length is whole sectors) so that clients rarely
    /// need the read-modify-write below.
    public let probed: Bool
    /// Serialises writes that touch block 0 of a probed image: each checks the sector it
    /// would leave behind, which another write must not change in between.
    private let blockZero = Mutex(())

    public init(file: BlockNode, offset: UInt64 = 0, size: UInt64? = nil, probed: Bool = false) throws(BlockError) {
        let available = file.length
        if offset > available {
            throw BlockError.invalid("Offset (\(offset)) cannot be greater than size of the containing file (\(available))")
        }
        if let size, offset + size > available {
            throw BlockError.invalid("The sum of offset (\(offset)) and size (\(size)) has to be smaller or equal to the actual size of the containing file (\(available))")
        }
        // QEMU: the whole file is a filtered child, a window of it a data child.
        self.file = BlockChild(name: "file", role: offset == 0 && size == nil ? .filteredPrimary : [.data, .primary],
                               node: file)
        self.offset = offset
        self.fixedSize = size
        self.probed = probed
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
    /// The file's limits, except that any request size works (QEMU's raw node has a request
    /// alignment of 1 and leaves read-modify-write to the layer that needs it) — unless the
    /// image was probed (below).
    public var limits: BlockLimits {
        var l = file.node.limits
        l.minimum = 1
        // A probed image asks for 512-byte requests so that clients rarely need the block-0
        // read-modify-write. QEMU rounds every node's length up to 512, so its probed raw
        // export is always whole sectors; so does qemu-nbd's front end (`FileDriver.sectorLength`).
        // An image of another length (a window with `size`) keeps minimum 1: a minimum the
        // length is not a multiple of would leave clients unable to reach the tail (qemu-img
        // asserts on it).
        if probed && length % 512 == 0 {
            l.minimum = 512
            l.preferred = max(l.preferred, l.minimum)
        }
        return l
    }
    /// The node's own `read-only` option decides (QEMU): a raw node over a read-only file is
    /// writable, and a writer on it is refused by the permission check on the file.
    public var isReadOnly: Bool { false }
    /// QEMU's `bdrv_get_info` on raw asks its file.
    public var answersImageInfo: Bool { file.node.driver.answersImageInfo }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        try RawDriver(file: file ?? self.file.node, offset: offset, size: fixedSize, probed: probed)
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        try file.node.read(at: self.offset + offset, into: buffer, flags: flags)
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        try checkWindow(offset, UInt64(buffer.count))
        if probed && offset < 512 && !buffer.isEmpty {
            try writeBlockZero(at: offset, from: buffer, flags: flags)
            return
        }
        try file.node.write(at: self.offset + offset, from: buffer, flags: flags)
    }

    /// A write into block 0 of a probed image: refused with EPERM, as QEMU's `raw_co_pwritev`
    /// refuses it, when the block it would leave probes as another format. A write that covers
    /// only part of the block is checked against the block's current bytes.
    private func writeBlockZero(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                                flags: RequestFlags) throws(BlockError) {
        // The read-modify-write below may sleep and the lock may be held by a worker doing I/O.
        if flags.contains(.noWait) { throw .wouldBlock }
        try blockZero.withLock { _ throws(BlockError) in
            let sector = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 64)
            defer { sector.deallocate() }
            sector.initializeMemory(as: UInt8.self, repeating: 0)
            let start = Int(offset)
            let covered = min(buffer.count, 512 - start)
            if start != 0 || covered < 512 {
                // Bytes past the end of a short image stay zero, as a read of them returns.
                let existing = Int(min(UInt64(512), length))
                if existing > 0 {
                    try file.node.read(at: self.offset, into: UnsafeMutableRawBufferPointer(rebasing: sector[..<existing]),
                                       flags: [])
                }
            }
            UnsafeMutableRawBufferPointer(rebasing: sector[start..<start + covered])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[..<covered]))
            if FormatSignature.format(of: UnsafeRawBufferPointer(sector)) != nil {
                throw BlockError(EPERM, "Refusing to write a header that probes as another format to block 0 of a probed raw image")
            }
            try file.node.write(at: self.offset + offset, from: buffer, flags: flags)
        }
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

    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        var status = try file.node.blockStatus(at: self.offset + offset, length: length, flags: flags)
        status.flags.insert(.allocated)
        if limits.minimum >= 512 { try wholeSectors(&status, at: offset, length: length, flags: flags) }
        return status
    }

    /// A probed image asks for whole sectors, so it answers block status in whole sectors too
    /// (the spec: descriptors MUST be multiples of an advertised minimum), as QEMU's block
    /// layer rounds status to `request_alignment`: an extent ending inside a sector stops at
    /// the sector before, and a sector with several statuses is one extent that is data if
    /// any part is, zero only if all of it is (the end of a file that is not whole sectors).
    private func wholeSectors(_ status: inout BlockStatus, at offset: UInt64, length: UInt64,
                              flags: RequestFlags) throws(BlockError) {
        let end = offset + length
        let stop = offset + status.length
        guard stop % 512 != 0 && stop < end else { return }
        let sectorStart = stop & ~511
        if sectorStart > offset {
            status.length = sectorStart - offset
            return
        }
        let sectorEnd = min(sectorStart + 512, end)
        var at = stop
        while at < sectorEnd {
            let next = try file.node.blockStatus(at: self.offset + at, length: sectorEnd - at, flags: flags)
            if next.isData { status.flags.insert(.data) }
            if !next.isZero { status.flags.remove(.zero) }
            at += max(1, next.length)
        }
        status.length = sectorEnd - offset
    }

    /// Forwards the asynchronous path of the file child (a re-exported `nbd` node).
    public var asyncInterface: (any AsyncBlockDriver)? { file.node.hasAsyncPath ? self : nil }

    public func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        var r = request
        r.offset += offset
        if r.operation == .blockStatus {
            try io.addingStatusFlags(.allocated) { () throws(BlockError) in try file.node.forward(io, r) }
        } else {
            try file.node.forward(io, r)
        }
    }

    public func truncate(to length: UInt64) throws(BlockError) {
        if fixedSize != nil || offset != 0 {
            throw BlockError.notSupported("cannot resize a raw node with 'offset' or 'size'")
        }
        try file.node.truncate(to: length)
    }
}
