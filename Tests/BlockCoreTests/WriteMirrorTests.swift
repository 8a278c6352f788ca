import BlockCore
import Synchronization
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Records what it mirrors and copies writes to a second node (write-blocking, as commit does).
final class CopyingMirror: WriteMirror, @unchecked Sendable {
    let target: BlockNode
    let seen = Mutex<[String]>([])
    init(target: BlockNode) { self.target = target }
    func mirror(offset: UInt64, length: UInt64, change: MirroredChange, flags: RequestFlags,
                apply: () throws(BlockError) -> Void) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        try apply()
        switch change {
        case .write(let data):
            try target.write(at: offset, from: data, flags: [.commitCopy])
            seen.withLock { $0.append("write \(offset)+\(length)") }
        case .zeroes:
            try target.writeZeroes(at: offset, length: length, flags: [.commitCopy])
            seen.withLock { $0.append("zeroes \(offset)+\(length)") }
        case .discard:
            seen.withLock { $0.append("discard \(offset)+\(length)") }
        }
    }
}

@Suite struct WriteMirrorTests {
    @Test func mirrorSeesClientChangesAndCommitCopiesMarkNoBitmap() throws {
        let base = BlockNode(name: "base", driver: MemoryDriver(length: 1 << 20))
        let top = BlockNode(name: "top", driver: MemoryDriver(length: 1 << 20, backing: base))
        let baseBitmap = DirtyBitmap(name: "b", granularity: 65536, length: base.length)
        let topBitmap = DirtyBitmap(name: "b", granularity: 65536, length: top.length)
        base.addObserver(baseBitmap)
        top.addObserver(topBitmap)
        let mirror = CopyingMirror(target: base)
        top.setMirror(mirror)
        try fill(top, 4096, 4096, 7)
        try top.writeZeroes(at: 131072, length: 4096)
        try top.discard(at: 262144, length: 65536)
        // A noWait write is pushed off the "event loop" before anything changes.
        let probe = UnsafeMutableRawBufferPointer.allocate(byteCount: 4, alignment: 8)
        defer { probe.deallocate() }
        probe.initializeMemory(as: UInt8.self, repeating: 1)
        var refused: Int32 = 0
        do throws(BlockError) { try top.write(at: 0, from: UnsafeRawBufferPointer(probe), flags: [.noWait]) } catch { refused = error.errno }
        #expect(refused == EAGAIN)
        // Writes flagged as commit copies do not go through the mirror either.
        try top.write(at: 0, from: UnsafeRawBufferPointer(probe), flags: [.commitCopy])
        #expect(mirror.seen.withLock { $0 } == ["write 4096+4096", "zeroes 131072+4096", "discard 262144+65536"])
        #expect(try readBytes(base, 4096, 4096) == [UInt8](repeating: 7, count: 4096))
        // Top's bitmap saw the client's changes; base's bitmap saw nothing (commit copies).
        #expect(topBitmap.dirtyBytes == 3 * 65536)
        #expect(baseBitmap.dirtyBytes == 0)
        top.setMirror(nil)
        #expect(!top.hasMirror)
    }

    @Test func rootSwitchSendsWaitersElsewhere() throws {
        let node = BlockNode(name: "old", driver: MemoryDriver(length: 1 << 20))
        let other = BlockNode(name: "new", driver: MemoryDriver(length: 1 << 20))
        let root = BlockRoot(name: "root", kind: .backend(name: nil), node: node, permissions: .none)
        node.beginDrain()
        let result = Mutex<Int32>(0)
        // The reader waits for the section, then enters the old node and finds the root
        // pointing elsewhere.
        let t = TestThread {
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
            defer { b.deallocate() }
            do throws(BlockError) { try node.read(at: 0, into: b, via: root) } catch { result.withLock { $0 = error.errno } }
        }
        // The read entered, backed out (in flight 0) and sleeps until the section ends.
        #expect(waitUntil { node.requestsEntered == 1 && node.inFlightCount == 0 && t.isBlocked },
                "the read never started waiting for the drained section")
        root.replace(with: other, drained: node)
        node.endDrain()
        t.join()
        #expect(result.withLock { $0 } == ESTALE)
        #expect(root.node === other)
        // Inline (noWait) readers are sent to a worker instead.
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
        defer { b.deallocate() }
        var errno: Int32 = 0
        do throws(BlockError) { try node.read(at: 0, into: b, flags: [.noWait], via: root) } catch { errno = error.errno }
        #expect(errno == EAGAIN)
        try other.read(at: 0, into: b, via: root)
    }

    /// A change that loaded the old node before a root switch and checks its permission after
    /// it (the switch took `write` from the old node, as a mirror's completion does) is sent
    /// to the new node, not refused with EPERM: a client writing through the export during
    /// the switch sees nothing.
    @Test func changeRacingARootSwitchIsRetriedNotRefused() throws {
        let node = BlockNode(name: "old", driver: MemoryDriver(length: 1 << 20))
        let other = BlockNode(name: "new", driver: MemoryDriver(length: 1 << 20))
        let root = BlockRoot(name: "root", kind: .backend(name: nil), node: node, permissions: .none)
        node.beginDrain()
        root.replace(with: other, drained: node)
        node.setGranted(.consistentRead)
        node.endDrain()
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
        defer { b.deallocate() }
        b.initializeMemory(as: UInt8.self, repeating: 3)
        let data = UnsafeRawBufferPointer(b)
        func failure(_ body: () throws(BlockError) -> Void) -> Int32 {
            do throws(BlockError) { try body(); return 0 } catch { return error.errno }
        }
        // On a worker: `.replaced` (retried on the root's node); inline (noWait): `.wouldBlock`.
        #expect(failure { () throws(BlockError) in try node.write(at: 0, from: data, via: root) } == ESTALE)
        #expect(failure { () throws(BlockError) in try node.write(at: 0, from: data, flags: [.noWait], via: root) } == EAGAIN)
        #expect(failure { () throws(BlockError) in try node.writeZeroes(at: 0, length: 512, via: root) } == ESTALE)
        #expect(failure { () throws(BlockError) in try node.discard(at: 0, length: 512, via: root) } == ESTALE)
        // Without a root, or through one that still points here, the refusal stands.
        #expect(failure { () throws(BlockError) in try node.write(at: 0, from: data) } == EPERM)
        let stays = BlockRoot(name: "root", kind: .backend(name: nil), node: node, permissions: .none)
        #expect(failure { () throws(BlockError) in try node.write(at: 0, from: data, via: stays) } == EPERM)
        try other.write(at: 0, from: data, via: root)
    }
}
