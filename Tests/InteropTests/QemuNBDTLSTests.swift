#if canImport(Glibc)
import Glibc
#endif
import Testing

/// qemu-nbd's TLS options through blockd's front end: `--object tls-creds-*` and
/// `--tls-creds`/`--tls-authz` to serve, `-L --tls-creds [--tls-hostname]` to list, against
/// libnbd's clients and against QEMU's own qemu-nbd (serving and listing), with QEMU's output
/// compared byte for byte where it is deterministic. Credentials: scripts/make-pki.sh.
@Suite struct QemuNBDTLSTests {
    static func image(_ dir: TempDir, size: Int = 4 << 20) throws -> String {
        let path = dir.file("disk.raw")
        try Files.createSparse(path, size: size)
        try Files.write(path, bytes: Files.pattern(count: 1 << 20, seed: 21), offset: 1 << 20)
        return path
    }

    /// The same arguments to QEMU's qemu-nbd and to blockd's front end: same status, stdout, stderr.
    static func expectSameOutput(_ qemuNBD: String, _ args: [String], sourceLocation: SourceLocation = #_sourceLocation) throws
        -> CommandResult {
        let theirs = try Run.command([qemuNBD] + args, timeout: 30)
        let mine = try Run.command([try QemuNBDFrontEnd.path()] + args, timeout: 30)
        #expect(mine.status == theirs.status && mine.stdout == theirs.stdout && mine.stderr == theirs.stderr,
                "qemu-nbd \(args.joined(separator: " "))\nQEMU: \(theirs)\nblockd: \(mine)", sourceLocation: sourceLocation)
        return mine
    }

    @Test(.requires("certtool", "psktool", "nbdinfo", "nbdcopy", "qemu-nbd"))
    func x509ServeAndListAgainstQemuNBD() throws {
        let dir = try TempDir(prefix: "qnbd-tls")
        let pki = try TLSInteropTests.PKI(in: dir)
        let image = try Self.image(dir)
        guard let qemuNBD = Tools.path(of: "qemu-nbd") else { throw HarnessError("qemu-nbd is not installed") }
        let socket = dir.file("nbd.sock")
        // -e 4: the readiness probe is a client too; with -e 1 it could hold the one slot
        // when the first real client arrives.
        let server = try Spawned([try QemuNBDFrontEnd.path(), "-t", "-e", "4", "-f", "raw", "-k", socket, "-x", "disk", "-D", "over TLS",
                                  "--object", "tls-creds-x509,id=tls0,endpoint=server,dir=\(pki.pki)", "--tls-creds", "tls0",
                                  image], in: dir)
        try server.waitForSocket(socket)

        // libnbd over nbds+unix:// with the CA (and a client certificate: verify-peer is on).
        let uri = "nbds+unix:///disk?socket=\(socket)&tls-certificates=\(pki.pki)"
        let info = try Run.expectSuccess(["nbdinfo", uri])
        #expect(info.stdout.contains("with TLS") && info.stdout.contains("export-size: \(4 << 20)")
                && info.stdout.contains("description: over TLS"), "\(info)")
        let copy = dir.file("copy.raw")
        try Run.expectSuccess(["nbdcopy", uri, copy])
        #expect(try Files.readBytes(copy) == Files.readBytes(image))
        // In the clear, or with a certificate from another CA: refused.
        #expect(try !Run.command(["nbdinfo", "nbd+unix:///disk?socket=\(socket)"]).succeeded)
        #expect(try !Run.command(["nbdinfo", "nbds+unix:///disk?socket=\(socket)&tls-certificates=\(pki.rogue)"]).succeeded)

