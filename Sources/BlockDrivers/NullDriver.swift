import BlockCore
#if canImport(Glibc)
import Glibc
#endif

/// The `null-co` protocol driver: a device of a given size that discards writes and reads
/// zeroes (with `read-zeroes`, the default here) — for benchmarks of the server itself.
public final class NullDriver: BlockDriver {
    public let driverName = "null-co"
    public let role = DriverRole.protocol
    public let length: UInt64
    public let readZeroes: Bool
    public let isReadOnly = false

    public init(size: UInt64, readZeroes: Bool) {
        self.length = size
        self.readZeroes = readZeroes
    }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        NullDriver(size: length, readZeroes: readZeroes)
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        if readZeroes, let base = buffer.baseAddress { memset(base, 0, buffer.count) }
    }
    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {}
    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    public func flush() throws(BlockError) {}
    public func blockStatus(at offset: UInt64, length: UInt64) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: readZeroes ? [.zero, .allocated] : [.data, .allocated])
    }
}
