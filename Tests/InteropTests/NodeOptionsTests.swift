#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Node and export options that change behaviour, each checked against what qemu-img, qemu-io,
/// fio and nbdinfo see, and against qemu-storage-daemon run with the same options: image locks
/// (`locking`, `force-share`), `cache.direct`, `cache.no-flush`, `discard`, `detect-zeroes`,
/// export `writethrough`, refused option values, and `query-named-block-nodes`.
@Suite struct NodeOptionsTests {
    static let mib = 1 << 20

    // MARK: locks

    /// blockd holds a qcow2 image read-write: qemu-img and qemu-io refuse it with QEMU's own
    /// messages (the same ones qemu-storage-daemon's locks give), `-U` still reads it, and the
    /// locks go with the node.
    @Test(.requires("qemu-img", "qemu-io", "qemu-storage-daemon"))
    func qemuToolsRefuseAnImageBlockdHolds() throws {
        let dir = try TempDir(prefix: "lock-held")
        let img = dir.file("disk.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
        let nodes = ["--blockdev", "driver=file,node-name=f0,filename=\(img)", "--blockdev", "driver=qcow2,node-name=d0,file=f0"]
        let probes: [[String]] = [
            ["qemu-img", "info", img],                          // read-only open: "shared" lock
            ["qemu-io", "-c", "write -P 0x11 0 4k", img],       // read-write open
        ]
        func refusals() throws -> [String] {
            try probes.map { p in
                let r = try Run.command(p)
                #expect(!r.succeeded, "\(p) opened an image another process holds:\n\(r)")
                return r.stderr
            }
        }
        let qsd = try QSD(nodes, in: dir)
        let qemuLocks = try Self.lockBytes(img)
        let qemuMessages = try refusals()
        qsd.stop()
        #expect(qemuLocks == ["100-101", "103-103", "201-201", "203-203"], "\(qemuLocks)")
        #expect(qemuMessages[0].contains("Failed to get shared \"write\" lock"), "\(qemuMessages[0])")
        #expect(qemuMessages[1].contains("Failed to get \"write\" lock"), "\(qemuMessages[1])")

        let qmp = dir.file("qmp.sock")
        let d = try Blockd(nodes + ["--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0"],
                           in: dir, waitForSocket: qmp)
        #expect(try Self.lockBytes(img) == qemuLocks)
        #expect(try refusals() == qemuMessages, "qemu-img/qemu-io must refuse blockd's image as they refuse QSD's")
        #expect(try Run.command(["qemu-img", "info", "-U", img]).succeeded, "force-share must still read")
        #expect(d.stop() == 0)
        try Run.expectSuccess(["qemu-img", "check", img])

        // locking=off takes no lock at all.
        let free = try Blockd(["--blockdev", "driver=file,node-name=f0,filename=\(img),locking=off",
                               "--blockdev", "driver=qcow2,node-name=d0,file=f0", "--chardev",
                               "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0"],
                              in: dir, waitForSocket: qmp)
        try Run.expectSuccess(["qemu-img", "info", img])
        #expect(free.stop() == 0)
    }

    /// A raw image served writable: the export's permissions reach the file through the raw
    /// node, as in QEMU: the same lock bytes as qemu-storage-daemon's (read and write taken,
    /// resize not shared), so a resize is refused with QEMU's message while another writer of
    /// a raw image is not (QEMU's raw users share write).
    @Test(.requires("qemu-img", "qemu-io", "qemu-storage-daemon"))
    func rawExportLocksLikeQemuStorageDaemon() throws {
        let dir = try TempDir(prefix: "lock-raw")
        let img = dir.file("disk.raw")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", img, "16M"])
        let socket = dir.file("nbd.sock")
        let args = ["--blockdev", "driver=file,node-name=f0,filename=\(img)", "--blockdev", "driver=raw,node-name=r0,file=f0",
                    "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                    "--export", "type=nbd,id=e0,node-name=r0,name=disk,writable=on"]
        let probes = [["qemu-img", "resize", "-f", "raw", img, "32M"], ["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4k", img]]
        let qsd = try QSD(args, in: dir, waitForSocket: socket)
        let qsdLocks = try Self.lockBytes(img)
        let qsdResults = try probes.map { try Run.command($0) }
        qsd.stop()
        #expect(qsdLocks == ["100-101", "203-203"], "\(qsdLocks)")
        #expect(!qsdResults[0].succeeded && qsdResults[0].stderr.contains("Failed to get \"resize\" lock"), "\(qsdResults[0])")
        let d = try Blockd(args, in: dir, waitForSocket: socket)
        #expect(try Self.lockBytes(img) == qsdLocks)
        for (probe, expected) in zip(probes, qsdResults) {
            let r = try Run.command(probe)
            #expect(r.status == expected.status && r.stderr == expected.stderr, "blockd: \(r)\nQSD: \(expected)")
        }
        #expect(d.stop() == 0)
        #expect(try Self.lockBytes(img).isEmpty)
        try Run.expectSuccess(probes[0])
    }

    /// The locks follow the block graph's permissions, whoever the user is: nothing on a raw
    /// base nobody reads, consistent read once the top above it is exported, write on base
    /// while an active commit writes it (the job's I/O, through the raw node; base reopened
    /// read-write keeps its locks), the export's permissions on base after the switch, and
    /// none once the export goes. The lines are qemu-storage-daemon 7.2's
    /// (`graph/graph_locks.py`), and QSD installed here must print them too.
    @Test(.requires("qemu-img", "qemu-io", "python3"))
    func locksFollowTheGraph() throws {
        let script = GraphPermissionTests.dir + "/graph_locks.py"
        let expected = """
            {'return': {}}
            {'return': {}}
            {'return': {}}
            {'return': {}}
            added base [] top ['100-101', '103-103', '201-201', '203-203']
            {'return': {}}
            exported base ['100-100'] top ['100-101', '103-103', '201-201', '203-203']
            {'return': {}}
            ready base ['101-101', '203-203'] top ['100-101', '103-103', '201-201', '203-203']
            {'return': {}}
            pivoted base ['100-101', '203-203'] top ['100-101', '103-103', '201-201', '203-203']
            {'return': {}}
            unexported base [] top ['100-101', '103-103', '201-201', '203-203']
            {'return': {}}

            """
        var programs = [try BuildProducts.blockd]
        if Tools.available("qemu-storage-daemon") { programs.append("qemu-storage-daemon") }
        for program in programs {
            let dir = try TempDir(prefix: "lock-graph")
            let r = try Run.command(["python3", script, program, dir.path], timeout: 60)
            #expect(r.status == 0 && r.stdout == expected, "\(program):\n\(r.stdout)\n\(r.stderr)")
        }
    }

    /// The OFD lock byte ranges held on `path` by anyone, from /proc/locks ("start-end", sorted).
    static func lockBytes(_ path: String) throws -> [String] {
        var st = stat()
        guard stat(path, &st) == 0 else { throw HarnessError("stat \(path) failed") }
        return try Files.read("/proc/locks").split(separator: "\n").compactMap { line -> String? in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let i = f.firstIndex(where: { $0.hasSuffix(":\(st.st_ino)") }), i + 2 < f.count else { return nil }
            return "\(f[i + 1])-\(f[i + 2])"
        }.sorted()
    }

    /// qemu-storage-daemon holds the image: blockd refuses it with QEMU's message and hint,
    /// on the command line and over QMP, and opens it read-only with force-share.
    @Test(.requires("qemu-img", "qemu-storage-daemon"))
    func blockdRefusesAnImageQemuHolds() throws {
        let dir = try TempDir(prefix: "lock-qsd")
        let img = dir.file("disk.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
        let nodes = ["--blockdev", "driver=file,node-name=f0,filename=\(img)", "--blockdev", "driver=qcow2,node-name=d0,file=f0"]
        let qsd = try QSD(nodes, in: dir)
        // What QEMU says when a second qemu-storage-daemon tries the same.
        let second = try Run.command(["qemu-storage-daemon"] + nodes, timeout: 10)
        #expect(second.stderr.contains("Failed to get \"write\" lock\nIs another process using the image [\(img)]?"),
                "\(second)")

        // The same words as the second qemu-storage-daemon, hint included (QEMU prints it on
        // the command line), and the same exit status.
        let rw = try Blockd.runOnce(nodes)
        #expect(rw.status == second.status)
        #expect(rw.stderr == "blockd: --blockdev driver=qcow2,node-name=d0,file=f0: Failed to get \"write\" lock\nIs another process using the image [\(img)]?\n",
                "\(rw)")
        #expect(rw.stderr.dropFirst("blockd: ".count) == second.stderr.dropFirst("qemu-storage-daemon: ".count), "\(rw)\n\(second)")
        let ro = try Blockd.runOnce(["--blockdev", "driver=qcow2,node-name=d0,read-only=on,file.driver=file,file.filename=\(img)"])
        #expect(ro.status == 1)
        #expect(ro.stderr.contains("Failed to get shared \"write\" lock\nIs another process using the image [\(img)]?"), "\(ro)")
        // force-share (inherited by the inline file child) reads anyway, as qemu-img -U does.
        let qmp = dir.file("qmp.sock")
        let shared = try Blockd(["--blockdev", "driver=qcow2,node-name=d0,read-only=on,force-share=on,file.driver=file,file.filename=\(img)",
                                 "--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0"],
                                in: dir, waitForSocket: qmp)
        #expect(shared.stop() == 0)
        qsd.stop()
        // Released: blockd opens it now.
        let after = try Blockd(nodes + ["--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0"],
                               in: dir, waitForSocket: qmp)
        #expect(after.stop() == 0)
    }

    /// Over QMP, blockdev-add gets QEMU's error text (without the terminal hint, as QEMU).
    @Test(.requires("qemu-img", "qemu-storage-daemon"), .requiresPython("qemu.qmp"))
    func blockdevAddOfALockedImageFailsLikeQemu() throws {
        let dir = try TempDir(prefix: "lock-qmp")
        let img = dir.file("disk.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
        let holder = try QSD(["--blockdev", "driver=file,node-name=f0,filename=\(img)",
                              "--blockdev", "driver=qcow2,node-name=d0,file=f0"], in: dir)
        let script = """
            import asyncio, sys
            from qemu.qmp import QMPClient, ExecuteError
            async def main():
                q = QMPClient('t'); await q.connect(sys.argv[1])
                await q.execute('blockdev-add', {'driver': 'file', 'node-name': 'f1', 'filename': sys.argv[2]})
                try:
                    await q.execute('blockdev-add', {'driver': 'qcow2', 'node-name': 'd1', 'file': 'f1'})
                    print('added')
                except ExecuteError as e:
                    print(e.error.error.class_, e.error.error.desc)
                await q.disconnect()
            asyncio.run(main())
            """
        try Files.write(dir.file("add.py"), script)
        var answers: [String] = []
        for daemon in ["qsd", "blockd"] {
            let qmp = dir.file("\(daemon).sock")
            let monitor = ["--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0"]
            if daemon == "qsd" {
                let q = try QSD(monitor, in: dir, waitForSocket: qmp)
                answers.append(try Run.expectSuccess(["python3", dir.file("add.py"), qmp, img]).stdout)
                q.stop()
            } else {
                let d = try Blockd(monitor, in: dir, waitForSocket: qmp)
                answers.append(try Run.expectSuccess(["python3", dir.file("add.py"), qmp, img]).stdout)
                _ = d.stop()
            }
        }
        #expect(answers[0] == "GenericError Failed to get \"write\" lock\n", "\(answers)")
        #expect(answers[1] == answers[0])
        holder.stop()
    }

    // MARK: cache.direct

    /// cache.direct=on: the image is open with O_DIRECT, the export advertises the alignment
    /// as its minimum block size (as qemu-storage-daemon does), and fio verifies aligned I/O,
    /// 100-byte writes sharing sectors (read-modify-write under concurrency), and qcow2
    /// allocation through it.
    @Test(.requires("qemu-img", "fio", "nbdinfo", "qemu-storage-daemon"))
    func directIOServesFioWithVerify() throws {
        let dir = try TempDir(prefix: "odirect")
        let raw = dir.file("disk.raw"), qcow = dir.file("disk.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "64M"])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M"])
        let socket = dir.file("nbd.sock")
        func args(_ image: String, _ format: String) -> [String] {
            ["--blockdev", "driver=file,node-name=f0,filename=\(image),cache.direct=on",
             "--blockdev", "driver=\(format),node-name=n0,file=f0",
             "--nbd-server", "addr.type=unix,addr.path=\(socket)",
             "--export", "type=nbd,id=e0,node-name=n0,name=disk,writable=on"]
        }
        let uri = "nbd+unix:///disk?socket=\(socket)"
        func minimumBlockSize() throws -> String {
            let info = try Run.expectSuccess(["nbdinfo", "--json", uri]).stdout
            guard let r = info.range(of: "\"block_size_minimum\": ") else { return "none" }
            return String(info[r.upperBound...].prefix { $0.isNumber })
        }
        let qsd = try QSD(args(raw, "raw"), in: dir, waitForSocket: socket)
        let qsdMinimum = try minimumBlockSize()
        qsd.stop()

        let d = try Blockd(args(raw, "raw"), in: dir, waitForSocket: socket)
        #expect(try Self.openFlags(pid: d.pid, path: raw).contains { $0 & Self.oDirect != 0 }, "image not opened O_DIRECT")
        #expect(try minimumBlockSize() == qsdMinimum)
        let fio = ["fio", "--ioengine=nbd", "--uri=\(uri)", "--name=v", "--verify=crc32c", "--verify_fatal=1",
                   "--verify_state_save=0", "--randrepeat=0"]
        var r = try Run.command(fio + ["--rw=randrw", "--bsrange=4k-128k", "--iodepth=16", "--size=32M"], timeout: 120)
        #expect(r.succeeded && !r.stderr.contains("verify"), "\(r)")
        r = try Run.command(fio + ["--rw=randwrite", "--bs=100", "--offset=40M", "--size=200k", "--iodepth=32"], timeout: 120)
        #expect(r.succeeded && !r.stderr.contains("verify"), "\(r)")
        #expect(d.stop() == 0)

        let q = try Blockd(args(qcow, "qcow2"), in: dir, waitForSocket: socket)
        r = try Run.command(fio + ["--rw=randwrite", "--bsrange=512-64k", "--iodepth=16", "--size=16M", "--fsync=64"], timeout: 120)
        #expect(r.succeeded && !r.stderr.contains("verify"), "\(r)")
        #expect(q.stop() == 0)
        try Run.expectSuccess(["qemu-img", "check", qcow])
    }

    /// Linux's O_DIRECT (octal, as /proc/PID/fdinfo shows flags).
    #if arch(arm64)
    static let oDirect = 0o200000
    #else
    static let oDirect = 0o40000
    #endif

    /// The `fcntl(F_GETFL)` flags of the descriptor `pid` holds on `path` (from /proc).
    /// The open flags of every descriptor `pid` holds on `path` (blockd's `cache.direct` keeps a
    /// buffered one beside the `O_DIRECT` one, for the writes `O_DIRECT` refuses).
    static func openFlags(pid: pid_t, path: String) throws -> [Int] {
        let fdDir = "/proc/\(pid)/fd"
        guard let dp = opendir(fdDir) else { return [] }
        defer { closedir(dp) }
        var found: [Int] = []
        while let entry = readdir(dp) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            var target = [CChar](repeating: 0, count: 4096)
            let n = readlink("\(fdDir)/\(name)", &target, target.count - 1)
            guard n > 0, String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) == path else { continue }
            for line in try Files.read("/proc/\(pid)/fdinfo/\(name)").split(separator: "\n") where line.hasPrefix("flags:") {
                if let flags = Int(String(line.dropFirst("flags:".count).drop { $0 == " " || $0 == "\t" }), radix: 8) {
                    found.append(flags)
                }
            }
        }
        return found
    }

    // MARK: discard and detect-zeroes

    /// detect-zeroes=unmap (with discard=unmap): a plain write of zero bytes becomes a hole in
    /// a raw file (nbdinfo --map, allocated size) and a zero cluster in qcow2 (qemu-img map);
    /// with detect-zeroes=off the same write stays data.
    @Test(.requires("qemu-img", "qemu-io", "nbdinfo"))
    func detectZeroesUnmapTurnsZeroWritesIntoHoles() throws {
        let dir = try TempDir(prefix: "detect-zeroes")
        let socket = dir.file("nbd.sock")
        let uri = "nbd+unix:///disk?socket=\(socket)"
        for mode in ["unmap", "off"] {
            let raw = dir.file("\(mode).raw")
            try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "4M"])
            try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", raw])
            let before = try Self.allocatedBytes(raw)
            let d = try Blockd(["--blockdev", "driver=file,node-name=f0,filename=\(raw),discard=unmap,detect-zeroes=\(mode)",
                                "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                                "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"],
                               in: dir, waitForSocket: socket)
            try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 0 1M 1M", "-c", "read -P 0 1M 1M",
                                   "-c", "read -P 0x5a 0 1M", uri])
            let map = try Run.expectSuccess(["nbdinfo", "--map", uri]).stdout
            #expect(d.stop() == 0)
            let hole = map.split(separator: "\n").contains { $0.contains("1048576") && $0.contains("hole,zero") }
            let freed = before - (try Self.allocatedBytes(raw))
            if mode == "unmap" {
                #expect(hole, "no hole at 1M:\n\(map)")
                #expect(freed >= Self.mib, "only \(freed) bytes freed")
            } else {
                #expect(!hole && freed == 0, "detect-zeroes=off changed allocation:\n\(map)")
            }
        }
        // qcow2: the clusters become zero clusters without data.
        let qcow = dir.file("z.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "4M"])
        try Run.expectSuccess(["qemu-io", "-c", "write -P 0x5a 0 4M", qcow])
        let d = try Blockd(["--blockdev", "driver=file,node-name=f0,filename=\(qcow),discard=unmap",
                            "--blockdev", "driver=qcow2,node-name=q0,file=f0,discard=unmap,detect-zeroes=unmap",
                            "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                            "--export", "type=nbd,id=e0,node-name=q0,name=disk,writable=on"],
                           in: dir, waitForSocket: socket)
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 0 1M 1M", uri])
        #expect(d.stop() == 0)
        let map = try Run.expectSuccess(["qemu-img", "map", "--output=json", qcow]).stdout
        #expect(map.contains("{ \"start\": 1048576, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"),
                "\(map)")
        try Run.expectSuccess(["qemu-img", "check", qcow])
    }

    /// discard=ignore (blockdev-add's default, as QEMU's): a trim succeeds and changes nothing;
    /// discard=unmap punches the hole.
    @Test(.requires("qemu-img", "qemu-io"))
    func discardIgnoreKeepsTheData() throws {
        let dir = try TempDir(prefix: "discard")
        let socket = dir.file("nbd.sock")
        let uri = "nbd+unix:///disk?socket=\(socket)"
        for mode in ["", ",discard=ignore", ",discard=unmap"] {
            let raw = dir.file("d\(mode.count).raw")
            try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "4M"])
            try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", raw])
            let before = try Self.allocatedBytes(raw)
            let d = try Blockd(["--blockdev", "driver=file,node-name=f0,filename=\(raw)\(mode)",
                                "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                                "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"],
                               in: dir, waitForSocket: socket)
            let pattern = mode.hasSuffix("unmap") ? "0" : "0x5a"
            try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "discard 1M 1M", "-c", "read -P \(pattern) 1M 1M", uri])
            #expect(d.stop() == 0)
            let freed = before - (try Self.allocatedBytes(raw))
            #expect(mode.hasSuffix("unmap") ? freed >= Self.mib : freed == 0, "discard\(mode): \(freed) bytes freed")
        }
    }

    static func allocatedBytes(_ path: String) throws -> Int {
        var st = stat()
        guard stat(path, &st) == 0 else { throw HarnessError("stat \(path) failed") }
        return Int(st.st_blocks) * 512
    }

    // MARK: writethrough and cache.no-flush

    /// Export writethrough=on: every write is made durable before its reply (RWF_DSYNC on the
    /// write, as FUA), without it writes are not; seen with strace.
    @Test(.requires("qemu-img", "qemu-io", "strace"))
    func writethroughMakesWritesDurableBeforeTheReply() throws {
        let dir = try TempDir(prefix: "writethrough")
        let raw = dir.file("disk.raw")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "4M"])
        let socket = dir.file("nbd.sock")
        for writethrough in [true, false] {
            let d = try Blockd(["--blockdev", "driver=file,node-name=f0,filename=\(raw)",
                                "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                                "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on,writethrough=\(writethrough ? "on" : "off")"],
                               in: dir, waitForSocket: socket)
            // -t writeback: qemu-io's default (writethrough) would make every write FUA itself.
            let trace = try Self.strace(pid: d.pid, in: dir) {
                try Run.expectSuccess(["qemu-io", "-t", "writeback", "-f", "raw", "-c", "write -P 0x33 0 64k",
                                       "-c", "write -P 0x34 1M 4k", "nbd+unix:///disk?socket=\(socket)"])
            }
            #expect(d.stop() == 0)
            let writes = trace.filter { $0.contains("pwritev2(") }
            #expect(writes.count >= 2, "\(trace)")
            if writethrough {
                #expect(writes.allSatisfy { $0.contains("RWF_DSYNC") }, "\(writes)")
            } else {
                #expect(!writes.contains { $0.contains("RWF_DSYNC") }, "\(writes)")
            }
        }
    }

    /// cache.no-flush=on: flush and FUA succeed without syncing (QEMU's cache=unsafe);
    /// without it both sync.
    @Test(.requires("qemu-img", "qemu-io", "strace"))
    func cacheNoFlushSkipsSyncs() throws {
        let dir = try TempDir(prefix: "no-flush")
        let raw = dir.file("disk.raw")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "4M"])
        let socket = dir.file("nbd.sock")
        for noFlush in [true, false] {
            let d = try Blockd(["--blockdev", "driver=file,node-name=f0,filename=\(raw),cache.no-flush=\(noFlush ? "on" : "off")",
                                "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                                "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"],
                               in: dir, waitForSocket: socket)
            let trace = try Self.strace(pid: d.pid, in: dir) {
                try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -f -P 0x33 0 64k", "-c", "flush",
                                       "nbd+unix:///disk?socket=\(socket)"])
            }
            #expect(d.stop() == 0)
            let syncs = trace.filter { $0.contains("fdatasync(") || $0.contains("RWF_DSYNC") }
            if noFlush {
                #expect(syncs.isEmpty, "\(syncs)")
            } else {
                #expect(trace.contains { $0.contains("fdatasync(") } && trace.contains { $0.contains("RWF_DSYNC") }, "\(trace)")
            }
        }
    }

    /// Runs `body` while strace records blockd's file syscalls (`calls`); returns the trace lines.
    static func strace(pid: pid_t, in dir: TempDir, calls: String = "pwritev2,pwrite64,fdatasync,fsync",
                       _ body: () throws -> Void) throws -> [String] {
        let tag = "\(pid)-\(Int(Subprocess.now() * 1e6))"
        let out = dir.file("strace-\(tag).out"), err = dir.file("strace-\(tag).err")
        let tracer = try Subprocess.spawn(["strace", "-f", "-e", "trace=\(calls)", "-o", out,
                                           "-p", String(pid)], stdoutPath: dir.file("strace.stdout"), stderrPath: err)
        // strace reports "Process N attached with T threads" once every thread is traced.
        if !waitUntil(timeout: 10, { ((try? Files.read(err)) ?? "").contains("attached") }) {
            kill(tracer, SIGKILL)
            throw HarnessError("strace did not attach")
        }
        do { try body() } catch {
            kill(tracer, SIGKILL)
            _ = Subprocess.wait(tracer, timeout: 10)
            throw error
        }
        kill(tracer, SIGINT)
        _ = Subprocess.wait(tracer, timeout: 10)
        return (try Files.read(out)).split(separator: "\n").map(String.init)
    }

    // MARK: refused values

    /// Every bad option value is refused before anything opens, naming the option; where
    /// qemu-storage-daemon refuses the same value its message is the one blockd prints.
    @Test(.requires("qemu-img", "qemu-storage-daemon"))
    func badOptionValuesAreRefusedNamingTheOption() throws {
        let dir = try TempDir(prefix: "bad-options")
        let raw = dir.file("disk.raw")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"])
        let file = "driver=file,node-name=f0,filename=\(raw)"
        // (option text, what names it in blockd's message, whether QEMU refuses it too — then
        // with the very message blockd prints). blockd refuses the AIO engines and tunables it
        // does not have; QEMU has them.
        let cases: [(String, String, Bool)] = [
            ("locking=maybe", "'locking'", true), ("cache.direct=maybe", "'cache.direct'", true),
            ("cache.no-flush=2", "'cache.no-flush'", true), ("discard=bogus", "'discard'", true),
            ("discard=on", "'discard'", true), ("detect-zeroes=bogus", "'detect-zeroes'", true),
            ("detect-zeroes=unmap", "detect-zeroes", true), ("aio=bogus", "'aio'", true),
            ("aio=native", "aio=native", true), ("force-share=on", "force-share", true),
            ("aio=io_uring", "'aio'", false), ("aio=native,cache.direct=on", "'aio'", false),
            ("aio-max-batch=4", "'aio-max-batch'", false), ("pr-manager=pr0", "'pr-manager'", false),
        ]
        for (option, name, qemuRefuses) in cases {
            let r = try Blockd.runOnce(["--blockdev", "\(file),\(option)"])
            let mine = "blockd: --blockdev \(file),\(option): "
            #expect(r.status == 1 && r.stderr.hasPrefix(mine) && r.stderr.dropFirst(mine.count).contains(name), "\(option): \(r)")
            guard qemuRefuses else { continue }
            let q = try Run.command(["qemu-storage-daemon", "--blockdev", "\(file),\(option)"], timeout: 10)
            let prefix = "qemu-storage-daemon: --blockdev \(file),\(option): "
            #expect(q.status == r.status && q.stderr.hasPrefix(prefix), "\(q)")
            #expect(String(r.stderr.dropFirst(mine.count)) == String(q.stderr.dropFirst(prefix.count)),
                    "\(option): blockd \(r.stderr) QSD \(q.stderr)")
        }
        let export = try Blockd.runOnce(["--blockdev", file, "--nbd-server", "addr.type=unix,addr.path=\(dir.file("s"))",
                                          "--export", "type=nbd,id=e0,node-name=f0,writethrough=maybe"])
        #expect(export.status == 1 && export.stderr.contains("Parameter 'writethrough' expects 'on' or 'off'"), "\(export)")
    }

    /// The qcow2 options: a bad value, a combination QEMU refuses, or an option the image
    /// cannot have (encryption, an external data file) gets qemu-storage-daemon's message
    /// word for word; values both accept open in both; l2-cache-entry-size other than the
    /// cluster size is refused by blockd alone (it caches whole tables), naming it. Export
    /// iothread: blockd has no iothread objects, so a named one is "not found", as in QSD
    /// without that object.
    @Test(.requires("qemu-img", "qemu-storage-daemon"))
    func qcow2OptionsAreCheckedLikeQemu() throws {
        let dir = try TempDir(prefix: "qcow2-options")
        let img = dir.file("disk.qcow2"), v2 = dir.file("v2.qcow2"), raw = dir.file("data.raw")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "64M"])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"])
        func node(_ options: String, image: String = img) -> String {
            "qcow2,node-name=d0,file.driver=file,file.filename=\(image)" + (options.isEmpty ? "" : ",\(options)")
        }
        let refused = [
            "overlap-check=bogus", "overlap-check.template=bogus", "overlap-check.main-header=maybe",
            "overlap-check.bogus=on", "cache-clean-interval=-1", "cache-clean-interval=5000000000",
            "l2-cache-entry-size=1000", "l2-cache-entry-size=128",
            "cache-size=1048576,l2-cache-size=1048576,refcount-cache-size=1048576",
            "cache-size=1048576,l2-cache-size=2097152", "cache-size=1048576,refcount-cache-size=2097152",
            "encrypt.format=bogus", "encrypt.key-secret=s", "encrypt=x", "encrypt.format=aes",
            "encrypt.format=luks,encrypt.key-secret=s", "encrypt.format=aes,encrypt.bogus=1",
            "data-file=nosuch", "data-file.driver=file,data-file.filename=\(raw)",
            "pass-discard-other=maybe", "pass-discard-snapshot=2", "lazy-refcounts=maybe",
        ]
        var cases = refused.map { (node($0), true) }
        cases.append((node("lazy-refcounts=on", image: v2), true))
        // Accepted by both (the node opens; a monitor shows it is up).
        for ok in ["overlap-check=none", "overlap-check.template=all,overlap-check.active-l2=off",
                   "cache-clean-interval=0", "cache-size=4194304", "l2-cache-size=1048576,refcount-cache-size=262144",
                   "l2-cache-entry-size=65536", "pass-discard-request=off,pass-discard-snapshot=off,pass-discard-other=on",
                   "lazy-refcounts=off"] {
            cases.append((node(ok), false))
        }
        let qmp = dir.file("qmp.sock")
        let monitor = ["--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0"]
        for (argument, shouldFail) in cases {
            if shouldFail {
                let r = try Blockd.runOnce(["--blockdev", argument])
                let q = try Run.command(["qemu-storage-daemon", "--blockdev", argument], timeout: 10)
                #expect(r.status == 1 && q.status == 1, "\(argument): blockd \(r) QSD \(q)")
                #expect(r.stderr.dropFirst("blockd: ".count) == q.stderr.dropFirst("qemu-storage-daemon: ".count),
                        "\(argument): blockd \(r.stderr) QSD \(q.stderr)")
            } else {
                let q = try QSD(["--blockdev", argument] + monitor, in: dir, waitForSocket: qmp)
                q.stop()
                let d = try Blockd(["--blockdev", argument] + monitor, in: dir, waitForSocket: qmp)
                #expect(d.stop() == 0, "\(argument)")
            }
        }
        // Only blockd refuses: it caches whole L2 tables.
        let entry = try Blockd.runOnce(["--blockdev", node("l2-cache-entry-size=4096")])
        #expect(entry.status == 1 && entry.stderr.contains("l2-cache-entry-size"), "\(entry)")

        // Export iothread / fixed-iothread.
        let socket = dir.file("nbd.sock")
        for export in ["iothread=io0", "iothread=io0,fixed-iothread=on", "fixed-iothread=maybe"] {
            let args = ["--blockdev", node(""), "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                        "--export", "nbd,id=e0,node-name=d0,\(export)"]
            let r = try Blockd.runOnce(args)
            let q = try Run.command(["qemu-storage-daemon"] + args, timeout: 10)
            #expect(r.status == 1 && q.status == 1, "\(export): blockd \(r) QSD \(q)")
            #expect(r.stderr.dropFirst("blockd: ".count) == q.stderr.dropFirst("qemu-storage-daemon: ".count),
                    "\(export): blockd \(r.stderr) QSD \(q.stderr)")
        }
        // fixed-iothread without an iothread: accepted by both (it only matters with one).
        let args = ["--blockdev", node(""), "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                    "--export", "nbd,id=e0,node-name=d0,fixed-iothread=on"]
        let q = try QSD(args, in: dir, waitForSocket: socket)
        q.stop()
        let d = try Blockd(args, in: dir, waitForSocket: socket)
        #expect(d.stop() == 0)
    }

    // MARK: query-named-block-nodes

    /// The same --blockdev options give the same `query-named-block-nodes` as
    /// qemu-storage-daemon, field by field, for every named node (file, qcow2 with a backing
    /// chain, raw with an inline file, null-co). Filters are left out: QEMU names them by a
    /// `json:{…}` rendering of their whole subtree, which blockd does not reproduce.
    @Test(.requires("qemu-img", "qemu-storage-daemon"), .requiresPython("qemu.qmp"))
    func namedNodesMatchQemuStorageDaemon() throws {
        let dir = try TempDir(prefix: "node-info")
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2"), raw = dir.file("disk.raw")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "1000000"])
        let qmp = dir.file("qmp.sock")
        let args = [
            "--blockdev", "driver=file,node-name=f0,filename=\(top),cache.direct=on,cache.no-flush=on,discard=unmap,detect-zeroes=unmap",
            "--blockdev", "driver=qcow2,node-name=t0,file=f0,detect-zeroes=on",
            "--blockdev", "driver=raw,node-name=r0,read-only=on,cache.no-flush=on,file.driver=file,file.filename=\(raw),file.node-name=rf",
            "--blockdev", "driver=null-co,node-name=n0,size=1048576,detect-zeroes=on",
            "--blockdev", "driver=null-co,node-name=n1", "--blockdev", "driver=null-co,node-name=n2,read-zeroes=on,size=4096",
            "--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0",
        ]
        let script = QMPInteropTests.scripts + "/named_nodes.py"
        let q = try QSD(args, in: dir, waitForSocket: qmp)
        let expected = try Run.expectSuccess(["python3", script, qmp]).stdout
        q.stop()
        let d = try Blockd(args, in: dir, waitForSocket: qmp)
        let got = try Run.expectSuccess(["python3", script, qmp]).stdout
        #expect(d.stop() == 0)
        let e = expected.split(separator: "\n"), g = got.split(separator: "\n")
        #expect(e.count == 7 && g.count == e.count, "QSD:\n\(expected)\nblockd:\n\(got)")
        for (a, b) in zip(e, g) { #expect(a == b) }
    }
}

