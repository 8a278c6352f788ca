#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Point-in-time backups (issue 13) end to end: each test is one scenario of
/// `backup/backup_scenarios.py`, which drives blockd (or qemu-storage-daemon: pass its path)
/// over QMP and pulls or checks the backups with libnbd, qemu-img, qemu-io and fio. The
/// transcript scenarios print their QMP session normalised; the golden files beside the script
/// are qemu-storage-daemon 7.2's, and blockd's must equal them.
@Suite("point-in-time backup", .serialized)
struct BackupInteropTests {
    static let dir: String = {
        let file = "\(#filePath)"
        return String(file[..<file.lastIndex(of: "/")!]) + "/backup"
    }()

    func run(_ daemon: String, _ scenario: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> CommandResult {
        let r = try Run.command(["/usr/bin/python3", Self.dir + "/backup_scenarios.py", daemon, scenario], timeout: 600)
        #expect(r.succeeded, "\(scenario) on \(daemon):\n\(r.stdout)\n\(r.stderr)", sourceLocation: sourceLocation)
        return r
    }

    func scenario(_ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try run(try BuildProducts.blockd, name, sourceLocation: sourceLocation)
        #expect(r.stdout.contains("OK"), "\(r.stdout)", sourceLocation: sourceLocation)
    }

    func transcript(_ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try run(try BuildProducts.blockd, name, sourceLocation: sourceLocation)
        let expected = try Files.read(Self.dir + "/\(name).qsd-7.2.expected.txt")
        #expect(r.stdout == expected, "transcript differs from qemu-storage-daemon 7.2's:\n\(r.stdout)",
                sourceLocation: sourceLocation)
    }

    /// Pattern A, a pull-mode backup while fio (verify) rewrites half the disk and qemu-io
    /// writes land in the MiB being read: the backup is exactly A, the disk is the writes over
    /// A, and after teardown only the disk's nodes and export are left.
    @Test(.requires("qemu-img", "qemu-io", "fio", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func pullModeBackupIsThePointInTime() throws { try scenario("point_in_time") }

    /// A full and three incremental pull-mode backups, fio writing during each and between
    /// them: each restored level equals the disk at that backup's start.
    @Test(.requires("qemu-img", "qemu-io", "fio", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func incrementalChainRestoresEachPointInTime() throws { try scenario("incremental_chain") }

    /// The next checkpoint's bitmap holds exactly the client writes made during the backup,
    /// none of the filter's copies; an old-style fleecing overlay's bitmap records no copy.
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func nextBitmapHoldsOnlyClientWrites() throws { try scenario("bitmaps_exact") }

    /// bitmap-mode on-success, never and always after success, failure and cancel.
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func bitmapModesAsQemu() throws { try transcript("bitmap_modes") }

    /// Push mode: every sync mode into qcow2 targets, full also compressed.
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func pushModeEverySyncMode() throws { try scenario("push_modes") }

    /// Push mode into a remote node (`nbd`, served by qemu-nbd) while a client writes: the
    /// remote image is the disk at the start, and clean.
    @Test(.requires("qemu-img", "qemu-io", "qemu-nbd", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func pushModeIntoARemoteNode() throws { try scenario("remote_target") }

    /// A fleecing target that runs out of space and one slower than cbw-timeout, with
    /// on-cbw-error break-snapshot and break-guest-write (QEMU's copy-before-write test).
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func copyBeforeWriteErrorsAsQemu() throws { try transcript("cbw_errors") }

    /// Refused backups (bad arguments, missing bitmap, busy target, a failed transaction):
    /// QEMU's errors, and the graph as it was after each.
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func refusedBackupsChangeNothing() throws { try transcript("errors") }

    /// What blockd refuses beyond QEMU: a second backup of a node, a fleecing target smaller
    /// than the disk.
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func secondBackupAndSmallTargetAreRefused() throws { try scenario("blockd_only_errors") }

    /// copy-before-write added with blockdev-add goes in above an exported throttle node's
    /// file; blockdev-reopen naming it is accepted, pointing the parent past it is refused while
    /// a snapshot reads it; blockdev-del takes it out; a reopen of a node without a file child
    /// is a no-op (it used to crash the daemon).
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func filterInsertedAtAddAndByReopen() throws { try scenario("inserted_filter") }

    /// kill -9 in the middle of a pull-mode backup under fio: the disk and its persistent
    /// bitmaps pass qemu-img check; the next incremental covers every write since the last
    /// good backup.
    @Test(.requires("qemu-img", "qemu-io", "fio", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func killDuringPullModeBackup() throws { try scenario("crash") }

    /// The pull-mode flow and a push-mode incremental backup: the same events and the same
    /// backup content as qemu-storage-daemon.
    @Test(.requires("qemu-img", "qemu-io", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"))
    func referenceTranscriptEqualsQemuStorageDaemons() throws { try transcript("reference") }

    /// The same scenarios against the qemu-storage-daemon installed here (the golden files
    /// come from it).
    @Test(.requires("qemu-storage-daemon", "qemu-img", "qemu-io", "fio", "/usr/bin/python3"), .requiresPython("nbd", interpreter: "/usr/bin/python3"),
          arguments: ["reference", "errors", "cbw_errors", "bitmap_modes"])
    func qemuStorageDaemonAnswersTheSame(_ name: String) throws {
        let r = try run(Tools.path(of: "qemu-storage-daemon")!, name)
        let expected = try Files.read(Self.dir + "/\(name).qsd-7.2.expected.txt")
        #expect(r.stdout == expected, "qemu-storage-daemon's transcript changed:\n\(r.stdout)")
    }
}
