#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Listening sockets handed over at start: systemd's protocol (LISTEN_PID, LISTEN_FDS,
/// LISTEN_FDNAMES) through `systemd-socket-activate` and a small launcher, and QEMU's
/// `addr.type=fd` on the command line and in nbd-server-start.
@Suite struct SocketActivationTests {
    /// Listens on `unix PATH` or `tcp` (127.0.0.1, any port) as fd 3, sets LISTEN_* for its own
    /// pid and execs the rest of its arguments (so the daemon keeps that pid), as systemd does.
    static let launcher = """
    import os, socket, sys
    where, names = sys.argv[1], sys.argv[2]
    if where == 'tcp':
        s = socket.socket(); s.bind(('127.0.0.1', 0))
    else:
        s = socket.socket(socket.AF_UNIX); s.bind(where)
    s.listen(16)
    if s.fileno() != 3:
        os.dup2(s.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ['LISTEN_PID'] = str(os.getpid())
    os.environ['LISTEN_FDS'] = '1'
    if names:
        os.environ['LISTEN_FDNAMES'] = names
    os.execv(sys.argv[3], sys.argv[3:])
    """

    static func launch(_ place: String, names: String = "") -> [String] {
        ["/usr/bin/python3", "-c", launcher, place, names]
    }

    static func image(_ dir: TempDir, size: Int = 8 << 20) throws -> String {
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: size)
        try Files.write(image, bytes: Array("activated".utf8), offset: 0)
        return image
    }

    static func expectServes(_ uri: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Run.expectSuccess(["nbdinfo", "--size", uri], sourceLocation: sourceLocation)
        #expect(r.stdout == "\(8 << 20)\n", sourceLocation: sourceLocation)
        let scratch = try TempDir(prefix: "sa-copy")
        try Run.expectSuccess(["nbdcopy", uri, scratch.file("copy")], sourceLocation: sourceLocation)
        #expect(try Files.readBytes(scratch.file("copy"), count: 9) == Array("activated".utf8), sourceLocation: sourceLocation)
    }

    @Test(.requires("systemd-socket-activate", "nbdinfo", "nbdcopy"))
    func serveUnderSystemdSocketActivate() throws {
        let dir = try TempDir(prefix: "sa-serve")
        let image = try Self.image(dir)
        let sock = dir.file("nbd.sock")
        // systemd-socket-activate listens at once and execs blockd on the first connection.
        let d = try Blockd(["serve", image, "--name", "disk"], in: dir, waitForSocket: sock, exportName: "disk",
                           launcher: ["systemd-socket-activate", "-l", sock])
        try Self.expectServes("nbd+unix:///disk?socket=\(sock)")
        try Self.expectServes("nbd+unix:///disk?socket=\(sock)")
        #expect(d.waitForStdout("NBD URI: nbd+unix:///disk?socket=\(sock)"), "\(d.stdoutText)")
        #expect(d.stop() == 0)
    }

    @Test(.requires("systemd-socket-activate", "nbdinfo", "nbdcopy"))
    func qsdCommandLineWithAddrTypeFdAndNames() throws {
        let dir = try TempDir(prefix: "sa-qsd")
        let image = try Self.image(dir)
        let node = ["--blockdev", "driver=file,node-name=f0,filename=\(image)"]
        let export = ["--export", "type=nbd,id=e0,node-name=f0,name=disk"]
        for (n, server) in ["addr.type=fd,addr.str=3", "addr.type=fd,addr.str=nbd", "max-connections=8"].enumerated() {
            let sock = dir.file("nbd\(n).sock")
            let d = try Blockd(node + ["--nbd-server", server] + export, in: dir, waitForSocket: sock, exportName: "disk",
                               launcher: ["systemd-socket-activate", "--fdname=nbd", "-l", sock])
            try Self.expectServes("nbd+unix:///disk?socket=\(sock)")
            #expect(d.stop() == 0)
            #expect(d.logLines(containing: "warning").isEmpty, "\(d.stderrText)")
        }
    }

    @Test(.requires("certtool", "psktool", "nbdinfo", "nbdcopy", "/usr/bin/python3"))
    func smallLauncherOverTCPWithTLS() throws {
        let dir = try TempDir(prefix: "sa-tcp")
        let image = try Self.image(dir)
        let pki = try TLSInteropTests.PKI(in: dir)
        let d = try Blockd(["serve", image, "--name", "disk", "--tls-creds", pki.pki], in: dir,
                           waitForOutput: "NBD URI:", exportName: "disk", launcher: Self.launch("tcp"))
        guard let line = d.stdoutText.split(separator: "\n").first(where: { $0.contains("NBD URI:") }),
              let at = line.range(of: "nbds://127.0.0.1:"),
              let port = Int(line[at.upperBound...].prefix { $0.isNumber }) else {
            Issue.record("no URI in \(d.stdoutText)")
            return
        }
        try Self.expectServes("nbds://127.0.0.1:\(port)/disk?tls-certificates=\(pki.pki)")
        #expect(d.stop() == 0)
    }

    @Test(.requires("systemd-socket-activate", "nbdinfo", "nbdcopy", "python3"), .requiresPython("qemu.qmp"))
    func nbdServerStartOverQMPTakesAnFd() throws {
        let dir = try TempDir(prefix: "sa-qmp")
        let image = try Self.image(dir)
        let sock = dir.file("nbd.sock")
        let qmp = dir.file("qmp.sock")
        let d = try Blockd(["--qmp", qmp, "--blockdev", "driver=file,node-name=f0,filename=\(image)"], in: dir,
                           waitForSocket: sock, exportName: "disk", launcher: ["systemd-socket-activate", "-l", sock])
        let deadline = Subprocess.now() + 10
        while !Blockd.canConnect(unixPath: qmp) && Subprocess.now() < deadline { usleep(5_000) }
        let script = """
        import asyncio, sys
        from qemu.qmp import QMPClient, ExecuteError
        async def main():
            q = QMPClient('sa'); await q.connect(sys.argv[1])
            async def run(cmd, **a):
                try:
                    await q.execute(cmd, a); print(cmd, 'ok')
                except ExecuteError as e:
                    print(cmd, e.error.error.desc)
            await run('nbd-server-start', addr={'type': 'fd', 'str': '0'})
            await run('nbd-server-start', addr={'type': 'fd', 'str': '99'})
            await run('nbd-server-start', addr={'type': 'fd', 'str': 'web'})
            await run('nbd-server-start', addr={'type': 'fd', 'str': '3'})
            await run('block-export-add', type='nbd', id='e0', **{'node-name': 'f0', 'name': 'disk'})
            await q.disconnect()
        asyncio.run(main())
        """
        let r = try Run.expectSuccess(["python3", "-c", script, qmp])
        #expect(r.stdout == """
            nbd-server-start File descriptor '0' is not a socket
            nbd-server-start File descriptor '99' cannot be used: Bad file descriptor
            nbd-server-start Unable to parse FD number web: the socket-activated sockets are named 'unknown'
            nbd-server-start ok
            block-export-add ok

            """, "\(r)")
        try Self.expectServes("nbd+unix:///disk?socket=\(sock)")
        #expect(d.stop() == 0)
    }

    @Test(.requires("/usr/bin/python3"))
    func activationConflictsAreRefused() throws {
        let dir = try TempDir(prefix: "sa-err")
        let image = try Self.image(dir)
        let blockd = try BuildProducts.blockd
        var r = try Run.command(Self.launch(dir.file("a.sock")) + [blockd, "serve", image, "--socket", dir.file("b.sock")])
        #expect(r.status == 1 && r.stderr.contains("serve: Unix socket can't be set when using socket activation"), "\(r)")
        r = try Run.command(Self.launch(dir.file("c.sock")) + [blockd, "serve", image, "--port", "10809"])
        #expect(r.status == 1 && r.stderr.contains("serve: TCP port number can't be set when using socket activation"), "\(r)")
        r = try Run.command(Self.launch(dir.file("d.sock"), names: "nbd") + [blockd, "--nbd-server", "addr.type=fd,addr.str=web"])
        #expect(r.status == 1 && r.stderr.contains("the socket-activated sockets are named 'nbd'"), "\(r)")
        r = try Blockd.runOnce(["--nbd-server", "max-connections=2"])
        #expect(r.status == 1 && r.stderr == "blockd: --nbd-server max-connections=2: Parameter 'addr' is missing\n", "\(r)")
        // Not for us: LISTEN_PID names another process, so nothing is taken over.
        r = try Blockd.runOnce(["--nbd-server", "max-connections=2"], environment: ["LISTEN_PID": "1", "LISTEN_FDS": "1"])
        #expect(r.status == 1 && r.stderr == "blockd: --nbd-server max-connections=2: Parameter 'addr' is missing\n", "\(r)")
    }
}
