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
    /// The name QEMU gives such a node (`null-co://`, or its explicit options as `json:{…}`).
    public let qemuFilename: String
    public var filename: String? { qemuFilename }
    /// No file: nothing allocated anywhere (QEMU's `null_allocated_file_size`).
    public var allocatedFileSize: Int64? { 0 }

    /// `givenSize`/`givenReadZeroes`: the options as the user gave them (nil when absent),
    /// which is what QEMU's filename shows.
    public init(size: UInt64, readZeroes: Bool, givenSize: UInt64? = nil, givenReadZeroes: Bool? = nil) {
        self.length = size
        self.readZeroes = readZeroes
        self.qemuFilename = NullDriver.qemuFilename(size: givenSize, readZeroes: givenReadZeroes)
    }

    private init(size: UInt64, readZeroes: Bool, qemuFilename: String) {
        self.length = size
        self.readZeroes = readZeroes
        self.qemuFilename = qemuFilename
    }

    /// QEMU's `bdrv_refresh_filename` for null-co: `null-co://` without options, else the
    /// "strong" options (size, read-zeroes) and the driver as JSON, in the order QEMU's QDict
    /// iterates them (hash bucket order, `qobject/qdict.c`).
    static func qemuFilename(size: UInt64?, readZeroes: Bool?) -> String {
        var entries: [(key: String, value: String)] = []
        if let size { entries.append(("size", String(size))) }
        if let readZeroes { entries.append(("read-zeroes", readZeroes ? "true" : "false")) }
        if entries.isEmpty { return "null-co://" }
        entries.append(("driver", "\"null-co\""))
        entries.sort { qdictBucket($0.key) < qdictBucket($1.key) }
        return "json:{" + entries.map { "\"\($0.key)\": \($0.value)" }.joined(separator: ", ") + "}"
    }

    /// QEMU's `tdb_hash(key) % QDICT_BUCKET_MAX`.
    static func qdictBucket(_ key: String) -> UInt32 {
        let bytes = Array(key.utf8)
        var value = UInt32(0x238F13AF) &* UInt32(bytes.count)
        for (i, b) in bytes.enumerated() { value = value &+ (UInt32(b) << UInt32(i * 5 % 24)) }
        return (1103515243 &* value &+ 12345) % 512
    }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        NullDriver(size: length, readZeroes: readZeroes, qemuFilename: qemuFilename)
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        if readZeroes, let base = buffer.baseAddress { memset(base, 0, buffer.count) }
    }
    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {}
    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    public func flush() throws(BlockError) {}
    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: readZeroes ? [.zero, .allocated] : [.data, .allocated])
    }
}
