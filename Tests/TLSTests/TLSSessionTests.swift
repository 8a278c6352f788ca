#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import TLS

/// Both endpoints of `TLSSession` against each other over a socketpair, with credentials
/// made by certtool and psktool.
@Suite(.requiresGnuTLSTools) struct TLSSessionTests {
    static let clientDN = "C=US,O=blockd tests,CN=client1"

    @Test func x509HandshakeChecksBothSidesAndCarriesData() throws {
        let pki = try PKI()
        let pair = try Pair(server: try .x509(directory: pki.pki, endpoint: .server),
                            client: try .x509(directory: pki.pki, endpoint: .client),
                            authorization: TLSAuthorization(id: "authz0", identity: Self.clientDN))
        let (s, c) = pair.handshake()
        #expect(s == .done && c == .done, "server: \(pair.server.failure ?? "-"), client: \(pair.client.failure ?? "-")")
        #expect(pair.server.peerIdentity == Self.clientDN)
        #expect(pair.client.peerIdentity == "O=blockd tests,CN=localhost")
        #expect(pair.server.parameters.hasPrefix("TLS1."))
        try exchange(pair, bytes: 5 << 20)
    }

    @Test func authzAcceptsTheRFC4514FormToo() throws {
        let pki = try PKI()
        let pair = try Pair(server: try .x509(directory: pki.pki, endpoint: .server),
                            client: try .x509(directory: pki.pki, endpoint: .client),
                            authorization: TLSAuthorization(id: "authz0", identity: "CN=client1,O=blockd tests,C=US"))
        let (s, c) = pair.handshake()
        #expect(s == .done && c == .done, "server: \(pair.server.failure ?? "-")")
    }

    @Test func pskHandshakeReportsTheUsername() throws {
        let pki = try PKI()
        let pair = try Pair(server: try .psk(keyFile: pki.psk, endpoint: .server),
                            client: try .psk(keyFile: pki.psk, endpoint: .client, username: "bob"),
                            authorization: TLSAuthorization(id: "authz0", identity: "bob"))
        let (s, c) = pair.handshake()
        #expect(s == .done && c == .done, "server: \(pair.server.failure ?? "-"), client: \(pair.client.failure ?? "-")")
        #expect(pair.server.peerIdentity == "bob")
        try exchange(pair, bytes: 1 << 20)
    }

    @Test func wrongPSKFailsOnBothSides() throws {
        let pki = try PKI()
        let pair = try Pair(server: try .psk(keyFile: pki.psk, endpoint: .server),
                            client: try .psk(keyFile: pki.pskWrong, endpoint: .client, username: "alice"))
        let (s, c) = pair.handshake()
        #expect(s == .failed && c == .failed)
        let server = pair.server.failure ?? "", client = pair.client.failure ?? ""
        #expect(server.hasPrefix("TLS handshake failed: the client's key for PSK username 'alice' does not match \(pki.psk)"), "\(server)")
        #expect(client.hasPrefix("TLS handshake failed"), "\(client)")
    }

