import EventLoop
import Glibc
import NBDServer
import Synchronization
import Testing

/// A stopping server removes its unix socket file, but not one another server has made at the
/// same path since: scripts (QEMU's iotests among them) kill one server and start the next on
/// the same path at once, and the first one's exit must not take the new socket away.
@Suite struct ListenerSocketFileTests {
    static func tempPath() -> String {
        var template = Array("/tmp/listener-test-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        #expect(made != nil)
        return String(cString: template) + "/nbd.sock"
    }

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    @Test func stopRemovesItsSocketFile() throws {
        let group = EventLoopGroup(count: 1, name: "listener-test")
        defer { group.shutdown() }
        let workers = WorkerPool(threads: 1)
        defer { workers.shutdown() }
        let path = Self.tempPath()
        defer {
            unlink(path)
            rmdir(String(path.dropLast("/nbd.sock".count)))
        }
        let server = NBDServer(loops: group, workers: workers)
        try server.listen(on: .unix(path: path))
        #expect(Self.exists(path))
        server.shutdown()
        group.loops[0].waitForQueuedTasks()
        #expect(!Self.exists(path))
    }

    @Test func stopLeavesANewServersSocketFile() throws {
        let group = EventLoopGroup(count: 1, name: "listener-test")
        defer { group.shutdown() }
        let workers = WorkerPool(threads: 1)
        defer { workers.shutdown() }
        let path = Self.tempPath()
        defer {
            unlink(path)
            rmdir(String(path.dropLast("/nbd.sock".count)))
        }
        let old = NBDServer(loops: group, workers: workers)
        try old.listen(on: .unix(path: path))
        // The next server replaces the socket file while the old one still runs.
        let newFD = try Sockets.listenUnix(path: path)
        defer { close(newFD) }
        old.shutdown()
        group.loops[0].waitForQueuedTasks()
        #expect(Self.exists(path))
        // And it is the new server's: a client reaches it.
        let client = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(client) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(client, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        #expect(rc == 0, "connect: \(String(cString: strerror(errno)))")
    }
}
