import BlockCore
import EventLoop
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// An asynchronous in-memory protocol driver: requests run on `loop` (as an NBD connection's
/// replies do) and complete there. `fail` makes the next request fail with EIO.
final class AsyncMemoryDriver: BlockDriver, AsyncBlockDriver, @unchecked Sendable {
    let driverName = "async-memory"
    let role = DriverRole.protocol
    let length: UInt64
    let isReadOnly = false
    let loop: EventLoop
    let data: Mutex<[UInt8]>
    let fail = Atomic<Bool>(false)
    /// Requests started; the test checks nothing ran inline in `submit`.
    let started = Atomic<Int>(0)
    /// What reached the driver, in order: operation and flags.
    let seen = Mutex<[(BlockOperation, RequestFlags)]>([])
    /// Holds requests until `release()` (to look at a node while one is in flight).
    let hold = Atomic<Bool>(false)
    private let held = Mutex<[@Sendable () -> Void]>([])

    init(length: UInt64, loop: EventLoop) {
        self.length = length
        self.loop = loop
        data = Mutex([UInt8](repeating: 0, count: Int(length)))
    }

    var asyncInterface: (any AsyncBlockDriver)? { self }

    func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        #expect(!request.flags.contains(.noWait))
        started.wrappingAdd(1, ordering: .relaxed)
        seen.withLock { $0.append((request.operation, request.flags)) }
        let r = UnsafeTransfer(request)
        let work: @Sendable () -> Void = { [self] in
            let request = r.value
            if self.fail.exchange(false, ordering: .relaxed) {
                io.complete(error: .io("injected"))
                return
            }
            let (o, n) = (Int(request.offset), Int(request.length))
            self.data.withLock { d in
                switch request.operation {
                case .read: d.withUnsafeBytes { request.buffer!.copyMemory(from: $0.baseAddress! + o, byteCount: n) }
                case .write: for i in 0..<n { d[o + i] = request.buffer!.load(fromByteOffset: i, as: UInt8.self) }
                case .writeZeroes, .discard: for i in 0..<n { d[o + i] = 0 }
                case .flush: break
                case .blockStatus: io.status = BlockStatus(length: request.length, flags: [.data])
                }
            }
            io.complete(error: nil)
        }
        if hold.load(ordering: .relaxed) {
            held.withLock { $0.append(work) }
        } else {
            loop.execute(work)
        }
    }

    func release() {
        hold.store(false, ordering: .relaxed)
        for w in held.withLock({ l -> [@Sendable () -> Void] in defer { l.removeAll() }; return l }) { loop.execute(w) }
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(.read(at: offset, into: buffer, flags: flags))
    }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(.write(at: offset, from: buffer, flags: flags))
    }
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(BlockRequest(.writeZeroes, offset: offset, length: length, flags: flags))
    }
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(BlockRequest(.discard, offset: offset, length: length, flags: flags))
    }
    func flush() throws(BlockError) { _ = try performSynchronously(BlockRequest(.flush)) }
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        try performSynchronously(BlockRequest(.blockStatus, offset: offset, length: length, flags: flags.intersection(.noWait)))
    }
}

/// Records changes, like a dirty bitmap.
final class ChangeLog: WriteObserver, @unchecked Sendable {
    let changes = Mutex<[(UInt64, UInt64)]>([])
    func nodeDidChange(offset: UInt64, length: UInt64) { changes.withLock { $0.append((offset, length)) } }
    var count: Int { changes.withLock { $0.count } }
}

/// Waits for completions of `BlockIO`s and remembers on which thread they ran.
final class Completions: @unchecked Sendable {
    private let lock = ConditionLock()
    private var done: [(BlockError?, Bool)] = []

    func io(on loop: EventLoop) -> BlockIO {
        BlockIO(loop: loop) { [self] io in
            let onLoop = loop.inLoopThread
            lock.withLock {
                done.append((io.error, onLoop))
                lock.broadcast()
            }
        }
    }

    /// Waits for `n` completions in all; returns them.
    func wait(_ n: Int) -> [(BlockError?, Bool)] {
        lock.withLock {
            let end = monotonicNanos() + 5_000_000_000
            while done.count < n && monotonicNanos() < end { _ = lock.wait(seconds: 0.05) }
            return done
        }
    }
}

