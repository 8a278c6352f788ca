#if canImport(Glibc)
import Glibc
#endif
import JSON
@testable import QMP
import Synchronization
import Testing

/// Bounds on QMP clients: a monitor serves at most `maxClientsPerMonitor` clients, and a
/// thread the system refuses becomes an error for that client (or the caller), never a crash.
@Suite(.serialized) struct QMPLimitsTests {
    static func tempDir() -> String {
        var template = Array("/tmp/qmplimits-XXXXXX".utf8CString)
        _ = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        return String(cString: template)
    }

    /// Connects and returns the first line the server sends (or nil when it closes first).
    static func firstLine(_ path: String) throws -> (fd: Int32, line: String?) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw QMPError.generic("connect failed") }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var bytes: [UInt8] = []
        var b: UInt8 = 0
        while recv(fd, &b, 1, 0) == 1 {
            if b == UInt8(ascii: "\n") { return (fd, String(decoding: bytes, as: UTF8.self)) }
            bytes.append(b)
        }
        return (fd, bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self))
    }

    /// True when the server closes `fd` within its receive timeout.
    static func closes(_ fd: Int32) -> Bool {
        var b: UInt8 = 0
        while true {
            let n = recv(fd, &b, 1, 0)
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
    }

    @Test func extraClientIsRefusedClearlyAndAFreedSlotIsReused() throws {
        let dir = Self.tempDir()
        let path = dir + "/qmp.sock"
        let server = QMPServer(maxClientsPerMonitor: 3)
        try server.addMonitor(path: path)
        defer { server.stop(); rmdir(dir) }
        var clients: [QMPClient] = []
        for _ in 0..<3 { clients.append(try QMPClient(path: path)) }
        let (fd, line) = try Self.firstLine(path)
        defer { close(fd) }
        #expect(line?.contains("\"GenericError\"") == true)
        #expect(line?.contains("Too many QMP clients on monitor \(path) (at most 3)") == true, "\(line ?? "nil")")
        #expect(Self.closes(fd))
        // The others still work; when one leaves, a new client gets a greeting.
        #expect(try clients[0].execute("query-version")["qemu"]?["major"] == 7)
        clients.removeLast()
        let deadline = Self.monotonic() + 5
        var again: QMPClient?
        while again == nil && Self.monotonic() < deadline {
            again = try? QMPClient(path: path)
            if again == nil { usleep(10_000) }
        }
        #expect(try again?.execute("query-version")["qemu"]?["major"] == 7)
    }

    static func monotonic() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Starts real threads for the first `allowed` calls, then refuses.
    final class Budget: Sendable {
        let left: Mutex<Int>
        init(_ n: Int) { left = Mutex(n) }
        var spawner: QMPSystem.Spawner {
            { [self] body in
                let ok = left.withLock { n -> Bool in
                    if n == 0 { return false }
                    n -= 1
                    return true
                }
                return ok && QMPSystem.spawn(body)
            }
        }
    }

    @Test func aMonitorWithoutAThreadIsAnError() throws {
        let dir = Self.tempDir()
        let path = dir + "/qmp.sock"
        let server = QMPServer(spawn: Budget(0).spawner)
        defer { server.stop(); rmdir(dir) }
        #expect(throws: QMPError.self) { try server.addMonitor(path: path) }
        #expect(access(path, F_OK) != 0, "no socket left behind")
        #expect(server.monitorPaths.isEmpty)
    }

    @Test func aClientWithoutAThreadGetsAnErrorAndTheServerGoesOn() throws {
        // Accept thread, then one session's writer, then nothing: the second session's reader
        // cannot start; the third client gets no thread at all.
        let dir = Self.tempDir()
        let path = dir + "/qmp.sock"
        let budget = Budget(2)
        let server = QMPServer(spawn: budget.spawner)
        try server.addMonitor(path: path)
        defer { server.stop(); rmdir(dir) }
        // Writer starts, reader does not: greeting, then the error, then close.
        let (fd1, greeting) = try Self.firstLine(path)
        defer { close(fd1) }
        #expect(greeting?.contains("\"QMP\"") == true)
        var rest: [UInt8] = []
        var b: UInt8 = 0
        while recv(fd1, &b, 1, 0) == 1 { rest.append(b) }
        #expect(String(decoding: rest, as: UTF8.self).contains("Could not start a thread for this QMP client"))
        // No thread at all: the error comes straight from the accept thread.
        let (fd2, line) = try Self.firstLine(path)
        defer { close(fd2) }
        #expect(line?.contains("Could not start a thread for this QMP client") == true, "\(line ?? "nil")")
        #expect(Self.closes(fd2))
        // Threads are available again: the server serves the next client.
        budget.left.withLock { $0 = 10 }
        let c = try QMPClient(path: path)
        #expect(try c.execute("query-version")["qemu"]?["major"] == 7)
    }

    /// A client that connects and leaves at once: its writer fails on the greeting and exits
    /// before the reader has even started. The socket must stay open until the reader is done
    /// too, or its descriptor number goes to the next client while the late reader still reads
    /// it (and closes it under that client). The spawner widens the window deterministically:
    /// it waits after starting a writer, and starts readers late.
    @Test func aClientThatLeavesAtOnceNeverTakesTheNextClientsSocket() throws {
        let dir = Self.tempDir()
        let path = dir + "/qmp.sock"
        let calls = Mutex(0)
        let spawner: QMPSystem.Spawner = { body in
            let n = calls.withLock { c -> Int in c += 1; return c }
            if n == 1 { return QMPSystem.spawn(body) }           // the accept loop
            if n % 2 == 0 {                                       // a writer: let it run (and fail) first
                let ok = QMPSystem.spawn(body)
                usleep(100_000)
                return ok
            }
            return QMPSystem.spawn { usleep(300_000); body() }    // a reader, late
        }
        let server = QMPServer(spawn: spawner)
        try server.addMonitor(path: path)
        defer { server.stop(); rmdir(dir) }
        // The first client is gone before its greeting is written.
        let (probe, _) = try Self.connectOnly(path)
        close(probe)
        // The next one gets the descriptor number the first one had, if it was closed early.
        let c = try QMPClient(path: path)
        for _ in 0..<5 {
            #expect(try c.execute("query-version")["qemu"]?["major"] == 7)
            usleep(100_000)
        }
    }

    static func connectOnly(_ path: String) throws -> (Int32, Void) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw QMPError.generic("connect failed") }
        return (fd, ())
    }
}
