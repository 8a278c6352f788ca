import CGnuTLS
import Glibc

/// One TLS session over a non-blocking socket, driven by an event loop: no call ever blocks.
///
/// GnuTLS never touches the socket itself. It writes finished records into our ciphertext
/// output buffer (its push function always succeeds), and `flush` sends that buffer with one
/// `send` per wake-up instead of one per record; it reads records from our input buffer,
/// refilled with one `recv` of up to 128 KiB when empty. So when GnuTLS reports `E_AGAIN` it
/// is always waiting for input (wait for `EPOLLIN`), and `wantsWrite` says when ciphertext is
/// waiting for the socket (wait for `EPOLLOUT`) — what `gnutls_record_get_direction` would
/// report, without its one-direction-at-a-time limit.
///
/// Used by one thread at a time (the loop that owns the connection). Either endpoint: the NBD
/// server uses the server side; a client (the `nbd` block driver) the client side.
public final class TLSSession {
    public enum State: Sendable, Equatable {
        case handshaking, established, failed, closed
    }

    /// What a handshake step did.
    public enum Progress: Sendable, Equatable {
        case done
        /// Needs more input from the peer (wait for `EPOLLIN`; and `EPOLLOUT` if `wantsWrite`).
        case wouldBlock
        /// The session is dead; `failure` says why.
        case failed
    }

    public let credentials: TLSCredentials
    public let authorization: TLSAuthorization?
    /// Client side: the name the server's certificate must match.
    public let hostname: String?
    public private(set) var state = State.handshaking
    /// Why the session failed, for the log or the user.
    public private(set) var failure: String?
    /// After the handshake: the peer's certificate DN (X.509, when checked) or PSK username (server side).
    public private(set) var peerIdentity: String?
    /// The username a client presented that is not in the key file (for the failure message).
    var unknownPSKUsername: String?
    /// The username whose key the server handed to GnuTLS (a failure after it: wrong key).
    var pskUsernameTried: String?

    private let session: gnutls_session_t
    private let io: UnsafeMutablePointer<CipherIO>
    /// Ciphertext queued beyond this stops `send` from encrypting more until the socket drains.
    static let outputLimit = 256 * 1024
    static let inputSize = 128 * 1024
    /// The largest plaintext GnuTLS puts in one record.
    static let maxRecord = 16384

    private var peer: String { credentials.endpoint == .server ? "client" : "server" }

