import BlockCore
import BlockDrivers
import BlockGraph
import EventLoop
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A target whose writes fail after `budget` bytes with `errno` (a fleecing image that runs
/// out of space), counting what reached it.
final class LimitedTarget: BlockDriver {
    let driverName = "file"
    let role = DriverRole.protocol
    let length: UInt64
    let isReadOnly = false
    let inner: MemFile
    let budget: Atomic<Int>
    let errno: Int32
    let writes = Atomic<Int>(0)

    init(length: UInt64, budget: Int = .max, errno: Int32 = ENOSPC) {
        self.length = length
        inner = MemFile("target", length: length)
        self.budget = Atomic(budget)
        self.errno = errno
    }

    private func take(_ n: Int) throws(BlockError) {
        if budget.wrappingSubtract(n, ordering: .relaxed).newValue < 0 {
            throw BlockError(errno, "No space left on device")
        }
        writes.wrappingAdd(1, ordering: .relaxed)
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        try inner.read(at: offset, into: buffer, flags: flags)
    }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        try take(buffer.count)
        try inner.write(at: offset, from: buffer, flags: flags)
    }
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try take(Int(length))
        try inner.writeZeroes(at: offset, length: length, flags: flags)
    }
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func flush() throws(BlockError) {}
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: [.data, .allocated])
    }
}

/// The copy-before-write filter and snapshot-access in a graph of in-memory nodes: QEMU's
/// permissions, the point-in-time view under concurrent writers, and what a failing target does.
@Suite struct CopyBeforeWriteTests {
    static let size: UInt64 = 1 << 20

    struct Setup {
        let g = G()
        let disk: BlockNode
        let target: BlockNode
        let cbw: BlockNode
        let snap: BlockNode
        let targetDriver: LimitedTarget

        init(onError: OnCBWError = .breakGuestWrite, budget: Int = .max, exported: Bool = true) throws {
            let mem = MemFile("f", length: CopyBeforeWriteTests.size)
            // Pattern A: byte i of each 4 KiB block is the block number.
            mem.data.withLock { d in for i in 0..<d.count { d[i] = UInt8(truncatingIfNeeded: i / 4096) } }
            let f = BlockNode(name: "f", driver: mem)
            try g.graph.register(f)
            disk = try g.format("disk", file: f)
            targetDriver = LimitedTarget(length: CopyBeforeWriteTests.size, budget: budget)
            target = BlockNode(name: "t", driver: targetDriver)
            try g.graph.register(target)
            cbw = BlockNode(name: "cbw", driver: try CopyBeforeWriteFilter(file: disk, target: target, bitmap: nil,
                                                                           onError: onError, timeoutSeconds: 0))
            try g.graph.register(cbw)
            snap = BlockNode(name: "snap", driver: SnapshotAccessDriver(file: cbw))
            try g.graph.register(snap)
            // A client writing through the filter (an export the filter took over).
            if exported { _ = try g.export(cbw, writable: true) }
        }
    }

