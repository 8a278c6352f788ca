import BlockCore
import BlockGraph
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An in-memory protocol node (a stand-in for `file`).
final class MemFile: BlockDriver {
    let driverName = "file"
    let role = DriverRole.protocol
    let length: UInt64
    let isReadOnly: Bool
    let data: Mutex<[UInt8]>
    let name: String

    init(_ name: String, length: UInt64 = 1 << 20, readOnly: Bool = false) {
        self.name = name
        self.length = length
        isReadOnly = readOnly
        data = Mutex([UInt8](repeating: 0, count: Int(length)))
    }

    var filename: String? { "/images/\(name)" }

    /// What the graph last told this driver its users take and share, and a stand-in for
    /// another process's image lock: taking any of `lockedByOthers` is refused as the file
    /// driver refuses it.
    let told = Mutex<[PermissionPair]>([])
    let lockedByOthers = Mutex<BlockPermissions>([])
    func setPermissions(_ cumulative: PermissionPair) throws(BlockError) {
        let held = lockedByOthers.withLock { $0 }
        if !cumulative.perm.isDisjoint(with: held) {
            throw BlockError(EBUSY, "Failed to get \"\(cumulative.perm.intersection(held).names)\" lock")
        }
        told.withLock { $0.append(cumulative) }
    }
    var current: PermissionPair? { told.withLock { $0.last } }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        data.withLock { d in for i in 0..<buffer.count { buffer[i] = d[Int(offset) + i] } }
    }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        data.withLock { d in for i in 0..<buffer.count { d[Int(offset) + i] = buffer[i] } }
    }
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        data.withLock { d in for i in 0..<Int(length) { d[Int(offset) + i] = 0 } }
    }
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func flush() throws(BlockError) {}
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: [.data, .allocated])
    }
    func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        let fresh = MemFile(name, length: length, readOnly: readOnly)
        fresh.data.withLock { $0 = data.withLock { $0 } }
        return fresh
    }
}

/// A format node over a file child (role `.image`, as qcow2), with an optional backing.
/// Reads and writes pass through to the file; it records the backing file name it was given.
final class MemFormat: BlockDriver {
    let driverName = "qcow2"
    let role = DriverRole.format
    let file: BlockChild
    let isReadOnly: Bool
    private let backingSlot = DrainGuarded<BlockChild?>(nil)
    let recorded = Mutex<(name: String?, format: String?)>((nil, nil))
    let closes = Atomic<Int>(0)

    init(file: BlockNode, backing: BlockNode? = nil, readOnly: Bool = false) {
        self.file = BlockChild(name: "file", role: .image, node: file)
        isReadOnly = readOnly
        if let backing { backingSlot.setUnpublished(BlockChild(name: "backing", role: .backing, node: backing)) }
    }

    var children: [BlockChild] { [file] + (backingSlot.value.map { [$0] } ?? []) }
    var length: UInt64 { file.node.length }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        try file.node.read(at: offset, into: buffer, flags: flags)
    }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        try file.node.write(at: offset, from: buffer, flags: flags)
    }
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try file.node.writeZeroes(at: offset, length: length, flags: flags)
    }
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func flush() throws(BlockError) {}
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: [.data, .allocated])
    }
    func close() throws(BlockError) { closes.wrappingAdd(1, ordering: .relaxed) }

    var canRecordBackingFile: Bool { !isReadOnly }
    func setBackingFile(name: String?, format: String?) throws(BlockError) {
        recorded.withLock { $0 = (name, format) }
    }
    func setBacking(_ node: BlockNode?, drained owner: BlockNode) throws(BlockError) {
        backingSlot.set(node.map { BlockChild(name: "backing", role: .backing, node: $0) }, drained: owner)
    }
    func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        MemFormat(file: file ?? self.file.node, backing: backing, readOnly: readOnly)
    }
}

/// A do-nothing filter.
final class MemFilter: FilterDriver {
    let driverName = "null-filter"
    let filtered: BlockChild
    init(_ node: BlockNode) { filtered = BlockChild(name: "file", role: .filteredPrimary, node: node) }
}

/// Builds graphs for the tests with QEMU-like names.
struct G {
    let graph = BlockGraph()

    @discardableResult
    func file(_ name: String, readOnly: Bool = false) throws(BlockError) -> BlockNode {
        let n = BlockNode(name: name, driver: MemFile(name, readOnly: readOnly), readOnly: readOnly)
        try graph.register(n)
        graph.setMonitorOwned(n)
        return n
    }

    @discardableResult
    func format(_ name: String, file: BlockNode, backing: BlockNode? = nil, readOnly: Bool = false,
                owned: Bool = true) throws(BlockError) -> BlockNode {
        let n = BlockNode(name: name, driver: MemFormat(file: file, backing: backing, readOnly: readOnly), readOnly: readOnly,
                          autoNamed: !owned)
        try graph.register(n)
        if owned { graph.setMonitorOwned(n) }
        return n
    }

    @discardableResult
    func filter(_ name: String, over node: BlockNode) throws(BlockError) -> BlockNode {
        let n = BlockNode(name: name, driver: MemFilter(node))
        try graph.register(n)
        graph.setMonitorOwned(n)
        return n
    }

    /// An NBD export as `blockd` attaches it: QEMU's two steps.
    @discardableResult
    func export(_ node: BlockNode, writable: Bool) throws(BlockError) -> BlockRoot {
        let root = BlockRoot(name: "root", kind: .backend(name: nil), node: node,
                             permissions: PermissionPair(perm: writable ? [.consistentRead, .write] : .consistentRead, shared: .all))
        try graph.attach([root])
        do throws(BlockError) {
            try graph.setPermissions(root, PermissionPair(perm: root.permissions.perm, shared: BlockPermissions.all.subtracting(.resize)))
        } catch {
            graph.detach([root])
            throw error
        }
        return root
    }

    /// What `query-named-block-nodes` would show, plus every edge's permissions: equal
    /// before and after a refused change.
    var state: [String] {
        graph.all.map { n in
            let edges = n.children.map { "\($0.name)->\($0.node.nodeName) \($0.permissions.perm)/\($0.permissions.shared)" }
            return "\(n.nodeName) [\(edges.joined(separator: ", "))] granted \(n.granted)"
        } + graph.roots.map { "root \($0.name)->\($0.node.nodeName) \($0.permissions.perm)/\($0.permissions.shared)" }
    }
}

func message(_ body: () throws(BlockError) -> Void) -> String? {
    do throws(BlockError) {
        try body()
        return nil
    } catch {
        return error.message
    }
}

/// Writes 512 bytes of `value` at offset 0.
func writeBytes(_ node: BlockNode, _ value: UInt8, at offset: UInt64 = 0, via root: BlockRoot? = nil) throws(BlockError) {
    let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
    defer { p.deallocate() }
    p.initializeMemory(as: UInt8.self, repeating: value)
    try node.write(at: offset, from: UnsafeRawBufferPointer(p), via: root)
}

func readByte(_ node: BlockNode, at offset: UInt64 = 0) throws(BlockError) -> UInt8 {
    let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 8)
    defer { p.deallocate() }
    try node.read(at: offset, into: p)
    return p[0]
}