    /// Starts a session on `fd`. `clearOutput` goes to the socket first, unencrypted (the
    /// server's reply to STARTTLS); `earlyInput` is ciphertext the caller already read from
    /// the socket (bytes a client sent right behind its STARTTLS).
    public init(fd: Int32, credentials: TLSCredentials, authorization: TLSAuthorization? = nil, hostname: String? = nil,
                clearOutput: [UInt8] = [], earlyInput: [UInt8] = []) throws(TLSError) {
        self.credentials = credentials
        self.authorization = authorization
        self.hostname = hostname
        var handle: gnutls_session_t?
        let flags = UInt32(credentials.endpoint == .server ? GNUTLS_SERVER : GNUTLS_CLIENT)
            | UInt32(GNUTLS_NONBLOCK) | UInt32(GNUTLS_NO_SIGNAL)
        var rc = gnutls_init(&handle, flags)
        guard rc >= 0, let handle else { throw TLSError("Cannot initialize TLS session: \(gnutlsText(rc))") }
        session = handle
        io = .allocate(capacity: 1)
        io.initialize(to: CipherIO(fd: fd, session: handle, inputCapacity: max(TLSSession.inputSize, earlyInput.count),
                                   outputCapacity: max(64 * 1024, clearOutput.count + 32 * 1024)))
        // From here on deinit frees everything.
        rc = gnutls_priority_set(session, credentials.priority)
        if rc < 0 { throw TLSError("Unable to set TLS session priority: \(gnutlsText(rc))") }
        switch credentials.kind {
        case .x509:
            rc = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(credentials.certificates))
            if credentials.endpoint == .server && credentials.verifyPeer {
                // Ask for a client certificate; `checkPeer` enforces it with a clear message.
                gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUEST)
            }
        case .psk:
            let creds = credentials.endpoint == .server ? UnsafeMutableRawPointer(credentials.pskServer)
                                                        : UnsafeMutableRawPointer(credentials.pskClient)
            rc = gnutls_credentials_set(session, GNUTLS_CRD_PSK, creds)
        }
        if rc < 0 { throw TLSError("Cannot set session credentials: \(gnutlsText(rc))") }
        if credentials.endpoint == .client, let hostname, !hostname.isEmpty, !TLSSession.isIPAddress(hostname) {
            _ = gnutls_server_name_set(session, GNUTLS_NAME_DNS, hostname, hostname.utf8.count)
        }
        gnutls_session_set_ptr(session, Unmanaged.passUnretained(self).toOpaque())
        gnutls_transport_set_ptr(session, UnsafeMutableRawPointer(io))
        gnutls_transport_set_push_function(session, cipherPush)
        gnutls_transport_set_pull_function(session, cipherPull)
        gnutls_transport_set_pull_timeout_function(session, cipherPullTimeout)
        if !clearOutput.isEmpty { clearOutput.withUnsafeBytes { io.pointee.append($0.baseAddress!, $0.count) } }
        if !earlyInput.isEmpty {
            earlyInput.withUnsafeBytes { io.pointee.input.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            io.pointee.inEnd = earlyInput.count
        }
    }

    deinit {
        gnutls_deinit(session)
        io.pointee.release()
        io.deinitialize(count: 1)
        io.deallocate()
    }

    // MARK: handshake

    /// Runs the handshake as far as the input allows. On completion the peer is checked
    /// (certificate, hostname, authorization); a refused peer fails the session.
    public func handshake() -> Progress {
        switch state {
        case .established: return .done
        case .failed, .closed: return .failed
        case .handshaking: break
        }
        while true {
            let rc = gnutls_handshake(session)
            if rc == 0 {
                if let (message, alert) = checkPeer() {
                    gnutls_alert_send(session, GNUTLS_AL_FATAL, alert)
                    fail(message)
                    return .failed
                }
                state = .established
                _ = flush()
                return .done
            }
            if rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED {
                if !flush() && io.pointee.socketError != 0 {
                    fail("TLS handshake failed: \(String(cString: strerror(io.pointee.socketError)))")
                    return .failed
                }
                if io.pointee.socketError != 0 {
                    fail("TLS handshake failed: \(String(cString: strerror(io.pointee.socketError)))")
                    return .failed
                }
                return .wouldBlock
            }
            if gnutls_error_is_fatal(rc) == 0 { continue }
            fail(handshakeFailure(rc))
            return .failed
        }
    }

    private func handshakeFailure(_ rc: Int32) -> String {
        if let user = unknownPSKUsername {
            return "TLS handshake failed: the \(peer) presented PSK username '\(user)', which is not in \(credentials.source)"
        }
        if io.pointee.eof && (rc == GNUTLS_E_PREMATURE_TERMINATION || rc == GNUTLS_E_UNEXPECTED_PACKET_LENGTH) {
            var text = "TLS handshake failed: the \(peer) closed the connection"
            if credentials.kind == .psk && credentials.endpoint == .client { text += " (wrong PSK, or username not known to the server?)" }
            return text
        }
        if rc == GNUTLS_E_FATAL_ALERT_RECEIVED || rc == GNUTLS_E_WARNING_ALERT_RECEIVED {
            let name = gnutls_alert_get_name(gnutls_alert_get(session)).map { String(cString: $0) } ?? "unknown"
            var text = "TLS handshake failed: the \(peer) sent the alert '\(name)'"
            if credentials.kind == .x509 { text += " (does it trust our certificate's CA?)" }
            return text
        }
        var text = "TLS handshake failed: \(gnutlsText(rc))"
        switch rc {
        case GNUTLS_E_UNEXPECTED_PACKET_LENGTH, GNUTLS_E_UNSUPPORTED_VERSION_PACKET, GNUTLS_E_UNEXPECTED_PACKET,
             GNUTLS_E_UNEXPECTED_HANDSHAKE_PACKET, GNUTLS_E_RECORD_OVERFLOW:
            text += " (is the \(peer) speaking TLS?)"
        case GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER, GNUTLS_E_DECRYPTION_FAILED, GNUTLS_E_KEY_USAGE_VIOLATION,
             GNUTLS_E_INSUFFICIENT_CREDENTIALS:
            if let user = pskUsernameTried {
                text = "TLS handshake failed: the client's key for PSK username '\(user)' does not match \(credentials.source) (\(gnutlsText(rc)))"
            } else if credentials.kind == .psk {
                text += " (wrong PSK for the username?)"
            }
        case GNUTLS_E_NO_CIPHER_SUITES, GNUTLS_E_UNKNOWN_CIPHER_SUITE, GNUTLS_E_NO_PRIORITIES_WERE_SET:
            text += " (the \(peer) offered no cipher suite our \(credentials.kind == .psk ? "PSK" : "X.509") credentials allow)"
        default:
            break
        }
        return text
    }

    /// The checks after a handshake; returns the refusal and the alert to send.
    private func checkPeer() -> (String, gnutls_alert_description_t)? {
        switch credentials.kind {
        case .psk:
            guard credentials.endpoint == .server else { return nil }
            var datum = gnutls_datum_t()
            if gnutls_psk_server_get_username2(session, &datum) >= 0, let data = datum.data {
                peerIdentity = String(decoding: UnsafeRawBufferPointer(start: data, count: Int(datum.size)), as: UTF8.self)
            }
            if let authz = authorization, peerIdentity != authz.identity {
                return ("TLS PSK authz check for \(peerIdentity ?? "?") is denied by \(authz.id)", GNUTLS_A_ACCESS_DENIED)
            }
            return nil
        case .x509:
            guard credentials.verifyPeer else { return nil }
            return checkCertificate()
        }
    }

    private func checkCertificate() -> (String, gnutls_alert_description_t)? {
        let what = credentials.endpoint == .server ? "client certificate" : "server certificate"
        var status: UInt32 = 0
        let rc = gnutls_certificate_verify_peers2(session, &status)
        if rc == GNUTLS_E_NO_CERTIFICATE_FOUND {
            return (credentials.endpoint == .server
                    ? "TLS client presented no certificate issued by \(credentials.source)/ca-cert.pem (verify-peer=on requires one)"
                    : "TLS server presented no certificate", GNUTLS_A_CERTIFICATE_REQUIRED)
        }
        if rc < 0 { return ("Verify failed: \(gnutlsText(rc))", GNUTLS_A_BAD_CERTIFICATE) }
        if status != 0 {
            let alert = status & GNUTLS_CERT_SIGNER_NOT_FOUND.rawValue != 0 ? GNUTLS_A_UNKNOWN_CA : GNUTLS_A_BAD_CERTIFICATE
            return ("\(what) rejected: \(X509Check.statusText(status))", alert)
        }
        var count: UInt32 = 0
        guard let list = gnutls_certificate_get_peers(session, &count), count > 0 else {
            return ("No certificate peers", GNUTLS_A_CERTIFICATE_REQUIRED)
        }
        var cert: gnutls_x509_crt_t?
        guard gnutls_x509_crt_init(&cert) >= 0, let cert else { return ("Cannot initialize certificate", GNUTLS_A_INTERNAL_ERROR) }
        defer { gnutls_x509_crt_deinit(cert) }
        let irc = gnutls_x509_crt_import(cert, list, GNUTLS_X509_FMT_DER)
        if irc < 0 { return ("Cannot import certificate: \(gnutlsText(irc))", GNUTLS_A_BAD_CERTIFICATE) }
        if let problem = X509Check.dateProblem(cert, now: time(nil)) {
            return ("\(what) rejected: the certificate \(problem)", GNUTLS_A_CERTIFICATE_EXPIRED)
        }
        guard let dn = X509Check.distinguishedName(cert) else {
            return ("Cannot get the distinguished name of the \(what)", GNUTLS_A_BAD_CERTIFICATE)
        }
        peerIdentity = dn
        // QEMU compares the identity with the first form only; the RFC 4514 order (what
        // `certtool -i` and OpenSSL show) is accepted too, so a copied DN works either way.
        if let authz = authorization, dn != authz.identity, X509Check.rfc4514Name(cert) != authz.identity {
            return ("TLS x509 authz check for \(dn) is denied by \(authz.id)", GNUTLS_A_ACCESS_DENIED)
        }
        if credentials.endpoint == .client {
            guard let hostname, !hostname.isEmpty else {
                return ("No hostname for certificate validation", GNUTLS_A_BAD_CERTIFICATE)
            }
            if gnutls_x509_crt_check_hostname(cert, hostname) == 0 {
                return ("Certificate does not match the hostname \(hostname)", GNUTLS_A_BAD_CERTIFICATE)
            }
        }
        return nil
    }

    private func fail(_ message: String) {
        if failure == nil { failure = message }
        state = .failed
        _ = flush()   // best effort: the alert, so the peer learns why
    }

    // MARK: records

    /// Reads up to `count` plaintext bytes, running the handshake first if it is not done.
    /// Returns the byte count, 0 at the end of the stream (close_notify or the peer closed
    /// the socket), or -1 with `errno` EAGAIN (wait for input) or another code (`failure` set).
    public func receive(into buffer: UnsafeMutableRawPointer, count: Int) -> Int {
        if state == .closed { return 0 }
        if state != .established {
            switch handshake() {
            case .done: break
            case .wouldBlock:
                errno = EAGAIN
                return -1
            case .failed:
                errno = ECONNABORTED
                return -1
            }
        }
        var total = 0
        while total < count {
            let n = gnutls_record_recv(session, buffer + total, count - total)
            if n > 0 {
                total += n
                // Keep going only while whole records may be waiting in our buffers; the
                // socket is read again on the next call.
                if gnutls_record_check_pending(session) == 0 && io.pointee.inStart == io.pointee.inEnd { break }
                continue
            }
            if n == 0 {
                state = .closed
                break
            }
            let rc = Int32(n)
            if rc == GNUTLS_E_INTERRUPTED { continue }
            if rc == GNUTLS_E_AGAIN {
                if total > 0 { break }
                if io.pointee.socketError != 0 {
                    fail("TLS read failed: \(String(cString: strerror(io.pointee.socketError)))")
                    errno = io.pointee.socketError
                    return -1
                }
                _ = flush()
                errno = EAGAIN
                return -1
            }
            if rc == GNUTLS_E_PREMATURE_TERMINATION {
                // The peer closed the socket without close_notify: an end of stream (NBD's own
                // framing tells a cut-off message apart).
                state = .closed
                break
            }
            if rc == GNUTLS_E_REHANDSHAKE {
                gnutls_alert_send(session, GNUTLS_AL_WARNING, GNUTLS_A_NO_RENEGOTIATION)
                continue
            }
            if gnutls_error_is_fatal(rc) == 0 { continue }
            if total > 0 { break }
            fail("TLS error: \(gnutlsText(rc))")
            errno = EPROTO
            return -1
        }
        if io.pointee.outEnd > io.pointee.outStart { _ = flush() }
        return total
    }

    /// Encrypts from `iov` (like `writev`) while the ciphertext buffer has room, and sends
    /// what the socket takes. Returns the plaintext bytes taken (possibly fewer than given),
    /// or -1 with `errno` EAGAIN (wait for `EPOLLOUT`) or another code (`failure` set).
    public func send(iovecs iov: UnsafePointer<iovec>, count: Int) -> Int {
        guard state == .established else {
            if state == .handshaking { errno = EAGAIN; return -1 }
            errno = EPIPE
            return -1
        }
        if io.pointee.pending >= TLSSession.outputLimit { _ = flush() }
        // Small pieces (4 KiB read replies, reply headers) share records: corked, GnuTLS
        // copies them into one buffer and seals up to 16 KiB per record at uncork, so a batch
        // of 32 replies costs 11 records instead of 32 on each side. Large pieces go straight
        // into their own full records (no extra copy).
        var corked = 0
        var taken = 0
        var failed: Int32 = 0
        outer: for i in 0..<count {
            let base = iov[i].iov_base!
            let length = iov[i].iov_len
            if length < TLSSession.maxRecord / 2 && TLSSession.coalesce {
                if corked + length > TLSSession.maxRecord {
                    failed = uncork()
                    corked = 0
                    if failed != 0 { break outer }
                }
                if io.pointee.pending >= TLSSession.outputLimit {
                    if !flush() || io.pointee.pending >= TLSSession.outputLimit { break outer }
                }
                if corked == 0 { gnutls_record_cork(session) }
                let n = gnutls_record_send(session, base, length)
                if n < 0 { failed = Int32(n); break outer }
                corked += n
                taken += n
                continue
            }
            if corked > 0 {
                failed = uncork()
                corked = 0
                if failed != 0 { break outer }
            }
            var offset = 0
            while offset < length {
                if io.pointee.pending >= TLSSession.outputLimit {
                    if !flush() || io.pointee.pending >= TLSSession.outputLimit { break outer }
                }
                let n = gnutls_record_send(session, base + offset, min(length - offset, TLSSession.maxRecord))
                if n > 0 {
                    offset += n
                    taken += n
                    continue
                }
                let rc = Int32(n)
                if rc == GNUTLS_E_INTERRUPTED { continue }
                failed = rc   // E_AGAIN cannot happen: our push never blocks
                break outer
            }
        }
        if corked > 0 && failed == 0 { failed = uncork() }
        if failed != 0 {
            fail("TLS write failed: \(gnutlsText(failed))")
            errno = EPIPE
            return -1
        }
        _ = flush()
        if io.pointee.socketError != 0 {
            fail("TLS write failed: \(String(cString: strerror(io.pointee.socketError)))")
            errno = io.pointee.socketError
            return -1
        }
        if taken == 0 {
            errno = EAGAIN
            return -1
        }
        return taken
    }

    static let coalesce = getenv("BLOCKD_TLS_COALESCE").map { String(cString: $0) != "0" } ?? true

    /// Seals the corked bytes into records; 0 or a GnuTLS error. Our push never blocks, so
    /// uncorking always completes.
    private func uncork() -> Int32 {
        while true {
            let rc = gnutls_record_uncork(session, 0)
            if rc >= 0 { return 0 }
            if rc == GNUTLS_E_INTERRUPTED || rc == GNUTLS_E_AGAIN { continue }
            return rc
        }
    }

    /// `send` for one buffer.
    public func send(_ base: UnsafeRawPointer, count: Int) -> Int {
        var v = iovec(iov_base: UnsafeMutableRawPointer(mutating: base), iov_len: count)
        return send(iovecs: &v, count: 1)
    }

    /// Sends queued ciphertext; true when none is left. A socket error is kept and reported
    /// by the next `send`/`receive`.
    @discardableResult
    public func flush() -> Bool { io.pointee.flush() }

    /// Bytes this session keeps allocated for its buffers (ciphertext input, and output, which
    /// grows while the socket does not take it); GnuTLS's own state comes on top.
    public var bufferBytes: Int { io.pointee.inputCapacity + io.pointee.outputCapacity }

    /// Ciphertext is waiting for the socket to take it (wait for `EPOLLOUT`).
    public var wantsWrite: Bool { io.pointee.outEnd > io.pointee.outStart && io.pointee.socketError == 0 }

    /// Input is buffered that `epoll` will not announce: decrypted bytes inside GnuTLS or
    /// ciphertext in our buffer. A caller that stopped reading early must read again.
    public var hasBufferedInput: Bool {
        state != .failed && (gnutls_record_check_pending(session) > 0 || io.pointee.inStart < io.pointee.inEnd)
    }

    /// Sends close_notify (best effort; never waits for the peer's).
    public func bye() {
        guard state == .established else { return }
        _ = gnutls_bye(session, GNUTLS_SHUT_WR)
        state = .closed
        _ = flush()
    }

    /// "TLS1.3 AES-256-GCM" and the like, for logs.
    public var parameters: String {
        let version = gnutls_protocol_get_name(gnutls_protocol_get_version(session)).map { String(cString: $0) } ?? "?"
        let cipher = gnutls_cipher_get_name(gnutls_cipher_get(session)).map { String(cString: $0) } ?? "?"
        return "\(version) \(cipher)"
    }

    static func isIPAddress(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}

