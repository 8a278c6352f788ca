#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

/// A long-running command for one test: stdout and stderr go to files, it is killed when
/// released. `blockd` started through another name (the `qemu-nbd` symlink) or with
/// `--daemonize` needs this rather than `Blockd`.
final class Spawned: @unchecked Sendable {
    let pid: pid_t
    let stdoutPath: String
    let stderrPath: String
    private var status: Int32?

    init(_ arguments: [String], in dir: TempDir, environment: [String: String] = [:]) throws {
        let tag = "spawned-\(getpid())-\(Spawned.counter.next())"
        stdoutPath = dir.file("\(tag).stdout")
        stderrPath = dir.file("\(tag).stderr")
        pid = try Subprocess.spawn(arguments, stdoutPath: stdoutPath, stderrPath: stderrPath, environment: environment)
    }

    deinit {
        if status == nil {
            kill(pid, SIGKILL)
            _ = Subprocess.wait(pid, timeout: 10)
        }
    }

    var stdoutText: String { (try? Files.read(stdoutPath)) ?? "" }
    var stderrText: String { (try? Files.read(stderrPath)) ?? "" }

    /// Exit status once it has ended on its own (nil while it runs).
    func exited(within timeout: Double = 0) -> Int32? {
        if let status { return status }
        status = Subprocess.wait(pid, timeout: timeout)
        return status
    }

    /// SIGTERM and the exit status (-1 if it had to be killed).
    func stop(timeout: Double = 10) -> Int32 {
        if let status { return status }
        kill(pid, SIGTERM)
        if let s = Subprocess.wait(pid, timeout: timeout) { status = s; return s }
        kill(pid, SIGKILL)
        status = Subprocess.wait(pid, timeout: 10) ?? -1
        return -1
    }

    /// Waits until `path` is a listening socket, or fails if the command ends first. Looked
    /// up in /proc/net/unix rather than probed with a connection: with qemu-nbd's `-e 1` a
    /// probe would be the one client, and the next client could arrive before the server
    /// has seen the probe go.
    func waitForSocket(_ path: String, timeout: Double = 10) throws {
        let deadline = Subprocess.now() + timeout
        while !Spawned.isListening(path) {
            if let s = exited() { throw HarnessError("exited with \(s) before \(path) was ready:\n\(stderrText)") }
            if Subprocess.now() > deadline { throw HarnessError("\(path) not ready within \(timeout) s:\n\(stderrText)") }
            usleep(2_000)
        }
    }

    static let counter = Blockd.Counter()

    /// A unix socket bound to `path` is listening (`__SO_ACCEPTCON` in /proc/net/unix).
    static func isListening(_ path: String) -> Bool {
        guard let table = try? Files.read("/proc/net/unix") else { return Blockd.canConnect(unixPath: path) }
        for line in table.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 8, fields[7...].joined(separator: " ") == path else { continue }
            if let flags = Int(fields[3], radix: 16), flags & 0x10000 != 0 { return true }
        }
        return false
    }
}

/// Processes whose command line contains `marker` (a unique path), from /proc.
func processes(mentioning marker: String) -> [pid_t] {
    guard let dir = opendir("/proc") else { return [] }
    defer { closedir(dir) }
    var found: [pid_t] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        guard let pid = pid_t(name), pid != getpid() else { continue }
        guard let raw = try? Files.readBytes("/proc/\(name)/cmdline") else { continue }
        let cmdline = String(decoding: raw.map { $0 == 0 ? 32 : $0 }, as: UTF8.self)
        // A zombie has an empty cmdline; it is not running.
        if cmdline.contains(marker) { found.append(pid) }
    }
    return found
}

/// `qemu-nbd` scripts and tools pointed at blockd's front end: the same options, the same
/// output, the same lifetime rules (exit after the last client unless `-t`), and the interop
/// scenarios blockd's own tests run, driven through `qemu-nbd -t -f qcow2 …`.
@Suite struct QemuNBDFrontEndTests {
    static func qcow2(_ dir: TempDir, name: String = "disk.qcow2", size: String = "64M") throws -> String {
        let path = dir.file(name)
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", path, size])
        return path
    }

