#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Hostile and careless clients against blockd's bounded resources (docs/architecture.md,
/// "Bounded resources"): floods that never read their replies, handshakes that never finish,
/// more clients than max-connections, running out of file descriptors, a stderr nobody reads.
/// Each checks what the daemon spends, and that another client is served meanwhile.
@Suite(.serialized) struct NBDResourceTests {
    /// RSS growth allowed during a flood (the per-connection budget is 32 MiB).
    static let maxGrowthKiB = 64 * 1024
    /// Slowest acceptable connect + handshake + 4 KiB read for a second client during a
    /// flood (it takes about a millisecond; the margin is for a loaded CI machine; before
    /// the budget it took 9.5 s).
    static let maxProbeSeconds = 0.5

    static func serve(_ dir: TempDir, size: Int = 256 << 20, verbose: Bool = false) throws -> Blockd {
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: size)
        try Files.write(image, bytes: Files.pattern(count: 1 << 20, seed: 1), offset: 0)
        return try Blockd.serve(image: image, in: dir, extra: verbose ? ["-v"] : [])
    }

    /// qemu-storage-daemon-style command line with `server` appended to --nbd-server; `-v` for
    /// the per-client lines the tests wait for.
    static func serveWithOptions(_ dir: TempDir, server: String) throws -> Blockd {
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 64 << 20)
        let socket = dir.file("nbd.sock")
        return try Blockd(["-v", "--blockdev", "driver=file,node-name=f0,filename=\(image)",
                           "--nbd-server", "addr.type=unix,addr.path=\(socket)\(server)",
                           "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"],
                          in: dir, waitForSocket: socket, exportName: "disk")
    }

    static func readRequests(count: Int, length: UInt32, spread: UInt64 = 0) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count * 28)
        for i in 0..<count {
            let offset = spread == 0 ? 0 : UInt64(i) % spread * UInt64(length)
            out += RawNBDClient.be(UInt32(0x2560_9513)) + RawNBDClient.be(UInt16(0)) + RawNBDClient.be(UInt16(0))
                + RawNBDClient.be(UInt64(i + 1)) + RawNBDClient.be(offset) + RawNBDClient.be(length)
        }
        return out
    }

    @Test func floodOfLargeReadsNeverReadBackStaysBounded() throws {
        let dir = try TempDir(prefix: "flood-large")
        let d = try Self.serve(dir)
        _ = try RawNBDClient.probe(unixPath: d.socket!, export: "disk")
        let before = Proc.rssKiB(d.pid)
        let flood = try RawNBDClient(unixPath: d.socket!)
        try flood.connect(export: "disk")
        // 4,000 pipelined 1 MiB reads (4 GiB of replies), none ever read.
        let batch = Self.readRequests(count: 4000, length: 1 << 20, spread: 200)
        _ = flood.sendUntilStalled(batch, stall: 1)
        let peak = Proc.peakAfterSettling { Proc.rssKiB(d.pid) }
        var worst = 0.0
        for _ in 0..<3 { worst = max(worst, try RawNBDClient.probe(unixPath: d.socket!, export: "disk")) }
        let final = Proc.rssKiB(d.pid)
        #expect(peak - before < Self.maxGrowthKiB, "RSS grew \(peak - before) KiB (from \(before) KiB)")
        #expect(final - before < Self.maxGrowthKiB)
        #expect(worst < Self.maxProbeSeconds, "a second client waited \(worst) s")
        // The flooder is served as it reads: its first replies arrive, in full.
        let head = try flood.receiveSimpleReply(dataLength: 1 << 20)
        #expect(head?.error == 0)
        #expect(d.isRunning)
        #expect(d.stop() == 0)
    }

    @Test func floodOfZeroLengthReadsNeverReadBackStaysBoundedAndIsAnswered() throws {
        let dir = try TempDir(prefix: "flood-zero")
        let d = try Self.serve(dir)
        _ = try RawNBDClient.probe(unixPath: d.socket!, export: "disk")
        let before = Proc.rssKiB(d.pid)
        let flood = try RawNBDClient(unixPath: d.socket!)
        try flood.connect(export: "disk")
        let count = 200_000
        let batch = Self.readRequests(count: count, length: 0)
        var sent = flood.sendUntilStalled(batch, stall: 1)
        #expect(sent < batch.count, "the server stopped reading a client that does not read its replies")
        let peak = Proc.peakAfterSettling { Proc.rssKiB(d.pid) }
        var worst = 0.0
        for _ in 0..<3 { worst = max(worst, try RawNBDClient.probe(unixPath: d.socket!, export: "disk")) }
        #expect(peak - before < Self.maxGrowthKiB, "RSS grew \(peak - before) KiB (from \(before) KiB)")
        #expect(worst < Self.maxProbeSeconds, "a second client waited \(worst) s")

        // Now read: the server resumes, and every request gets exactly one reply.
        flood.setNonBlocking(true)
        var seen = [Bool](repeating: false, count: count + 1)
        var replies = 0
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        let deadline = Subprocess.now() + 60
        while replies < count && Subprocess.now() < deadline {
            if sent < batch.count {
                let n = batch.withUnsafeBytes { Glibc.send(flood.fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
                if n > 0 { sent += n }
            }
            let n = buffer.withUnsafeMutableBytes { recv(flood.fd, $0.baseAddress!, $0.count, 0) }
            if n == 0 { break }
            if n < 0 {
                var p = pollfd(fd: flood.fd, events: Int16(POLLIN | (sent < batch.count ? POLLOUT : 0)), revents: 0)
                _ = poll(&p, 1, 50)
                continue
            }
            pending += buffer[0..<n]
            var at = 0
            while pending.count - at >= 16 {
                #expect(RawNBDClient.load(pending, at, UInt32.self) == 0x6744_6698)
                #expect(RawNBDClient.load(pending, at + 4, UInt32.self) == 0)
                let cookie = Int(RawNBDClient.load(pending, at + 8, UInt64.self))
                if cookie >= 1 && cookie <= count && !seen[cookie] { seen[cookie] = true; replies += 1 } else {
                    Issue.record("unexpected or repeated cookie \(cookie)")
                    return
                }
                at += 16
            }
            pending.removeFirst(at)
        }
        #expect(replies == count)
        #expect(d.stop() == 0)
    }

    @Test func unfinishedHandshakesAreClosedAfterHandshakeMaxSeconds() throws {
        let dir = try TempDir(prefix: "handshake-timeout")
        let d = try Self.serveWithOptions(dir, server: ",handshake-max-seconds=1")
        // A client that finished the handshake and then idles stays.
        let idle = try RawNBDClient(unixPath: d.socket!)
        try idle.connect(export: "disk")
        let before = Proc.rssKiB(d.pid)
        // A silent one: greeted, then says nothing; and a hundred more like it.
        let silent = try RawNBDClient(unixPath: d.socket!)
        let start = Subprocess.now()
        #expect(try silent.receive(18) != nil)
        var crowd: [RawNBDClient] = []
        for _ in 0..<100 { crowd.append(try RawNBDClient(unixPath: d.socket!)) }
        #expect(try RawNBDClient.probe(unixPath: d.socket!, export: "disk") < Self.maxProbeSeconds)
        #expect(Proc.rssKiB(d.pid) - before < Self.maxGrowthKiB)
        // A trickling one: one byte every 200 ms, never a whole handshake in time.
        let trickle = try RawNBDClient(unixPath: d.socket!)
        #expect(try trickle.receive(18) != nil)
        let script = RawNBDClient.be(UInt32(3)) + RawNBDClient.be(UInt64(0x4948_4156_454f_5054)) + RawNBDClient.be(UInt32(3))
            + RawNBDClient.be(UInt32(0))
        var trickleClosedAt: Double?
        for byte in script {
            var p = pollfd(fd: trickle.fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 200) > 0 {
                var b: UInt8 = 0
                if recv(trickle.fd, &b, 1, 0) <= 0 { trickleClosedAt = Subprocess.now(); break }
            }
            if Glibc.send(trickle.fd, [byte], 1, Int32(MSG_NOSIGNAL)) < 0 { trickleClosedAt = Subprocess.now(); break }
        }
        if trickleClosedAt == nil, trickle.waitForClose() { trickleClosedAt = Subprocess.now() }
        #expect(silent.waitForClose())
        let silentClosedAt = Subprocess.now()
        #expect(silentClosedAt - start >= 0.9 && silentClosedAt - start < 5, "closed after \(silentClosedAt - start) s")
        #expect(trickleClosedAt.map { $0 - start >= 0.9 && $0 - start < 5 } == true, "trickler closed at \(String(describing: trickleClosedAt))")
        #expect(d.waitForLog("handshake not finished within 1 s") != nil, "\(d.stderrText)")
        for c in crowd { #expect(c.waitForClose()) }
        // The idle client has been idle longer than the limit: still served.
        #expect(try idle.read(offset: 0, length: 4096).error == 0)
        #expect(try RawNBDClient.probe(unixPath: d.socket!, export: "disk") < Self.maxProbeSeconds)
        try idle.disconnect()
        #expect(d.stop() == 0)
    }

    @Test(.requires("python3")) func nbdServerStartTakesHandshakeMaxSecondsAndMaxConnections() throws {
        let dir = try TempDir(prefix: "qmp-nbd-start")
        let qmp = dir.file("qmp.sock")
        let sock = dir.file("nbd.sock")
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 16 << 20)
        let d = try Blockd(["-v", "--chardev", "socket,id=mon0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=mon0"],
                           in: dir, waitForSocket: qmp)
        // Plain JSON over the socket: no client library needed.
        let script = """
        import json, socket, sys
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
        json.loads(f.readline())
        def cmd(name, **args):
            f.write(json.dumps({"execute": name, "arguments": args}) + "\\n"); f.flush()
            while True:
                r = json.loads(f.readline())
                if "event" not in r: return r
        print(json.dumps(cmd("qmp_capabilities")))
        print(json.dumps(cmd("nbd-server-start", addr={"type": "unix", "path": sys.argv[2]},
                             **{"handshake-max-seconds": 1, "max-connections": 2})))
        print(json.dumps(cmd("blockdev-add", driver="file", **{"node-name": "f0", "filename": sys.argv[3]})))
        print(json.dumps(cmd("block-export-add", type="nbd", id="e0", **{"node-name": "f0", "writable": True})))
        print(json.dumps(cmd("nbd-server-start", addr={"type": "unix", "path": sys.argv[2]}, **{"handshake-max-seconds": -1})))
        """
        let r = try Run.expectSuccess(["python3", "-c", script, qmp, sock, image])
        let lines = r.stdout.split(separator: "\n")
        #expect(lines.count == 5 && lines.prefix(4).allSatisfy { $0.contains("\"return\"") }, "\(r.stdout)")
        #expect(lines.last?.contains("Parameter 'handshake-max-seconds' expects uint32_t") == true)
        let silent = try RawNBDClient(unixPath: sock)
        #expect(try silent.receive(18) != nil)
        #expect(silent.waitForClose())
        #expect(d.waitForLog("handshake not finished within 1 s") != nil, "\(d.stderrText)")
        let c = try RawNBDClient(unixPath: sock)
        try c.connect(export: "f0")
        #expect(c.transmissionFlags & (1 << 8) != 0, "multi-conn with max-connections=2")
        #expect(d.stop() == 0)
    }

    @Test func atMaxConnectionsNewClientsWaitAndAreGreetedWhenASlotFrees() throws {
        let dir = try TempDir(prefix: "max-conn")
        let d = try Self.serveWithOptions(dir, server: ",max-connections=1")
        let first = try RawNBDClient(unixPath: d.socket!)
        try first.connect(export: "disk")
        // A writable export on a one-connection server does not advertise multi-conn (QEMU).
        #expect(first.transmissionFlags & (1 << 8) == 0)
        #expect(first.transmissionFlags & 2 == 0, "writable")
        // The next clients are queued, not greeted and not closed, and cost the daemon nothing.
        let before = Proc.rssKiB(d.pid)
        let waiting = try RawNBDClient(unixPath: d.socket!, timeout: 0.5)
        var queued: [RawNBDClient] = []
        for _ in 0..<50 { queued.append(try RawNBDClient(unixPath: d.socket!, timeout: 5)) }
        #expect(Proc.rssKiB(d.pid) - before < 4 * 1024)
        var byte: UInt8 = 0
        let n = recv(waiting.fd, &byte, 1, 0)
        #expect(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "no greeting (and no close) while the slot is taken")
        #expect(try first.read(offset: 0, length: 4096).error == 0)
        // The slot frees: the waiting client is greeted and served.
        try first.disconnect()
        #expect(first.waitForClose())
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(waiting.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        try waiting.connect(export: "disk")
        #expect(try waiting.read(offset: 0, length: 4096).error == 0)
        try waiting.disconnect()
        #expect(waiting.waitForClose())
        // Each queued client gets its turn as the one before leaves.
        for c in queued {
            try c.connect(export: "disk")
            #expect(try c.read(offset: 0, length: 512).error == 0)
            try c.disconnect()
            #expect(c.waitForClose())
        }
        #expect(d.logLines(containing: "refusing").isEmpty)
        #expect(d.stop() == 0)
    }

    @Test(.requires("prlimit")) func runningOutOfFileDescriptorsBacksOffInsteadOfSpinning() throws {
        let dir = try TempDir(prefix: "emfile")
        let d = try Self.serve(dir, size: 16 << 20)
        _ = try RawNBDClient.probe(unixPath: d.socket!, export: "disk")
        // Leave room for three more descriptors only.
        let limit = Proc.openFDs(d.pid) + 3
        try Run.expectSuccess(["prlimit", "--pid", "\(d.pid)", "--nofile=\(limit):"])
        var clients: [RawNBDClient] = []
        for _ in 0..<8 { clients.append(try RawNBDClient(unixPath: d.socket!, timeout: 0.5)) }
        #expect(d.waitForLog("Too many open files") != nil, "\(d.stderrText)")
        // While accept keeps failing, the loop sleeps: barely any CPU over a second.
        let cpu0 = Proc.cpuTicks(d.pid)
        usleep(1_000_000)
        let ticks = Proc.cpuTicks(d.pid) - cpu0
        #expect(ticks < 30, "\(ticks) ticks of CPU in 1 s while out of descriptors (a spin burns ~100)")
        // Descriptors free up: every waiting client is greeted.
        try Run.expectSuccess(["prlimit", "--pid", "\(d.pid)", "--nofile=1024:"])
        for c in clients {
            var tv = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            try c.connect(export: "disk")
            #expect(try c.read(offset: 0, length: 512).error == 0)
        }
        #expect(d.stop() == 0)
    }

    @Test func aFullStderrPipeDoesNotStallTheLoops() throws {
        let dir = try TempDir(prefix: "stderr-pipe")
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 16 << 20)
        let fifo = dir.file("stderr.fifo")
        #expect(mkfifo(fifo, 0o600) == 0)
        // Held open for reading and never read: once its 64 KiB fill up, writes would block.
        let reader = open(fifo, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        #expect(reader >= 0)
        defer { close(reader) }
        let socket = dir.file("nbd.sock")
        let pid = try Subprocess.spawn([try BuildProducts.blockd, "serve", image, "--socket", socket, "--name", "disk", "--loops", "1", "-v"],
                                       stdoutPath: dir.file("stdout"), stderrPath: fifo)
        defer { kill(pid, SIGKILL); _ = Subprocess.wait(pid, timeout: 10) }
        let ready = Subprocess.now() + 10
        while !Blockd.canConnect(unixPath: socket) && Subprocess.now() < ready { usleep(5_000) }
        // Hundreds of clients with bad handshakes: each is logged once with -v (over 64 KiB in all).
        for i in 0..<800 {
            let bad = try RawNBDClient(unixPath: socket)
            _ = try bad.receive(18)
            try bad.send(Array("GET /\(i) HTTP/1.1 with a long line so the log fills faster\r\n\r\n".utf8))
            _ = bad.waitForClose()
        }
        // The log writer thread fills the pipe asynchronously: wait until it is full, that is
        // until a thread is blocked writing to stderr. (How many bytes the pipe then holds
        // varies: a write of up to 4 KiB that does not fit the last page's rest waits for a
        // free page, so pages can end partly empty.)
        var pipeBytes: Int32 = 0
        let full = waitUntil(timeout: 10) {
            _ = ioctl(reader, UInt(FIONREAD), &pipeBytes)
            return pipeBytes >= 32 * 1024 && Proc.threadBlockedWriting(pid, fd: 2)
        }
        #expect(full, "the pipe is full (\(pipeBytes) bytes, a thread blocked writing to it: \(Proc.threadBlockedWriting(pid, fd: 2)))")
        // The event loop still serves clients promptly.
        var worst = 0.0
        for _ in 0..<5 { worst = max(worst, try RawNBDClient.probe(unixPath: socket, export: "disk")) }
        #expect(worst < Self.maxProbeSeconds, "a client waited \(worst) s with stderr full")
    }

    @Test func oneBadClientCannotFloodTheLog() throws {
        let dir = try TempDir(prefix: "log-rate")
        let d = try Self.serve(dir, size: 16 << 20, verbose: true)
        let c = try RawNBDClient(unixPath: d.socket!)
        try c.connect(export: "disk")
        // 2,000 invalid requests (past the end), each answered EINVAL.
        var batch: [UInt8] = []
        for i in 0..<2000 {
            batch += RawNBDClient.be(UInt32(0x2560_9513)) + RawNBDClient.be(UInt16(0)) + RawNBDClient.be(UInt16(0))
                + RawNBDClient.be(UInt64(i)) + RawNBDClient.be(UInt64(1 << 40)) + RawNBDClient.be(UInt32(512))
        }
        try c.send(batch)
        for _ in 0..<2000 { #expect(try c.receiveSimpleReply()?.error == 22) }
        try c.disconnect()
        #expect(c.waitForClose())
        #expect(try RawNBDClient.probe(unixPath: d.socket!, export: "disk") < 2)
        // Stopping writes out every queued log line.
        #expect(d.stop() == 0)
        let lines = d.logLines(containing: "invalid read request")
        #expect(lines.count >= 1 && lines.count <= 20, "\(lines.count) log lines for one client")
    }
}