/// Ciphertext between GnuTLS and the socket (see `TLSSession`). Reached from GnuTLS's C
/// callbacks through the transport pointer, so it is a plain struct behind a pointer.
struct CipherIO {
    let fd: Int32
    let session: gnutls_session_t
    let input: UnsafeMutableRawPointer
    let inputCapacity: Int
    var inStart = 0
    var inEnd = 0
    var output: UnsafeMutableRawPointer
    var outputCapacity: Int
    var outStart = 0
    var outEnd = 0
    /// The peer closed its side of the socket.
    var eof = false
    /// A socket error other than EAGAIN (the connection is dead).
    var socketError: Int32 = 0

    init(fd: Int32, session: gnutls_session_t, inputCapacity: Int, outputCapacity: Int) {
        self.fd = fd
        self.session = session
        self.inputCapacity = inputCapacity
        self.outputCapacity = outputCapacity
        input = .allocate(byteCount: inputCapacity, alignment: 64)
        output = .allocate(byteCount: outputCapacity, alignment: 64)
    }

    func release() {
        input.deallocate()
        output.deallocate()
    }

    var pending: Int { outEnd - outStart }

    /// Appends ciphertext, growing the buffer if a record does not fit.
    mutating func append(_ bytes: UnsafeRawPointer, _ count: Int) {
        if outEnd + count > outputCapacity {
            if outStart > 0 {
                output.copyMemory(from: output + outStart, byteCount: outEnd - outStart)
                outEnd -= outStart
                outStart = 0
            }
            if outEnd + count > outputCapacity {
                let capacity = max(outputCapacity * 2, outEnd + count)
                let bigger = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
                bigger.copyMemory(from: output, byteCount: outEnd)
                output.deallocate()
                output = bigger
                outputCapacity = capacity
            }
        }
        (output + outEnd).copyMemory(from: bytes, byteCount: count)
        outEnd += count
    }

