import BlockCore
import NBDProtocol
import Synchronization

/// A source of block status for one meta context (`base:allocation`,
/// `qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`).
public protocol MetaContextProvider: AnyObject, Sendable {
    /// The full context name, `namespace:leaf`.
    var name: String { get }
    /// Extents from `offset`, covering at most `length` bytes, at most `maxExtents` of them.
    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockError) -> [Transmission.Extent]
    /// True when `extents` never does I/O or sleeps (beyond a short lock), so a block-status
    /// request for this context alone is answered on the loop thread, not on a worker.
    var isNonBlocking: Bool { get }
}

extension MetaContextProvider {
    public var isNonBlocking: Bool { false }
}

/// The node an export serves (shared with its meta contexts), QEMU's BlockBackend root.
final class ExportRoot: @unchecked Sendable {
    // Written under the control lock inside a drained section of the old node.
    var node: BlockNode
    init(_ node: BlockNode) { self.node = node }
}

/// One NBD export: a node served under a name.
public final class Export: @unchecked Sendable {
    public let id: String
    public let name: String
    public let description: String?
    /// The node served. Re-pointed only by `replaceNode` (active commit's pivot) inside a
    /// drained section of the old node, which orders the change before the next request.
    public var node: BlockNode { root.node }
    let root: ExportRoot
    public let writable: Bool
    /// `writethrough=on`: every write and zero write is FUA (QEMU's export turns the
    /// BlockBackend's write cache off), so it is durable before its reply.
    public let writethrough: Bool
    /// Meta contexts this export offers, in the order LIST answers them.
    public let contexts: [any MetaContextProvider]
    private let connectionCount = Atomic<Int>(0)
    /// Whether buffered writes may run on the loop thread (see `InlineWritePolicy`).
    let inlineWrites: InlineWritePolicy

    /// Whether clients are told several connections see each other's writes
    /// (`NBD_FLAG_CAN_MULTI_CONN`). QEMU 7.2 says so unless the server takes one client at a time.
    public let multiConn: Bool

    /// `allocationDepth` offers `qemu:allocation-depth` (QEMU's `allocation-depth=on`, qemu-nbd `-A`).
    public init(id: String, name: String, description: String?, node: BlockNode, writable: Bool,
                writethrough: Bool = false, extraContexts: [any MetaContextProvider] = [],
                allocationDepth: Bool = true, multiConn: Bool = true) {
        self.id = id
        self.name = name
        self.description = description
        let root = ExportRoot(node)
        self.root = root
        self.writable = writable
        self.writethrough = writethrough
        self.multiConn = multiConn
        self.contexts = [BaseAllocationContext(root: root)] + (allocationDepth ? [AllocationDepthContext(root: root)] : [])
            + extraContexts
        // Decided for the node exported first; after an active commit's switch the policy
        // stays as it was (a qcow2 top never allows inline buffered writes: conservative).
        self.inlineWrites = InlineWritePolicy(node: node)
    }

    /// Serves `newNode` from now on (active commit completion). The caller holds the control
    /// lock and has drained the old node; connections stay open.
    public func replaceNode(with newNode: BlockNode) {
        root.node = newNode
    }

    public var size: UInt64 { node.length }

    public var transmissionFlags: TransmissionFlags {
        var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .sendDF]
        if multiConn { flags.insert(.canMultiConn) }
        if writable {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        } else {
            flags.insert(.readOnly)
        }
        return flags
    }

    public var limits: BlockLimits {
        var l = node.limits
        l.maximum = min(l.maximum, Transmission.maxPayload)
        l.minimum = max(1, l.minimum)
        l.preferred = max(l.minimum, l.preferred)
        return l
    }

    /// Contexts that match one LIST/SET query, as QEMU answers: an exact name, a namespace
    /// (`base:`, `qemu:`) or a leaf prefix (`qemu:dirty-bitmap:`).
    public func contexts(matching query: String) -> [any MetaContextProvider] {
        if query.hasSuffix(":") || query == "qemu:dirty-bitmap:" {
            return contexts.filter { $0.name.hasPrefix(query) }
        }
        return contexts.filter { $0.name == query }
    }

    public var activeConnections: Int { connectionCount.load(ordering: .relaxed) }
    func connectionOpened() { connectionCount.wrappingAdd(1, ordering: .relaxed) }
    func connectionClosed() { connectionCount.wrappingSubtract(1, ordering: .relaxed) }
}

/// `base:allocation`: holes and zeroes of the whole chain, as QEMU reports them.
final class BaseAllocationContext: MetaContextProvider {
    let name = "base:allocation"
    let root: ExportRoot
    var node: BlockNode { root.node }
    init(root: ExportRoot) { self.root = root }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockError) -> [Transmission.Extent] {
        try collect(node: node, offset: offset, length: length, maxExtents: maxExtents) { status in
            var flags: UInt32 = 0
            if !status.isData { flags |= AllocationFlags.hole }
            if status.isZero { flags |= AllocationFlags.zero }
            return flags
        }
    }
}

/// `qemu:allocation-depth`: 0 unallocated, 1 the exported layer, 2 its backing, …
final class AllocationDepthContext: MetaContextProvider {
    let name = "qemu:allocation-depth"
    let root: ExportRoot
    var node: BlockNode { root.node }
    init(root: ExportRoot) { self.root = root }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockError) -> [Transmission.Extent] {
        try collect(node: node, offset: offset, length: length, maxExtents: maxExtents) { UInt32($0.depth) }
    }
}

/// Walks the chain's block status and merges neighbours with equal flags.
func collect(node: BlockNode, offset: UInt64, length: UInt64, maxExtents: Int,
             _ flagsOf: (BlockStatus) -> UInt32) throws(BlockError) -> [Transmission.Extent] {
    var out: [Transmission.Extent] = []
    var at = offset
    let end = offset + length
    while at < end {
        let status = try node.blockStatusAbove(at: at, length: end - at)
        let flags = flagsOf(status)
        let n = status.length
        if let last = out.last, last.flags == flags, UInt64(last.length) + n <= UInt64(UInt32.max) {
            out[out.count - 1].length += UInt32(n)
        } else {
            if out.count == maxExtents { break }
            out.append(Transmission.Extent(length: UInt32(min(n, UInt64(UInt32.max))), flags: flags))
        }
        at += n
    }
    return out
}

/// The exports of one server, looked up by name during the handshake.
public final class ExportTable: Sendable {
    private let table = Mutex<[Export]>([])

    public init() {}

    public func add(_ export: Export) {
        table.withLock { $0.append(export) }
    }

    @discardableResult
    public func remove(id: String) -> Export? {
        table.withLock { list in
            guard let i = list.firstIndex(where: { $0.id == id }) else { return nil }
            return list.remove(at: i)
        }
    }

    public var all: [Export] { table.withLock { $0 } }

    /// The export with this name; the empty name picks the only export when there is one.
    public func lookup(name: String) -> Export? {
        table.withLock { list in
            if let e = list.first(where: { $0.name == name }) { return e }
            if name.isEmpty && list.count == 1 { return list[0] }
            return nil
        }
    }
}
