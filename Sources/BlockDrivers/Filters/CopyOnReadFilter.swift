import BlockCore
import Synchronization

/// `copy-on-read`: data that a read brings up from below the filtered node is written into
/// the filtered node as an unchanged write, so later reads find it there. Option `bottom`
/// limits copying to data allocated above (and in) that node, as QEMU's filter does.
///
/// Copies hold the filtered node's range lock exclusively, so a racing client write always
/// wins; an event-loop (`noWait`) read that would copy is handed to a worker.
public final class CopyOnReadFilter: FilterDriver {
    public let driverName = "copy-on-read"
    public let filtered: BlockChild
    /// Copy only what is allocated above this node's backing (nil: everything).
    public let bottom: BlockNode?
    private let closed = Atomic<Bool>(false)

    public init(file: BlockNode, bottom: BlockNode?) {
        filtered = BlockChild(name: "file", role: .filteredPrimary, node: file)
        self.bottom = bottom
        file.beginSerialising()
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        let node = filtered.node
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let want = UInt64(buffer.count - done)
            let dst = { (n: UInt64) in UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + Int(n)]) }
            if flags.contains(.noWait) {
                // Only the common case goes inline: allocated in the filtered node itself, known
                // from cached metadata (a cache miss or a busy lock is `.wouldBlock`).
                let st = try node.blockStatus(at: pos, length: want, flags: .noWait)
                if !st.isAllocated { throw .wouldBlock }
                try node.read(at: pos, into: dst(st.length), flags: flags)
                done += Int(st.length)
                continue
            }
            let base = bottom?.backingSkippingFilters()
            let st = try node.blockStatusAbove(base: base, at: pos, length: want)
            let n = st.length
            if st.depth >= 2 {
                try node.rangeLock.withLock(offset: pos, length: n, exclusive: true) { () throws(BlockError) in
                    try node.read(at: pos, into: dst(n), flags: flags)
                    try node.write(at: pos, from: UnsafeRawBufferPointer(dst(n)), flags: [.writeUnchanged])
                }
            } else {
                try node.read(at: pos, into: dst(n), flags: flags)
            }
            done += Int(n)
        }
    }

    public func close() throws(BlockError) {
        if closed.exchange(true, ordering: .sequentiallyConsistent) { return }
        filtered.node.endSerialising()
    }

    /// QEMU's `cor_child_perm`: what the users take, plus write-unchanged for the copies.
    public func childPermissions(for child: BlockChild, parent: PermissionPair, writable: Bool) -> PermissionPair {
        PermissionFilter.copyOnRead.apply(parent)
    }
}

/// `null-filter`: a filter that does nothing, forwarding every request to its `file`. QEMU
/// 7.2 has no generic do-nothing filter (its `preallocate` and `compress` filters change
/// behaviour); blockd adds this one so bitmaps and tests can hang a node anywhere in a chain
/// (the "empty filter" the bitmap discussion asks for).
public final class NullFilter: ForwardingFilter {
    public let driverName = "null-filter"
    public let filtered: BlockChild
    public init(file: BlockNode) { filtered = BlockChild(name: "file", role: .filteredPrimary, node: file) }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        NullFilter(file: file ?? filtered.node)
    }
}
