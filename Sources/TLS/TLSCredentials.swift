import CGnuTLS
import Glibc

/// Which side of a TLS session credentials are for (QEMU's `endpoint=`).
public enum TLSEndpoint: String, Sendable {
    case server, client
}

/// Who may connect: QEMU's `authz-simple` object. For X.509 the identity is the client
/// certificate's distinguished name as GnuTLS prints it (`gnutls_x509_crt_get_dn`, e.g.
/// `CN=client,O=Example`, the string QEMU compares); for PSK it is the PSK username.
public struct TLSAuthorization: Sendable, Equatable {
    /// The object's id, named in refusals.
    public var id: String
    public var identity: String
    public init(id: String, identity: String) {
        self.id = id
        self.identity = identity
    }
}

/// Loaded TLS credentials: X.509 certificates or pre-shared keys, for a server or a client,
/// shared by every session made from them.
///
/// `@unchecked Sendable`: every stored property is a `let`, and the GnuTLS credential and
/// priority objects are never changed after `init`; GnuTLS allows one credentials object to be
/// used by many sessions on many threads at once (that is how QEMU and nbdkit use them).
public final class TLSCredentials: @unchecked Sendable {
    public enum Kind: String, Sendable {
        case x509, psk
    }

    public let kind: Kind
    public let endpoint: TLSEndpoint
    /// X.509: check the peer's certificate (QEMU's `verify-peer`, default on).
    public let verifyPeer: Bool
    /// Where the credentials came from, for messages (`DIR` or `DIR/keys.psk`).
    public let source: String
    /// PSK client: the username this side presents.
    public let pskUsername: String?
    /// PSK server: the keys clients may use.
    let pskKeys: PSKKeyFile?
    let priority: gnutls_priority_t
    let certificates: gnutls_certificate_credentials_t?
    let pskServer: gnutls_psk_server_credentials_t?
    let pskClient: gnutls_psk_client_credentials_t?

    private init(kind: Kind, endpoint: TLSEndpoint, verifyPeer: Bool, source: String, pskUsername: String?,
                 pskKeys: PSKKeyFile?, priority: gnutls_priority_t, certificates: gnutls_certificate_credentials_t?,
                 pskServer: gnutls_psk_server_credentials_t?, pskClient: gnutls_psk_client_credentials_t?) {
        self.kind = kind
        self.endpoint = endpoint
        self.verifyPeer = verifyPeer
        self.source = source
        self.pskUsername = pskUsername
        self.pskKeys = pskKeys
        self.priority = priority
        self.certificates = certificates
        self.pskServer = pskServer
        self.pskClient = pskClient
    }

    deinit {
        gnutls_priority_deinit(priority)
        if let certificates { gnutls_certificate_free_credentials(certificates) }
        if let pskServer { gnutls_psk_free_server_credentials(pskServer) }
        if let pskClient { gnutls_psk_free_client_credentials(pskClient) }
    }

    /// The default priority string, as QEMU's (`NORMAL`); PSK adds the PSK key exchanges.
    public static let defaultPriority = "NORMAL"
    static let pskPriorityAddition = "+ECDHE-PSK:+DHE-PSK:+PSK"

    static func makePriority(_ base: String?, psk: Bool) throws(TLSError) -> gnutls_priority_t {
        let text = (base ?? defaultPriority) + (psk ? ":" + pskPriorityAddition : "")
        var priority: gnutls_priority_t?
        var errorPosition: UnsafePointer<CChar>?
        let rc = gnutls_priority_init(&priority, text, &errorPosition)
        guard rc >= 0, let priority else {
            throw TLSError("Unable to set TLS session priority \(text): \(gnutlsText(rc))")
        }
        return priority
    }

    // MARK: X.509

    /// X.509 credentials from a directory with QEMU's file names: `ca-cert.pem`, and
    /// `server-cert.pem` + `server-key.pem` (server; `ca-crl.pem` optional) or
    /// `client-cert.pem` + `client-key.pem` (client, optional). `sanityCheck` checks dates and
    /// that our certificate is signed by the CA before any client sees it, as QEMU does.
    public static func x509(directory: String, endpoint: TLSEndpoint, verifyPeer: Bool = true,
                            priority: String? = nil, sanityCheck: Bool = true) throws(TLSError) -> TLSCredentials {
        let dir = directory.hasSuffix("/") && directory.count > 1 ? String(directory.dropLast()) : directory
        let caPath = dir + "/ca-cert.pem"
        let crlPath = dir + "/ca-crl.pem"
        let certPath = dir + (endpoint == .server ? "/server-cert.pem" : "/client-cert.pem")
        let keyPath = dir + (endpoint == .server ? "/server-key.pem" : "/client-key.pem")
        // A server that does not check clients needs no CA (nbdkit's rule; QEMU always asks
        // for one). A client always checks the server against the CA.
        let hasCA = try FileText.exists(caPath, required: endpoint == .client || verifyPeer)
        let hasCert = try FileText.exists(certPath, required: endpoint == .server)
        let hasKey = try FileText.exists(keyPath, required: endpoint == .server)
        let hasCRL = try FileText.exists(crlPath, required: false)
        if hasCert != hasKey {
            throw TLSError("\(hasCert ? certPath : keyPath) is present but \(hasCert ? keyPath : certPath) is missing")
        }

        if sanityCheck && hasCert {
            try X509Check.sanity(certificate: certPath, ca: hasCA ? caPath : nil)
        }

        var creds: gnutls_certificate_credentials_t?
        var rc = gnutls_certificate_allocate_credentials(&creds)
        guard rc >= 0, let creds else { throw TLSError("Cannot allocate credentials: \(gnutlsText(rc))") }
        var ok = false
        defer { if !ok { gnutls_certificate_free_credentials(creds) } }
        if hasCA {
            rc = gnutls_certificate_set_x509_trust_file(creds, caPath, GNUTLS_X509_FMT_PEM)
            if rc < 0 { throw TLSError("Cannot load CA certificate '\(caPath)': \(gnutlsText(rc))") }
            if rc == 0 { throw TLSError("Cannot load CA certificate '\(caPath)': no certificate in the file") }
        }
        if hasCert {
            rc = gnutls_certificate_set_x509_key_file2(creds, certPath, keyPath, GNUTLS_X509_FMT_PEM, nil, 0)
            if rc < 0 { throw TLSError("Cannot load certificate '\(certPath)' & key '\(keyPath)': \(gnutlsText(rc))") }
        }
        if hasCRL {
            rc = gnutls_certificate_set_x509_crl_file(creds, crlPath, GNUTLS_X509_FMT_PEM)
            if rc < 0 { throw TLSError("Cannot load CRL '\(crlPath)': \(gnutlsText(rc))") }
        }
        let prio = try makePriority(priority, psk: false)
        ok = true
        return TLSCredentials(kind: .x509, endpoint: endpoint, verifyPeer: verifyPeer, source: dir, pskUsername: nil,
                              pskKeys: nil, priority: prio, certificates: creds, pskServer: nil, pskClient: nil)
    }

