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
    /// (a forwarding layer has one only while its child has), so a forwarding layer reads its
    /// edge here: ask only from inside the node (`BlockNode.submit`) or under the graph's
    /// change lock; others read `BlockNode.supportsAsync`.
    var asyncInterface: (any AsyncBlockDriver)? { get }

    // MARK: graph

    /// What this node takes on `child` and shares with the child's other users, given what
    /// the node's own users take and share (`parent`): QEMU's `.bdrv_child_perm`. The default
    /// is QEMU's `bdrv_default_perms` for the child's role. `writable`: the node is writable.
    func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool) -> PermissionPair
    /// `childPermissions` for drivers whose answer depends on whether the node has any user at
    /// all (QEMU's copy-before-write looks at `bs->parents`). The graph's check calls this one;
    /// the default ignores `hasUsers`.
    func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool, hasUsers: Bool) -> PermissionPair
    /// Called once the node is in the graph with its permissions granted, before anyone uses
    /// it: the first writes of a writable open (qcow2 marks the image in use, stores bitmaps).
    func activate() throws(BlockError)
    /// The file the node keeps its bytes in (protocol drivers): QEMU's `filename`.
    var filename: String? { get }
    /// Bytes per cluster of a format with clusters (default bitmap granularity, `query-*`).
    var clusterSizeInfo: UInt64? { get }
    /// QAPI `ImageInfoSpecific` for `query-named-block-nodes` (qcow2's format-specific data).
    var formatSpecificInfo: FormatSpecificInfo? { get }
    /// The backing format recorded in the image (qcow2's backing format extension).
    var backingFormat: String? { get }

    /// Whether `setBackingFile` can record a backing file name in the image.
    var canRecordBackingFile: Bool { get }
    /// Rewrites the backing file name and format recorded in the image (stream and commit at
    /// completion); `nil` removes the reference. Throws, changing nothing, when it cannot.
    func setBackingFile(name: String?, format: String?) throws(BlockError)
    /// Points the backing edge at `node`, or removes it (`nil`): `blockdev-reopen`, stream
    /// and commit completion. `owner` is this driver's node; the caller (`BlockGraph`) holds
    /// the change lock and has drained it and everything above it.
    func setBacking(_ node: BlockNode?, drained owner: BlockNode) throws(BlockError)
    /// A new instance of this driver over the same image, opened read-write (`readOnly`
    /// false) or read-only, whose `file` child is `file` (the protocol node, reopened first)
    /// and whose backing is `backing`: QEMU's reopen, done as open-new-then-switch. The new
    /// instance is not activated.
    func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver
    /// `blockdev-reopen` of driver options other than the graph edges (`options`: the given
    /// values as text, e.g. `throttle-group`): checks them and returns the change to apply
    /// inside the drained section, or nil when nothing changes. The default accepts no option.
    func prepareReopen(options: [String: String]) throws(BlockError) -> (@Sendable () -> Void)?
    /// What the node's users take and share on it from now on (`cumulative`), as the graph's
    /// check decided (QEMU's `.bdrv_check_perm`/`.bdrv_set_perm`): a protocol driver that
    /// shows other processes what is done with its image takes that here (the file driver's
    /// OFD lock bytes). Throwing refuses the graph change, with QEMU's words ("Failed to get
    /// \"write\" lock"); the graph then gives the drivers it told before their previous
    /// permissions back. Loosening never fails. The default does nothing.
    func setPermissions(_ cumulative: PermissionPair) throws(BlockError)

    // MARK: information and upkeep

    /// Whether QEMU's `bdrv_get_info` succeeds for the node (`query-named-block-nodes` shows
    /// `dirty-flag` only then): drivers that answer it say true (file, qcow2); filters and
    /// raw ask the node below; others (null-co, nbd) do not.
    var answersImageInfo: Bool { get }
    /// Bytes the node's data takes where the driver knows it without a file (null-co: 0);
    /// nil when the file below counts (`actual-size`).
    var allocatedFileSize: Int64? { get }
    /// Reports corruption found in the image while it is open (QEMU's
    /// `BLOCK_IMAGE_CORRUPTED`, qcow2's overlap checks); the default never does.
    func onCorruption(_ handler: (@Sendable (ImageCorruption) -> Void)?)
    /// Seconds between `cleanUnusedCaches` calls (QEMU's `cache-clean-interval`); 0 for none.
    var cacheCleanInterval: UInt64 { get }
    /// The remote dirty bitmap this node's block status reports in place of allocation (an
    /// `nbd` node opened with `x-dirty-bitmap=qemu:dirty-bitmap:NAME`: dirty extents read as
    /// "no data"), or nil.
    var remoteDirtyBitmapContext: String? { get }
    /// Drops metadata caches not used since the previous call; false once the driver is
    /// closed (the daemon's timer stops then).
    func cleanCachesIfOpen() -> Bool
}