    @Test func unknownPSKUserIsNamed() throws {
        let pki = try PKI()
        let other = pki.root + "/carol.psk"
        #expect(PKI.run(["psktool", "-u", "carol", "-p", other]) == 0)
        let pair = try Pair(server: try .psk(keyFile: pki.psk, endpoint: .server),
                            client: try .psk(keyFile: other, endpoint: .client, username: "carol"))
        let (s, _) = pair.handshake()
        #expect(s == .failed)
        #expect(pair.server.failure?.contains("PSK username 'carol', which is not in \(pki.psk)") == true,
                "\(pair.server.failure ?? "-")")
    }

    @Test func clientFromAnotherCAIsRefusedByTheServer() throws {
        let pki = try PKI()
        // The client trusts our server (its CA file is ours) but presents a rogue certificate.
        let dir = pki.root + "/mixed"
        #expect(PKI.run(["/bin/mkdir", dir]) == 0)
        #expect(PKI.run(["/bin/cp", pki.pki + "/ca-cert.pem", pki.rogue + "/client-cert.pem", pki.rogue + "/client-key.pem", dir]) == 0)
        let pair = try Pair(server: try .x509(directory: pki.pki, endpoint: .server),
                            client: try .x509(directory: dir, endpoint: .client, sanityCheck: false))
        let (s, _) = pair.handshake()
        #expect(s == .failed)
        // GnuTLS clients offer only a certificate from a CA the server names, so the server
        // sees none.
        #expect(pair.server.failure == "TLS client presented no certificate issued by \(pki.pki)/ca-cert.pem (verify-peer=on requires one)",
                "\(pair.server.failure ?? "-")")
    }

    @Test func serverFromAnotherCAIsRefusedByTheClient() throws {
        let pki = try PKI()
        let pair = try Pair(server: try .x509(directory: pki.rogue, endpoint: .server, verifyPeer: false),
                            client: try .x509(directory: pki.pki, endpoint: .client))
        let (_, c) = pair.handshake()
        #expect(c == .failed)
        #expect(pair.client.failure?.contains("server certificate rejected: The certificate hasn't got a known issuer") == true,
                "\(pair.client.failure ?? "-")")
    }

    @Test func clientWithoutCertificateIsRefusedWhenVerifyPeerIsOn() throws {
        let pki = try PKI()
        let dir = pki.root + "/cacert-only"
        #expect(PKI.run(["/bin/mkdir", dir]) == 0)
        #expect(PKI.run(["/bin/cp", pki.pki + "/ca-cert.pem", dir]) == 0)
        let pair = try Pair(server: try .x509(directory: pki.pki, endpoint: .server),
                            client: try .x509(directory: dir, endpoint: .client))
        let (s, _) = pair.handshake()
        #expect(s == .failed)
        #expect(pair.server.failure?.contains("presented no certificate") == true, "\(pair.server.failure ?? "-")")
        // verify-peer=off: the same client is served.
        let open = try Pair(server: try .x509(directory: pki.pki, endpoint: .server, verifyPeer: false),
                            client: try .x509(directory: dir, endpoint: .client))
        let (s2, c2) = open.handshake()
        #expect(s2 == .done && c2 == .done, "\(open.server.failure ?? "-") / \(open.client.failure ?? "-")")
    }

    @Test func authzRefusesAnotherIdentity() throws {
        let pki = try PKI()
        let pair = try Pair(server: try .x509(directory: pki.pki, endpoint: .server),
                            client: try .x509(directory: pki.pki2, endpoint: .client),
                            authorization: TLSAuthorization(id: "authz0", identity: Self.clientDN))
        let (s, c) = pair.handshake()
        #expect(s == .failed)
        #expect(pair.server.failure == "TLS x509 authz check for C=US,O=blockd tests,CN=client2 is denied by authz0",
                "\(pair.server.failure ?? "-")")
        // The client learns it from the alert (TLS 1.3: after its side of the handshake).
        if c == .done {
            var byte: UInt8 = 0
            var n = 0
            for _ in 0..<1000 {
                n = pair.client.receive(into: &byte, count: 1)
                if n != -1 || errno != EAGAIN { break }
                usleep(100)
            }
            #expect(n <= 0)
        }
    }

    @Test func clientChecksTheHostname() throws {
        let pki = try PKI()
        let pair = try Pair(server: try .x509(directory: pki.pki, endpoint: .server),
                            client: try .x509(directory: pki.pki, endpoint: .client), hostname: "example.org")
        let (_, c) = pair.handshake()
        #expect(c == .failed)
        #expect(pair.client.failure == "Certificate does not match the hostname example.org", "\(pair.client.failure ?? "-")")
        let byIP = try Pair(server: try .x509(directory: pki.pki, endpoint: .server),
                            client: try .x509(directory: pki.pki, endpoint: .client), hostname: "127.0.0.1")
        let (s2, c2) = byIP.handshake()
        #expect(s2 == .done && c2 == .done, "\(byIP.client.failure ?? "-")")
    }

    @Test func garbageInsteadOfAClientHelloFailsTheServer() throws {
        let pki = try PKI()
        var sv: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &sv) == 0)
        defer { close(sv[0]); close(sv[1]) }
        let server = try TLSSession(fd: sv[0], credentials: try .x509(directory: pki.pki, endpoint: .server))
        let garbage = Array("GET / HTTP/1.0\r\n\r\n".utf8) + [UInt8](repeating: 0x16, count: 64)
        _ = garbage.withUnsafeBytes { write(sv[1], $0.baseAddress!, $0.count) }
        var progress = TLSSession.Progress.wouldBlock
        for _ in 0..<100 where progress == .wouldBlock {
            progress = server.handshake()
        }
        #expect(progress == .failed)
        #expect(server.failure?.hasPrefix("TLS handshake failed: ") == true, "\(server.failure ?? "-")")
        #expect(server.failure?.contains("is the client speaking TLS?") == true, "\(server.failure ?? "-")")
    }

    @Test func earlyInputAndClearOutputFrameTheSession() throws {
        // The server's clear-text prefix reaches the client before any TLS record, and bytes
        // read before the session started are fed to it (a STARTTLS reply and a ClientHello).
        let pki = try PKI()
        var sv: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &sv) == 0)
        defer { close(sv[0]); close(sv[1]) }
        let client = try TLSSession(fd: sv[1], credentials: try .x509(directory: pki.pki, endpoint: .client), hostname: "localhost")
        #expect(client.handshake() == .wouldBlock)   // its ClientHello is now in the socket
        var hello = [UInt8](repeating: 0, count: 65536)
        let n = hello.withUnsafeMutableBytes { read(sv[0], $0.baseAddress!, $0.count) }
        #expect(n > 5)
        let server = try TLSSession(fd: sv[0], credentials: try .x509(directory: pki.pki, endpoint: .server, verifyPeer: false),
                                    clearOutput: Array("ACK!".utf8), earlyInput: Array(hello[0..<n]))
        #expect(server.handshake() == .wouldBlock)
        var prefix = [UInt8](repeating: 0, count: 4)
        #expect(prefix.withUnsafeMutableBytes { read(sv[1], $0.baseAddress!, 4) } == 4)
        #expect(prefix == Array("ACK!".utf8))
        var s = TLSSession.Progress.wouldBlock, c = TLSSession.Progress.wouldBlock
        for _ in 0..<10_000 where s == .wouldBlock || c == .wouldBlock {
            if c == .wouldBlock { c = client.handshake() }
            if s == .wouldBlock { s = server.handshake() }
            usleep(50)
        }
        #expect(s == .done && c == .done, "\(server.failure ?? "-") / \(client.failure ?? "-")")
    }

    /// Client → server and server → client `bytes` each way, through the non-blocking paths
    /// (partial sends, the output limit, several records per read).
    func exchange(_ pair: Pair, bytes: Int) throws {
        for (from, to) in [(pair.client, pair.server), (pair.server, pair.client)] {
            var data = [UInt8](repeating: 0, count: bytes)
            for i in 0..<bytes { data[i] = UInt8(truncatingIfNeeded: i &* 131 &+ i >> 11) }
            var received = [UInt8](repeating: 0, count: bytes)
            var sent = 0, got = 0
            var spins = 0
            while got < bytes {
                spins += 1
                if spins > 2_000_000 { Issue.record("exchange stalled at \(sent) sent, \(got) received"); return }
                if sent < bytes {
                    // Several iovecs of odd sizes at once, like a connection's reply batch.
                    let sizes = [4112, 17, 70_000, 1]
                    var iov: [iovec] = []
                    var at = sent
                    data.withUnsafeMutableBytes { raw in
                        for size in sizes where at < bytes {
                            let n = min(size, bytes - at)
                            iov.append(iovec(iov_base: raw.baseAddress! + at, iov_len: n))
                            at += n
                        }
                    }
                    let n = iov.withUnsafeBufferPointer { from.send(iovecs: $0.baseAddress!, count: $0.count) }
                    if n > 0 { sent += n } else if errno != EAGAIN { Issue.record("send: \(from.failure ?? "-")"); return }
                } else if from.wantsWrite {
                    from.flush()
                }
                let n = received.withUnsafeMutableBytes { to.receive(into: $0.baseAddress! + got, count: min(256 * 1024, bytes - got)) }
                if n > 0 { got += n } else if n == 0 { Issue.record("unexpected end of stream"); return } else if errno != EAGAIN {
                    Issue.record("receive: \(to.failure ?? "-")")
                    return
                }
            }
            #expect(received == data)
        }
        // close_notify ends the stream cleanly.
        pair.client.bye()
        var byte: UInt8 = 0
        var n = -1
        for _ in 0..<1000 {
            n = pair.server.receive(into: &byte, count: 1)
            if n != -1 { break }
            usleep(100)
        }
        #expect(n == 0)
    }
}

