#if canImport(Glibc)
import Glibc
#endif
import Testing

/// An image whose refcounts call its L1 table free, served writable: the first allocating
/// write would put an L2 table over the L1 table. blockd refuses it as qemu-storage-daemon
/// does — the client gets EIO, the monitor `BLOCK_IMAGE_CORRUPTED` with the same data, stderr
/// QEMU's line — and the image is marked corrupt with its L1 table intact.
@Suite struct QCOW2CorruptionTests {
    @Test(.requires("qemu-img", "qemu-io", "qemu-storage-daemon"), .requiresPython("qemu.qmp"))
    func writeOverMetadataIsRefusedLikeQemu() throws {
        let dir = try TempDir(prefix: "corrupt")
        let script = QMPInteropTests.scripts + "/corrupt_event.py"
        var seen: [String] = []
        var stderr: [String] = []
        for daemon in ["qsd", "blockd"] {
            let img = dir.file("\(daemon).qcow2")
            try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"])
            // 64 KiB clusters: header, refcount table, refcount block (16-bit entries), L1.
            let fd = open(img, O_WRONLY)
            var zero: UInt16 = 0
            #expect(pwrite(fd, &zero, 2, 0x20000 + 3 * 2) == 2)
            close(fd)
            let l1Before = try Files.readBytes(img, offset: 0x30000, count: 0x10000)
            let qmp = dir.file("\(daemon)-qmp.sock"), nbd = dir.file("\(daemon)-nbd.sock")
            let monitor = ["--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0"]
            if daemon == "qsd" {
                let q = try QSD(monitor, in: dir, waitForSocket: qmp)
                seen.append(try Run.expectSuccess(["python3", script, qmp, img, nbd]).stdout)
                q.stop()
                stderr.append(try Files.read(q.log))
            } else {
                let d = try Blockd(monitor, in: dir, waitForSocket: qmp)
                seen.append(try Run.expectSuccess(["python3", script, qmp, img, nbd]).stdout)
                #expect(d.stop() == 0)
                stderr.append(d.stderrText)
            }
            #expect(try Run.command(["qemu-img", "info", img]).stdout.contains("corrupt: true"), "\(daemon)")
            if daemon == "blockd" {
                #expect(try Files.readBytes(img, offset: 0x30000, count: 0x10000) == l1Before,
                        "blockd wrote over the L1 table")
            }
        }
        #expect(seen[0].contains("BLOCK_IMAGE_CORRUPTED {\"device\": \"\", \"msg\": \"Preventing invalid write on metadata (overlaps with active L1 table)\""),
                "\(seen[0])")
        #expect(seen[1] == seen[0])
        let line = "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with active L1 table); further corruption events will be suppressed\n"
        #expect(stderr[0].contains(line), "\(stderr[0])")
        #expect(stderr[1] == line)
    }
}
