#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

/// The incremental-backup example (Examples/IncrementalBackup) against a real blockd, and the
/// crash-safety of persistent bitmaps under fio.
@Suite(.serialized) struct IncrementalBackupTests {
    /// A blockd started with only a QMP monitor, driven by blockctl as in docs/incremental-backup.md.
    final class Setup {
        let dir: TempDir
        let daemon: Blockd
        let qmp: String
        let nbd: String
        let image: String
        var disk: String { "nbd+unix:///disk0?socket=\(nbd)" }
        var backupExport: String { "nbd+unix:///backup?socket=\(nbd)" }

        init(size: String) throws {
            dir = try TempDir(prefix: "blockd-ib")
            qmp = dir.file("qmp.sock")
            nbd = dir.file("nbd.sock")
            image = dir.file("disk.qcow2")
            try Run.expectSuccess(["qemu-img", "create", "-f", "qcow2", image, size])
            try Run.expectSuccess(["qemu-io", "-c", "write -P 7 0 16M", "-c", "write -P 9 100M 3M", image])
            daemon = try Blockd(["--qmp", qmp], in: dir, waitForSocket: qmp)
            try ctl("add-node", "driver=file,node-name=f0,filename=\(image)")
            try ctl("add-node", "driver=qcow2,node-name=disk0,file=f0")
            try ctl("server-start", "--socket", nbd)
            try ctl("export", "disk0", "--writable")
        }

        @discardableResult
        func ctl(_ args: String...) throws -> String { try ctl(args) }

        @discardableResult
        func ctl(_ args: [String]) throws -> String {
            try Run.expectSuccess([try BuildProducts.blockctl] + args, environment: ["BLOCKD_QMP": qmp]).stdout
        }

        func backup(_ args: String...) throws -> CommandResult { try backup(args) }

        func backup(_ args: [String]) throws -> CommandResult {
            try Run.expectSuccess([try BuildProducts.executable("incremental-backup")] + args, timeout: 120)
        }
    }

    /// (bytes, extents) from the example's "transferred N bytes in M extents" line.
    static func transferred(_ out: String) -> (UInt64, Int)? {
        guard let line = out.split(separator: "\n").first(where: { $0.contains("transferred") }) else { return nil }
        let w = line.split(separator: " ")
        guard let i = w.firstIndex(of: "transferred"), w.count > i + 4,
              let bytes = UInt64(w[i + 1]), let extents = Int(w[i + 4]) else { return nil }
        return (bytes, extents)
    }

    /// Dirty extents (offset, length) from `nbdinfo --map=qemu:dirty-bitmap:NAME`.
    static func dirtyMap(_ uri: String, _ bitmap: String) throws -> [(UInt64, UInt64)] {
        try Run.expectSuccess(["nbdinfo", "--map=qemu:dirty-bitmap:\(bitmap)", uri]).stdout
            .split(separator: "\n").compactMap { line in
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                guard f.count >= 3, f[2] == "1", let a = UInt64(f[0]), let b = UInt64(f[1]) else { return nil }
                return (a, b)
            }
    }