/// One qemu-storage-daemon for a comparison, killed when released; `stop()` ends it (SIGTERM)
/// and waits, so the next daemon finds the images unlocked.
final class QSD: @unchecked Sendable {
    let pid: pid_t
    /// Its stdout and stderr.
    let log: String
    private var exited = false

    /// Starts `qemu-storage-daemon ARGUMENTS` and waits until `socket` accepts connections, or
    /// (without a socket) until the daemon holds its images — it opens every --blockdev before
    /// it does anything else, so its monitor-less form is ready once /proc shows them open.
    init(_ arguments: [String], in dir: TempDir, waitForSocket socket: String? = nil, timeout: Double = 10) throws {
        let log = dir.file("qsd-\(Int(Subprocess.now() * 1e6)).log")
        self.log = log
        var args = arguments
        var wait = socket
        if wait == nil {
            // A monitor to wait for: created after every --blockdev is open.
            wait = dir.file("qsd-ready-\(getpid())-\(Int(Subprocess.now() * 1e6)).sock")
            args += ["--chardev", "socket,id=qsdready,path=\(wait!),server=on,wait=off", "--monitor", "chardev=qsdready"]
        }
        pid = try Subprocess.spawn(["qemu-storage-daemon"] + args, stdoutPath: log, stderrPath: log)
        var status: Int32?
        let up = waitUntil(timeout: timeout) {
            status = Subprocess.wait(pid, timeout: 0)
            return status != nil || Blockd.canConnect(unixPath: wait!)
        }
        if let status {
            exited = true
            throw HarnessError("qemu-storage-daemon exited with \(status):\n\((try? Files.read(log)) ?? "")")
        }
        if !up {
            stop()
            throw HarnessError("qemu-storage-daemon did not start:\n\((try? Files.read(log)) ?? "")")
        }
    }

    func stop() {
        if exited { return }
        exited = true
        kill(pid, SIGTERM)
        if Subprocess.wait(pid, timeout: 10) == nil {
            kill(pid, SIGKILL)
            _ = Subprocess.wait(pid, timeout: 10)
        }
    }

    deinit { stop() }
}