@Suite struct AsyncIOTests {
    let group = EventLoopGroup(count: 2, name: "async-test")
    var driverLoop: EventLoop { group.loops[0] }
    var callerLoop: EventLoop { group.loops[1] }

    /// Runs `body` on `loop` and waits for it.
    func on<T: Sendable>(_ loop: EventLoop, _ body: @escaping @Sendable () -> T) -> T {
        let result = Mutex<T?>(nil)
        let lock = ConditionLock()
        loop.execute {
            let v = body()
            result.withLock { $0 = v }
            lock.withLock { lock.broadcast() }
        }
        return lock.withLock {
            while result.withLock({ $0 == nil }) { _ = lock.wait(seconds: 0.05) }
            return result.withLock { $0! }
        }
    }

    @Test func requestsRunThroughTheNodeAndCompleteOnTheCallersLoop() throws {
        defer { group.shutdown() }
        let driver = AsyncMemoryDriver(length: 1 << 16, loop: driverLoop)
        let node = BlockNode(name: "n", driver: driver)
        let log = ChangeLog()
        node.addObserver(log)
        #expect(node.supportsAsync)
        let done = Completions()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0x5a)
        let b = UnsafeTransfer(buffer)
        let thrown = on(callerLoop) { () -> Bool in
            do {
                try node.submit(done.io(on: callerLoop), .write(at: 4096, from: UnsafeRawBufferPointer(b.value)))
                return false
            } catch { return true }
        }
        #expect(!thrown)
        let first = done.wait(1)
        #expect(first.count == 1 && first[0].0 == nil && first[0].1, "completed on the caller's loop")
        #expect(log.count == 1, "observers hear about a successful write")
        #expect(node.inFlightCount == 0)
        #expect(try readBytes(node, 4096, 4096) == [UInt8](repeating: 0x5a, count: 4096), "synchronous read through the async driver")

