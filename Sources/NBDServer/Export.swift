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
    /// Meta contexts this export offers, in the order LIST answers them.
    public let contexts: [any MetaContextProvider]
    private let connectionCount = Atomic<Int>(0)
    /// Whether buffered writes may run on the loop thread (see `InlineWritePolicy`).
    let inlineWrites: InlineWritePolicy
    /// Where the advertised preferred block size comes from.
    public let preferredBlockSize: PreferredBlockSize

    public enum PreferredBlockSize: Sendable {
        /// The node's (a qcow2 node's cluster size, up to 64 KiB): a client that sizes its
        /// requests by it (nbdcopy) writes whole clusters and detects zeroes per cluster.
        case node
        /// QEMU's: 4096, or the minimum when larger (`nbd_negotiate_handle_info` hard-codes it),
        /// for the qemu-nbd front end, whose output (`qemu-nbd --list`) scripts compare.
        case qemu
    }

    /// `allocationDepth` offers `qemu:allocation-depth` (QEMU's `allocation-depth=on`, qemu-nbd `-A`).
    public init(id: String, name: String, description: String?, node: BlockNode, writable: Bool,
                extraContexts: [any MetaContextProvider] = [], allocationDepth: Bool = true,
                preferredBlockSize: PreferredBlockSize = .node) {
        self.id = id
        self.name = name
        self.description = description
        let root = ExportRoot(node)
        self.root = root
        self.writable = writable
        self.contexts = [BaseAllocationContext(root: root)] + (allocationDepth ? [AllocationDepthContext(root: root)] : [])
            + extraContexts
        // Decided for the node exported first; after an active commit's switch the policy
        // stays as it was (a qcow2 top never allows inline buffered writes: conservative).
        self.inlineWrites = InlineWritePolicy(node: node)
        self.preferredBlockSize = preferredBlockSize
    }

    /// Serves `newNode` from now on (active commit completion). The caller holds the control
    /// lock and has drained the old node; connections stay open.
    public func replaceNode(with newNode: BlockNode) {
        root.node = newNode
    }

    public var size: UInt64 { node.length }

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

    /// The node's limits as the spec lets them be advertised (`Handshake.blockSizes`), the
    /// maximum capped at 32 MiB, the preferred size as `preferredBlockSize` says.
    public var limits: BlockLimits {
        let l = node.limits
        let preferred = preferredBlockSize == .node ? l.preferred : 4096
        let s = Handshake.blockSizes(minimum: l.minimum, preferred: preferred, maximum: l.maximum, exportSize: size,
                                     cap: Transmission.maxPayload)
        return BlockLimits(minimum: s.minimum, preferred: s.preferred, maximum: s.maximum)
    }

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

/// Walks the chain's block status and merges neighbours with equal flags. Descriptors are
/// consecutive, nonzero and cover at most `length` bytes from `offset`.
func collect(node: BlockNode, offset: UInt64, length: UInt64, maxExtents: Int,
             _ flagsOf: (BlockStatus) -> UInt32) throws(BlockError) -> [Transmission.Extent] {
    var out: [Transmission.Extent] = []
    var at = offset
    let end = offset + length
    while at < end {
        let status = try node.blockStatusAbove(at: at, length: end - at)
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
