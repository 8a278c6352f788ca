import BlockCore
import Synchronization
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// An in-memory data node with an optional backing child; unallocated bytes fall through.
final class MemoryDriver: BlockDriver, @unchecked Sendable {
    let driverName = "memory"
    let role = DriverRole.format
    let length: UInt64
    let isReadOnly = false
    private let state: Mutex<(data: [UInt8], allocated: [Bool])>
    let backingEdge: BlockChild?
    /// Sleeps this long inside each write (to widen races in tests).
    let writeDelayMicros: UInt32
    /// Each write waits here before it changes anything (tests hold requests in flight).
    let gate: Gate?

    init(length: UInt64, backing: BlockNode? = nil, writeDelayMicros: UInt32 = 0, gate: Gate? = nil) {
        self.length = length
        state = Mutex(([UInt8](repeating: 0, count: Int(length)), [Bool](repeating: false, count: Int(length))))
        backingEdge = backing.map { BlockChild(name: "backing", node: $0) }
        self.writeDelayMicros = writeDelayMicros
        self.gate = gate
    }

    var children: [BlockChild] { backingEdge.map { [$0] } ?? [] }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        let snapshot = state.withLock { s in (Array(s.data[Int(offset)..<Int(offset) + buffer.count]), Array(s.allocated[Int(offset)..<Int(offset) + buffer.count])) }
        for i in 0..<buffer.count {
            if snapshot.1[i] {
                buffer[i] = snapshot.0[i]
            } else if let b = backingEdge?.node {
                var one: UInt8 = 0
                try typed { try withUnsafeMutableBytes(of: &one) { p in try b.read(at: offset + UInt64(i), into: p) } }
                buffer[i] = one
            } else {
                buffer[i] = 0
            }
        }
    }

    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        if let gate, !gate.pass() { throw BlockError.io("test gate never opened") }
        if writeDelayMicros > 0 { usleep(writeDelayMicros) }
        state.withLock { s in
            for i in 0..<buffer.count {
                s.data[Int(offset) + i] = buffer[i]
                s.allocated[Int(offset) + i] = true
            }
        }
    }

    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        let zeros = [UInt8](repeating: 0, count: Int(length))
        try typed { try zeros.withUnsafeBytes { p in try write(at: offset, from: p, flags: flags) } }
    }

    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func flush() throws(BlockError) {}

    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        state.withLock { s in
            let first = s.allocated[Int(offset)]
            var n: UInt64 = 1
            while n < length && s.allocated[Int(offset + n)] == first { n += 1 }
            return BlockStatus(length: n, flags: first ? [.data, .allocated] : [])
        }
    }
}

/// A pass-through filter for chain tests.
final class PassFilter: FilterDriver, @unchecked Sendable {
    let driverName = "pass"
    let filtered: BlockChild
    init(_ node: BlockNode) { filtered = BlockChild(name: "file", node: node) }
}

func fill(_ node: BlockNode, _ offset: UInt64, _ length: Int, _ byte: UInt8) throws {
    let data = [UInt8](repeating: byte, count: length)
    try data.withUnsafeBytes { try node.write(at: offset, from: $0) }
}

/// Bytes as the driver holds them, bypassing the node (and its drained sections).
func driverBytes(_ driver: MemoryDriver, _ offset: UInt64, _ length: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: length)
    try out.withUnsafeMutableBytes { p in try driver.read(at: offset, into: p, flags: []) }
    return out
}

func readBytes(_ node: BlockNode, _ offset: UInt64, _ length: Int) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: length)
    try out.withUnsafeMutableBytes { try node.read(at: offset, into: $0) }
    return out
}

/// Runs an untyped-throwing body (stdlib `withUnsafe…` rethrows) as `throws(BlockError)`.
func typed<T>(_ body: () throws -> T) throws(BlockError) -> T {
    do { return try body() } catch let e as BlockError { throw e } catch { throw BlockError.io("\(error)") }
}
