#if canImport(Glibc)
import Glibc
#endif
import Testing

/// `blockd`'s command line: mistakes get one line naming the option and exit 1 (as QEMU's
/// tools); no arguments serve the demo.
@Suite struct CommandLineTests {
    static func expectUsageError(_ arguments: [String], mentions: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Blockd.runOnce(arguments)
        #expect(r.status == 1, "\(r)", sourceLocation: sourceLocation)
        #expect(r.stderr.hasPrefix("blockd: "), "\(r)", sourceLocation: sourceLocation)
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 1, "want one line: \(r)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(mentions), "\(r)", sourceLocation: sourceLocation)
    }

    @Test func unknownOption() throws {
        try Self.expectUsageError(["--frobnicate"], mentions: "--frobnicate")
    }

    @Test func serveWithoutFilename() throws {
        try Self.expectUsageError(["serve"], mentions: "IMAGE is missing")
    }

    @Test func serveMissingFile() throws {
        let dir = try TempDir(prefix: "cli")
        try Self.expectUsageError(["serve", dir.file("absent.img"), "--socket", dir.file("s")], mentions: "absent.img")
    }

    @Test func badNBDServerAddress() throws {
        try Self.expectUsageError(["--nbd-server", "addr.type=carrier-pigeon"], mentions: "--nbd-server")
        try Self.expectUsageError(["--nbd-server", "addr.type=unix"], mentions: "addr.path")
    }

    @Test func exportOfAMissingNode() throws {
        let dir = try TempDir(prefix: "cli")
        try Self.expectUsageError(["--nbd-server", "addr.type=unix,addr.path=\(dir.file("s"))",
                                   "--export", "type=nbd,id=e0,node-name=ghost"], mentions: "ghost")
    }

    @Test func blockdevWithMissingFile() throws {
        let dir = try TempDir(prefix: "cli")
        try Self.expectUsageError(["--blockdev", "driver=file,node-name=f,filename=\(dir.file("nope.img"))"],
                                  mentions: "--blockdev")
    }

    @Test func noArgumentsServesTheDemo() throws {
        let dir = try TempDir(prefix: "demo")
        let d = try Blockd([], in: dir, waitForSocket: dir.file("nbd.sock"), exportName: "demo",
                           environment: ["BLOCKD_RUNTIME_DIR": dir.path])
        let deadline = Subprocess.now() + 5
        while !d.stdoutText.contains("NBD URI:") && Subprocess.now() < deadline { usleep(5_000) }
        #expect(d.stdoutText.contains("nbd+unix:///demo?socket=\(dir.file("nbd.sock"))"), "\(d.stdoutText)")
        let c = try RawNBDClient(unixPath: dir.file("nbd.sock"))
        try c.connect(export: "demo")
        let r = try c.read(offset: 0, length: 64)
        #expect(String(decoding: r.data, as: UTF8.self).hasPrefix("Hello from blockd!"))
        try c.disconnect()
        #expect(d.stop() == 0, "\(d.stderrText)")
    }
}