@Suite struct PSKKeyFileTests {
    @Test func parsesPsktoolLines() throws {
        let f = try PSKKeyFile(parsing: "# keys\nalice:00ff10\n\nbob:ABCDEF\r\nalice:1111\n", path: "k")
        #expect(f.usernames == ["alice", "bob"])
        #expect(f.keys["alice"] == [0x00, 0xff, 0x10])
        #expect(f.keys["bob"] == [0xab, 0xcd, 0xef])
    }

    @Test func rejectsMalformedLinesWithTheLineNumber() {
        #expect(throws: TLSError("PSK file k, line 2: expected 'username:hexkey'")) {
            try PSKKeyFile(parsing: "a:00\nnocolon\n", path: "k")
        }
        #expect(throws: TLSError("PSK file k, line 1: the key for 'a' is not 1 to 512 bytes of hexadecimal")) {
            try PSKKeyFile(parsing: "a:0g\n", path: "k")
        }
        #expect(throws: TLSError("PSK file k, line 1: the username is empty")) {
            try PSKKeyFile(parsing: ":00\n", path: "k")
        }
        #expect(throws: TLSError("PSK file k has no keys (expected lines of 'username:hexkey', see psktool)")) {
            try PSKKeyFile(parsing: "\n# nothing\n", path: "k")
        }
    }

    @Test(.requiresGnuTLSTools) func credentialErrorsNameTheFile() throws {
        let pki = try PKI()
        #expect(throws: TLSError("Username carol not found in PSK file \(pki.psk)")) {
            try TLSCredentials.psk(keyFile: pki.psk, endpoint: .client, username: "carol")
        }
        #expect(throws: TLSError("username should not be set when endpoint=server")) {
            try TLSCredentials.psk(keyFile: pki.psk, endpoint: .server, username: "alice")
        }
        #expect(throws: TLSError("Unable to access credentials \(pki.root)/nope/server-cert.pem: No such file or directory")) {
            _ = PKI.run(["/bin/mkdir", pki.root + "/nope"])
            _ = PKI.run(["/bin/cp", pki.pki + "/ca-cert.pem", pki.root + "/nope"])
            return try TLSCredentials.x509(directory: pki.root + "/nope", endpoint: .server)
        }
        // A server certificate from another CA than the directory's ca-cert.pem.
        let mixed = pki.root + "/mixed"
        _ = PKI.run(["/bin/mkdir", mixed])
        _ = PKI.run(["/bin/cp", pki.pki + "/ca-cert.pem", pki.rogue + "/server-cert.pem", pki.rogue + "/server-key.pem", mixed])
        do {
            _ = try TLSCredentials.x509(directory: mixed, endpoint: .server)
            Issue.record("a certificate from another CA was accepted")
        } catch {
            #expect(error.message.hasPrefix("The certificate \(mixed)/server-cert.pem is not valid for the CA \(mixed)/ca-cert.pem: The certificate hasn't got a known issuer"),
                    "\(error.message)")
        }
        // sanity-check=off defers that to the clients.
        _ = try TLSCredentials.x509(directory: mixed, endpoint: .server, sanityCheck: false)
    }
}

extension TLSError: Equatable {
    public static func == (a: TLSError, b: TLSError) -> Bool { a.message == b.message }
}