    /// Sends queued ciphertext; true when all of it went.
    mutating func flush() -> Bool {
        while outStart < outEnd {
            if socketError != 0 { return false }
            let n = Glibc.send(fd, output + outStart, outEnd - outStart, Int32(MSG_NOSIGNAL))
            if n > 0 {
                outStart += n
                continue
            }
            let code = errno
            if code == EINTR { continue }
            if code != EAGAIN && code != EWOULDBLOCK { socketError = code }
            return false
        }
        outStart = 0
        outEnd = 0
        return true
    }

    /// Refills the empty input buffer with one `recv`: bytes read, 0 at end of stream, or -1
    /// with the errno to report.
    mutating func fill() -> (Int, Int32) {
        inStart = 0
        inEnd = 0
        if eof { return (0, 0) }
        if socketError != 0 { return (-1, socketError) }
        while true {
            let n = recv(fd, input, inputCapacity, 0)
            if n > 0 {
                inEnd = n
                return (n, 0)
            }
            if n == 0 {
                eof = true
                return (0, 0)
            }
            let code = errno
            if code == EINTR { continue }
            if code != EAGAIN && code != EWOULDBLOCK { socketError = code }
            return (-1, code == EWOULDBLOCK ? EAGAIN : code)
        }
    }
}

private func cipherPush(_ transport: gnutls_transport_ptr_t?, _ data: UnsafeRawPointer?, _ count: Int) -> Int {
    let io = transport!.assumingMemoryBound(to: CipherIO.self)
    io.pointee.append(data!, count)
    return count
}

