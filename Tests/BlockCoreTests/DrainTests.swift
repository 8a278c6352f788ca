import BlockCore
import Synchronization
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct DrainTests {
    @Test func noWaitRequestToDrainedNodeWouldBlock() throws {
        let node = BlockNode(name: "n", driver: MemoryDriver(length: 4096))
        node.beginDrain()
        var buf = [UInt8](repeating: 0, count: 16)
        #expect(throws: BlockError.self) {
            try buf.withUnsafeMutableBytes { try node.read(at: 0, into: $0, flags: .noWait) }
        }
        node.endDrain()
        try buf.withUnsafeMutableBytes { try node.read(at: 0, into: $0, flags: .noWait) }
        #expect(node.inFlightCount == 0)
    }

    @Test func requestWaitsUntilDrainEnds() throws {
        let driver = MemoryDriver(length: 4096)
        let node = BlockNode(name: "n", driver: driver)
        node.beginDrain()
        let done = Mutex(false)
        let t = TestThread { try? fill(node, 0, 8, 7); done.withLock { $0 = true } }
        // The write entered, backed out (in flight 0) and sleeps until the section ends.
        #expect(waitUntil { node.requestsEntered == 1 && node.inFlightCount == 0 && t.isBlocked },
                "the write never started waiting for the drained section")
        #expect(!done.withLock { $0 })
        #expect(try driverBytes(driver, 0, 8) == [UInt8](repeating: 0, count: 8), "a write reached the driver while drained")
        node.endDrain()
        t.join()
        #expect(done.withLock { $0 })
        #expect(try readBytes(node, 0, 8) == [UInt8](repeating: 7, count: 8))
    }

    @Test func drainWaitsForInFlightRequests() throws {
        let gate = Gate()
        let node = BlockNode(name: "n", driver: MemoryDriver(length: 4096, gate: gate))
        let writer = TestThread { try? fill(node, 0, 8, 1) }
        #expect(waitUntil { gate.waiting == 1 }, "the write never reached the driver")
        #expect(node.inFlightCount == 1)
        let drained = Mutex(false)
        let drainer = TestThread { node.beginDrain(); drained.withLock { $0 = true } }
        // The section has begun and cannot finish while the write is inside the driver.
        #expect(waitUntil { node.isDrained && drainer.isBlocked })
        #expect(!drained.withLock { $0 })
        gate.open()
        drainer.join()
        #expect(drained.withLock { $0 })
        #expect(node.inFlightCount == 0)
        #expect(try BlockNode.withDrained([]) { true })
        node.endDrain()
        writer.join()
        #expect(try readBytes(node, 0, 8) == [UInt8](repeating: 1, count: 8))
    }
}

@Suite struct RangeLockTests {
    @Test func sharedHoldersCoexistExclusiveConflicts() throws {
        let lock = RangeLock()
        let a = try lock.lock(offset: 0, length: 100, exclusive: false)
        let b = try lock.lock(offset: 50, length: 100, exclusive: false)
        #expect(throws: BlockError.self) { _ = try lock.lock(offset: 99, length: 1, exclusive: true, noWait: true) }
        let c = try lock.lock(offset: 150, length: 10, exclusive: true, noWait: true)
        lock.unlock(a); lock.unlock(b); lock.unlock(c)
        #expect(lock.heldCount == 0)
    }

    /// A client write racing with a copy of the same range always wins: the copy reads the
    /// visible data and writes it back under the exclusive lock, so nothing old lands later.
    @Test func clientWriteDuringCopyIsNeverLost() throws {
        let base = BlockNode(name: "base", driver: MemoryDriver(length: 4096))
        try fill(base, 0, 4096, 0xAA)
        let top = BlockNode(name: "top", driver: MemoryDriver(length: 4096, backing: base, writeDelayMicros: 2_000))
        top.beginSerialising()
        defer { top.endSerialising() }
        let copier = Thread {
            for chunk in stride(from: 0, to: 4096, by: 512) {
                try? top.rangeLock.withLock(offset: UInt64(chunk), length: 512, exclusive: true) { () throws(BlockError) in
                    var buf = [UInt8](repeating: 0, count: 512)
                    try typed { try buf.withUnsafeMutableBytes { p in try top.read(at: UInt64(chunk), into: p) } }
                    try typed { try buf.withUnsafeBytes { p in try top.write(at: UInt64(chunk), from: p, flags: .writeUnchanged) } }
                }
            }
        }
        for i in 0..<32 { try fill(top, UInt64(i * 128), 16, 0x55) }
        copier.join()
        for i in 0..<32 { #expect(try readBytes(top, UInt64(i * 128), 16) == [UInt8](repeating: 0x55, count: 16)) }
        #expect(try readBytes(top, 100, 4) == [0xAA, 0xAA, 0xAA, 0xAA])
    }
}

@Suite struct StreamPlanTests {
    /// base ◀ f1 ◀ mid ◀ f2 ◀ top ◀ f3 (device)
    func chain() -> (base: BlockNode, f1: BlockNode, mid: BlockNode, f2: BlockNode, top: BlockNode, f3: BlockNode) {
        let base = BlockNode(name: "base", driver: MemoryDriver(length: 4096))
        let f1 = BlockNode(name: "f1", driver: PassFilter(base))
        let mid = BlockNode(name: "mid", driver: MemoryDriver(length: 4096, backing: f1))
        let f2 = BlockNode(name: "f2", driver: PassFilter(mid))
        let top = BlockNode(name: "top", driver: MemoryDriver(length: 4096, backing: f2))
        let f3 = BlockNode(name: "f3", driver: PassFilter(top))
        return (base, f1, mid, f2, top, f3)
    }

