#if canImport(Glibc)
import Glibc
#endif
import Testing
import TestSupport

/// Images on tmpfs, whose reads refuse `RWF_NOWAIT` with EOPNOTSUPP: the event loop's inline
/// read hands the request to a worker (instead of failing it), and the file remembers, so
/// later reads go to the worker without trying again.
@Suite struct TmpfsTests {
    /// A directory on `/dev/shm` when it is a tmpfs mount (/proc/mounts), or the test is
    /// skipped (failed under CI).
    static func tmpfsDirectory() throws -> TempDir {
        let mounts = (try? Files.read("/proc/mounts")) ?? ""
        let isTmpfs = mounts.split(separator: "\n").contains { line in
            let f = line.split(separator: " ")
            return f.count > 2 && f[1] == "/dev/shm" && f[2] == "tmpfs"
        }
        guard isTmpfs, access("/dev/shm", W_OK) == 0 else {
            if CI.isCI { throw HarnessError("/dev/shm is not a writable tmpfs") }
            try Test.cancel("needs /dev/shm as a writable tmpfs")
        }
        return try TempDir(prefix: "tmpfs", base: "/dev/shm")
    }

    @Test(.requires("qemu-img", "qemu-io", "nbdinfo", "strace"))
    func imagesOnTmpfsServeReads() throws {
        let dir = try Self.tmpfsDirectory()
        let raw = dir.file("disk.raw"), qcow = dir.file("disk.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "raw", raw, "8M"])
        try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 4M 64k", raw])
        try Run.expectSuccess(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow])
        for (image, format) in [(raw, "raw"), (qcow, "qcow2")] {
            let d = try Blockd.serve(image: image, in: dir)
            let trace = try NodeOptionsTests.strace(pid: d.pid, in: dir, calls: "preadv2") {
                try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 4M 64k",
                                       "-c", "read -P 0 5M 1M", "-c", "read -P 0x5a 4k 4k", d.uri])
                try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, raw])
                let info = try Run.expectSuccess(["nbdinfo", "--map", d.uri]).stdout
                #expect(info.contains("data"), "\(format): \(info)")
            }
            #expect(d.stop() == 0)
            // One inline attempt learns that tmpfs has no RWF_NOWAIT reads; every other read
            // goes to a worker without trying.
            let refused = trace.filter { $0.contains("RWF_NOWAIT") && $0.contains("EOPNOTSUPP") }
            let nowait = trace.filter { $0.contains("RWF_NOWAIT") }
            #expect(refused.count == 1 && nowait.count == 1, "\(format): \(nowait)")
            #expect(trace.filter { $0.contains("preadv2(") && !$0.contains("RWF_NOWAIT") }.count >= 4, "\(format): \(trace)")
        }
    }
}