private func cipherPull(_ transport: gnutls_transport_ptr_t?, _ buffer: UnsafeMutableRawPointer?, _ count: Int) -> Int {
    let io = transport!.assumingMemoryBound(to: CipherIO.self)
    if io.pointee.inStart == io.pointee.inEnd {
        let (n, code) = io.pointee.fill()
        if n == 0 { return 0 }
        if n < 0 {
            gnutls_transport_set_errno(io.pointee.session, code)
            return -1
        }
    }
    let n = min(count, io.pointee.inEnd - io.pointee.inStart)
    buffer!.copyMemory(from: io.pointee.input + io.pointee.inStart, byteCount: n)
    io.pointee.inStart += n
    return n
}

/// GnuTLS asks whether input is ready (it never waits here: the session is non-blocking).
private func cipherPullTimeout(_ transport: gnutls_transport_ptr_t?, _ milliseconds: UInt32) -> Int32 {
    let io = transport!.assumingMemoryBound(to: CipherIO.self)
    if io.pointee.inStart < io.pointee.inEnd || io.pointee.eof { return 1 }
    let (n, code) = io.pointee.fill()
    if n >= 0 { return 1 }
    if code == EAGAIN { return 0 }
    gnutls_transport_set_errno(io.pointee.session, code)
    return -1
}
