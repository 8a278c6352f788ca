#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Graph changes the block layer refuses (issue 11): each scenario of `graph/graph_refusals.py`
/// tries them over QMP, checks after each refusal that `query-named-block-nodes`,
/// `query-block-exports` and `query-block-jobs` are as before, and prints a transcript. The
/// transcript equals qemu-storage-daemon 7.2's (kept beside the script), and when QSD is
/// installed the same script runs against it too.
@Suite("graph permissions", .requires("qemu-img", "qemu-io", "python3"))
struct GraphPermissionTests {
    static let dir: String = {
        let file = "\(#filePath)"
        return String(file[..<file.lastIndex(of: "/")!]) + "/graph"
    }()

    func transcript(_ daemon: String, _ scenario: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
        let r = try Run.command(["python3", Self.dir + "/graph_refusals.py", daemon, scenario], timeout: 180)
        #expect(r.status == 0, "\(scenario) on \(daemon):\n\(r.stdout)\n\(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stdout.hasSuffix("OK\n"), "\(r.stdout)", sourceLocation: sourceLocation)
        return r.stdout
    }

    func check(_ scenario: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let ours = try transcript(try BuildProducts.blockd, scenario, sourceLocation: sourceLocation)
        #expect(!ours.contains("GRAPH CHANGED"), "a refused change changed the graph:\n\(ours)", sourceLocation: sourceLocation)
        let expected = try Files.read(Self.dir + "/\(scenario).qsd-7.2.expected.txt")
        #expect(ours == expected, "transcript differs from qemu-storage-daemon 7.2's:\n\(ours)", sourceLocation: sourceLocation)
    }

    /// A second qcow2 node over a file another qcow2 node writes (and a read-only one), a raw
    /// node over that file exported writable and read-only, the file exported itself.
    @Test func newUsersOfAWrittenFileAreRefused() throws { try check("new_users") }

    /// A writable export of a backing node: opened read-only from the header, or below a node
    /// a stream job holds (which shares no write of its backing).
    @Test func writableExportOfABackingNodeIsRefused() throws { try check("backing_export") }

    /// A second writer (or reader, for commit) on nodes a stream or commit job holds, a second
    /// job, blockdev-del of a job's node.
    @Test func secondWriterOnAJobsNodeIsRefused() throws { try check("job_writer") }

    /// A filter put into a link a stream job froze, with blockdev-reopen; below the frozen part
    /// it is allowed, and after the job the link is free.
    @Test func filterInsertionIntoAFrozenLinkIsRefused() throws { try check("frozen_filter") }

    /// blockdev-del of a node with inline children: they go with it, unless an export or
    /// another parent still uses them; they are not the monitor's to delete.
    @Test func inlineChildrenGoWithTheirParent() throws { try check("inline_children") }

    /// The same scenarios against the qemu-storage-daemon installed here.
    @Test(.requires("qemu-storage-daemon"),
          arguments: ["new_users", "backing_export", "job_writer", "frozen_filter", "inline_children"])
    func qemuStorageDaemonAnswersTheSame(_ scenario: String) throws {
        let qsd = try transcript(Tools.path(of: "qemu-storage-daemon")!, scenario)
        let ours = try transcript(try BuildProducts.blockd, scenario)
        #expect(ours == qsd, "blockd:\n\(ours)\nqemu-storage-daemon:\n\(qsd)")
    }
}