    @Test(.requires("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fio"))
    func clientsAgainstPersistentQcow2Server() throws {
        let dir = try TempDir(prefix: "qnbd")
        let image = try Self.qcow2(dir)
        try Run.expectSuccess(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", image])
        let socket = dir.file("nbd.sock")
        let server = try Spawned([try QemuNBDFrontEnd.path(), "-t", "-f", "qcow2", "-k", socket, "-x", "disk", image], in: dir)
        try server.waitForSocket(socket)
        let uri = "nbd+unix:///disk?socket=\(socket)"

        let info = try Run.expectSuccess(["nbdinfo", "--json", uri])
        #expect(info.stdout.contains("\"export-size\": 67108864"), "\(info)")
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 2M", "-c", "write -P 0xa5 8M 1M",
                               "-c", "read -P 0xa5 8M 1M", uri])
        try Run.expectSuccess(["fio", "--ioengine=nbd", "--uri=\(uri)", "--rw=randrw", "--bs=4k", "--iodepth=8",
                               "--size=8M", "--offset=16M", "--name=job", "--verify=crc32c", "--output-format=terse"],
                              timeout: 120)
        let copy = dir.file("copy.raw")
        try Run.expectSuccess(["nbdcopy", uri, copy])
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, copy])
        try Run.expectSuccess(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, dir.file("copy.qcow2")])
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, dir.file("copy.qcow2")])
        // Everything clients did survived, and a session printed nothing.
        #expect(server.stop() == 0)
        #expect(!Files.exists(socket))
        try Run.expectSuccess(["qemu-img", "check", image])
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", copy, image])
        #expect(server.stdoutText.isEmpty && server.stderrText.isEmpty, "stdout: \(server.stdoutText)\nstderr: \(server.stderrText)")
    }

    /// Without -t, qemu-nbd ends after its last client that got as far as transmission;
    /// listing exports (no transmission) does not count.
    @Test(.requires("qemu-img", "nbdinfo"))
    func exitsAfterTheLastClientWithoutPersistent() throws {
        let dir = try TempDir(prefix: "qnbd-last")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 4 << 20)
        let socket = dir.file("nbd.sock")
        let server = try Spawned([try QemuNBDFrontEnd.path(), "-f", "raw", "-k", socket, image], in: dir)
        try server.waitForSocket(socket)
        let list = try Run.expectSuccess(["nbdinfo", "--list", "nbd+unix:///?socket=\(socket)"])
        #expect(list.stdout.contains("export=\"\""), "\(list)")
        // Still serving after the listing: this client gets its export.
        try Run.expectSuccess(["nbdinfo", "--size", "nbd+unix:///?socket=\(socket)"])
        #expect(server.exited(within: 10) == 0, "\(server.stderrText)")
        #expect(!Files.exists(socket))
        #expect(server.stdoutText.isEmpty && server.stderrText.isEmpty)
    }

    /// Without `-f`, an image probed as raw is served as qemu-nbd serves it: QEMU's warning,
    /// a minimum block size of 512, and every write that would leave block 0 looking like
    /// another image format (whole or partial, qcow2, vmdk, vpc, qed, vhdx, luks, vdi) refused
    /// with EPERM, other writes done. The same script against qemu-nbd gives the same lines.
    /// With `-f raw`: no restriction, minimum 1; with `-r`: no warning.
    @Test(.requires("qemu-nbd", "qemu-img", "qemu-io"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func probedRawRestrictsBlockZeroAsQemuNBD() throws {
        let dir = try TempDir(prefix: "qnbd-probed")
        let script = """
            import nbd, sys
            h = nbd.NBD(); h.set_strict_mode(0); h.connect_uri(sys.argv[1])
            print("min", h.get_block_size(nbd.SIZE_MINIMUM))
            q3 = b"QFI\\xfb\\x00\\x00\\x00\\x03"
            for name, data, off in [
                    ("qcow2 sector", q3 + bytes(504), 0), ("qcow2 first 8 bytes", q3, 0),
                    ("magic without version", b"QFI\\xfb" + bytes(508), 0), ("data", b"x" * 512, 0),
                    ("data 5 bytes at 3", b"hello", 3), ("qcow2 at 4096", q3 + bytes(504), 4096),
                    ("vmdk", b"KDMV\\x01\\x00\\x00\\x00" + bytes(504), 0), ("vpc", b"conectix" + bytes(504), 0),
                    ("qed", b"QED\\0" + bytes(508), 0), ("vhdx", b"vhdxfile" + bytes(504), 0),
                    ("luks", b"LUKS\\xba\\xbe\\x00\\x01" + bytes(504), 0), ("vdi", bytes(64) + b"\\x7f\\x10\\xda\\xbe" + bytes(444), 0),
                    ("vmdk descriptor", b"# Disk DescriptorFile\\nversion=1\\n" + bytes(480), 0),
                    ("qcow2 over two sectors", q3 + bytes(1016), 0)]:
                try:
                    h.pwrite(data, off); print(name, "written")
                except nbd.Error as e:
                    print(name, "refused", e.errno)
            print("block 0 starts", bytes(h.pread(8, 0)))
            h.shutdown()
            """
        func run(_ program: [String], _ args: [String]) throws -> (output: String, stderr: String) {
            let image = dir.file("p\(Spawned.counter.next()).raw")
            try Files.createSparse(image, size: 1 << 20)
            let socket = image + ".sock"
            let server = try Spawned(program + ["-t", "-k", socket] + args + [image], in: dir)
            try server.waitForSocket(socket)
            let r = try Run.command(["/usr/bin/python3", "-c", script, "nbd+unix:///?socket=\(socket)"], timeout: 60)
            #expect(r.status == 0, "\(r)")
            _ = server.stop()
            return (r.stdout, server.stderrText.replacingOccurrences(of: image, with: "IMAGE"))
        }
        let ours = try QemuNBDFrontEnd.path()
        for args in [[], ["-f", "raw"]] {
            let q = try run(["qemu-nbd"], args), b = try run([ours], args)
            #expect(b.output == q.output, "\(args): blockd\n\(b.output)\nqemu-nbd\n\(q.output)")
            // qemu-nbd sometimes adds "write failed: … Broken pipe" when a client leaves (a race
            // in its disconnect path); the warning is what must match.
            let qemuWarning = q.stderr.split(separator: "\n", omittingEmptySubsequences: false)
                .filter { !$0.hasPrefix("qemu-nbd: write failed:") }.joined(separator: "\n")
            #expect(b.stderr == qemuWarning, "\(args): blockd\n\(b.stderr)\nqemu-nbd\n\(q.stderr)")
        }
        // The probed case refused what the others wrote, and warned; -r does not warn.
        let probed = try run([ours], [])
        #expect(probed.output.contains("min 512\n") && probed.output.contains("qcow2 sector refused EPERM\n")
                && probed.output.contains("data written\n"), "\(probed.output)")
        #expect(probed.stderr.hasPrefix("WARNING: Image format was not specified for 'IMAGE' and probing guessed raw."))
        let explicit = try run([ours], ["-f", "raw"])
        #expect(explicit.output.contains("min 1\n") && explicit.output.contains("qcow2 sector written\n"), "\(explicit.output)")
        #expect(try run([ours], ["-r"]).stderr.isEmpty)

        // A length that is not whole sectors: QEMU counts lengths in sectors, so both export
        // a 1000-byte file as 1024 bytes, the tail a hole; probed, in whole-sector extents
        // (iotests 241). Listing, map and the tail's bytes are the same against either server.
        let odd = dir.file("odd.raw")
        try Data(repeating: 0x30, count: 1000).write(to: URL(fileURLWithPath: odd))
        func view(_ program: String, _ args: [String]) throws -> String {
            let socket = dir.file("odd\(Spawned.counter.next()).sock")
            let server = try Spawned([program, "-t", "-k", socket] + args + [odd], in: dir)
            try server.waitForSocket(socket)
            let list = try Run.expectSuccess(["qemu-nbd", "--list", "-k", socket])
            let map = try Run.expectSuccess(["qemu-img", "map", "--output=json", "-f", "raw", "nbd:unix:\(socket)"])
            let read = try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "read -P 0 1000 24", "nbd:unix:\(socket)"])
            _ = server.stop()
            return list.stdout + map.stdout + (read.stdout.contains("read 24/24 bytes") ? "tail zero\n" : read.stdout)
        }
        for args in [[], ["-f", "raw"]] {
            let q = try view("qemu-nbd", args), b = try view(ours, args)
            #expect(b == q, "\(args): blockd\n\(b)\nqemu-nbd\n\(q)")
            #expect(b.contains("  size:  1024\n") && b.contains("tail zero\n"), "\(b)")
        }
        #expect(try view(ours, []).contains("  min block: 512\n"))
    }

    /// Block sizes as qemu-nbd negotiates them (libnbd's interop-qemu-block-size.sh): a probed
    /// raw image needs 512-byte requests, so NBD_OPT_INFO without a block size request is
    /// refused and NBD_OPT_GO without one gets minimum 1; with `-f raw` it is 1 throughout.
    /// The same script against qemu-nbd gives the same lines.
    @Test(.requires("qemu-nbd"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func blockSizeNegotiationAsQemuNBD() throws {
        let dir = try TempDir(prefix: "qnbd-bs")
        let script = """
            import nbd, sys
            for request in (True, False):
                h = nbd.NBD(); h.set_opt_mode(True); h.set_request_block_size(request)
                h.connect_unix(sys.argv[1])
                sizes = lambda: [h.get_block_size(t) for t in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
                try:
                    h.opt_info(); print(request, "info", sizes())
                except nbd.Error as e:
                    print(request, "info refused", e.errno)
                h.opt_go(); print(request, "go", sizes())
                h.shutdown()
            """
        func run(_ program: String, _ args: [String]) throws -> String {
            let image = dir.file("b\(Spawned.counter.next()).raw")
            try Files.createSparse(image, size: 10 << 20)
            let socket = image + ".sock"
            let server = try Spawned([program, "-t", "-k", socket] + args + [image], in: dir)
            try server.waitForSocket(socket)
            let r = try Run.command(["/usr/bin/python3", "-c", script, socket], timeout: 60)
            #expect(r.status == 0, "\(r)")
            _ = server.stop()
            return r.stdout
        }
        guard let qemuNBD = Tools.path(of: "qemu-nbd") else { throw HarnessError("qemu-nbd is not installed") }
        let ours = try QemuNBDFrontEnd.path()
        for args in [[], ["-f", "raw"]] {
            let q = try run(qemuNBD, args), b = try run(ours, args)
            #expect(b == q, "\(args): blockd\n\(b)\nqemu-nbd\n\(q)")
        }
        #expect(try run(ours, []) == """
            True info [512, 4096, 33554432]
            True go [512, 4096, 33554432]
            False info refused EINVAL
            False go [1, 4096, 33554432]

            """)
    }

    /// Sparse reads come back in the chunks qemu-nbd sends where both know the zeroes: a
    /// qcow2 with 512-byte clusters and one zero cluster (libnbd's structured-read.sh), a
    /// 64 KiB-cluster qcow2 with an unallocated cluster between data, a raw file with a
    /// punched 4 KiB hole; DF gives one data chunk.
    @Test(.requires("qemu-nbd", "qemu-img", "qemu-io", "fallocate"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func sparseReadChunksAsQemuNBD() throws {
        let dir = try TempDir(prefix: "qnbd-sparse")
        let script = """
            import nbd, sys
            h = nbd.NBD(); h.connect_unix(sys.argv[1])
            for off, n in [(int(a), int(b)) for a, b in (x.split("+") for x in sys.argv[2:])]:
                for flags in (0, nbd.CMD_FLAG_DF):
                    chunks = []
                    def cb(buf, o, status, err):
                        chunks.append("%s %d+%d" % ({nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}.get(status, status), o, len(buf)))
                        return 0
                    h.pread_structured(n, off, cb, flags)
                    print(off, n, "df" if flags else "", chunks)
            h.shutdown()
            """
        let small = dir.file("small.qcow2"), big = dir.file("big.qcow2"), raw = dir.file("holes.raw")
        try Run.expectSuccess(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", small, "3k"])
        try Run.expectSuccess(["qemu-io", "-d", "unmap", "-f", "qcow2", "-c", "w -P 1 0 3k", "-c", "w -zu 2k 512", small])
        try Run.expectSuccess(["qemu-img", "create", "-f", "qcow2", big, "1M"])
        try Run.expectSuccess(["qemu-io", "-f", "qcow2", "-c", "w -P 1 0 64k", "-c", "w -P 2 128k 64k", big])
        try Run.expectSuccess(["qemu-img", "create", "-f", "raw", raw, "64k"])
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "w -P 3 0 64k", raw])
        try Run.expectSuccess(["fallocate", "-p", "-o", "8192", "-l", "4096", raw])
        let cases: [(image: String, format: String, reads: [String])] = [
            (small, "qcow2", ["2048+1024", "0+3072"]), (big, "qcow2", ["0+196608", "65536+4096"]),
            (raw, "raw", ["0+16384", "8192+4096"]),
        ]
        guard let qemuNBD = Tools.path(of: "qemu-nbd") else { throw HarnessError("qemu-nbd is not installed") }
        let ours = try QemuNBDFrontEnd.path()
        for c in cases {
            var outputs: [String] = []
            for program in [qemuNBD, ours] {
                let socket = dir.file("s\(Spawned.counter.next()).sock")
                let server = try Spawned([program, "-t", "-r", "-f", c.format, "-k", socket, c.image], in: dir)
                try server.waitForSocket(socket)
                let r = try Run.command(["/usr/bin/python3", "-c", script, socket] + c.reads, timeout: 60)
                #expect(r.status == 0, "\(r)")
                _ = server.stop()
                outputs.append(r.stdout)
            }
            #expect(outputs[1] == outputs[0], "\(c.image): blockd\n\(outputs[1])\nqemu-nbd\n\(outputs[0])")
        }
    }

    /// `-e 1` (the default): one client at a time, so no multi-conn; `-e 2`: multi-conn.
    @Test(.requires("nbdinfo"))
    func sharedDecidesMultiConn() throws {
        let dir = try TempDir(prefix: "qnbd-e")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 1 << 20)
        for (shared, multi) in [("1", "false"), ("2", "true"), ("0", "true")] {
            let socket = dir.file("nbd\(shared).sock")
            let server = try Spawned([try QemuNBDFrontEnd.path(), "-t", "-e", shared, "-f", "raw", "-k", socket, image], in: dir)
            try server.waitForSocket(socket)
            let r = try Run.expectSuccess(["nbdinfo", "nbd+unix:///?socket=\(socket)"])
            #expect(r.stdout.contains("can_multi_conn: \(multi)"), "-e \(shared): \(r.stdout)")
            #expect(server.stop() == 0)
        }
    }

    /// `-e 1`: a second client waits in the listen backlog (neither greeted nor closed) and is
    /// served once the first leaves, as qemu-nbd does; `--handshake-limit 1` closes a client
    /// that says nothing after the greeting.
    @Test func sharedQueuesClientsAndHandshakeLimitCloses() throws {
        let dir = try TempDir(prefix: "qnbd-queue")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 1 << 20)
        let socket = dir.file("nbd.sock")
        let server = try Spawned([try QemuNBDFrontEnd.path(), "-t", "-e", "1", "--handshake-limit", "1", "-f", "raw",
                                  "-k", socket, "-x", "disk", image], in: dir)
        try server.waitForSocket(socket)
        let first = try RawNBDClient(unixPath: socket)
        try first.connect(export: "disk")
        let second = try RawNBDClient(unixPath: socket, timeout: 0.5)
        var byte: UInt8 = 0
        let n = recv(second.fd, &byte, 1, 0)
        #expect(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "no greeting and no close while the one slot is taken")
        try first.disconnect()
        #expect(first.waitForClose())
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(second.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        try second.connect(export: "disk")
        #expect(try second.read(offset: 0, length: 4096).error == 0)
        try second.disconnect()
        #expect(second.waitForClose())
        // Greeted, then silent: closed after the limit.
        let silent = try RawNBDClient(unixPath: socket)
        let start = Subprocess.now()
        #expect(try silent.receive(18) != nil)
        #expect(silent.waitForClose())
        let elapsed = Subprocess.now() - start
        #expect(elapsed >= 0.9 && elapsed < 5, "closed after \(elapsed) s")
        #expect(server.stop() == 0)
        #expect(server.stderrText.isEmpty, "\(server.stderrText)")
    }

    /// `-L` prints what qemu-nbd prints, line for line, for blockd's server and for QEMU's.
    @Test(.requires("qemu-img", "qemu-nbd"))
    func listIsQemuNBDsListing() throws {
        let dir = try TempDir(prefix: "qnbd-list")
        let image = try Self.qcow2(dir)
        try Run.expectSuccess(["qemu-img", "bitmap", "--add", image, "b0"])
        let ours = try QemuNBDFrontEnd.path()
        guard let qemuNBD = Tools.path(of: "qemu-nbd") else { throw HarnessError("qemu-nbd is not installed") }
        // blockd's front end serving, listed by both.
        let socket = dir.file("ours.sock")
        let server = try Spawned([ours, "-t", "-r", "-f", "qcow2", "-k", socket, "-x", "disk", "-D", "a description",
                                  "-A", "-B", "b0", image], in: dir)
        try server.waitForSocket(socket)
        let theirs = try Run.expectSuccess([qemuNBD, "-L", "-k", socket])
        let mine = try Run.expectSuccess([ours, "-L", "-k", socket])
        #expect(mine.stdout == theirs.stdout)
        #expect(mine.stdout.contains(" export: 'disk'\n  description: a description\n"), "\(mine.stdout)")
        #expect(mine.stdout.contains("   qemu:allocation-depth\n   qemu:dirty-bitmap:b0\n"), "\(mine.stdout)")
        #expect(server.stop() == 0)

        // QEMU's qemu-nbd serving the same, listed by both: the same lines as blockd's server
        // (block sizes too: QEMU's preferred 4096, not the 64 KiB cluster size).
        let qsock = dir.file("qemu.sock")
        let qemu = try Spawned([qemuNBD, "-t", "-r", "-f", "qcow2", "-k", qsock, "-x", "disk", "-D", "a description",
                                "-A", "-B", "b0", image], in: dir)
        try qemu.waitForSocket(qsock)
        let a = try Run.expectSuccess([qemuNBD, "-L", "-k", qsock])
        let b = try Run.expectSuccess([ours, "-L", "-k", qsock])
        #expect(a.stdout == b.stdout)
        #expect(a.stdout == theirs.stdout, "qemu-nbd serving:\n\(a.stdout)\nblockd serving:\n\(theirs.stdout)")
        #expect(theirs.stdout.contains("  opt block: 4096\n"), "\(theirs.stdout)")
        #expect(qemu.stop() == 0)

        // blockd's own server advertises the cluster size as the preferred block size.
        let own = try Blockd(["serve", image, "--read-only", "--socket", dir.file("own.sock")], in: dir,
                             waitForSocket: dir.file("own.sock"))
        defer { _ = own.stop() }
        let ownList = try Run.expectSuccess([ours, "-L", "-k", dir.file("own.sock")])
        #expect(ownList.stdout.contains("  opt block: 65536\n"), "\(ownList.stdout)")

        // `blockd nbd -L` is the same client.
        let sub = try Run.command([try BuildProducts.blockd, "nbd", "-L", "-k", dir.file("absent.sock")])
        #expect(sub.status == 1)
        #expect(sub.stderr == "blockd: Failed to connect to '\(dir.file("absent.sock"))': No such file or directory\n", "\(sub)")
    }

    @Test(.requires("nbdinfo"))
    func forkReturnsOnceServingWithPidFile() throws {
        let dir = try TempDir(prefix: "qnbd-fork")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 2 << 20)
        let socket = dir.file("nbd.sock"), pidfile = dir.file("qemu-nbd.pid")
        let r = try Run.command([try QemuNBDFrontEnd.path(), "--fork", "--pid-file", pidfile, "-t", "-f", "raw", "-k", socket, image])
        #expect(r.status == 0 && r.stderr.isEmpty && r.stdout.isEmpty, "\(r)")
        // Ready when the parent returned: no waiting. (Not probed with a connection: with
        // `-e 1` that would be the one client.)
        #expect(Files.exists(socket))
        let pid = pid_t(try Files.read(pidfile).split(separator: "\n").first.map(String.init) ?? "") ?? 0
        #expect(pid > 0 && kill(pid, 0) == 0)
        try Run.expectSuccess(["nbdinfo", "--size", "nbd+unix:///?socket=\(socket)"])
        kill(pid, SIGTERM)
        let deadline = Subprocess.now() + 10
        while kill(pid, 0) == 0 && Subprocess.now() < deadline { usleep(5_000) }
        #expect(kill(pid, 0) != 0)
        #expect(!Files.exists(socket))
    }

    @Test func forkFailureLeavesNothingRunning() throws {
        let dir = try TempDir(prefix: "qnbd-forkfail")
        let missing = dir.file("missing.raw")
        let r = try Run.command([try QemuNBDFrontEnd.path(), "--fork", "-f", "raw", "-k", dir.file("nbd.sock"), missing])
        #expect(r.status == 1)
        #expect(r.stderr == "qemu-nbd: Failed to blk_new_open '\(missing)': Could not open '\(missing)': No such file or directory\n", "\(r)")
        #expect(processes(mentioning: missing).isEmpty)
        #expect(!Files.exists(dir.file("nbd.sock")))
    }

    /// Options for the kernel client and internal snapshots are refused with a clear message.
    @Test(arguments: [
        (["-c", "/dev/nbd0", "f"], "qemu-nbd: Kernel /dev/nbdN support not available"),
        (["-d", "/dev/nbd0"], "qemu-nbd: Kernel /dev/nbdN support not available"),
        (["-s", "f"], "qemu-nbd: -s/--snapshot is not supported by blockd"),
        (["-l", "snap", "f"], "qemu-nbd: -l/--load-snapshot is not supported by blockd"),
    ])
    func refusedOptions(_ args: [String], _ start: String) throws {
        let r = try Run.command([try QemuNBDFrontEnd.path()] + args)
        #expect(r.status == 1)
        #expect(r.stderr.hasPrefix(start) && r.stderr.split(separator: "\n").count == 1, "\(r)")
    }

    /// systemd socket activation: qemu-nbd's checks on the variables.
    @Test(arguments: [
        (["-f", "raw", "f"], "2", "qemu-nbd: qemu-nbd does not support socket activation with LISTEN_FDS > 1\n"),
        (["-k", "/tmp/x.sock", "f"], "1", "qemu-nbd: Unix socket can't be set when using socket activation\n"),
        (["-p", "1234", "f"], "1", "qemu-nbd: TCP port number can't be set when using socket activation\n"),
        (["-L"], "1", "qemu-nbd: List mode is incompatible with socket activation\n"),
    ])
    func socketActivationChecks(_ args: [String], _ fds: String, _ message: String) throws {
        // LISTEN_PID must be the process itself: `exec` keeps the shell's pid.
        let script = "exec 3</dev/null 4</dev/null; LISTEN_PID=$$ LISTEN_FDS=\(fds) exec \"$@\""
        let r = try Run.command(["/bin/sh", "-c", script, "sh", try QemuNBDFrontEnd.path()] + args)
        #expect(r.status == 1 && r.stderr == message, "\(r)")
    }

    /// LISTEN_FDS=1: serve on the inherited socket (`addr.type=fd`).
    @Test(.requires("nbdinfo", "python3"))
    func socketActivationServes() throws {
        let dir = try TempDir(prefix: "qnbd-sa")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 1 << 20)
        let socket = dir.file("activated.sock")
        let launcher = """
            import os, socket, sys
            s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4)
            os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
            os.environ["LISTEN_PID"] = str(os.getpid()); os.environ["LISTEN_FDS"] = "1"
            os.execv(sys.argv[2], sys.argv[2:])
            """
        let server = try Spawned(["/usr/bin/python3", "-c", launcher, socket, try QemuNBDFrontEnd.path(), "-t", "-f", "raw", image],
                                 in: dir)
        // The launcher listens before the front end starts: a client waits in the backlog
        // until it is served.
        try server.waitForSocket(socket)
        try Run.expectSuccess(["nbdinfo", "--size", "nbd+unix:///?socket=\(socket)"])
        #expect(server.stop() == 0, "\(server.stderrText)")
    }

    /// -o, --image-opts and `blockd nbd` serve what they say.
    @Test(.requires("qemu-img", "qemu-io"))
    func offsetImageOptsAndSubcommand() throws {
        let dir = try TempDir(prefix: "qnbd-opts")
        let image = try Self.qcow2(dir, size: "4M")
        try Run.expectSuccess(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1M 1M", image])
        let socket = dir.file("nbd.sock")
        // --image-opts with an inline file child, read-only, through `blockd nbd`.
        var server = try Spawned([try BuildProducts.blockd, "nbd", "-t", "-r", "-k", socket,
                                  "--image-opts", "driver=qcow2,file.driver=file,file.filename=\(image)"], in: dir)
        try server.waitForSocket(socket)
        try Run.expectSuccess(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 1M", "nbd+unix:///?socket=\(socket)"])
        let ro = try Run.command(["qemu-io", "-f", "raw", "-c", "write 0 4k", "nbd+unix:///?socket=\(socket)"])
        #expect(!ro.succeeded || ro.stdout.contains("failed"), "\(ro)")
        #expect(server.stop() == 0)
        // -o: the export starts 1 MiB into the image (raw over the format node).
        server = try Spawned([try QemuNBDFrontEnd.path(), "-t", "-f", "qcow2", "-o", "1048576", "-k", socket, image], in: dir)
        try server.waitForSocket(socket)
        let size = try Run.expectSuccess(["nbdinfo", "--size", "nbd+unix:///?socket=\(socket)"])
        #expect(size.stdout == "3145728\n")
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "read -P 0x22 0 1M", "nbd+unix:///?socket=\(socket)"])
        #expect(server.stop() == 0)
        try Run.expectSuccess(["qemu-img", "check", image])
    }

    /// `-v` brings back per-client lines; without it a session prints nothing.
    @Test(.requires("nbdinfo"))
    func verboseLogsClients() throws {
        let dir = try TempDir(prefix: "qnbd-v")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 1 << 20)
        let socket = dir.file("nbd.sock")
        let server = try Spawned([try QemuNBDFrontEnd.path(), "-v", "-t", "-f", "raw", "-k", socket, image], in: dir)
        try server.waitForSocket(socket)
        // A client that hangs up in the handshake is one of the per-client lines.
        let fd = socket_connect(socket)
        close(fd)
        #expect(waitUntil(timeout: 5) { server.stderrText.contains("qemu-nbd: info: client") }, "\(server.stderrText)")
        #expect(server.stop() == 0)
    }

    // MARK: cache, discard and detect-zeroes

    /// `--cache`, `--discard` and `--detect-zeroes` act as in qemu-nbd: the same command lines
    /// against QEMU's qemu-nbd and blockd's front end give the same O_DIRECT open, the same
    /// advertised minimum block size, and the same allocation after a trim and a write of
    /// zeroes (without `--discard=unmap` both keep the data, as qemu-nbd defaults to ignore).
    @Test(.requires("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo"))
    func cacheDiscardAndDetectZeroesActAsInQemuNBD() throws {
        let dir = try TempDir(prefix: "qnbd-modes")
        guard let qemuNBD = Tools.path(of: "qemu-nbd") else { throw HarnessError("qemu-nbd is not installed") }
        let socket = dir.file("nbd.sock")
        let uri = "nbd+unix:///?socket=\(socket)"
        struct Seen: Equatable { var direct: Bool; var minimum: String; var freedMiB: Int; var map: String }
        func run(_ tool: String, _ flags: [String]) throws -> Seen {
            let raw = dir.file("disk.raw")
            unlink(raw)
            try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "8M"])
            try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8M", raw])
            let before = try NodeOptionsTests.allocatedBytes(raw)
            let server = try Spawned([tool, "-t", "-f", "raw", "-k", socket] + flags + [raw], in: dir)
            try server.waitForSocket(socket)
            // qemu-nbd listens before it opens the image, and may hold another descriptor on it
            // for a moment while it opens: look once a client has been served.
            let info = try Run.expectSuccess(["nbdinfo", "--json", uri]).stdout
            let direct = try NodeOptionsTests.openFlags(pid: server.pid, path: raw).contains { $0 & NodeOptionsTests.oDirect != 0 }
            let minimum = info.range(of: "\"block_size_minimum\": ").map { String(info[$0.upperBound...].prefix { $0.isNumber }) } ?? "none"
            // A trim of 1M..2M, and a plain write of zeroes at 4M..5M.
            try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "discard 1M 1M", "-c", "write -P 0 4M 1M", uri])
            let map = try Run.expectSuccess(["nbdinfo", "--map", uri]).stdout
            #expect(server.stop() == 0, "\(tool) \(flags): \(server.stderrText)")
            let freed = before - (try NodeOptionsTests.allocatedBytes(raw))
            return Seen(direct: direct, minimum: minimum, freedMiB: freed >> 20, map: map)
        }
        let modes: [[String]] = [[], ["--cache=none"], ["--discard=unmap"], ["--discard=unmap", "--detect-zeroes=unmap"],
                                 ["--detect-zeroes=on"], ["-n", "--discard=ignore"]]
        for flags in modes {
            let theirs = try run(qemuNBD, flags)
            let ours = try run(try QemuNBDFrontEnd.path(), flags)
            #expect(ours == theirs, "\(flags): blockd \(ours)\nqemu-nbd \(theirs)")
            // What each mode must do at all (so that equal results cannot both be wrong).
            #expect(ours.direct == (flags.contains("--cache=none") || flags.contains("-n")), "\(flags): \(ours)")
            #expect(ours.freedMiB == (flags.contains("--discard=unmap") ? (flags.contains("--detect-zeroes=unmap") ? 2 : 1) : 0),
                    "\(flags): \(ours)")
        }
    }

    /// `--cache=unsafe` never syncs (not even for a client's flush); `--cache=writethrough`
    /// makes every write durable before its reply; `--cache=writeback` (the default) syncs
    /// on flush only. Seen with strace.
    @Test(.requires("qemu-img", "qemu-io", "strace"))
    func cacheModesSyncAsQemuNBD() throws {
        let dir = try TempDir(prefix: "qnbd-sync")
        let raw = dir.file("disk.raw")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "4M"])
        let socket = dir.file("nbd.sock")
        for mode in ["unsafe", "writethrough", "writeback"] {
            let server = try Spawned([try QemuNBDFrontEnd.path(), "-t", "-f", "raw", "--cache=\(mode)", "-k", socket, raw], in: dir)
            try server.waitForSocket(socket)
            // -t writeback: qemu-io's default (writethrough) would make every write FUA itself.
            let trace = try NodeOptionsTests.strace(pid: server.pid, in: dir) {
                try Run.expectSuccess(["qemu-io", "-t", "writeback", "-f", "raw", "-c", "write -P 0x33 0 64k",
                                       "-c", "write -P 0x34 1M 4k", "-c", "flush", "nbd+unix:///?socket=\(socket)"])
            }
            #expect(server.stop() == 0, "\(server.stderrText)")
            let writes = trace.filter { $0.contains("pwritev2(") || $0.contains("pwrite64(") }
            let durable = writes.filter { $0.contains("RWF_DSYNC") }
            let syncs = trace.filter { $0.contains("fdatasync(") || $0.contains("fsync(") }
            #expect(writes.count >= 2, "\(mode): \(trace)")
            switch mode {
            case "unsafe": #expect(durable.isEmpty && syncs.isEmpty, "\(mode): \(trace)")
            case "writethrough": #expect(durable.count == writes.count, "\(mode): \(trace)")
            default: #expect(durable.isEmpty && !syncs.isEmpty, "\(mode): \(trace)")
            }
        }
    }
}

/// A connected unix socket (or -1).
func socket_connect(_ path: String) -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        let b = Array(path.utf8)
        for i in 0..<min(b.count, raw.count - 1) { raw[i] = b[i] }
    }
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    if rc != 0 { close(fd); return -1 }
    return fd
}
