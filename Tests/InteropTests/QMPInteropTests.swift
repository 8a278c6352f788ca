#if canImport(Glibc)
import Glibc
#endif
import Testing

/// blockd's QMP monitor driven by QEMU's own client library (qemu.qmp), qmp-shell and
/// blockctl; transcripts are compared with qemu-storage-daemon 7.2's, kept beside the scripts.
@Suite struct QMPInteropTests {
    static let scripts: String = {
        let file = #filePath
        return String(file.dropLast("/QMPInteropTests.swift".count)) + "/qmp"
    }()

    /// A monitor-only blockd, started with qemu-storage-daemon's --chardev/--monitor options.
    /// `extra` comes first (`-v` for per-client log lines).
    static func monitorOnly(in dir: TempDir, extra: [String] = []) throws -> (Blockd, String) {
        let qmp = dir.file("qmp.sock")
        let d = try Blockd(extra + ["--chardev", "socket,id=mon0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=mon0"],
                           in: dir, waitForSocket: qmp)
        return (d, qmp)
    }

    @Test(.requires("qemu-img", "qemu-io"), .requiresPython("qemu.qmp"))
    func wholeSessionGivesQemuStorageDaemonsTranscript() throws {
        let dir = try TempDir(prefix: "qmp-session")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "4M"])
        try Run.expectSuccess(["qemu-io", "-c", "write -P 0x11 0 1M", dir.file("base.qcow2")])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", "-b", dir.file("base.qcow2"), "-F", "qcow2",
                               dir.file("top.qcow2")])
        let (d, qmp) = try Self.monitorOnly(in: dir)
        let r = try Run.expectSuccess(["python3", Self.scripts + "/qmp_session.py", qmp, dir.path], timeout: 60)
        let expected = try Files.read(Self.scripts + "/qmp_session.qsd-7.2.expected.txt")
        #expect(r.stdout == expected, "transcript differs from qemu-storage-daemon's:\n\(r.stdout)\nstderr: \(d.stderrText)")
        // `quit` ends the daemon cleanly; the images are consistent afterwards.
        #expect(d.stop() == 0)
        try Run.expectSuccess(["qemu-img", "check", dir.file("top.qcow2")])
        try Run.expectSuccess(["qemu-img", "check", dir.file("base.qcow2")])
    }

    @Test(.requiresPython("qemu.qmp"))
    func protocolTranscriptMatchesQemuStorageDaemon() throws {
        let dir = try TempDir(prefix: "qmp-proto")
        let (d, qmp) = try Self.monitorOnly(in: dir)
        let r = try Run.expectSuccess(["python3", Self.scripts + "/qmp_protocol_check.py", qmp], timeout: 120)
        let expected = try Files.read(Self.scripts + "/qsd-7.2.expected.txt")
        #expect(r.stdout == expected, "protocol transcript differs:\n\(r.stdout)")
        #expect(d.isRunning, "bad input must not take the daemon down")
        _ = d.stop()
    }

    @Test(.requires("qmp-shell"), .requiresPython("qemu.qmp"))
    func qmpShellRunsCommands() throws {
        let dir = try TempDir(prefix: "qmp-shell")
        let (d, qmp) = try Self.monitorOnly(in: dir)
        let input = "blockdev-add driver=null-co node-name=n0 size=1048576\nquery-named-block-nodes flat=true\n"
        let r = try Run.command(["qmp-shell", qmp], timeout: 30, stdin: input)
        #expect(r.stdout.contains("\"node-name\": \"n0\""), "\(r)")
        #expect(r.stdout.contains("\"drv\": \"null-co\""), "\(r)")
        _ = d.stop()
    }

    @Test func blockctlDrivesASession() throws {
        let dir = try TempDir(prefix: "blockctl")
        let (d, qmp) = try Self.monitorOnly(in: dir)
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 4 << 20)
        let ctl = [try BuildProducts.blockctl, "--socket", qmp]
        try Run.expectSuccess(ctl + ["add-node", "driver=file,node-name=f0,filename=\(image)"])
        try Run.expectSuccess(ctl + ["add-node", #"{"driver": "raw", "node-name": "r0", "file": "f0"}"#])
        let nodes = try Run.expectSuccess(ctl + ["nodes"])
        #expect(nodes.stdout.contains("r0") && nodes.stdout.contains("raw") && nodes.stdout.contains("4 MiB"), "\(nodes)")
        try Run.expectSuccess(ctl + ["server-start", "--socket", dir.file("nbd.sock")])
        try Run.expectSuccess(ctl + ["export", "r0", "--name", "disk", "--writable", "--id", "e0"])
        let exports = try Run.expectSuccess(ctl + ["--json", "exports"])
        #expect(exports.stdout.contains("\"id\": \"e0\""), "\(exports)")
        // An error is one line on stderr and a non-zero exit status.
        let busy = try Run.command(ctl + ["del-node", "r0"])
        #expect(busy.status == 1)
        #expect(busy.stderr == "blockctl: Node r0 is in use\n", "\(busy)")
        let usage = try Run.command(ctl + ["no-such-command"])
        #expect(usage.status == 2)
        try Run.expectSuccess(ctl + ["unexport", "e0"])
        try Run.expectSuccess(ctl + ["del-node", "r0"])
        try Run.expectSuccess(ctl + ["quit"])
        #expect(d.stop() == 0)
    }

    @Test func badCommandsLeaveTheMonitorWorking() throws {
        let dir = try TempDir(prefix: "qmp-bad")
        let (d, qmp) = try Self.monitorOnly(in: dir)
        let ctl = [try BuildProducts.blockctl, "--socket", qmp]
        let cases: [([String], String)] = [
            (["query", "blockdev-add", #"{"driver": "file", "node-name": "x"}"#], "Parameter 'filename' is missing"),
            (["query", "blockdev-add", #"{"driver": "nope", "node-name": "x"}"#], "Parameter 'driver' does not accept value 'nope'"),
            (["query", "blockdev-add", #"{"driver": "null-co", "node-name": "x", "size": "big"}"#], "size"),
            (["query", "blockdev-add", #"{"driver": "file", "node-name": "x", "filename": "/nonexistent"}"#],
             "Could not open '/nonexistent': No such file or directory"),
            (["query", "blockdev-del", #"{"node-name": "missing"}"#], "Failed to find node with node-name='missing'"),
            // QEMU looks for the node before the server.
            (["query", "block-export-add", #"{"type": "nbd", "id": "e", "node-name": "x"}"#], "Cannot find device='' nor node-name='x'"),
            (["query", "blockdev-add", #"{"driver": "null-co", "node-name": "n", "bogus": 1}"#], "Parameter 'bogus' is unexpected"),
            (["query", "no-such-command"], "The command no-such-command has not been found"),
        ]
        for (args, message) in cases {
            let r = try Run.command(ctl + args)
            #expect(r.status == 1 && r.stderr.contains(message), "\(args): \(r)")
        }
        try Run.expectSuccess(ctl + ["query", "blockdev-add", #"{"driver": "null-co", "node-name": "n"}"#])
        let noServer = try Run.command(ctl + ["query", "block-export-add", #"{"type": "nbd", "id": "e", "node-name": "n"}"#])
        #expect(noServer.stderr.contains("NBD server not running"), "\(noServer)")
        let dup = try Run.command(ctl + ["query", "blockdev-add", #"{"driver": "null-co", "node-name": "n"}"#])
        #expect(dup.stderr.contains("Duplicate nodes with node-name='n'"), "\(dup)")
        #expect(d.isRunning)
        _ = d.stop()
    }
}

extension QMPInteropTests {
    /// A 10 MiB request line gets QEMU's answer and the monitor keeps working.
    @Test(.requiresPython("qemu.qmp"))
    func tenMebibyteRequestIsAnswered() throws {
        let dir = try TempDir(prefix: "qmp-big")
        let (d, qmp) = try Self.monitorOnly(in: dir)
        let r = try Run.expectSuccess(["python3", Self.scripts + "/qmp_protocol_check.py", qmp, "--big-mib", "10"], timeout: 120)
        #expect(r.stdout.contains(#"raw: 10 MiB request -> {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}, "id": "big"}"#),
                "\(r.stdout)")
        #expect(d.isRunning)
        _ = d.stop()
    }
}
