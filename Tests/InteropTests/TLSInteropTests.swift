#if canImport(Glibc)
import Glibc
#endif
import Testing

/// NBD over TLS (STARTTLS) with real clients: libnbd's nbdinfo, nbdcopy and nbdfuse with
/// `nbds://` / `nbds+unix://` URIs, and qemu-img / qemu-io with QEMU's tls-creds objects.
/// Credentials come from scripts/make-pki.sh (certtool, psktool), made fresh for each test.
@Suite struct TLSInteropTests {
    /// The credentials of scripts/make-pki.sh in `dir/k`.
    struct PKI {
        let root: String
        var pki: String { root + "/pki" }
        var pki2: String { root + "/pki2" }
        var rogue: String { root + "/rogue" }
        var pskDir: String { root + "/psk" }
        var psk: String { root + "/psk/keys.psk" }
        var pskWrong: String { root + "/psk-wrong/keys.psk" }

        init(in dir: TempDir) throws {
            root = dir.file("k")
            try Run.expectSuccess(["bash", TLSInteropTests.sourceRoot + "/scripts/make-pki.sh", root])
        }
    }

    static let sourceRoot: String = {
        var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return parts.joined(separator: "/")
    }()

    static let client1 = "C=US,O=blockd tests,CN=client1"

    /// `blockd serve IMAGE --socket … EXTRA`.
    static func serveUnix(_ dir: TempDir, size: Int = 16 << 20, extra: [String]) throws -> (String, Blockd) {
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: size)
        return (image, try Blockd.serve(image: image, in: dir, extra: extra))
    }

    /// `blockd serve IMAGE --host 127.0.0.1 --port 0 EXTRA`; returns the bound port.
    static func serveTCP(_ dir: TempDir, size: Int = 16 << 20, extra: [String]) throws -> (String, Blockd, Int) {
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: size)
        let d = try Blockd(["serve", image, "--host", "127.0.0.1", "--port", "0", "--name", "disk"] + extra, in: dir,
                           waitForOutput: "NBD URI:", exportName: "disk")
        guard let line = d.stdoutText.split(separator: "\n").first(where: { $0.contains("NBD URI:") }),
              let colon = line.range(of: "127.0.0.1:"),
              let port = Int(line[colon.upperBound...].prefix { $0.isNumber }) else {
            throw HarnessError("no port in: \(d.stdoutText)")
        }
        #expect(line.contains("nbds://127.0.0.1:\(port)/disk"), "\(line)")
        return (image, d, port)
    }

    static func tlsURI(_ d: Blockd, _ query: String, user: String? = nil) -> String {
        "nbds+unix://\(user.map { $0 + "@" } ?? "")/disk?socket=\(d.socket!)&\(query)"
    }

    // MARK: libnbd clients

    @Test(.requires("certtool", "psktool", "nbdinfo", "nbdcopy"))
    func nbdinfoAndNbdcopyOverUnixWithCertificates() throws {
        let dir = try TempDir(prefix: "tls-x509")
        let pki = try PKI(in: dir)
        let (image, d) = try Self.serveUnix(dir, extra: ["--tls-creds", pki.pki])
        #expect(d.waitForStdout("nbds+unix:///disk?socket="), "\(d.stdoutText)")
        let uri = Self.tlsURI(d, "tls-certificates=\(pki.pki)")
        let info = try Run.expectSuccess(["nbdinfo", uri])
        #expect(info.stdout.contains("with TLS"), "\(info)")
        #expect(info.stdout.contains("export-size: \(16 << 20)"), "\(info)")
        // 12 MiB of a pattern in, then the whole export out again.
        let source = dir.file("src.img")
        try Files.createSparse(source, size: 16 << 20)
        try Files.write(source, bytes: Files.pattern(count: 12 << 20, seed: 5), offset: 1 << 20)
        try Run.expectSuccess(["nbdcopy", source, uri])
        let copy = dir.file("copy.img")
        try Run.expectSuccess(["nbdcopy", uri, copy])
        #expect(try Files.readBytes(copy) == Files.readBytes(source))
        #expect(try Files.readBytes(image) == Files.readBytes(source))
        #expect(d.stop() == 0)
    }

    @Test(.requires("certtool", "psktool", "nbdinfo", "nbdcopy"))
    func nbdsOverTCPWithCertificates() throws {
        let dir = try TempDir(prefix: "tls-tcp")
        let pki = try PKI(in: dir)
        let (_, d, port) = try Self.serveTCP(dir, extra: ["--tls-creds", pki.pki])
        // libnbd checks the server certificate against 127.0.0.1 (an IP SAN of the certificate).
        let uri = "nbds://127.0.0.1:\(port)/disk?tls-certificates=\(pki.pki)"
        let source = dir.file("src.img")
        try Files.write(source, bytes: Files.pattern(count: 16 << 20, seed: 9))
        try Run.expectSuccess(["nbdcopy", "--requests=32", source, uri])
        let copy = dir.file("copy.img")
        try Run.expectSuccess(["nbdcopy", "--connections=4", uri, copy])
        #expect(try Files.readBytes(copy) == Files.readBytes(source))
        let size = try Run.expectSuccess(["nbdinfo", "--size", uri])
        #expect(size.stdout == "\(16 << 20)\n")
        #expect(d.stop() == 0)
    }

    /// nbdfuse 1.14 refuses file names in URIs (tls-certificates=, tls-psk-file=: "local file
    /// access … is not allowed"), so it finds its certificates where libnbd looks by default:
    /// `$HOME/.pki/libnbd` for a user other than root. As root, the test runs it as `nobody`
    /// with just the capabilities a FUSE mount needs (setpriv), and the mount allows others.
    @Test(.requires("certtool", "psktool", "nbdfuse", "fusermount3", "setpriv"))
    func nbdfuseOverTLSWithCertificates() throws {
        if geteuid() == 0 { try require(.device("/dev/fuse")) }
        let dir = try TempDir(prefix: "tls-fuse")
        chmod(dir.path, 0o755)
        let pki = try PKI(in: dir)
        let (image, d) = try Self.serveUnix(dir, size: 4 << 20, extra: ["--tls-creds", pki.pki])
        try Files.write(image, bytes: Array("hello through TLS".utf8), offset: 0)
        let home = dir.file("home")
        let certs = home + "/.pki/libnbd"
        try Run.expectSuccess(["mkdir", "-p", certs])
        try Run.expectSuccess(["cp", pki.pki + "/ca-cert.pem", pki.pki + "/client-cert.pem", pki.pki + "/client-key.pem", certs])
        let mount = dir.file("mnt")
        mkdir(mount, 0o755)
        var command = ["env", "HOME=\(home)", "nbdfuse", mount, "nbds+unix:///disk?socket=\(d.socket!)"]
        if geteuid() == 0 {
            try Run.expectSuccess(["chown", "-R", "65534:65534", home, mount])
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       "--inh-caps=+dac_override,+sys_admin", "--ambient-caps=+dac_override,+sys_admin",
                       "env", "HOME=\(home)", "nbdfuse", "-o", "allow_other", mount, "nbds+unix:///disk?socket=\(d.socket!)"]
        }
        let pid = try Subprocess.spawn(command, stdoutPath: dir.file("fuse.out"), stderrPath: dir.file("fuse.err"))
        defer {
            _ = try? Run.command(["fusermount3", "-u", mount], timeout: 10)
            if Subprocess.wait(pid, timeout: 5) == nil { kill(pid, SIGKILL); _ = Subprocess.wait(pid, timeout: 5) }
        }
        let file = mount + "/nbd"
        let deadline = Subprocess.now() + 10
        while Files.size(file) != 4 << 20 && Subprocess.now() < deadline { usleep(10_000) }
        #expect(Files.size(file) == 4 << 20, "\((try? Files.read(dir.file("fuse.err"))) ?? "")")
        #expect(try Files.readBytes(file, offset: 0, count: 17) == Array("hello through TLS".utf8))
        let data = Files.pattern(count: 512 * 1024, seed: 78)
        try Files.write(file, bytes: data, offset: 1 << 20)
        let fd = open(file, O_RDWR)
        #expect(fd >= 0)
        #expect(fsync(fd) == 0)
        close(fd)
        #expect(try Files.readBytes(image, offset: 1 << 20, count: data.count) == data)
    }

    @Test(.requires("certtool", "psktool", "nbdinfo", "nbdcopy"))
    func pskThroughObjectsWithNbdcopy() throws {
        let dir = try TempDir(prefix: "tls-psk")
        let pki = try PKI(in: dir)
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 8 << 20)
        let sock = dir.file("nbd.sock")
        let d = try Blockd(["-v", "--blockdev", "driver=file,node-name=f0,filename=\(image)",
                            "--object", "tls-creds-psk,id=tls0,endpoint=server,dir=\(pki.pskDir)",
                            "--object", "authz-simple,id=authz0,identity=alice",
                            "--nbd-server", "addr.type=unix,addr.path=\(sock),tls-creds=tls0,tls-authz=authz0",
                            "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"],
                           in: dir, waitForSocket: sock, exportName: "disk")
        let uri = Self.tlsURI(d, "tls-psk-file=\(pki.psk)", user: "alice")
        let source = dir.file("src.img")
        try Files.write(source, bytes: Files.pattern(count: 8 << 20, seed: 11))
        try Run.expectSuccess(["nbdcopy", source, uri])
        #expect(try Files.readBytes(image) == Files.readBytes(source))
        let info = try Run.expectSuccess(["nbdinfo", uri])
        #expect(info.stdout.contains("with TLS"), "\(info)")
        // bob has a key, but tls-authz lets only alice in; alice with the wrong key is refused.
        #expect(try !Run.command(["nbdinfo", Self.tlsURI(d, "tls-psk-file=\(pki.psk)", user: "bob")]).succeeded)
        #expect(d.waitForLog("TLS PSK authz check for bob is denied by authz0") != nil, "\(d.stderrText)")
        #expect(try !Run.command(["nbdinfo", Self.tlsURI(d, "tls-psk-file=\(pki.pskWrong)", user: "alice")]).succeeded)
        #expect(d.waitForLog("the client's key for PSK username 'alice' does not match") != nil, "\(d.stderrText)")
        #expect(d.stop() == 0)
    }

    // MARK: QEMU clients

    @Test(.requires("certtool", "psktool", "qemu-img", "qemu-io"))
    func qemuImgAndQemuIOWithX509OverTCP() throws {
        let dir = try TempDir(prefix: "tls-qemu")
        let pki = try PKI(in: dir)
        let (image, d, port) = try Self.serveTCP(dir, extra: ["--tls-creds", pki.pki, "--tls-authz", Self.client1])
        let object = "tls-creds-x509,id=tls0,endpoint=client,dir=\(pki.pki)"
        let opts = "driver=nbd,host=127.0.0.1,port=\(port),export=disk,tls-creds=tls0"
        try Run.expectSuccess(["qemu-io", "--object", object, "--image-opts", opts,
                               "-c", "write -P 0x5a 0 3M", "-c", "read -P 0x5a 0 3M", "-c", "write -z 1M 64k",
                               "-c", "read -P 0 1M 64k", "-c", "flush"])
        let source = dir.file("src.img")
        try Files.write(source, bytes: Files.pattern(count: 8 << 20, seed: 3))
        try Files.write(source, bytes: [UInt8](repeating: 0, count: 8 << 20), offset: 8 << 20)
        try Run.expectSuccess(["qemu-img", "convert", "-n", "--object", object, "-f", "raw", source,
                               "--target-image-opts", opts])
        try Run.expectSuccess(["qemu-img", "compare", "--object", object, "--image-opts", "driver=raw,file.filename=\(source)", opts])
        let info = try Run.expectSuccess(["qemu-img", "info", "--object", object, "--image-opts", opts])
        #expect(info.stdout.contains("virtual size: 16 MiB"), "\(info)")
        #expect(d.stop() == 0)
        #expect(try Files.readBytes(image) == Files.readBytes(source))
    }

    @Test(.requires("certtool", "psktool", "qemu-img", "qemu-io"))
    func qemuIOWithPSKOverUnix() throws {
        let dir = try TempDir(prefix: "tls-qemu-psk")
        let pki = try PKI(in: dir)
        let (_, d) = try Self.serveUnix(dir, extra: ["--tls-psk", pki.psk, "-v"])
        let opts = "driver=nbd,path=\(d.socket!),export=disk,tls-creds=tls0"
        try Run.expectSuccess(["qemu-io", "--object", "tls-creds-psk,id=tls0,endpoint=client,dir=\(pki.pskDir),username=bob",
                               "--image-opts", opts, "-c", "write -P 0x33 4M 1M", "-c", "read -P 0x33 4M 1M"])
        // The wrong key: refused, with the reason in the daemon's log; the daemon goes on.
        let wrongDir = dir.file("k/psk-wrong")
        let bad = try Run.command(["qemu-img", "info", "--object", "tls-creds-psk,id=tls0,endpoint=client,dir=\(wrongDir),username=alice",
                                   "--image-opts", opts])
        #expect(!bad.succeeded)
        #expect(bad.stderr.contains("TLS handshake failed"), "\(bad)")
        #expect(d.waitForLog("the client's key for PSK username 'alice' does not match \(pki.psk)") != nil, "\(d.stderrText)")
        try Run.expectSuccess(["qemu-io", "--object", "tls-creds-psk,id=tls0,endpoint=client,dir=\(pki.pskDir),username=alice",
                               "--image-opts", opts, "-c", "read -P 0x33 4M 1M"])
        #expect(d.stop() == 0)
    }

    // MARK: refusals

    @Test(.requires("certtool", "psktool", "nbdinfo", "qemu-img"))
    func refusedClientsGetClearMessagesAndTheDaemonGoesOn() throws {
        let dir = try TempDir(prefix: "tls-refuse")
        let pki = try PKI(in: dir)
        // -v: refused clients are per-client lines (quiet by default, as qemu-nbd).
        let (_, d) = try Self.serveUnix(dir, extra: ["--tls-creds", pki.pki, "--tls-authz", Self.client1, "-v"])
        let good = Self.tlsURI(d, "tls-certificates=\(pki.pki)")

        // A client certificate from another CA: GnuTLS then offers none.
        #expect(try !Run.command(["nbdinfo", Self.tlsURI(d, "tls-certificates=\(pki.rogue)")]).succeeded)
        #expect(d.waitForLog("TLS client presented no certificate issued by \(pki.pki)/ca-cert.pem") != nil, "\(d.stderrText)")
        // A client that trusts another CA refuses our server.
        let rogueCA = try Run.command(["qemu-img", "info", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir=\(pki.rogue)",
                                       "--image-opts", "driver=nbd,path=\(d.socket!),export=disk,tls-creds=tls0,tls-hostname=localhost"])
        #expect(!rogueCA.succeeded)
        #expect(rogueCA.stderr.contains("The certificate hasn't got a known issuer"), "\(rogueCA)")
        // Same CA, another identity: tls-authz refuses it.
        #expect(try !Run.command(["nbdinfo", Self.tlsURI(d, "tls-certificates=\(pki.pki2)")]).succeeded)
        #expect(d.waitForLog("TLS x509 authz check for C=US,O=blockd tests,CN=client2 is denied") != nil, "\(d.stderrText)")
        // A plain client to this TLS server.
        let plain = try Run.command(["qemu-img", "info", "--image-opts", "driver=nbd,path=\(d.socket!),export=disk"])
        #expect(!plain.succeeded)
        #expect(plain.stderr.contains("TLS negotiation required before option 7 (go)"), "\(plain)")
        #expect(plain.stderr.contains("Option 0x7 not permitted before TLS"), "\(plain)")
        #expect(try !Run.command(["nbdinfo", d.uri]).succeeded)

        // After all that, the right client is served, and the daemon still runs.
        let ok = try Run.expectSuccess(["nbdinfo", "--size", good])
        #expect(ok.stdout == "\(16 << 20)\n")
        #expect(d.isRunning)
        #expect(d.stop() == 0)
    }

    @Test(.requires("certtool", "psktool", "nbdinfo", "qemu-img"))
    func tlsClientToPlainServerIsToldTLSIsNotConfigured() throws {
        let dir = try TempDir(prefix: "tls-plain")
        let pki = try PKI(in: dir)
        let (_, d) = try Self.serveUnix(dir, extra: [])
        let r = try Run.command(["qemu-img", "info", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir=\(pki.pki)",
                                 "--image-opts", "driver=nbd,path=\(d.socket!),export=disk,tls-creds=tls0,tls-hostname=localhost"])
        #expect(!r.succeeded)
        // QEMU's own wording for qemu-nbd's answer, word for word.
        #expect(r.stderr.contains("Denied by server for option 5 (starttls)"), "\(r)")
        #expect(r.stderr.contains("server reported: TLS not configured"), "\(r)")
        #expect(try !Run.command(["nbdinfo", Self.tlsURI(d, "tls-certificates=\(pki.pki)")]).succeeded)
        try Run.expectSuccess(["nbdinfo", d.uri])
        #expect(d.stop() == 0)
    }

    /// Raw option haggling against a TLS server: QEMU's rules before STARTTLS, and garbage
    /// where the ClientHello should be.
    @Test(.requires("certtool", "psktool", "nbdinfo"))
    func optionsBeforeStartTLSAndGarbageInTheHandshake() throws {
        let dir = try TempDir(prefix: "tls-raw")
        let pki = try PKI(in: dir)
        let (_, d) = try Self.serveUnix(dir, extra: ["--tls-creds", pki.pki, "-v"])
        let errTLSReqd: UInt32 = 0x8000_0005, errInvalid: UInt32 = 0x8000_0003, ack: UInt32 = 1

        // LIST, INFO, STRUCTURED_REPLY and an unknown option: ERR_TLS_REQD, the client may go on.
        var c = try RawNBDClient(unixPath: d.socket!)
        try c.greet()
        for option: UInt32 in [3, 6, 8, 0x1234] {
            try c.sendOption(option, option == 6 ? RawNBDClient.be(UInt32(4)) + Array("disk".utf8) + RawNBDClient.be(UInt16(0)) : [])
            let r = try c.receiveOptionReply()
            #expect(r?.type == errTLSReqd, "option \(option): \(String(describing: r))")
        }
        // STARTTLS is acknowledged; then something that is not TLS ends that client.
        try c.sendOption(5)
        #expect(try c.receiveOptionReply()?.type == ack)
        try c.send(Array("GET / HTTP/1.0\r\n\r\n".utf8))
        #expect(c.waitForClose())
        #expect(d.waitForLog("(is the client speaking TLS?)") != nil, "\(d.stderrText)")

        // A real ClientHello (Python's ssl, OpenSSL), the server's first flight, then garbage
        // where the client's Finished should be.
        let script = """
        import os, socket, ssl, struct, sys
        s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
        def recv(n):
            b = b''
            while len(b) < n:
                c = s.recv(n - len(b))
                if not c: raise SystemExit('closed early')
                b += c
            return b
        recv(18); s.sendall(struct.pack('>I', 3))
        s.sendall(struct.pack('>QII', 0x49484156454F5054, 5, 0))
        h = recv(20); recv(struct.unpack('>I', h[16:20])[0])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(inc, out, server_hostname='localhost')
        try: tls.do_handshake()
        except ssl.SSLWantReadError: pass
        s.sendall(out.read())
        inc.write(s.recv(65536))          # ServerHello … server Finished
        s.sendall(b'\\x17\\x03\\x03\\x00\\x40' + os.urandom(64))
        try:
            while s.recv(4096): pass
        except ConnectionResetError: pass
        print('closed')
        """
        let py = try Run.python(script, [d.socket!], timeout: 30)
        #expect(py.stdout == "closed\n", "\(py)")
        #expect(d.waitForLog("TLS handshake failed: Decryption has failed") != nil, "\(d.stderrText)")

        // A ClientHello record cut off, then the client hangs up.
        c = try RawNBDClient(unixPath: d.socket!)
        try c.greet()
        try c.sendOption(5)
        #expect(try c.receiveOptionReply()?.type == ack)
        try c.send([0x16, 0x03, 0x01, 0x02, 0x00] + Files.pattern(count: 100, seed: 2))
        shutdown(c.fd, Int32(SHUT_WR))
        #expect(c.waitForClose())
        #expect(d.waitForLog("TLS handshake failed: the client closed the connection") != nil, "\(d.stderrText)")

        // EXPORT_NAME before STARTTLS: no error reply exists, so the server hangs up.
        c = try RawNBDClient(unixPath: d.socket!)
        try c.greet()
        try c.sendOption(1, Array("disk".utf8))
        #expect(c.waitForClose())
        // STARTTLS with data: ERR_INVALID, then the server hangs up (as QEMU does).
        c = try RawNBDClient(unixPath: d.socket!)
        try c.greet()
        try c.sendOption(5, [1, 2, 3])
        #expect(try c.receiveOptionReply()?.type == errInvalid)
        #expect(c.waitForClose())
        // ABORT before STARTTLS is acknowledged (the NBD spec allows it).
        c = try RawNBDClient(unixPath: d.socket!)
        try c.greet()
        try c.sendOption(2)
        #expect(try c.receiveOptionReply()?.type == ack)
        #expect(c.waitForClose())

        // A client stalled half-way through its ClientHello holds nothing up: others are
        // served, and closing it (here: shutting down) is safe at any point.
        let stalled = try RawNBDClient(unixPath: d.socket!)
        try stalled.greet()
        try stalled.sendOption(5)
        #expect(try stalled.receiveOptionReply()?.type == ack)
        try stalled.send([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        try Run.expectSuccess(["nbdinfo", "--size", Self.tlsURI(d, "tls-certificates=\(pki.pki)")])
        #expect(d.stop() == 0)
        #expect(stalled.waitForClose())
    }

    /// `handshake-max-seconds` runs until transmission, so it covers the TLS handshake: a
    /// client that sends STARTTLS and then nothing, and one that trickles its ClientHello a
    /// byte at a time, are closed once the limit passes; a real TLS client is still served.
    @Test(.requires("certtool", "psktool", "nbdinfo", "python3"))
    func handshakeMaxSecondsCoversTheTLSHandshake() throws {
        let dir = try TempDir(prefix: "tls-timeout")
        let pki = try PKI(in: dir)
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 1 << 20)
        let socket = dir.file("nbd.sock")
        let d = try Blockd(["-v", "--object", "tls-creds-x509,id=tls0,endpoint=server,dir=\(pki.pki)",
                            "--blockdev", "driver=file,node-name=f0,filename=\(image)",
                            "--nbd-server", "addr.type=unix,addr.path=\(socket),tls-creds=tls0,handshake-max-seconds=1",
                            "--export", "type=nbd,id=e0,node-name=f0,name=disk"],
                           in: dir, waitForSocket: socket, exportName: "disk")
        // A ClientHello as OpenSSL (Python's ssl) sends it.
        let helloScript = """
        import ssl, sys
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sys.stdout.write(outgoing.read().hex())
        """
        let hex = Array(try Run.expectSuccess(["python3", "-c", helloScript]).stdout.utf8)
        var hello: [UInt8] = []
        for i in stride(from: 0, to: hex.count - 1, by: 2) { hello.append(UInt8(String(decoding: hex[i...i + 1], as: UTF8.self), radix: 16)!) }
        #expect(hello.count > 100 && hello[0] == 0x16, "a TLS handshake record")

        let ack: UInt32 = 1
        let start = Subprocess.now()
        let silent = try RawNBDClient(unixPath: socket)
        try silent.greet()
        try silent.sendOption(5)
        #expect(try silent.receiveOptionReply()?.type == ack)
        let trickle = try RawNBDClient(unixPath: socket)
        try trickle.greet()
        try trickle.sendOption(5)
        #expect(try trickle.receiveOptionReply()?.type == ack)
        var trickleClosedAt: Double?
        for byte in hello {
            var p = pollfd(fd: trickle.fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 100) > 0 {
                var b: UInt8 = 0
                if recv(trickle.fd, &b, 1, 0) <= 0 { trickleClosedAt = Subprocess.now(); break }
            }
            if Glibc.send(trickle.fd, [byte], 1, Int32(MSG_NOSIGNAL)) < 0 { trickleClosedAt = Subprocess.now(); break }
        }
        if trickleClosedAt == nil, trickle.waitForClose() { trickleClosedAt = Subprocess.now() }
        #expect(silent.waitForClose())
        let silentClosedAt = Subprocess.now()
        #expect(silentClosedAt - start >= 0.9 && silentClosedAt - start < 5, "closed after \(silentClosedAt - start) s")
        #expect(trickleClosedAt.map { $0 - start >= 0.9 && $0 - start < 5 } == true,
                "trickler closed at \(String(describing: trickleClosedAt.map { $0 - start }))")
        #expect(d.waitForLog("TLS handshake not finished within 1 s (handshake-max-seconds)") != nil, "\(d.stderrText)")
        // A client that completes TLS in time is served.
        let size = try Run.expectSuccess(["nbdinfo", "--size", Self.tlsURI(d, "tls-certificates=\(pki.pki)")])
        #expect(size.stdout == "\(1 << 20)\n", "\(size.stdout)")
        #expect(d.stop() == 0)
    }

    /// A TLS client that pipelines 4,000 1 MiB reads and never reads a reply: the memory budget
    /// (which counts the TLS session's buffers) stops reading it, RSS stays bounded, another
    /// client is served meanwhile, and the flooder still gets its replies when it reads.
    @Test(.requires("certtool", "psktool", "nbdinfo", "python3"))
    func tlsFloodNeverReadBackStaysBounded() throws {
        let dir = try TempDir(prefix: "tls-flood")
        let pki = try PKI(in: dir)
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 256 << 20)
        let d = try Blockd.serve(image: image, in: dir, extra: ["--tls-creds", pki.pki])
        try Run.expectSuccess(["nbdinfo", "--size", Self.tlsURI(d, "tls-certificates=\(pki.pki)")])
        let before = Proc.rssKiB(d.pid)
        // NBD handshake, STARTTLS, TLS with the client certificate, NBD_OPT_GO; then requests
        // until the socket takes no more (all 4,000 fit in the socket buffers: the server
        // stops reading them at its budget); then, told to, read one reply.
        let script = """
        import os, socket, ssl, struct, sys, time
        sock, pki, out, go = sys.argv[1:5]
        s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sock)
        def recvn(c, n):
            b = b""
            while len(b) < n:
                x = c.recv(n - len(b))
                if not x: raise SystemExit("closed")
                b += x
            return b
        recvn(s, 18); s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 5, 0)); recvn(s, 20)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.load_verify_locations(pki + "/ca-cert.pem")
        ctx.load_cert_chain(pki + "/client-cert.pem", pki + "/client-key.pem")
        t = ctx.wrap_socket(s, server_hostname="localhost")
        payload = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
        t.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(payload)) + payload)
        while True:
            magic, opt, typ, n = struct.unpack(">QIII", recvn(t, 20)); recvn(t, n)
            if typ == 1: break
            if typ & 0x80000000: raise SystemExit("GO refused")
        batch = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i + 1, (i % 200) << 20, 1 << 20) for i in range(4000))
        t.setblocking(False)
        sent, last = 0, time.monotonic()
        while sent < len(batch) and time.monotonic() - last < 1:
            try:
                n = t.send(batch[sent:sent + 65536])
                sent += n; last = time.monotonic()
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                time.sleep(0.01)
        open(out, "w").write(str(sent // 28))
        while not os.path.exists(go): time.sleep(0.02)
        t.setblocking(True); t.settimeout(10)
        magic, err, cookie = struct.unpack(">IIQ", recvn(t, 16)); recvn(t, 1 << 20)
        print(magic == 0x67446698 and err == 0 and 1 <= cookie <= 4000)
        """
        let sentFile = dir.file("sent"), goFile = dir.file("go"), output = dir.file("flood.out")
        let flood = try Subprocess.spawn(["python3", "-c", script, d.socket!, pki.pki, sentFile, goFile],
                                         stdoutPath: output, stderrPath: dir.file("flood.err"))
        defer { kill(flood, SIGKILL); _ = Subprocess.wait(flood, timeout: 10) }
        let deadline = Subprocess.now() + 60
        while (try? Files.read(sentFile))?.isEmpty != false && Subprocess.now() < deadline { usleep(20_000) }
        let sent = Int((try? Files.read(sentFile)) ?? "") ?? 0
        #expect(sent > 0, "\((try? Files.read(dir.file("flood.err"))) ?? "")")
        let peak = Proc.peakAfterSettling { Proc.rssKiB(d.pid) }
        #expect(peak - before < 64 * 1024, "RSS grew \(peak - before) KiB (from \(before) KiB)")
        // Another TLS client is served meanwhile.
        let t0 = Subprocess.now()
        try Run.expectSuccess(["nbdinfo", "--size", Self.tlsURI(d, "tls-certificates=\(pki.pki)")])
        #expect(Subprocess.now() - t0 < 5)
        try Files.write(goFile, "")
        #expect(Subprocess.wait(flood, timeout: 30) == 0)
        #expect((try? Files.read(output)) == "True\n", "\((try? Files.read(output)) ?? "") \((try? Files.read(dir.file("flood.err"))) ?? "")")
        #expect(d.stop() == 0)
    }

    @Test(.requires("nbdinfo"))
    func startTLSWithoutTLSIsRefusedByPolicy() throws {
        let dir = try TempDir(prefix: "tls-none")
        let (_, d) = try Self.serveUnix(dir, extra: [])
        let c = try RawNBDClient(unixPath: d.socket!)
        try c.greet()
        try c.sendOption(5)
        let r = try c.receiveOptionReply()
        #expect(r?.type == 0x8000_0002, "\(String(describing: r))")   // NBD_REP_ERR_POLICY
        #expect(r.map { String(decoding: $0.payload, as: UTF8.self) } == "TLS not configured")
        // The client may carry on in the clear.
        try c.sendOption(7, RawNBDClient.be(UInt32(4)) + Array("disk".utf8) + RawNBDClient.be(UInt16(0)))
        var types: [UInt32] = []
        while let reply = try c.receiveOptionReply() {
            types.append(reply.type)
            if reply.type == 1 || reply.type & 0x8000_0000 != 0 { break }
        }
        #expect(types.last == 1, "\(types)")
        #expect(d.stop() == 0)
    }

    // MARK: QMP

    @Test(.requires("certtool", "psktool", "nbdinfo", "python3"), .requiresPython("qemu.qmp"))
    func objectsOverQMPMatchQemuStorageDaemon() throws {
        let dir = try TempDir(prefix: "tls-qmp")
        let pki = try PKI(in: dir)
        let (d, qmp) = try QMPInteropTests.monitorOnly(in: dir, extra: ["-v"])
        let r = try Run.expectSuccess(["python3", QMPInteropTests.scripts + "/tls_objects.py", qmp, pki.root, dir.file("nbd.sock")],
                                      timeout: 120)
        let expected = try Files.read(QMPInteropTests.scripts + "/tls_objects.expected.txt")
            .replacingOccurrences(of: "PKI", with: pki.root)
        #expect(r.stdout == expected, "transcript differs:\n\(r.stdout)\nstderr: \(d.stderrText)")
        #expect(d.waitForLog("TLS x509 authz check for C=US,O=blockd tests,CN=client2 is denied by authz0") != nil)
        #expect(d.stop() == 0)
    }

    @Test(.requires("certtool", "psktool"))
    func commandLineErrorsNameTheProblem() throws {
        let dir = try TempDir(prefix: "tls-cli")
        let pki = try PKI(in: dir)
        let image = dir.file("disk.img")
        try Files.createSparse(image, size: 1 << 20)
        func fails(_ args: [String], _ message: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let r = try Blockd.runOnce(args)
            #expect(r.status == 1, "\(r)", sourceLocation: sourceLocation)
            #expect(r.stderr.contains(message), "\(r)", sourceLocation: sourceLocation)
        }
        // QEMU's form: `blockd: --option ARGUMENT: message`, in command-line order (the
        // objects a server names come before it, as qemu-storage-daemon needs them).
        let sock = "addr.type=unix,addr.path=\(dir.file("s.sock"))"
        try fails(["--nbd-server", "\(sock),tls-creds=tls0"],
                  "blockd: --nbd-server \(sock),tls-creds=tls0: No TLS credentials with id 'tls0'\n")
        try fails(["--nbd-server", "\(sock),tls-creds=tls0", "--object", "tls-creds-x509,id=tls0,endpoint=server,dir=\(pki.pki)"],
                  "blockd: --nbd-server \(sock),tls-creds=tls0: No TLS credentials with id 'tls0'\n")
        try fails(["--object", "tls-creds-x509,id=tls0,dir=\(pki.pki)", "--nbd-server", "\(sock),tls-creds=tls0"],
                  ": Expected TLS credentials for a server endpoint\n")
        try fails(["--object", "tls-creds-x509,id=tls0,endpoint=server,dir=\(pki.pki),verify-peer=off",
                   "--object", "authz-simple,id=a0,identity=x", "--nbd-server", "\(sock),tls-creds=tls0,tls-authz=a0"],
                  "tls-authz 'a0' needs tls-creds 'tls0' with verify-peer=on")
        try fails(["--nbd-server", "\(sock),tls-authz=a0"], ": tls-authz is not permitted without tls-creds\n")
        try fails(["--object", "tls-creds-x509,id=tls0,endpoint=server,dir=\(dir.path)"],
                  ": Unable to access credentials \(dir.path)/ca-cert.pem: No such file or directory\n")
        try fails(["--object", "tls-creds-x509,id=tls0,endpoint=sever,dir=\(pki.pki)"],
                  "blockd: --object tls-creds-x509,id=tls0,endpoint=sever,dir=\(pki.pki): Parameter 'endpoint' does not accept value 'sever'\n")
        try fails(["--object", "tls-creds-psk,id=p0,endpoint=server,dir=\(pki.pskDir),username=alice"],
                  ": username should not be set when endpoint=server\n")
        try fails(["--object", "tls-creds-x509,id=tls0,endpoint=server,dir=\(pki.pki),colour=blue"],
                  "blockd: --object tls-creds-x509,id=tls0,endpoint=server,dir=\(pki.pki),colour=blue: Parameter 'colour' is unexpected\n")
        try fails(["serve", image, "--tls-creds", dir.path], "serve: --tls-creds: Unable to access credentials")
        try fails(["serve", image, "--tls-psk", pki.psk, "--tls-creds", pki.pki], "give either --tls-creds or --tls-psk")
        try fails(["serve", image, "--tls-authz", "x"], "--tls-authz is not permitted without --tls-creds or --tls-psk")
    }
}