        // -L over TLS, by QEMU's qemu-nbd and by the front end: the same listing, the same
        // refusals (no hostname to check the certificate against over a unix socket, a
        // hostname the certificate does not name, no TLS at all).
        let client = ["--object", "tls-creds-x509,id=c0,endpoint=client,dir=\(pki.pki)", "--tls-creds", "c0"]
        let listed = try Self.expectSameOutput(qemuNBD, ["-L", "-k", socket, "--tls-hostname", "localhost"] + client)
        #expect(listed.status == 0 && listed.stdout.hasPrefix("exports available: 1\n export: 'disk'\n  description: over TLS\n"),
                "\(listed)")
        let noHost = try Self.expectSameOutput(qemuNBD, ["-L", "-k", socket] + client)
        #expect(noHost.stderr == "qemu-nbd: No hostname for certificate validation\n", "\(noHost)")
        let wrongHost = try Self.expectSameOutput(qemuNBD, ["-L", "-k", socket, "--tls-hostname", "example.com"] + client)
        #expect(wrongHost.stderr == "qemu-nbd: Certificate does not match the hostname example.com\n", "\(wrongHost)")
        let plain = try Self.expectSameOutput(qemuNBD, ["-L", "-k", socket])
        #expect(plain.status == 1 && plain.stderr.hasPrefix("qemu-nbd: TLS negotiation required before option 3 (list)\n"),
                "\(plain)")
        // A CA that did not sign the server's certificate (QEMU's reason, with GnuTLS's detail).
        let rogue = try Run.command([try QemuNBDFrontEnd.path(), "-L", "-k", socket, "--tls-hostname", "localhost",
                                     "--object", "tls-creds-x509,id=c0,endpoint=client,dir=\(pki.rogue)", "--tls-creds", "c0"])
        #expect(rogue.status == 1 && rogue.stderr.contains("The certificate hasn't got a known issuer"), "\(rogue)")
        #expect(server.stop() == 0)
        #expect(server.stdoutText.isEmpty && server.stderrText.isEmpty, "\(server.stderrText)")

        // QEMU's qemu-nbd serving TLS, listed by both; and a TLS client to its plain server.
        let qsock = dir.file("qemu.sock")
        let qemu = try Spawned([qemuNBD, "-t", "-f", "raw", "-k", qsock, "-x", "q", "--object",
                                "tls-creds-x509,id=tls0,endpoint=server,dir=\(pki.pki)", "--tls-creds", "tls0", image], in: dir)
        try qemu.waitForSocket(qsock)
        let theirs = try Self.expectSameOutput(qemuNBD, ["-L", "-k", qsock, "--tls-hostname", "localhost"] + client)
        #expect(theirs.status == 0 && theirs.stdout.contains(" export: 'q'\n"), "\(theirs)")
        #expect(qemu.stop() == 0)
        let psock = dir.file("plain.sock")
        let plainQemu = try Spawned([qemuNBD, "-t", "-f", "raw", "-k", psock, image], in: dir)
        try plainQemu.waitForSocket(psock)
        let refused = try Self.expectSameOutput(qemuNBD, ["-L", "-k", psock, "--tls-hostname", "localhost"] + client)
        #expect(refused.stderr == "qemu-nbd: Denied by server for option 5 (starttls)\nserver reported: TLS not configured\n",
                "\(refused)")
        #expect(plainQemu.stop() == 0)
    }

    /// PSK with `--tls-authz`, on a socket passed by socket activation over TCP (the front end
    /// serves it as `addr.type=fd`), listed over TCP by both qemu-nbds with PSK client
    /// credentials.
    @Test(.requires("certtool", "psktool", "nbdinfo", "qemu-nbd", "/usr/bin/python3"))
    func pskWithAuthzOnAnActivatedTCPSocket() throws {
        let dir = try TempDir(prefix: "qnbd-tls-psk")
        let pki = try TLSInteropTests.PKI(in: dir)
        let image = try Self.image(dir)
        guard let qemuNBD = Tools.path(of: "qemu-nbd") else { throw HarnessError("qemu-nbd is not installed") }
        // Listens on 127.0.0.1 (any port) as fd 3, prints the port, then execs the front end
        // with LISTEN_PID/LISTEN_FDS for the same pid, as systemd does.
        let launcher = """
            import os, socket, sys
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
            os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
            print(s.getsockname()[1], flush=True)
            os.environ["LISTEN_PID"] = str(os.getpid()); os.environ["LISTEN_FDS"] = "1"
            os.execv(sys.argv[1], sys.argv[1:])
            """
        // -e 4: a refused client may still hold its slot for a moment after it has gone.
        let server = try Spawned(["/usr/bin/python3", "-c", launcher, try QemuNBDFrontEnd.path(), "-t", "-e", "4", "-f", "raw",
                                  "--object", "tls-creds-psk,id=tls0,endpoint=server,dir=\(pki.pskDir)",
                                  "--object", "authz-simple,id=auth0,identity=alice",
                                  "--tls-creds", "tls0", "--tls-authz", "auth0", image], in: dir)
        let deadline = Subprocess.now() + 10
        var port = 0
        while port == 0 {
            if let line = server.stdoutText.split(separator: "\n").first, let p = Int(line) { port = p; break }
            if let s = server.exited() { throw HarnessError("launcher exited with \(s): \(server.stderrText)") }
            if Subprocess.now() > deadline { throw HarnessError("no port from the launcher: \(server.stderrText)") }
            usleep(2_000)
        }
        // The socket listens from the start (the launcher made it), so the first client may
        // arrive before the front end is ready: it waits in the backlog.
        let alice = "nbds://alice@127.0.0.1:\(port)/?tls-psk-file=\(pki.psk)"
        let size = try Run.expectSuccess(["nbdinfo", "--size", alice])
        #expect(size.stdout == "\(4 << 20)\n")
        // bob has a key, but --tls-authz lets only alice in.
        #expect(try !Run.command(["nbdinfo", "--size", "nbds://bob@127.0.0.1:\(port)/?tls-psk-file=\(pki.psk)"]).succeeded)

        let client = ["--object", "tls-creds-psk,id=c0,endpoint=client,dir=\(pki.pskDir),username=alice", "--tls-creds", "c0"]
        let listed = try Self.expectSameOutput(qemuNBD, ["-L", "-b", "127.0.0.1", "-p", String(port)] + client)
        #expect(listed.status == 0 && listed.stdout.hasPrefix("exports available: 1\n export: ''\n"), "\(listed)")
        // -L and --tls-authz do not go together (QEMU's check, before any connection).
        _ = try Self.expectSameOutput(qemuNBD, ["-L", "-b", "127.0.0.1", "-p", String(port), "--tls-authz", "auth0"] + client)
        #expect(server.stop() == 0)
        #expect(server.stderrText.isEmpty, "\(server.stderrText)")
    }
}