/// A corruption found while the image is open (QEMU's `qcow2_signal_corruption`): what the
/// node reports as `BLOCK_IMAGE_CORRUPTED`.
public struct ImageCorruption: Sendable, Equatable {
    public var message: String
    /// Host offset and length of the access that found it, when there was one.
    public var offset: UInt64?
    public var size: UInt64?
    public var fatal: Bool
    public init(message: String, offset: UInt64?, size: UInt64?, fatal: Bool) {
        self.message = message
        self.offset = offset
        self.size = size
        self.fatal = fatal
    }
}

/// QAPI `ImageInfoSpecific`: a format's own facts, kept as ordered name/value pairs so the
/// daemon can show them without knowing the driver.
public struct FormatSpecificInfo: Sendable, Equatable {
    public indirect enum Value: Sendable, Equatable {
        case bool(Bool)
        case int(Int64)
        case string(String)
        case list([Value])
        case object([(String, Value)])

        public static func == (a: Value, b: Value) -> Bool {
            switch (a, b) {
            case (.bool(let x), .bool(let y)): return x == y
            case (.int(let x), .int(let y)): return x == y
            case (.string(let x), .string(let y)): return x == y
            case (.list(let x), .list(let y)): return x == y
            case (.object(let x), .object(let y)):
                return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
            default: return false
            }
        }
    }
    /// QAPI `ImageInfoSpecificKind` (`qcow2`).
    public var type: String
    public var data: [(String, Value)]
    public init(type: String, data: [(String, Value)]) {
        self.type = type
        self.data = data
    }

    public static func == (a: FormatSpecificInfo, b: FormatSpecificInfo) -> Bool {
        a.type == b.type && Value.object(a.data) == Value.object(b.data)
    }
}

extension BlockDriver {
    public func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool) -> PermissionPair {
        // A filter's child is filtered whatever role its edge was made with.
        let role = self.role == .filter ? ChildRole.filteredPrimary : child.role
        return BlockPermissions.defaultChildPermissions(role: role, parent: parent, writable: writable)
    }
    public func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool, hasUsers: Bool) -> PermissionPair {
        childPermissions(for: child, parent: parent, writable: writable)
    }
    public func activate() throws(BlockError) {}
    public var filename: String? { nil }
    public var clusterSizeInfo: UInt64? { nil }
    public var formatSpecificInfo: FormatSpecificInfo? { nil }
    public var backingFormat: String? { nil }
    public var canRecordBackingFile: Bool { false }
    public func setBackingFile(name: String?, format: String?) throws(BlockError) {
        throw BlockError.notSupported("Driver '\(driverName)' cannot record a backing file")
    }
    public func setBacking(_ node: BlockNode?, drained owner: BlockNode) throws(BlockError) {
        throw BlockError.notSupported("Driver '\(driverName)' of node '\(owner.nodeName)' does not support backing files")
    }
    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        throw BlockError.notSupported("Block format '\(driverName)' does not support reopening")
    }
    public func prepareReopen(options: [String: String]) throws(BlockError) -> (@Sendable () -> Void)? {
        if let key = options.keys.sorted().first {
            throw BlockError.invalid("Cannot change the option '\(key)'")
        }
        return nil
    }
    public func setPermissions(_ cumulative: PermissionPair) throws(BlockError) {}
    public var answersImageInfo: Bool { false }
    public var allocatedFileSize: Int64? { nil }
    public func onCorruption(_ handler: (@Sendable (ImageCorruption) -> Void)?) {}
    public var cacheCleanInterval: UInt64 { 0 }
    public var remoteDirtyBitmapContext: String? { nil }
    public func cleanCachesIfOpen() -> Bool { false }
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
    /// QEMU's `bdrv_get_info` on a filter asks the filtered node.
    public var answersImageInfo: Bool { filtered.node.driver.answersImageInfo }
    public var role: DriverRole { .filter }
    public var children: [BlockChild] { [filtered] }
    public var length: UInt64 { filtered.node.length }
    public var limits: BlockLimits { filtered.node.limits }
    /// A filter node is writable unless opened read-only: as in QEMU, a writer above a
    /// read-only child is refused by the permission check ("Block node is read-only").
    public var isReadOnly: Bool { false }
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
    public var asyncInterface: (any AsyncBlockDriver)? { filtered.node.hasAsyncPath ? self : nil }
    public func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        try filtered.node.forward(io, request)
    }
}
