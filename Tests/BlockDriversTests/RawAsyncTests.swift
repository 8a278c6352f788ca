import BlockCore
import BlockDrivers
import EventLoop
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// An asynchronous protocol driver that records what reaches it and answers on a loop.
final class RecordingAsyncDriver: BlockDriver, AsyncBlockDriver, @unchecked Sendable {
    let driverName = "recording"
    let role = DriverRole.protocol
    let length: UInt64 = 1 << 20
    let isReadOnly = false
    let loop: EventLoop
    let seen = Mutex<[(BlockOperation, UInt64, UInt64)]>([])

    init(loop: EventLoop) { self.loop = loop }

    var asyncInterface: (any AsyncBlockDriver)? { self }

    func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        seen.withLock { $0.append((request.operation, request.offset, request.length)) }
        let length = request.length
        loop.execute {
            io.status = BlockStatus(length: length / 2, flags: [.data])
            io.complete(error: nil)
        }
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {}
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {}
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func flush() throws(BlockError) {}
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: [.data])
    }
}

@Suite struct RawAsyncTests {
    /// raw forwards the asynchronous path with its offset, and reports status as allocated.
    @Test func rawForwardsWithOffsetAndMarksStatusAllocated() throws {
        let group = EventLoopGroup(count: 1, name: "raw-async")
        defer { group.shutdown() }
        let driver = RecordingAsyncDriver(loop: group.loops[0])
        let file = BlockNode(name: "f", driver: driver)
        let raw = BlockNode(name: "r", driver: try RawDriver(file: file, offset: 4096, size: 65536))
        #expect(raw.supportsAsync)
        let lock = ConditionLock()
        let result = Mutex<BlockStatus?>(nil)
        let io = BlockIO(loop: nil) { io in
            result.withLock { $0 = io.status }
            lock.withLock { lock.broadcast() }
        }
        try raw.submit(io, BlockRequest(.blockStatus, offset: 512, length: 8192))
        lock.withLock { while result.withLock({ $0 == nil }) { _ = lock.wait(seconds: 0.05) } }
        #expect(result.withLock { $0 } == BlockStatus(length: 4096, flags: [.data, .allocated]))
        #expect(driver.seen.withLock { $0.map(\.1) } == [4096 + 512])
        #expect(raw.inFlightCount == 0 && file.inFlightCount == 0)
        // Past raw's window: refused before anything reaches the file.
        #expect(throws: BlockError.self) { try raw.submit(io, BlockRequest(.discard, offset: 65536 - 100, length: 200)) }
        #expect(driver.seen.withLock { $0.count } == 1)
    }
}