    // MARK: PSK

    /// PSK credentials from a key file (`DIR/keys.psk` for QEMU's `tls-creds-psk`). A server
    /// accepts every user in the file; a client presents `username` (QEMU's default: `qemu`).
    /// The file is read now: edit it, then re-create the object to change keys.
    public static func psk(keyFile path: String, endpoint: TLSEndpoint, username: String? = nil,
                           priority: String? = nil) throws(TLSError) -> TLSCredentials {
        if endpoint == .server && username != nil {
            throw TLSError("username should not be set when endpoint=server")
        }
        _ = try FileText.exists(path, required: true)
        let keys = try PSKKeyFile.load(path: path)
        let prio = try makePriority(priority, psk: true)
        switch endpoint {
        case .server:
            var creds: gnutls_psk_server_credentials_t?
            let rc = gnutls_psk_allocate_server_credentials(&creds)
            guard rc >= 0, let creds else {
                gnutls_priority_deinit(prio)
                throw TLSError("Cannot allocate credentials: \(gnutlsText(rc))")
            }
            gnutls_psk_set_server_credentials_function2(creds, pskServerLookup)
            return TLSCredentials(kind: .psk, endpoint: .server, verifyPeer: true, source: path, pskUsername: nil,
                                  pskKeys: keys, priority: prio, certificates: nil, pskServer: creds, pskClient: nil)
        case .client:
            let user = username ?? "qemu"
            guard let key = keys.keys[user] else {
                gnutls_priority_deinit(prio)
                throw TLSError("Username \(user) not found in PSK file \(path)")
            }
            var creds: gnutls_psk_client_credentials_t?
            var rc = gnutls_psk_allocate_client_credentials(&creds)
            guard rc >= 0, let creds else {
                gnutls_priority_deinit(prio)
                throw TLSError("Cannot allocate credentials: \(gnutlsText(rc))")
            }
            rc = key.withUnsafeBytes { raw -> Int32 in
                var datum = gnutls_datum_t(data: UnsafeMutablePointer(mutating: raw.bindMemory(to: UInt8.self).baseAddress),
                                           size: UInt32(raw.count))
                return gnutls_psk_set_client_credentials(creds, user, &datum, GNUTLS_PSK_KEY_RAW)
            }
            if rc < 0 {
                gnutls_psk_free_client_credentials(creds)
                gnutls_priority_deinit(prio)
                throw TLSError("Cannot set PSK client credentials: \(gnutlsText(rc))")
            }
            return TLSCredentials(kind: .psk, endpoint: .client, verifyPeer: true, source: path, pskUsername: user,
                                  pskKeys: keys, priority: prio, certificates: nil, pskServer: nil, pskClient: creds)
        }
    }
}

/// GnuTLS asks the server for the key of the username a client presents. The session's
/// user pointer is its `TLSSession` (set before the handshake starts).
private func pskServerLookup(_ session: gnutls_session_t?, _ username: UnsafePointer<gnutls_datum_t>?,
                             _ key: UnsafeMutablePointer<gnutls_datum_t>?) -> Int32 {
    guard let session, let username, let key, let owner = gnutls_session_get_ptr(session) else { return -1 }
    let tls = Unmanaged<TLSSession>.fromOpaque(owner).takeUnretainedValue()
    let name = String(decoding: UnsafeRawBufferPointer(start: username.pointee.data, count: Int(username.pointee.size)),
                      as: UTF8.self)
    guard let secret = tls.credentials.pskKeys?.keys[name], let copy = cgnutls_malloc(secret.count) else {
        tls.unknownPSKUsername = name
        return -1
    }
    secret.withUnsafeBytes { copy.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    tls.pskUsernameTried = name
    key.pointee.data = copy.assumingMemoryBound(to: UInt8.self)
    key.pointee.size = UInt32(secret.count)
    return 0
}
