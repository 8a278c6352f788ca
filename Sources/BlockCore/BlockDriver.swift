/// What kind of node a driver makes.
public enum DriverRole: String, Sendable {
    /// Talks to storage: `file`, `null-co`.
    case `protocol`
    /// Interprets a protocol node's bytes: `raw`, `qcow2`.
    case format
    /// Passes requests to exactly one filtered child: `copy-on-read`, `throttle`.
    case filter
}

/// A protocol, format or filter implementation; one instance per node.
///
/// Requests arrive already validated by `BlockNode` (in range, permitted), so drivers only
/// assert. Every method may be called from several threads at once; a driver protects its
/// own state. With `.noWait` a driver throws `BlockError.wouldBlock` instead of sleeping.
public protocol BlockDriver: AnyObject, Sendable {
    /// The QAPI driver name (`file`, `raw`, `qcow2`, …).
    var driverName: String { get }
    var role: DriverRole { get }
    /// Children this driver reads and writes through (`file`, `backing`, `filtered`…).
    var children: [BlockChild] { get }
    /// Virtual size in bytes.
    var length: UInt64 { get }
    var limits: BlockLimits { get }
    /// True when the node cannot be written at all (opened read-only).
    var isReadOnly: Bool { get }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
              flags: RequestFlags) throws(BlockError)
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
               flags: RequestFlags) throws(BlockError)
    /// Makes the range read as zeroes; with `.mayUnmap` it may deallocate, with `.noFallback`
    /// it fails with `ENOTSUP` rather than writing zero bytes slowly.
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError)
    /// Advisory: the range's content becomes unspecified and its space may be freed.
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError)
    func flush() throws(BlockError)
    /// Status of this layer alone from `offset`; `length` in the answer is ≤ the query.
    /// With `.noWait` in `flags`, throw `BlockError.wouldBlock` rather than sleep (a contended
    /// metadata lock, a metadata cache miss, a filesystem extent lookup).
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus
    /// Hint to bring a range into cache (NBD `CACHE`); the default does nothing.
    func prefetch(at offset: UInt64, length: UInt64) throws(BlockError)
    /// Write back metadata and release resources. Called once, when the node is deleted.
    func close() throws(BlockError)
    /// The backing file name recorded in the image (qcow2 header), if any.
    var backingFileName: String? { get }
    /// Protocol drivers that store bytes in a growable file accept writes past the end and
    /// grow (format drivers allocate clusters there). Exports never allow this: they check
    /// requests against their own size first.
    var growsOnWrite: Bool { get }
    /// Changes the size (`block_resize`, format drivers trimming their file).
    func truncate(to length: UInt64) throws(BlockError)
    /// Where persistent dirty bitmaps of this node are stored (qcow2); nil when they cannot be.
    var bitmapStorage: (any PersistentBitmapStorage)? { get }
    /// The unit of `.writeCompressed` writes (qcow2: the cluster size), or nil when the driver
    /// cannot write compressed data (QEMU's `block_driver_can_compress`).
    var compressedWriteClusterSize: UInt64? { get }
    /// The native asynchronous path of this driver (see `AsyncBlockDriver`), or nil when
    /// it serves only the synchronous methods above (the default). May change with the graph
    /// (a forwarding layer has one only while its child has).
    var asyncInterface: (any AsyncBlockDriver)? { get }
}

extension BlockDriver {
    public var children: [BlockChild] { [] }
    public var limits: BlockLimits { BlockLimits() }
    public var backingFileName: String? { nil }
    public var growsOnWrite: Bool { false }
    public var bitmapStorage: (any PersistentBitmapStorage)? { nil }
    public var compressedWriteClusterSize: UInt64? { nil }
    public var asyncInterface: (any AsyncBlockDriver)? { nil }
    public func truncate(to length: UInt64) throws(BlockError) {
        throw BlockError.notSupported("driver '\(driverName)' cannot be resized")
    }
    public func prefetch(at offset: UInt64, length: UInt64) throws(BlockError) {}
    public func close() throws(BlockError) {}

    /// The slow path of `writeZeroes`: writes actual zero bytes through `write`, 1 MiB at a
    /// time, for drivers (or parts of requests) that cannot make zeroes any faster.
    public func writeZeroBytes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        let chunk = Int(min(length, 1 << 20))
        if chunk == 0 { return }
        let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0)
        var at = offset
        let end = offset + length
        while at < end {
            let n = Int(min(UInt64(chunk), end - at))
            try write(at: at, from: UnsafeRawBufferPointer(rebasing: zeroes[0..<n]), flags: flags.subtracting(.noWait))
            at += UInt64(n)
        }
    }

    /// The child with role `.file` (protocol under a format), if any.
    public var fileChild: BlockChild? { children.first { $0.name == "file" } }
    /// The child with role `.backing`, if any.
    public var backingChild: BlockChild? { children.first { $0.name == "backing" } }
}

/// The forwarding half of a filter: every call goes through the filtered child's node, so
/// that node's checks still run. A filter overrides only what it changes.
public protocol FilterDriver: BlockDriver {
    var filtered: BlockChild { get }
}

extension FilterDriver {
    public var role: DriverRole { .filter }
    public var children: [BlockChild] { [filtered] }
    public var length: UInt64 { filtered.node.length }
    public var limits: BlockLimits { filtered.node.limits }
    public var isReadOnly: Bool { filtered.node.isReadOnly }
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        try filtered.node.read(at: offset, into: buffer, flags: flags)
    }
    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        try filtered.node.write(at: offset, from: buffer, flags: flags)
    }
    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try filtered.node.writeZeroes(at: offset, length: length, flags: flags)
    }
    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try filtered.node.discard(at: offset, length: length, flags: flags)
    }
    public func flush() throws(BlockError) { try filtered.node.flush() }
    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        // A filter has no data of its own: report the filtered node's status, depth unchanged.
        try filtered.node.blockStatus(at: offset, length: length, flags: flags)
    }
    public func prefetch(at offset: UInt64, length: UInt64) throws(BlockError) {
        try filtered.node.prefetch(at: offset, length: length)
    }
}

/// A filter that only forwards (`null-filter`): it serves the asynchronous path whenever its
/// child does. Filters that change requests (throttle, copy-on-read) are plain `FilterDriver`s
/// and stay synchronous.
public protocol ForwardingFilter: FilterDriver, AsyncBlockDriver {}

extension ForwardingFilter {
    public var asyncInterface: (any AsyncBlockDriver)? { filtered.node.supportsAsync ? self : nil }
    public func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        try filtered.node.forward(io, request)
    }
}