        driver.fail.store(true, ordering: .relaxed)
        _ = on(callerLoop) { try? node.submit(done.io(on: callerLoop), .write(at: 0, from: UnsafeRawBufferPointer(b.value))) }
        let second = done.wait(2)
        #expect(second.count == 2 && second[1].0?.errno == EIO)
        #expect(log.count == 1, "a failed write is not reported as a change")
        #expect(node.inFlightCount == 0)
    }

    @Test func checksThrowBeforeAnythingStarts() throws {
        defer { group.shutdown() }
        let driver = AsyncMemoryDriver(length: 1 << 16, loop: driverLoop)
        let node = BlockNode(name: "n", driver: driver)
        let readOnly = BlockNode(name: "ro", driver: AsyncMemoryDriver(length: 4096, loop: driverLoop), readOnly: true)
        let done = Completions()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let b = UnsafeTransfer(buffer)
        let errors = on(callerLoop) { () -> [Int32] in
            var out: [Int32] = []
            let io = done.io(on: callerLoop)
            // Past the end; to a read-only node; compressed to a driver that cannot compress
            // (the synchronous write's check, shared).
            for (n, r) in [(node, BlockRequest.read(at: (1 << 16) - 100, into: b.value)),
                           (readOnly, BlockRequest.write(at: 0, from: UnsafeRawBufferPointer(b.value))),
                           (node, BlockRequest.write(at: 0, from: UnsafeRawBufferPointer(b.value), flags: .writeCompressed))] {
                do { try n.submit(io, r); out.append(0) } catch { out.append((error as? BlockError)?.errno ?? -1) }
            }
            // A drained node: the caller must take the synchronous path (nothing started).
            node.beginDrainForTest()
            do { try node.submit(io, .read(at: 0, into: b.value)); out.append(0) } catch { out.append((error as? BlockError)?.errno ?? -1) }
            node.endDrain()
            return out
        }
        #expect(errors == [EINVAL, EPERM, ENOTSUP, EAGAIN])
        #expect(driver.started.load(ordering: .relaxed) == 0)
        #expect(node.inFlightCount == 0)
    }

    @Test func drainWaitsForAnAsyncRequestInFlight() throws {
        defer { group.shutdown() }
        let driver = AsyncMemoryDriver(length: 1 << 16, loop: driverLoop)
        let node = BlockNode(name: "n", driver: driver)
        driver.hold.store(true, ordering: .relaxed)
        let done = Completions()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 4096)
        defer { buffer.deallocate() }
        let b = UnsafeTransfer(buffer)
        _ = on(callerLoop) { try? node.submit(done.io(on: callerLoop), .read(at: 0, into: b.value)) }
        #expect(node.inFlightCount == 1)
        let drained = Atomic<Bool>(false)
        let t = Thread { node.beginDrain(); drained.store(true, ordering: .relaxed); node.endDrain() }
        usleep(50_000)
        let early = drained.load(ordering: .relaxed)
        #expect(!early, "drain waits for the request")
        driver.release()
        t.join()
        let late = drained.load(ordering: .relaxed)
        #expect(late)
        #expect(done.wait(1).count == 1)
    }

    @Test func rangeLockAndMirrorSendChangesToTheSynchronousPath() throws {
        defer { group.shutdown() }
        let driver = AsyncMemoryDriver(length: 1 << 16, loop: driverLoop)
        let node = BlockNode(name: "n", driver: driver)
        node.beginSerialising()
        let token = try node.rangeLock.lock(offset: 0, length: 4096, exclusive: true)
        let done = Completions()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 4096)
        defer { buffer.deallocate() }
        let b = UnsafeTransfer(buffer)
        let blocked = on(callerLoop) { () -> Int32 in
            do { try node.submit(done.io(on: callerLoop), .write(at: 512, from: UnsafeRawBufferPointer(b.value))); return 0 } catch { return (error as? BlockError)?.errno ?? -1 }
        }
        #expect(blocked == EAGAIN)
        // Elsewhere in the node the write goes ahead (holding the lock shared until done).
        let other = on(callerLoop) { () -> Int32 in
            do { try node.submit(done.io(on: callerLoop), .write(at: 8192, from: UnsafeRawBufferPointer(b.value))); return 0 } catch { return (error as? BlockError)?.errno ?? -1 }
        }
        #expect(other == 0)
        #expect(done.wait(1).count == 1)
        node.rangeLock.unlock(token)
        #expect(node.rangeLock.heldCount == 0)
        node.endSerialising()
        // An active commit's mirror wraps changes synchronously: not on the async path.
        node.setMirror(PassMirror())
        let mirrored = on(callerLoop) { () -> Int32 in
            do { try node.submit(done.io(on: callerLoop), .write(at: 8192, from: UnsafeRawBufferPointer(b.value))); return 0 } catch { return (error as? BlockError)?.errno ?? -1 }
        }
        #expect(mirrored == EAGAIN)
        node.setMirror(nil)
        #expect(node.inFlightCount == 0)
    }

    @Test func synchronousCallsRefuseToWaitOnAnEventLoop() throws {
        defer { group.shutdown() }
        let driver = AsyncMemoryDriver(length: 4096, loop: driverLoop)
        let node = BlockNode(name: "n", driver: driver)
        var buf = [UInt8](repeating: 0, count: 16)
        #expect(throws: BlockError.self) { try buf.withUnsafeMutableBytes { try node.read(at: 0, into: $0, flags: .noWait) } }
        let onLoop = on(callerLoop) { () -> Int32 in
            var b = [UInt8](repeating: 0, count: 16)
            do { try b.withUnsafeMutableBytes { try node.read(at: 0, into: $0) }; return 0 } catch { return (error as? BlockError)?.errno ?? -1 }
        }
        #expect(onLoop == EAGAIN)
        #expect(node.inFlightCount == 0)
    }

    /// Node options act on asynchronous requests exactly as on synchronous ones (the same
    /// helpers): detect-zeroes turns an all-zero write into a zero write (deallocating only
    /// with `unmap`), discard=ignore completes a discard without reaching the driver (on the
    /// caller's loop, not inside `submit`, no change reported) and takes `.mayUnmap` from
    /// zero writes. Both paths send the driver the same requests.
    @Test func nodeOptionsActOnAsyncRequestsAsOnSynchronousOnes() throws {
        defer { group.shutdown() }
        let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0)
        let z = UnsafeTransfer(UnsafeRawBufferPointer(zeroes))
        let requests = UnsafeTransfer([
            BlockRequest.write(at: 4096, from: z.value, flags: .fua),
            BlockRequest(.writeZeroes, offset: 8192, length: 4096, flags: .mayUnmap),
            BlockRequest(.discard, offset: 0, length: 4096, flags: .mayUnmap),
        ])
        func describe(_ seen: [(BlockOperation, RequestFlags)]) -> [String] {
            seen.map { "\($0.0)\($0.1.contains(.fua) ? "+fua" : "")\($0.1.contains(.mayUnmap) ? "+unmap" : "")" }
        }
        let cases: [(NodeOptions, [String])] = [
            (NodeOptions(discard: .ignore, detectZeroes: .on), ["write-zeroes+fua", "write-zeroes"]),
            (NodeOptions(discard: .ignore, detectZeroes: .off), ["write+fua", "write-zeroes"]),
            (NodeOptions(discard: .unmap, detectZeroes: .on), ["write-zeroes+fua", "write-zeroes+unmap", "discard+unmap"]),
            (NodeOptions(discard: .unmap, detectZeroes: .unmap), ["write-zeroes+fua+unmap", "write-zeroes+unmap", "discard+unmap"]),
        ]
        for (options, expected) in cases {
            let driver = AsyncMemoryDriver(length: 1 << 16, loop: driverLoop)
            let node = BlockNode(name: "n", driver: driver, options: options)
            let log = ChangeLog()
            node.addObserver(log)
            let done = Completions()
            let thrown = on(callerLoop) { () -> Int in
                var thrown = 0
                for r in requests.value {
                    do { try node.submit(done.io(on: callerLoop), r) } catch { thrown += 1 }
                }
                return thrown
            }
            #expect(thrown == 0, "\(options)")
            let completions = done.wait(3)
            #expect(completions.count == 3 && completions.allSatisfy { $0.0 == nil && $0.1 }, "all complete, on the caller's loop")
            #expect(describe(driver.seen.withLock { $0 }) == expected, "asynchronous, \(options)")
            #expect(log.count == expected.count, "an ignored discard changes nothing")
            #expect(node.inFlightCount == 0)

            // The synchronous path (this thread may wait) sends the same requests.
            let syncDriver = AsyncMemoryDriver(length: 1 << 16, loop: driverLoop)
            let syncNode = BlockNode(name: "s", driver: syncDriver, options: options)
            try syncNode.write(at: 4096, from: z.value, flags: .fua)
            try syncNode.writeZeroes(at: 8192, length: 4096, flags: .mayUnmap)
            try syncNode.discard(at: 0, length: 4096, flags: .mayUnmap)
            #expect(describe(syncDriver.seen.withLock { $0 }) == expected, "synchronous, \(options)")
        }
    }

    @Test func forwardingFiltersPassTheAsyncPathOnlyWhenTheirChildHasOne() throws {
        defer { group.shutdown() }
        let asyncNode = BlockNode(name: "a", driver: AsyncMemoryDriver(length: 4096, loop: driverLoop))
        let syncNode = BlockNode(name: "s", driver: MemoryDriver(length: 4096))
        #expect(BlockNode(name: "f1", driver: ForwardFilter(asyncNode)).supportsAsync)
        #expect(!BlockNode(name: "f2", driver: ForwardFilter(syncNode)).supportsAsync)
        #expect(!BlockNode(name: "f3", driver: PassFilter(asyncNode)).supportsAsync, "plain filters stay synchronous")
        let filter = BlockNode(name: "f4", driver: ForwardFilter(asyncNode))
        let done = Completions()
        _ = on(callerLoop) { try? filter.submit(done.io(on: callerLoop), BlockRequest(.blockStatus, offset: 0, length: 4096)) }
        #expect(done.wait(1).first?.0 == nil)
        #expect(asyncNode.inFlightCount == 0 && filter.inFlightCount == 0)
    }
}

final class PassMirror: WriteMirror, @unchecked Sendable {
    func mirror(offset: UInt64, length: UInt64, change: MirroredChange, flags: RequestFlags,
                apply: () throws(BlockError) -> Void) throws(BlockError) { try apply() }
}

final class ForwardFilter: ForwardingFilter, @unchecked Sendable {
    let driverName = "forward"
    let filtered: BlockChild
    init(_ node: BlockNode) { filtered = BlockChild(name: "file", node: node) }
}

extension BlockNode {
    /// `beginDrain` for a node with nothing in flight (it returns at once).
    func beginDrainForTest() { beginDrain() }
}