    static func pattern(_ offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: offset / 4096) }

    @Test func permissionsAreQEMUs() throws {
        let s = try Setup(exported: false)
        // No users yet: the filter takes nothing on the disk, and writes the target.
        let fileEdge = s.cbw.children[0]
        let targetEdge = s.cbw.children[1]
        #expect(targetEdge.permissions == PermissionPair(perm: .write, shared: BlockPermissions.all.subtracting(.resize)))
        // snapshot-access takes nothing and shares everything; with it as a user, the filter
        // lets nobody else write the disk.
        #expect(s.snap.children[0].permissions == PermissionPair(perm: [], shared: .all))
        #expect(fileEdge.permissions.shared == [.consistentRead, .writeUnchanged])
        // An export writing through the filter: the filter reads and writes the disk.
        _ = try s.g.export(s.cbw, writable: true)
        #expect(fileEdge.permissions.perm == [.consistentRead, .write])
        #expect(message { () throws(BlockError) in try s.g.export(s.disk, writable: true) }
            == "Permission conflict on node 'disk': permissions 'write' are both required by an unnamed block device (uses node 'disk' as 'root' child) and unshared by node 'cbw' (uses node 'disk' as 'file' child).")
    }

    @Test func snapshotStaysThePointInTimeUnderConcurrentWriters() throws {
        let s = try Setup()
        let size = Int(CopyBeforeWriteTests.size)
        let cbw = s.cbw
        // Four writers overwrite random 4 KiB blocks with 0xEE while a reader reads the
        // snapshot in 24 KiB pieces that straddle clusters.
        let stop = Atomic<Bool>(false)
        let failures = Mutex<[String]>([])
        var threads: [OSThread] = []
        for w in 0..<4 {
            threads.append(OSThread.start(name: "w\(w)") {
                var seed = UInt64(w + 1) &* 0x9E37_79B9_7F4A_7C15
                let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
                defer { block.deallocate() }
                block.initializeMemory(as: UInt8.self, repeating: 0xEE)
                while !stop.load(ordering: .relaxed) {
                    seed = seed &* 6364136223846793005 &+ 1442695040888963407
                    let off = UInt64((seed >> 33) % UInt64(size / 4096)) * 4096
                    do throws(BlockError) { try cbw.write(at: off, from: UnsafeRawBufferPointer(block)) } catch {
                        failures.withLock { $0.append("write \(off): \(error.message)") }
                    }
                }
            })
        }
        let piece = 24 * 1024
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 4096)
        defer { buf.deallocate() }
        for round in 0..<3 {
            var off = 0
            while off < size {
                let n = min(piece, size - off)
                try s.snap.read(at: UInt64(off), into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<n]))
                for i in 0..<n where buf[i] != Self.pattern(off + i) {
                    failures.withLock { $0.append("round \(round): snapshot byte \(off + i) is \(buf[i])") }
                    break
                }
                off += n
            }
        }
        stop.store(true, ordering: .relaxed)
        for t in threads { t.join() }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0.prefix(5) })")
        // Each 64 KiB cluster was copied at most once (16 clusters, one write each at most).
        let copier = (cbw.driver as! any BlockCopyOwner).blockCopy
        #expect(s.targetDriver.writes.load(ordering: .relaxed) <= copier.clusterCount)
    }

    @Test func breakGuestWriteFailsTheWriteAndKeepsTheSnapshot() throws {
        let s = try Setup(onError: .breakGuestWrite, budget: 0)
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        block.initializeMemory(as: UInt8.self, repeating: 0xEE)
        #expect(message { () throws(BlockError) in try s.cbw.write(at: 8192, from: UnsafeRawBufferPointer(block)) }
            == "No space left on device")
        try s.snap.read(at: 8192, into: block)
        #expect(block.allSatisfy { $0 == Self.pattern(8192) })
        try s.disk.read(at: 8192, into: block)
        #expect(block.allSatisfy { $0 == Self.pattern(8192) })
    }

    @Test func breakSnapshotKeepsWritingAndFailsSnapshotReads() throws {
        let s = try Setup(onError: .breakSnapshot, budget: 0)
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        block.initializeMemory(as: UInt8.self, repeating: 0xEE)
        try s.cbw.write(at: 8192, from: UnsafeRawBufferPointer(block))
        try s.disk.read(at: 8192, into: block)
        #expect(block.allSatisfy { $0 == 0xEE })
        #expect(message { () throws(BlockError) in try s.snap.read(at: 0, into: block) } == "Permission denied")
        // Once broken the filter copies nothing more.
        try s.cbw.write(at: 512 * 1024, from: UnsafeRawBufferPointer(block))
        #expect(s.targetDriver.writes.load(ordering: .relaxed) == 0)
    }

    @Test func discardedSnapshotRangesAreNotCopiedOrReadable() throws {
        let s = try Setup()
        // A client of the snapshot that may discard (a writable export of snapshot-access).
        _ = try s.g.export(s.snap, writable: true)
        try s.snap.discard(at: 0, length: 256 * 1024)
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        block.initializeMemory(as: UInt8.self, repeating: 0xEE)
        try s.cbw.write(at: 4096, from: UnsafeRawBufferPointer(block))
        #expect(s.targetDriver.writes.load(ordering: .relaxed) == 0)
        #expect(message { () throws(BlockError) in try s.snap.read(at: 0, into: block) } == "Permission denied")
        try s.snap.read(at: 256 * 1024, into: block)
        #expect(block.allSatisfy { $0 == Self.pattern(256 * 1024) })
    }

    @Test func unchangedWritesAreNotCopied() throws {
        let s = try Setup()
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        try s.disk.read(at: 0, into: block)
        try s.cbw.write(at: 0, from: UnsafeRawBufferPointer(block), flags: .writeUnchanged)
        #expect(s.targetDriver.writes.load(ordering: .relaxed) == 0)
    }

    @Test func bitmapFreezeAbdicateAndReclaim() throws {
        let b = DirtyBitmap(name: "b", granularity: 65536, length: 1 << 20)
        b.mark(offset: 0, length: 65536)
        try b.freeze()
        #expect(b.isBusy && b.isRecording && !b.isEnabled)
        #expect(message { () throws(BlockError) in try b.freeze() }
            == "Bitmap 'b' is currently in use by another operation and cannot be used")
        b.nodeDidChange(offset: 131072, length: 4096)
        #expect(b.dirtyBytes == 65536)
        b.reclaim()
        #expect(!b.isBusy && b.isEnabled && b.dirtyBytes == 131072)
        try b.freeze()
        b.nodeDidChange(offset: 262144, length: 4096)
        b.abdicate()
        #expect(!b.isBusy && b.isEnabled && b.dirtyBytes == 65536 && b.isDirty(offset: 262144))
    }
}
