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
    /// `writethrough=on`: every write and zero write is FUA (QEMU's export turns the
    /// BlockBackend's write cache off), so it is durable before its reply.
    public let writethrough: Bool
    /// Meta contexts this export offers, in the order LIST answers them.
    public let contexts: [any MetaContextProvider]
    private let connectionCount = Atomic<Int>(0)
    /// Whether buffered writes may run on the loop thread (see `InlineWritePolicy`).
    let inlineWrites: InlineWritePolicy

    /// `root` is the export's root in the graph (attached there by the daemon, which checks
    /// its permissions); a root of its own is made when none is given (tests).
    /// `allocationDepth` offers `qemu:allocation-depth` (QEMU's `allocation-depth=on`, qemu-nbd `-A`).
    public init(id: String, name: String, description: String?, node: BlockNode, writable: Bool,
                writethrough: Bool = false, root: BlockRoot? = nil, extraContexts: [any MetaContextProvider] = [],
                allocationDepth: Bool = true) {
        self.id = id
        self.name = name
        self.description = description
        let root = root ?? Export.makeRoot(node: node, writable: writable)
        self.root = root
        self.writable = writable
        self.writethrough = writethrough
        self.contexts = [BaseAllocationContext(root: root)] + (allocationDepth ? [AllocationDepthContext(root: root)] : [])
            + extraContexts
        // Fixed when the export is made (QEMU's NBD export size too), so a handshake on an
        // event loop reads no graph edge (edges are read only by requests in flight). The
        // limits are advertised as the spec lets them be (`Handshake.blockSizes`), the
        // maximum capped at 32 MiB.
        let size = node.length
        self.size = size
        let l = node.limits
        let s = Handshake.blockSizes(minimum: l.minimum, preferred: l.preferred, maximum: l.maximum, exportSize: size,
                                     cap: Transmission.maxPayload)
        self.limits = BlockLimits(minimum: s.minimum, preferred: s.preferred, maximum: s.maximum)
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

    /// The transmission flags one client sees. They depend on what it negotiated:
    /// `SEND_DF` only with structured replies or extended headers (the spec: "MUST leave this
    /// flag clear if structured replies have not been negotiated"), `BLOCK_STAT_PAYLOAD`
    /// only with extended headers and contexts selected (QEMU 8.2), and `CAN_MULTI_CONN`
    /// only when the server allows more than one client (QEMU: not with max-connections=1).
    public func transmissionFlags(structured: Bool, extended: Bool, multiConn: Bool,
                                  blockStatusPayload: Bool) -> TransmissionFlags {
        var flags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
        if structured || extended { flags.insert(.sendDF) }
        if extended && blockStatusPayload { flags.insert(.blockStatusPayload) }
        if multiConn { flags.insert(.canMultiConn) }
        if writable {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        } else {
            flags.insert(.readOnly)
        }
        return flags
    }

    /// Block size constraints advertised in the handshake (fixed when the export was made).
    public let limits: BlockLimits

    /// Contexts that match one LIST/SET query, as QEMU answers. A query ending in a colon
    /// (`base:`, `qemu:`, `qemu:dirty-bitmap:`) is a wildcard: LIST lists every context under
    /// it, SET selects nothing (the spec: the server "MUST ignore this form during
    /// NBD_OPT_SET_META_CONTEXT"). Any other query selects the context of exactly that name;
    /// unknown namespaces and leaves match nothing.
    public func contexts(matching query: String, forSet: Bool) -> [any MetaContextProvider] {
        if query.hasSuffix(":") {
            return forSet ? [] : contexts.filter { $0.name.hasPrefix(query) }
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

/// Walks the chain's block status and merges neighbours with equal flags. Descriptors are
/// consecutive, nonzero and cover at most `length` bytes from `offset`.
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
        let n = min(status.length, end - at)
        if n == 0 { break }
        let flags = flagsOf(status)
        if let last = out.last, last.flags == flags {
            out[out.count - 1].length += n
        } else {
            if out.count == maxExtents { break }
            out.append(Transmission.Extent(length: n, flags: flags))
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