    /// `count` of a bitmap in query-named-block-nodes.
    static func bitmapCount(_ s: Setup, node: String, name: String) throws -> UInt64? {
        let text = try s.ctl("query", "query-named-block-nodes", #"{"flat": true}"#)
        let nodes = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]] ?? []
        let n = nodes.first { $0["node-name"] as? String == node }
        let b = (n?["dirty-bitmaps"] as? [[String: Any]])?.first { $0["name"] as? String == name }
        return (b?["count"] as? NSNumber)?.uint64Value
    }

    @Test(.requires("qemu-img", "qemu-io", "nbdinfo", "fio"))
    func fullThenIncrementalAroundFioBurst() throws {
        let s = try Setup(size: "256M")
        let file = s.dir.file("backup.raw")
        try s.ctl("bitmap", "add", "disk0", "b0", "--persistent")
        // The image's bitmap directory, as QSD reports it under format-specific.
        #expect(try s.ctl("query", "query-named-block-nodes").contains(
            #""lazy-refcounts": false, "bitmaps": [{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}], "refcount-bits": 16"#))
        let full = try s.backup("--uri", s.disk, "--backup", file, "--bitmap", "b0")
        #expect(Self.transferred(full.stdout)?.0 == 256 << 20, "\(full.stdout)")
        #expect(full.stdout.contains("verify: ok"))

        // The burst: random 64 KiB writes, plus unaligned small ones (rounded out to granules).
        try Run.expectSuccess(["fio", "--name=burst", "--ioengine=nbd", "--uri=\(s.disk)", "--rw=randwrite", "--bs=64k",
                               "--size=256M", "--io_size=8M", "--iodepth=8", "--randrepeat=0"])
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 3 1000 5000", "-c", "write -P 4 200M 1", s.disk])

        try s.ctl("query", "transaction", #"""
        {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1", "persistent": true}},
                     {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}}]}
        """#)
        try s.ctl("export", "disk0", "--name", "backup", "--id", "backup", "--bitmap", "b0")
        let count = try #require(try Self.bitmapCount(s, node: "disk0", name: "b0"))
        let map = try Self.dirtyMap(s.backupExport, "b0")
        #expect(map.reduce(0) { $0 + $1.1 } == count)
        #expect(count >= 8 << 20 && count < 10 << 20)

        let incremental = try s.backup("--uri", s.backupExport, "--backup", file, "--bitmap", "b0")
        let t = try #require(Self.transferred(incremental.stdout), "\(incremental.stdout)")
        #expect(t.0 == count)
        #expect(t.1 == map.count)
        #expect(incremental.stdout.contains("verify: ok"))

        // The backup equals the live image (qemu-img reading it over NBD).
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "raw", file, s.disk])

        try s.ctl("unexport", "backup")
        try s.ctl("bitmap", "remove", "disk0", "b0")
        // Writes after the rotation are b1's, and the backup export is gone.
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 5 64M 64k", s.disk])
        #expect(try Self.bitmapCount(s, node: "disk0", name: "b1") == 65536)
        #expect(s.daemon.stop() == 0)
        // Against the image file: it differs only where the write after the backup went.
        let cmp = try Run.command(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", file, s.image])
        #expect(!cmp.succeeded)   // the write after the backup differs …
        #expect(cmp.stdout.contains("Content mismatch at offset 67108864"))   // … and only there
    }

    /// fio (iodepth 1, its iolog says what it issued) writes to an export with a persistent
    /// bitmap; kill -9 at a random moment, 20 times. After each restart the bitmap loads valid
    /// and every range fio wrote is dirty. fio logs a write before issuing it, so the last
    /// entry of a round may never have reached the daemon: it is not checked.
    @Test(.requires("qemu-img", "nbdinfo", "fio"))
    func crashSafetyUnderFio() throws {
        let dir = try TempDir(prefix: "blockd-ibc")
        let image = dir.file("a.qcow2")
        let sock = dir.file("nbd.sock")
        let qmp = dir.file("qmp.sock")
        try Run.expectSuccess(["qemu-img", "create", "-f", "qcow2", image, "4G"])
        try Run.expectSuccess(["qemu-img", "bitmap", "--add", image, "b0"])
        let args = ["--blockdev", "driver=file,filename=\(image),node-name=f",
                    "--blockdev", "driver=qcow2,file=f,node-name=n0",
                    "--nbd-server", "addr.type=unix,addr.path=\(sock)",
                    "--export", "type=nbd,id=e,node-name=n0,writable=on,bitmaps.0=b0", "--qmp", qmp]
        let uri = "nbd+unix:///n0?socket=\(sock)"
        var written: [(UInt64, UInt64)] = []
        for round in 0..<20 {
            let d = try Blockd(args, in: dir, waitForSocket: sock)
            let log = dir.file("iolog\(round)")
            let fio = try Subprocess.spawn([Tools.path(of: "fio") ?? "fio", "--name=w", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite",
                                            "--bsrange=512-256k", "--size=4G", "--iodepth=1", "--time_based", "--runtime=10",
                                            "--randrepeat=0", "--write_iolog=\(log)"],
                                           stdoutPath: dir.file("fio.out"), stderrPath: dir.file("fio.err"))
            // fio takes a while to start: wait for its first write, then kill at a random moment.
            let deadline = Subprocess.now() + 10
            while Subprocess.now() < deadline && !((try? Files.read(log))?.contains(" write ") ?? false) { usleep(5_000) }
            usleep(UInt32.random(in: 20_000...300_000))
            d.kill9()
            _ = Subprocess.wait(fio, timeout: 20)
            let entries = try Files.read(log).split(separator: "\n").compactMap { line -> (UInt64, UInt64)? in
                let f = line.split(separator: " ")
                guard f.count == 5, f[2] == "write", let o = UInt64(f[3]), let l = UInt64(f[4]) else { return nil }
                return (o, l)
            }
            #expect(entries.count > 1, "round \(round): fio wrote nothing")
            written += entries.dropLast()
            let r = try Blockd(args, in: dir, waitForSocket: sock)
            let map = try Self.dirtyMap(uri, "b0")
            let info = try Run.expectSuccess([try BuildProducts.blockctl, "query", "query-named-block-nodes"],
                                             environment: ["BLOCKD_QMP": qmp]).stdout
            #expect(r.stop() == 0)
            #expect(info.contains(#""name": "b0""#) && !info.contains("inconsistent"))
            // Sorted extents: binary search for the one that would hold each write.
            for (o, l) in written {
                var lo = 0, hi = map.count
                while lo < hi { let m = (lo + hi) / 2; if map[m].0 + map[m].1 <= o { lo = m + 1 } else { hi = m } }
                let ok = lo < map.count && map[lo].0 <= o && o + l <= map[lo].0 + map[lo].1
                #expect(ok, "round \(round): [\(o), +\(l)) written but not dirty")
                if !ok { return }
            }
        }
        // Unflushed allocations leak after kill -9 (exit 3); anything else is corruption.
        let check = try Run.command(["qemu-img", "check", image])
        #expect(check.status == 0 || check.status == 3, "\(check)")
    }

    /// Pull mode (docs/backup.md) with `blockctl backup start|finish` and the example client:
    /// a full and then an incremental backup, fio writing to the disk for the whole of each
    /// pull. Each backup equals the disk at its start (a copy read right after the start,
    /// before fio begins), never the disk at its end; after each finish the filter, the
    /// snapshot and the fleecing node are gone, and the checkpoints rotate.
    @Test(.requires("qemu-img", "qemu-io", "fio"))
    func pullModeWithBlockctlUnderFio() throws {
        let s = try Setup(size: "128M")
        let file = s.dir.file("backup.raw")
        let snapshot = "nbd+unix:///disk0-backup?socket=\(s.nbd)"
        var fioRound = 0

        /// One backup: start, copy of the disk at the start, fio during the whole pull, finish.
        func backup(since: String?, checkpoint: String) throws -> CommandResult {
            let fleece = s.dir.file("fl-\(checkpoint).qcow2")
            try Run.expectSuccess(["qemu-img", "create", "-f", "qcow2", fleece, "128M"])
            var start = ["backup", "start", "disk0", "--fleece", fleece, "--checkpoint", checkpoint, "--persistent"]
            if let since { start += ["--since", since] }
            let started = try s.ctl(start)
            #expect(started.contains("export 'disk0-backup'"), "\(started)")
            let expected = s.dir.file("expected-\(checkpoint).raw")
            try Run.expectSuccess(["qemu-img", "convert", "-f", "raw", "-O", "raw", s.disk, expected])
            fioRound += 1
            let fio = try Subprocess.spawn([Tools.path(of: "fio") ?? "fio", "--name=w", "--ioengine=nbd", "--uri=\(s.disk)",
                                            "--rw=randwrite", "--bsrange=4k-128k", "--size=128M", "--iodepth=8",
                                            "--time_based", "--runtime=120", "--randrepeat=0"],
                                           stdoutPath: s.dir.file("fio\(fioRound).out"), stderrPath: s.dir.file("fio\(fioRound).err"))
            // The pull starts once fio's writes are landing (the disk no longer equals the copy).
            let deadline = Subprocess.now() + 20
            while Subprocess.now() < deadline,
                  (try? Run.command(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", expected, s.disk]))?.succeeded ?? true {
                usleep(20_000)
            }
            var pull = ["--uri", snapshot, "--backup", file, "--progress"]
            pull += since.map { ["--bitmap", $0] } ?? ["--full"]
            let result = try s.backup(pull)
            // fio was still writing when the pull (and its verify pass) ended.
            let stillWriting = Subprocess.wait(fio, timeout: 0) == nil
            kill(fio, SIGTERM)
            _ = Subprocess.wait(fio, timeout: 20)
            #expect(stillWriting, "fio stopped before the backup ended")
            var finish = ["backup", "finish", "disk0", "--checkpoint", checkpoint]
            if let since { finish += ["--since", since] }
            try s.ctl(finish)
            // The backup is the disk at the start, and the disk moved on meanwhile.
            try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "raw", expected, file])
            #expect(!(try Run.command(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", file, s.disk])).succeeded)
            let nodes = try s.ctl("nodes")
            for gone in ["disk0-fleece", "disk0-cbw", "disk0-snap"] { #expect(!nodes.contains(gone), "\(nodes)") }
            #expect(!(try s.ctl("exports")).contains("disk0-backup"))
            return result
        }

        let full = try backup(since: nil, checkpoint: "b0")
        #expect(full.stdout.contains("verify: ok"), "\(full.stdout)")
        #expect(full.stderr.contains("progress: 128/128 MiB (100%)") && full.stderr.contains("ETA"), "\(full.stderr)")
        // b0 holds fio's writes made during the full backup (and after).
        let b0 = try #require(try Self.bitmapCount(s, node: "disk0", name: "b0"))
        #expect(b0 > 0)

        let incremental = try backup(since: "b0", checkpoint: "b1")
        let t = try #require(Self.transferred(incremental.stdout), "\(incremental.stdout)")
        #expect(t.0 == b0, "the incremental copied other than what b0 marked when it started")
        #expect(incremental.stdout.contains("verify: ok"))
        // b0 went on success; b1 holds what fio wrote during the incremental backup.
        #expect(try Self.bitmapCount(s, node: "disk0", name: "b0") == nil)
        #expect(try #require(try Self.bitmapCount(s, node: "disk0", name: "b1")) > 0)
        #expect(s.daemon.stop() == 0)
        try Run.expectSuccess(["qemu-img", "check", s.image])
    }

    /// `blockctl backup finish --failed` gives the next checkpoint what the failed backup did
    /// not copy; `blockctl backup push` copies the disk into a qcow2 node with its progress
    /// line (rate, ETA) until the job is done.
    @Test(.requires("qemu-img", "qemu-io"))
    func blockctlFailedPullAndPush() throws {
        let s = try Setup(size: "128M")
        try s.ctl("bitmap", "add", "disk0", "b0", "--persistent")
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", s.disk])
        let fleece = s.dir.file("fl.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-f", "qcow2", fleece, "128M"])
        try s.ctl("backup", "start", "disk0", "--fleece", fleece, "--checkpoint", "b1", "--since", "b0", "--persistent")
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 2 64M 64k", s.disk])
        try s.ctl("backup", "finish", "disk0", "--checkpoint", "b1", "--since", "b0", "--failed")
        #expect(try Self.bitmapCount(s, node: "disk0", name: "b0") == nil)
        #expect(try Self.bitmapCount(s, node: "disk0", name: "b1") == (1 << 20) + 65536)

        let target = s.dir.file("t.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-f", "qcow2", target, "128M"])
        try s.ctl("add-node", "driver=file,node-name=tf,filename=\(target)")
        try s.ctl("add-node", "driver=qcow2,node-name=t,file=tf")
        let out = try s.ctl("backup", "push", "disk0", "t", "--sync", "full", "--speed", "64M")   // ~2 s: polled on the way
        #expect(out.contains("disk0-backup [") && out.contains("ETA") && out.hasSuffix("done\n"), "\(out)")
        try s.ctl("del-node", "t")
        #expect(s.daemon.stop() == 0)
        try Run.expectSuccess(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", s.image, target])
        try Run.expectSuccess(["qemu-img", "check", target])
    }
}