    @Test func deviceFilterResolvesToTop() throws {
        let c = chain()
        let plan = try StreamPlan.resolve(device: c.f3, base: c.base, bottom: nil)
        #expect(plan.top === c.top)
        #expect(plan.baseOverlay === c.mid)
        #expect(plan.aboveBase === c.f1)
        #expect(plan.currentBase === c.base)
    }

    @Test func filterAsBaseIsKept() throws {
        let c = chain()
        let plan = try StreamPlan.resolve(device: c.top, base: c.f1, bottom: nil)
        #expect(plan.aboveBase === c.mid)
        #expect(plan.currentBase === c.f1)
    }

    @Test func noBaseStreamsEverything() throws {
        let c = chain()
        let plan = try StreamPlan.resolve(device: c.top, base: nil, bottom: nil)
        #expect(plan.baseOverlay === c.base)
        #expect(plan.aboveBase === c.base)
        #expect(plan.currentBase == nil)
    }

    @Test func bottomGivesBaseBelowIt() throws {
        let c = chain()
        let plan = try StreamPlan.resolve(device: c.top, base: nil, bottom: c.mid)
        #expect(plan.base === c.base)
        #expect(plan.aboveBase === c.f1)
    }

    @Test func baseNotInChainIsRefused() throws {
        let c = chain()
        let stranger = BlockNode(name: "x", driver: MemoryDriver(length: 4096))
        #expect(throws: BlockError.self) { try StreamPlan.resolve(device: c.top, base: stranger, bottom: nil) }
        #expect(throws: BlockError.self) { try StreamPlan.resolve(device: c.top, base: c.top, bottom: nil) }
    }

    @Test func freezeBlocksSecondJobAndGraphChanges() throws {
        let c = chain()
        let plan = try StreamPlan.resolve(device: c.top, base: c.base, bottom: nil)
        let frozen = try FrozenChain.freeze(from: plan.top, through: plan.aboveBase, owner: "j0")
        #expect(frozen.edges.count == 3)  // top→f2, f2→mid, mid→f1; f1→base stays free
        #expect(throws: BlockError.self) { _ = try FrozenChain.freeze(from: c.mid, through: c.f1, owner: "j1") }
        #expect(c.mid.driver.backingChild?.frozenBy == "j0")
        #expect(c.f1.chainChild?.frozenBy == nil)
        // (Graph changes that would break a frozen link: BlockGraphTests.)
        frozen.unfreeze()
        #expect(c.top.frozenChildren.isEmpty)
    }

    @Test func blockStatusAboveStopsAtFilterBase() throws {
        let c = chain()
        try fill(c.base, 0, 512, 1)
        try fill(c.mid, 512, 512, 2)
        #expect(try c.top.blockStatusAbove(base: c.f1, at: 0, length: 4096).depth == 0)
        #expect(try c.top.blockStatusAbove(base: c.f1, at: 512, length: 512).depth == 2)
        #expect(try c.top.blockStatusAbove(base: nil, at: 0, length: 512).depth == 3)
    }
}

/// A joinable thread for tests.
final class Thread: @unchecked Sendable {
    private var handle = pthread_t()
    private let body: () -> Void
    init(_ body: @escaping () -> Void) {
        self.body = body
        let ctx = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&handle, nil, { raw in
            let t = Unmanaged<Thread>.fromOpaque(raw!).takeRetainedValue()
            t.body()
            return nil
        }, ctx)
    }
    func join() { pthread_join(handle, nil) }
}
