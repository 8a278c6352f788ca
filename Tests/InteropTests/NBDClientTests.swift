#if canImport(Glibc)
import Glibc
#endif
import Testing

/// blockd against real NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy, nbdfuse, fio, libnbd.
/// Each test starts its own daemon on its own image and socket.
@Suite struct NBDClientTests {
    static let mib = 1 << 20

    /// A writable raw image of `size` bytes (sparse) served by a fresh blockd.
    static func served(size: Int = 16 << 20, readOnly: Bool = false) throws -> (TempDir, String, Blockd) {
        let dir = try TempDir(prefix: "nbd")
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: size)
        let d = try Blockd.serve(image: image, in: dir, readOnly: readOnly)
        return (dir, image, d)
    }

    @Test(.requires("nbdinfo")) func nbdinfoListShowsTheExport() throws {
        let (_, image, d) = try Self.served()
        let r = try Run.expectSuccess(["nbdinfo", "--list", "nbd+unix:///?socket=\(d.socket!)"])
        #expect(r.stdout.contains("export=\"disk\""), "\(r)")
        #expect(r.stdout.contains(image), "description is the image path: \(r)")
        #expect(r.stdout.contains("export-size: \(16 << 20)"), "\(r)")
        #expect(d.stop() == 0)
    }

    @Test(.requires("nbdinfo")) func nbdinfoJSONShowsSizeFlagsAndContexts() throws {
        let (_, _, d) = try Self.served()
        let r = try Run.expectSuccess(["nbdinfo", "--json", d.uri])
        let json = r.stdout.filter { !$0.isWhitespace }
        #expect(json.contains("\"export-size\":\(16 << 20)"), "\(r)")
        for flag in ["\"is_read_only\":false", "\"can_flush\":true", "\"can_fua\":true", "\"can_trim\":true",
                     "\"can_zero\":true", "\"can_fast_zero\":true", "\"can_multi_conn\":true", "\"can_cache\":true",
                     "\"can_df\":true", "\"base:allocation\"", "\"block_size_maximum\":33554432"] {
            #expect(json.contains(flag), "missing \(flag) in \(r.stdout)")
        }
        #expect(d.stop() == 0)
    }

    @Test(.requires("nbdinfo")) func readOnlyExportSaysSo() throws {
        let (_, _, d) = try Self.served(readOnly: true)
        let json = try Run.expectSuccess(["nbdinfo", "--json", d.uri]).stdout.filter { !$0.isWhitespace }
        #expect(json.contains("\"is_read_only\":true"), "\(json)")
        #expect(json.contains("\"can_trim\":false"), "\(json)")
    }

    @Test(.requires("qemu-io")) func qemuIOPatternsZeroesDiscardFlush() throws {
        let (_, image, d) = try Self.served()
        let r = try Run.expectSuccess(["qemu-io", "-f", "raw",
            "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
            "-c", "write -P 0x5c 3M 64k", "-c", "write -P 0x11 5000 3000", "-c", "read -P 0x11 5000 3000",
            "-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M",
            "-c", "write -P 0xee 2M 1M", "-c", "discard 2M 1M", "-c", "read -P 0 2M 1M",
            "-c", "aio_write -P 0x77 8M 64k", "-c", "aio_write -P 0x78 9M 64k", "-c", "aio_flush",
            "-c", "read -P 0x77 8M 64k", "-c", "read -P 0x78 9M 64k",
            "-c", "flush", d.uri])
        #expect(!r.stdout.contains("Pattern verification failed"), "\(r)")
        #expect(!r.stderr.contains("error") && !r.stdout.contains("error"), "\(r)")
        #expect(d.stop() == 0)
        // Through the file itself: the data reached the image.
        #expect(try Files.readBytes(image, offset: 0, count: 4096) == [UInt8](repeating: 0xab, count: 4096))
        #expect(try Files.readBytes(image, offset: 5000, count: 3000) == [UInt8](repeating: 0x11, count: 3000))
        #expect(try Files.readBytes(image, offset: 3 * Self.mib, count: 65536) == [UInt8](repeating: 0x5c, count: 65536))
        #expect(try Files.readBytes(image, offset: Self.mib, count: 2 * Self.mib) == [UInt8](repeating: 0, count: 2 * Self.mib))
        #expect(try Files.readBytes(image, offset: 9 * Self.mib, count: 65536) == [UInt8](repeating: 0x78, count: 65536))
    }

    /// A source image with data, zeroes and holes.
    static func makeSource(_ path: String, size: Int) throws {
        try Files.createSparse(path, size: size)
        try Files.write(path, bytes: Files.pattern(count: 3 * mib, seed: 1), offset: 0)
        try Files.write(path, bytes: [UInt8](repeating: 0, count: mib), offset: 4 * mib)
        try Files.write(path, bytes: Files.pattern(count: mib + 12345, seed: 2), offset: 7 * mib + 512)
        try Files.write(path, bytes: Files.pattern(count: 4096, seed: 3), offset: size - 4096)
    }

    @Test(.requires("qemu-img")) func qemuImgConvertBothWaysAndCompare() throws {
        let (dir, image, d) = try Self.served()
        let source = dir.file("source.img")
        try Self.makeSource(source, size: 16 << 20)
        try Run.expectSuccess(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, d.uri])
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, d.uri])
        let back = dir.file("back.qcow2")
        try Run.expectSuccess(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", d.uri, back])
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, back])
        #expect(d.stop() == 0)
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, image])
    }

    @Test(.requires("nbdcopy", "cmp")) func nbdcopyInAndOut() throws {
        let (dir, image, d) = try Self.served()
        let source = dir.file("source.img")
        try Self.makeSource(source, size: 16 << 20)
        try Run.expectSuccess(["nbdcopy", "--connections=4", "--requests=16", source, d.uri])
        let out = dir.file("out.img")
        try Run.expectSuccess(["nbdcopy", d.uri, out])
        try Run.expectSuccess(["cmp", source, out])
        // Sparse-aware copy out to stdout, too.
        let r = try Run.expectSuccess(["sh", "-c", "nbdcopy '\(d.uri)' - | cmp - '\(source)'"])
        #expect(r.succeeded)
        #expect(d.stop() == 0)
        try Run.expectSuccess(["cmp", source, image])
    }

    @Test(.requires("nbdinfo")) func nbdinfoMapMatchesSparseFile() throws {
        let dir = try TempDir(prefix: "nbd")
        let image = dir.file("sparse.img")
        try Files.createSparse(image, size: 8 << 20)
        try Files.write(image, bytes: Files.pattern(count: Self.mib, seed: 9), offset: Self.mib)
        try Files.write(image, bytes: Files.pattern(count: 2 * Self.mib, seed: 10), offset: 5 * Self.mib)
        let d = try Blockd.serve(image: image, in: dir, readOnly: true)
        let r = try Run.expectSuccess(["nbdinfo", "--map", d.uri])
        // "offset length type description" per line.
        let rows = r.stdout.split(separator: "\n").map { $0.split(whereSeparator: { $0 == " " || $0 == "\t" }) }
            .map { (Int($0[0])!, Int($0[1])!, Int($0[2])!) }
        let m = Self.mib
        #expect(rows.count == 5, "\(r.stdout)")
        let expected = [(0, m, 3), (m, m, 0), (2 * m, 3 * m, 3), (5 * m, 2 * m, 0), (7 * m, m, 3)]
        for (row, want) in zip(rows, expected) {
            #expect(row == want, "\(r.stdout)")
        }
    }

    @Test(.requires("fio")) func fioRandomReadWriteVerifiesWithFourJobs() throws {
        let (dir, _, d) = try Self.served(size: 64 << 20)
        // Each job writes and verifies its own 16 MiB stripe, so the checksums never collide.
        let r = try Run.command(["fio", "--name=verify", "--ioengine=nbd", "--uri=\(d.uri)", "--rw=randrw",
                                 "--bs=4k", "--size=16M", "--offset_increment=16M", "--numjobs=4", "--iodepth=16",
                                 "--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=512",
                                 "--group_reporting", "--output=\(dir.file("fio.out"))"], timeout: 120)
        let output = (try? Files.read(dir.file("fio.out"))) ?? ""
        #expect(r.succeeded, "\(r)\n\(output)")
        #expect(!output.contains("verify:") || !output.contains("bad"), "\(output)")
        #expect(output.contains("err= 0"), "\(output)")
        #expect(d.stop() == 0)
    }

    @Test(.requires("nbdfuse", "fusermount3"), .requires(.device("/dev/fuse")))
    func nbdfuseMountReadsAndWritesTheImage() throws {
        let (dir, image, d) = try Self.served(size: 4 << 20)
        try Files.write(image, bytes: Array("hello through fuse".utf8), offset: 0)
        let mount = dir.file("mnt")
        mkdir(mount, 0o700)
        let pid = try Subprocess.spawn(["nbdfuse", mount, d.uri], stdoutPath: dir.file("fuse.out"), stderrPath: dir.file("fuse.err"))
        defer {
            _ = try? Run.command(["fusermount3", "-u", mount], timeout: 10)
            if Subprocess.wait(pid, timeout: 5) == nil { kill(pid, SIGKILL); _ = Subprocess.wait(pid, timeout: 5) }
        }
        let file = mount + "/nbd"
        let deadline = Subprocess.now() + 10
        while Files.size(file) != 4 << 20 && Subprocess.now() < deadline { usleep(10_000) }
        #expect(Files.size(file) == 4 << 20, "\((try? Files.read(dir.file("fuse.err"))) ?? "")")
        #expect(try Files.readBytes(file, offset: 0, count: 18) == Array("hello through fuse".utf8))
        let data = Files.pattern(count: 256 * 1024, seed: 77)
        try Files.write(file, bytes: data, offset: 1 << 20)
        let fd = open(file, O_RDWR)
        #expect(fsync(fd) == 0)
        close(fd)
        #expect(try Files.readBytes(file, offset: 1 << 20, count: data.count) == data)
        #expect(try Files.readBytes(image, offset: 1 << 20, count: data.count) == data)
    }

    @Test(.requires("nbdinfo")) func tcpListenerServesNbdinfo() throws {
        let dir = try TempDir(prefix: "nbd")
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 1 << 20)
        let d = try Blockd(["serve", image, "--port", "0", "--host", "127.0.0.1", "--name", "tcp"], in: dir,
                           waitForOutput: "NBD URI: ")
        let line = d.stdoutText.split(separator: "\n").first { $0.contains("NBD URI: ") }!
        let uri = String(line.split(separator: " ").last!)
        #expect(uri.hasPrefix("nbd://127.0.0.1:"), "\(uri)")
        let r = try Run.expectSuccess(["nbdinfo", "--size", uri])
        #expect(r.stdout == "1048576\n")
    }

    /// Many requests in flight on several connections at once (libnbd's aio API), each
    /// checked; replies may come back in any order.
    @Test(.requiresPython("nbd", interpreter: "/usr/bin/python3")) func libnbdManyRequestsInFlightOnFourConnections() throws {
        let (_, _, d) = try Self.served(size: 32 << 20)
        let script = """
        import nbd, sys, os
        uri = sys.argv[1]
        hs = []
        for i in range(4):
            h = nbd.NBD(); h.connect_uri(uri); hs.append(h)
        assert hs[0].can_multi_conn()
        bs = 65536
        blocks = {}
        # 128 writes in flight spread over 4 connections, then flush, then reads.
        for i in range(128):
            data = os.urandom(bs)
            blocks[i] = data
            hs[i % 4].aio_pwrite(data, i * bs * 2)
        for h in hs:
            while h.aio_in_flight() > 0: h.poll(-1)
        hs[0].flush()
        bufs = {}
        for i in range(128):
            b = nbd.Buffer(bs); bufs[i] = b
            hs[(i + 1) % 4].aio_pread(b, i * bs * 2)
        for h in hs:
            while h.aio_in_flight() > 0: h.poll(-1)
        for i in range(128):
            assert bufs[i].to_bytearray() == blocks[i], i
        # Holes between the blocks read back as zeroes (sparse structured reply).
        assert hs[2].pread(bs, bs) == bytearray(bs)
        for h in hs: h.shutdown()
        print("ok")
        """
        let r = try Run.command(["/usr/bin/python3", "-c", script, d.uri], timeout: 60)
        #expect(r.stdout == "ok\n", "\(r)")
        #expect(d.stop() == 0)
    }
}
