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

/// One NBD export: a node served under a name.
public final class Export: Sendable {
    public let id: String
    public let name: String
    public let description: String?
    /// The node served. The graph re-points the root (active commit's switch) inside a
    /// drained section of the old node; requests pass the root along (`via:`) and are retried
    /// on the new node when they raced with the switch.
    public var node: BlockNode { root.node }
    /// QEMU's BlockBackend: the export's place in the block graph, with its permissions.
    public let root: BlockRoot
    public let writable: Bool
    /// Meta contexts this export offers, in the order LIST answers them.
    public let contexts: [any MetaContextProvider]
    private let connectionCount = Atomic<Int>(0)
    /// Whether buffered writes may run on the loop thread (see `InlineWritePolicy`).
    let inlineWrites: InlineWritePolicy

    /// `root` is the export's root in the graph (attached there by the daemon, which checks
    /// its permissions); a root of its own is made when none is given (tests).
    public init(id: String, name: String, description: String?, node: BlockNode, writable: Bool,
                root: BlockRoot? = nil, extraContexts: [any MetaContextProvider] = []) {
        self.id = id
        self.name = name
        self.description = description
        let root = root ?? Export.makeRoot(node: node, writable: writable)
        self.root = root
        self.writable = writable
        self.contexts = [BaseAllocationContext(root: root), AllocationDepthContext(root: root)] + extraContexts
        // Fixed when the export is made (QEMU's NBD export size too), so a handshake on an
        // event loop reads no graph edge (edges are read only by requests in flight).
        self.size = node.length
        var l = node.limits
        l.maximum = min(l.maximum, Transmission.maxPayload)
        l.minimum = max(1, l.minimum)
        l.preferred = max(l.minimum, l.preferred)
        self.limits = l
        // Decided for the node exported first; after an active commit's switch the policy
        // stays as it was (a qcow2 top never allows inline buffered writes: conservative).
        self.inlineWrites = InlineWritePolicy(node: node)
    }

    /// QEMU's export backend (`blk_exp_add`): consistent read, plus write when writable,
    /// sharing everything; `nbd_export_create` then unshares resize (`servingPermissions`).
    public static func makeRoot(node: BlockNode, writable: Bool) -> BlockRoot {
        BlockRoot(name: "root", kind: .backend(name: nil), node: node,
                  permissions: PermissionPair(perm: writable ? [.consistentRead, .write] : .consistentRead, shared: .all))
    }

    /// What the export holds once created: no resize while the NBD server serves the node.
    public static func servingPermissions(writable: Bool) -> PermissionPair {
        PermissionPair(perm: writable ? [.consistentRead, .write] : .consistentRead,
                       shared: BlockPermissions.all.subtracting(.resize))
    }

    /// The size clients see: the node's when the export was made.
    public let size: UInt64

    public var transmissionFlags: TransmissionFlags {
        var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .sendDF, .canMultiConn]
        if writable {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        } else {
            flags.insert(.readOnly)
        }
        return flags
    }

    /// Block size constraints advertised in the handshake (fixed when the export was made).
    public let limits: BlockLimits

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
    let root: BlockRoot
    init(root: BlockRoot) { self.root = root }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockError) -> [Transmission.Extent] {
        try collect(root: root, offset: offset, length: length, maxExtents: maxExtents) { status in
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
    let root: BlockRoot
    init(root: BlockRoot) { self.root = root }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockError) -> [Transmission.Extent] {
        try collect(root: root, offset: offset, length: length, maxExtents: maxExtents) { UInt32($0.depth) }
    }
}

/// Walks the chain's block status and merges neighbours with equal flags.
/// The root's node is read once per request; a switch meanwhile shows as `.replaced` and the
/// request is retried on the new node.
func collect(root: BlockRoot, offset: UInt64, length: UInt64, maxExtents: Int,
             _ flagsOf: (BlockStatus) -> UInt32) throws(BlockError) -> [Transmission.Extent] {
    var out: [Transmission.Extent] = []
    var at = offset
    let end = offset + length
    let node = root.node
    while at < end {
        let status = try node.blockStatusAbove(at: at, length: end - at, via: root)
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
