import BlockCore
import BlockGraph
import BlockJobs
import Synchronization
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// An in-memory protocol node for job tests.
final class MemDisk: BlockDriver {
    let driverName = "file"
    let role = DriverRole.protocol
    let length: UInt64
    let isReadOnly = false
    let data: Mutex<[UInt8]>

    init(length: UInt64, fill: UInt8 = 0) {
        self.length = length
        data = Mutex([UInt8](repeating: fill, count: Int(length)))
    }

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        data.withLock { d in d.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) } }
    }
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        data.withLock { d in d.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count]).copyMemory(from: buffer) } }
    }
    func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        data.withLock { d in for i in Int(offset)..<Int(offset + length) { d[i] = 0 } }
    }
    func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {}
    func flush() throws(BlockError) {}
    func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        BlockStatus(length: length, flags: [.data, .allocated])
    }
    func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver { self }
    var bytes: [UInt8] { data.withLock { $0 } }
}

/// blockdev-mirror's job on in-memory nodes (the QMP side and real images are in
/// `InteropTests/MirrorTests`): the shared converging copy with several steps in flight
/// while a client writes through an export-like root, and the switch at `job-complete`.
@Suite struct MirrorJobTests {
    static let size: UInt64 = 16 << 20

    /// A client writing through the root from before the job until after the switch: every
    /// write lands (a write that raced with the switch is retried on the target), the root
    /// ends on the target, and the target holds exactly what the client wrote.
    @Test(arguments: [MirrorCopyMode.background, .writeBlocking])
    func clientWritesSurviveTheSwitch(mode: MirrorCopyMode) throws {
        let graph = BlockGraph()
        let src = BlockNode(name: "src", driver: MemDisk(length: Self.size, fill: 3))
        let dst = BlockNode(name: "dst", driver: MemDisk(length: Self.size, fill: 9))
        try graph.register(src)
        try graph.register(dst)
        let root = BlockRoot(name: "root", kind: .backend(name: "e"), node: src,
                             permissions: PermissionPair(perm: [.consistentRead, .write],
                                                         shared: [.consistentRead, .write, .writeUnchanged]))
        try graph.attach([root])
        var options = MirrorOptions()
        options.copyMode = mode
        options.granularity = 65536
        let job = try MirrorJob(source: src, target: dst, options: options, graph: graph, id: "m")
        #expect(dst.granted.contains(.write))

        // The client: 4 KiB writes at pseudo-random offsets, its own record of the disk.
        let model = Mutex([UInt8](repeating: 3, count: Int(Self.size)))
        let stop = Atomic<Bool>(false)
        let failures = Mutex<[String]>([])
        let writes = Atomic<Int>(0)
        let client = TestThread {
            var seed: UInt64 = 0x9E3779B97F4A7C15
            let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            defer { block.deallocate() }
            var n: UInt8 = 0
            while !stop.load(ordering: .relaxed) {
                seed = seed &* 6364136223846793005 &+ 1442695040888963407
                let offset = (seed >> 33) % (Self.size / 4096) * 4096
                n &+= 1
                block.initializeMemory(as: UInt8.self, repeating: n)
                while true {
                    do throws(BlockError) {
                        try root.node.write(at: offset, from: UnsafeRawBufferPointer(block), via: root)
                        break
                    } catch {
                        if error.errno == ESTALE { continue }       // switched: again on the new node
                        failures.withLock { $0.append(error.message) }
                        return
                    }
                }
                model.withLock { m in for i in 0..<4096 { m[Int(offset) + i] = n } }
                writes.wrappingAdd(1, ordering: .relaxed)
            }
        }
        #expect(waitUntil { writes.load(ordering: .relaxed) > 20 })
        let host = RecordingHost()
        let running = try JobRegistry().start(id: "m", body: job, host: host)
        #expect(host.waitFor("BLOCK_JOB_READY", seconds: 30))
        let atReady = writes.load(ordering: .relaxed)
        #expect(waitUntil { writes.load(ordering: .relaxed) > atReady + 20 }, "the client writes while READY")
        try running.complete()
        running.join()
        #expect(host.waitFor("null"))
        let atSwitch = writes.load(ordering: .relaxed)
        #expect(waitUntil { writes.load(ordering: .relaxed) > atSwitch + 20 }, "the client writes after the switch")
        stop.store(true, ordering: .relaxed)
        client.join()
        #expect(failures.withLock { $0 } == [])
        #expect(host.list.contains("BLOCK_JOB_COMPLETED"))
        #expect(root.node === dst)
        let expected = model.withLock { $0 }
        #expect((dst.driver as! MemDisk).bytes == expected, "the target is not what the client wrote")
        // The job let go of both nodes: the source can be written by a new user, the target
        // is only the root's.
        #expect(graph.jobRoots(on: src).isEmpty && graph.jobRoots(on: dst).isEmpty)
        #expect(!src.hasMirror)
    }
}
