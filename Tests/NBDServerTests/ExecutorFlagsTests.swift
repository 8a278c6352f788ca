import BlockCore
import NBDProtocol
@testable import NBDServer
import Synchronization
import Testing

/// An asynchronous driver that records what reaches it, on either path, and completes
/// asynchronous requests only when the test says.
final class RecordingDriver: BlockDriver, AsyncBlockDriver, @unchecked Sendable {
    let driverName = "recording"
    let role = DriverRole.protocol
    let length: UInt64 = 1 << 20
    let isReadOnly = false
    var asyncInterface: (any AsyncBlockDriver)? { self }
    let seen = Mutex<[String]>([])
    private let pending = Mutex<[BlockIO]>([])

    private func record(_ operation: BlockOperation, _ flags: RequestFlags) {
        // Only the flags the wire decides: not the loop's `.noWait` attempt markers.
        let f = flags.subtracting([.noWait, .bufferedWriteMayBlock])
        seen.withLock { $0.append("\(operation)\(f.contains(.fua) ? "+fua" : "")\(f.contains(.mayUnmap) ? "+unmap" : "")") }
    }

    func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        record(request.operation, request.flags)
        pending.withLock { $0.append(io) }
    }

    func completeAll() {
        for io in pending.withLock({ p -> [BlockIO] in defer { p.removeAll() }; return p }) { io.complete(error: nil) }
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        record(.read, flags)
    }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        record(.write, flags)
    }
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        record(.writeZeroes, flags)
    }
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        record(.discard, flags)
    }
    func flush() throws(BlockError) { record(.flush, []) }
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: [.data])
    }
}

@Suite struct ExecutorFlagsTests {
    /// An export's `writethrough` makes writes and zero writes FUA — not trims or reads —
    /// on the asynchronous path (`Executor.submit`) exactly as on the synchronous one
    /// (`Executor.perform`): both take their flags from `blockFlags`.
    @Test func writethroughMakesWritesAndZeroWritesFUAOnBothPaths() {
        let pool = BufferPool()
        let commands: [(Command, CommandFlags)] = [(.write, []), (.writeZeroes, []), (.trim, []), (.read, []), (.writeZeroes, [.fua])]
        for writethrough in [false, true] {
            var outcomes: [[String]] = []
            for async in [true, false] {
                let driver = RecordingDriver()
                let node = BlockNode(name: "n", driver: driver)
                for (command, flags) in commands {
                    let r = Request()
                    r.header = RequestHeader(flags: flags, type: command.rawValue, cookie: 1, offset: 0, length: 4096)
                    r.buffer = pool.take(Request.headroom + 4096)
                    r.data.initializeMemory(as: UInt8.self, repeating: 0x11)
                    if async {
                        let io = BlockIO(loop: nil) { _ in }
                        let (handled, started) = Executor.submit(r, node: node, root: nil, io: io, writethrough: writethrough)
                        #expect(handled && started && r.errno == 0)
                        driver.completeAll()
                    } else {
                        let done = Executor.perform(r, node: node, root: nil, contexts: [], structured: true, noWait: false,
                                                    writethrough: writethrough)
                        #expect(done && r.errno == 0)
                    }
                    pool.give(r.buffer)
                }
                #expect(node.inFlightCount == 0)
                outcomes.append(driver.seen.withLock { $0 })
            }
            let fua = writethrough ? "+fua" : ""
            #expect(outcomes[0] == ["write\(fua)", "write-zeroes\(fua)+unmap", "discard+unmap", "read", "write-zeroes+fua+unmap"],
                    "writethrough=\(writethrough)")
            #expect(outcomes[1] == outcomes[0], "the synchronous path decides the same flags")
        }
    }
}
