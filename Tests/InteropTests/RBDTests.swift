#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Testing

/// A single-node Ceph cluster (`scripts/ceph-single-node.sh`, with cephx) for the tests of one
/// suite: started before the suite's first test, stopped after its last. When it cannot start
/// the suite's tests fail (also locally: the tools were there, the `.requires` trait saw them).
struct CephCluster: SuiteTrait, TestScoping {
    /// The running cluster's `ceph.conf`, while a suite with this trait runs.
    static var conf: String? { current.withLock { $0 } }
    private static let current = Mutex<String?>(nil)

    static let script: String = {
        let file = "\(#filePath)"
        var parts = file.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)   // Tests/InteropTests/RBDTests.swift
        return parts.joined(separator: "/") + "/scripts/ceph-single-node.sh"
    }()

    var isRecursive: Bool { false }

    func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        let dir = try TempDir(prefix: "ceph")
        // A second attempt in a fresh directory if the first fails (its monitor's port, picked
        // free, may have been taken meanwhile by another process).
        var started = try Run.command(["bash", Self.script, "start", dir.path + "/c"], timeout: 120,
                                      environment: ["CEPH_AUTH": "cephx"])
        var cluster = dir.path + "/c"
        defer { _ = try? Run.command(["bash", Self.script, "stop", cluster], timeout: 60) }
        if !started.succeeded {
            _ = try? Run.command(["bash", Self.script, "stop", cluster], timeout: 60)
            cluster = dir.path + "/c2"
            started = try Run.command(["bash", Self.script, "start", cluster], timeout: 120,
                                      environment: ["CEPH_AUTH": "cephx"])
        }
        let conf = started.stdout.split(separator: "\n").last.map(String.init) ?? ""
        guard started.succeeded, conf.hasSuffix("ceph.conf") else {
            Issue.record("the test cluster did not start:\n\(started.stdout)\n\(started.stderr)")
            return
        }
        CephCluster.current.withLock { $0 = conf }
        defer { CephCluster.current.withLock { $0 = nil } }
        try await function()
    }
}

extension Trait where Self == CephCluster {
    /// Runs the suite with a Ceph cluster of its own (see `CephCluster`).
    static var cephCluster: Self { CephCluster() }
}

/// The `rbd` driver end to end (`rbd/rbd_scenarios.py BLOCKD CONF SCENARIO`): RBD images
/// exported over NBD, as a qcow2 overlay's base, under stream and commit, with dirty bitmaps;
/// against qemu-storage-daemon with the same QMP script; with the OSD stopped; bad input.
@Suite("rbd driver", .serialized, .requires("ceph-mon", "ceph-osd", "rbd", "monmaptool", "ceph-authtool", "qemu-img", "qemu-io", "python3"),
       .cephCluster)
struct RBDTests {
    static let script: String = {
        let file = "\(#filePath)"
        return String(file[..<file.lastIndex(of: "/")!]) + "/rbd/rbd_scenarios.py"
    }()

    func run(_ scenario: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        guard let conf = CephCluster.conf else {
            Issue.record("no test cluster", sourceLocation: sourceLocation)
            return
        }
        let r = try Run.command(["python3", Self.script, try BuildProducts.blockd, conf, scenario], timeout: 600)
        if r.status == 77 {
            // The script found a tool missing (it names it): the same rule as `require`.
            throw MissingScriptRequirement(scenario: scenario, output: r.stdout)
        }
        #expect(r.status == 0 && ("\n" + r.stdout).contains("\nOK "), "\(scenario):\n\(r.stdout)\n\(r.stderr)",
                sourceLocation: sourceLocation)
    }

    /// qemu-io, fio with verify and nbdcopy through an export; `rbd export` and `rbd diff`
    /// agree with what the clients wrote and what `nbdinfo --map` reports.
    @Test(.requires("fio", "nbdcopy", "nbdinfo")) func exportOverNBD() throws { try run("export") }

    /// NO_HOLE zero writes keep the range allocated (qemu-storage-daemon 7.2 frees it).
    @Test(.requires("qemu-storage-daemon")) func noHoleZeroesStayAllocated() throws { try run("zeroes") }

    /// A local qcow2 overlay over an RBD base: reads, writes, stream, commit.
    @Test(.requires("fio")) func qcow2OverlayOverRBDBase() throws { try run("overlay") }

    /// A dirty bitmap on an RBD node, exported as qemu:dirty-bitmap: for an incremental backup.
    @Test(.requires("nbdinfo", "nbdcopy"), .requiresPython("nbd", interpreter: "/usr/bin/python3")) func incrementalBackupOfRBDNode() throws { try run("bitmap") }

    /// The same QMP script against qemu-storage-daemon: same replies, events and content.
    @Test(.requires("qemu-storage-daemon")) func sameAsQemuStorageDaemon() throws { try run("qsd") }

    /// A qcow2 image stored in RBD grows the RBD image as it allocates.
    @Test(.requires("fio")) func qcow2InsideRBDGrowsTheImage() throws { try run("qcow2") }

    /// The OSD stops under I/O: requests wait and succeed, or fail with EIO after
    /// rados_osd_op_timeout; other exports and QMP go on.
    @Test func osdStopsUnderIO() throws { try run("osd") }

    /// Two writable nodes of one image are refused, in one daemon and across processes.
    @Test func secondWriterIsRefused() throws { try run("lock") }

    /// Unreachable monitors, missing pool/image/snapshot/namespace, wrong user or key, bad
    /// secrets and options: clear errors, bounded waits, graph unchanged, daemon alive.
    @Test func badInputGetsClearErrors() throws { try run("bad") }
}
