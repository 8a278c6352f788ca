#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Crash safety of the qcow2 driver: blockd is killed with SIGKILL while fio writes, trims and
/// flushes; every time, `qemu-img check` must find no corruption (leaks are fine) and every
/// block that was flushed before the kill must read back.
@Suite struct QCOW2CrashTests {
    @Test(.requires("qemu-img", "qemu-io", "fio"), .timeLimit(.minutes(2)))
    func killNineDuringWritesNeverCorrupts() throws {
        let dir = try TempDir(prefix: "qcow2-crash")
        let image = dir.file("disk.qcow2")
        // Small clusters make allocation and L2/refcount metadata churn on every write.
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "32M"])
        var rng = SystemRandomNumberGenerator()
        let rounds = 20
        for round in 0..<rounds {
            let d = try Blockd.serve(image: image, in: dir)
            // A marker for this round at its own place, flushed: it must survive every later kill.
            let marker = 0x40 + round
            let r = try Run.command(["qemu-io", "-f", "raw", "-c", "write -P \(marker) \(round * 65536) 64k",
                                     "-c", "flush", d.uri])
            #expect(r.succeeded && !r.stdout.contains("failed"), "\(r)")
            // Writes (allocating, partial clusters, overwrites), trims and flushes in 2-32 MiB.
            let log = dir.file("fio\(round).iolog")
            let fio = try Subprocess.spawn(
                ["fio", "--ioengine=nbd", "--uri=\(d.uri)", "--iodepth=16", "--offset=2M", "--size=30M",
                 "--time_based", "--runtime=5", "--randrepeat=0",
                 "--name=w", "--rw=randwrite", "--bsrange=512-64k", "--fsync=32",
                 "--verify=crc32c", "--do_verify=0", "--verify_state_save=0", "--write_iolog=\(log)",
                 "--name=t", "--rw=randtrim", "--bs=16k"],
                stdoutPath: dir.file("fio.out"), stderrPath: dir.file("fio.err"))
            // Kill at a random moment once fio writes (a crash test: the delay is the point, not a wait).
            #expect(waitUntil(timeout: 10) { ((try? Files.read(log)) ?? "").contains(" write ") }, "round \(round): fio never wrote")
            usleep(UInt32.random(in: 20_000...150_000, using: &rng))
            d.kill9()
            kill(fio, SIGKILL)
            _ = Subprocess.wait(fio, timeout: 10)

            let check = try Run.command(["qemu-img", "check", image])
            // 0: clean, 3: leaked clusters only. 2 would be corruption.
            #expect(check.status == 0 || check.status == 3, "round \(round): \(check)")
            #expect(!check.stdout.contains("ERROR"), "round \(round): \(check)")
            if check.status != 0 && check.status != 3 { break }
            // Every flushed marker so far reads back.
            var cmds: [String] = []
            for k in 0...round { cmds += ["-c", "read -P \(0x40 + k) \(k * 65536) 64k"] }
            let read = try Run.command(["qemu-io", "-r", "-f", "qcow2"] + cmds + [image])
            #expect(read.succeeded && !read.stdout.contains("Pattern verification failed")
                    && !read.stdout.contains("failed"), "round \(round): \(read)")
        }
        // A repaired image opens writable again.
        try Run.expectSuccess(["qemu-img", "check", "-q", "-r", "leaks", image])
    }

    /// Leaks after `kill -9` while a client writes 4 KiB random writes into an image with
    /// 64 KiB clusters, 10 crashes without repair. A cluster's refcount reaches the disk only in
    /// a metadata write-back, right before the L2 table that points at it, and never while its
    /// allocating write is still in flight. So a crash leaks at most the allocations made since
    /// the previous write-back, and only when it falls between a write-back's refcount sync and
    /// its L2 write (QEMU has the same window). Two workloads make that bound exact:
    /// - queue depth 16, no flush: nothing is ever written back, so nothing leaks;
    /// - queue depth 1, an fsync every 32 writes: at most 32 data clusters plus the image's two
    ///   L2 tables (created in the first round).
    /// blockd used to leak its whole cluster reservation on every crash (up to 64 clusters),
    /// and every cluster allocated when no flush had come. Figures against
    /// qemu-storage-daemon: Benchmarks/crash-leaks.sh, docs/qcow2.md.
    @Test(.requires("qemu-img", "fio"), .timeLimit(.minutes(3)))
    func killNineLeaksOnlyAllocationsInFlight() throws {
        let dir = try TempDir(prefix: "qcow2-leaks")
        let image = dir.file("disk.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, "1G"])
        let fsyncEvery = 32
        var rng = SystemRandomNumberGenerator()
        var total = 0
        var perCrash: [Int] = []
        for round in 0..<10 {
            let flushes = round % 2 == 1
            let bound = flushes ? fsyncEvery + 2 : 0
            let d = try Blockd.serve(image: image, in: dir)
            let start = Files.size(image) ?? 0
            let fio = try Subprocess.spawn(
                ["fio", "--ioengine=nbd", "--uri=\(d.uri)", "--name=w", "--rw=randwrite", "--bs=4k",
                 "--size=1G", "--time_based", "--runtime=30", "--norandommap", "--randrepeat=0"]
                    + (flushes ? ["--iodepth=1", "--fsync=\(fsyncEvery)"] : ["--iodepth=16"]),
                stdoutPath: dir.file("fio.out"), stderrPath: dir.file("fio.err"))
            // Allocating writes are under way once the file grows by some clusters.
            waitUntil(timeout: 10) { (Files.size(image) ?? 0) >= start + 32 * 65536 }
            // The crash lands anywhere in the write stream.
            usleep(UInt32.random(in: 0...200_000, using: &rng))
            d.kill9()
            // fio leads its own process group (Subprocess.spawn): its job processes go too.
            kill(-fio, SIGKILL)
            _ = Subprocess.wait(fio, timeout: 10)
            let check = try Run.command(["qemu-img", "check", image])
            #expect(check.status == 0 || check.status == 3, "round \(round): \(check)")
            #expect(!check.stdout.contains("ERROR"), "round \(round): \(check)")
            var leaked = 0
            for line in check.stdout.split(separator: "\n") where line.hasSuffix("leaked clusters were found on the image.") {
                leaked = Int(line.prefix { $0.isNumber }) ?? 0
            }
            perCrash.append(leaked - total)
            #expect(leaked - total <= bound,
                    "round \(round) (\(flushes ? "QD1, fsync every \(fsyncEvery)" : "QD16, no flush")): \(leaked - total) clusters leaked by one crash")
            total = leaked
        }
        print("killNineLeaksOnlyAllocationsInFlight: leaked clusters per crash \(perCrash), total \(total)")
        // The image opens writable again after repair.
        try Run.expectSuccess(["qemu-img", "check", "-q", "-r", "leaks", image])
    }
}
