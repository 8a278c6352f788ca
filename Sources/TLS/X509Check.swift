import CGnuTLS
import Glibc

/// Certificate checks with messages for people: at load time (our own certificate) and after
/// a handshake (the peer's).
enum X509Check {
    /// A list of certificates read from a PEM file; freed on deinit.
    final class CertificateList {
        var certs: UnsafeMutablePointer<gnutls_x509_crt_t?>?
        var count: UInt32 = 0

        init(file path: String, what: String) throws(TLSError) {
            var datum = gnutls_datum_t()
            var rc = gnutls_load_file(path, &datum)
            if rc < 0 { throw TLSError("Cannot read \(what) '\(path)': \(gnutlsText(rc))") }
            defer { cgnutls_free(datum.data) }
            rc = gnutls_x509_crt_list_import2(&certs, &count, &datum, GNUTLS_X509_FMT_PEM, 0)
            if rc < 0 { throw TLSError("Cannot load \(what) '\(path)': \(gnutlsText(rc))") }
            if count == 0 { throw TLSError("Cannot load \(what) '\(path)': no certificate in the file") }
        }

        deinit {
            guard let certs else { return }
            for i in 0..<Int(count) { gnutls_x509_crt_deinit(certs[i]) }
            cgnutls_free(certs)
        }
    }

    /// QEMU's `sanity-check`: our certificate and the CA are within their dates, and the
    /// certificate is signed by the CA.
    static func sanity(certificate certPath: String, ca caPath: String?) throws(TLSError) {
        let certs = try CertificateList(file: certPath, what: "certificate")
        let now = time(nil)
        if let problem = dateProblem(certs.certs![0]!, now: now) {
            throw TLSError("The certificate \(certPath) \(problem)")
        }
        guard let caPath else { return }
        let cas = try CertificateList(file: caPath, what: "CA certificate")
        for i in 0..<Int(cas.count) {
            if let problem = dateProblem(cas.certs![i]!, now: now) {
                throw TLSError("The CA certificate \(caPath) \(problem)")
            }
        }
        var status: UInt32 = 0
        let rc = gnutls_x509_crt_list_verify(certs.certs, certs.count, cas.certs, cas.count, nil, 0, 0, &status)
        if rc < 0 { throw TLSError("Cannot verify \(certPath) against \(caPath): \(gnutlsText(rc))") }
        if status != 0 {
            throw TLSError("The certificate \(certPath) is not valid for the CA \(caPath): \(statusText(status))")
        }
    }

    static func dateProblem(_ cert: gnutls_x509_crt_t, now: time_t) -> String? {
        if gnutls_x509_crt_get_expiration_time(cert) < now { return "has expired" }
        if gnutls_x509_crt_get_activation_time(cert) > now { return "is not yet active" }
        return nil
    }

    /// The verification status bits as QEMU words them (the first matching reason, most
    /// specific last as in QEMU), followed by GnuTLS's full description.
    static func statusText(_ status: UInt32) -> String {
        var reason = "Invalid certificate"
        if status & GNUTLS_CERT_INVALID.rawValue != 0 { reason = "The certificate is not trusted" }
        if status & GNUTLS_CERT_SIGNER_NOT_FOUND.rawValue != 0 { reason = "The certificate hasn't got a known issuer" }
        if status & GNUTLS_CERT_REVOKED.rawValue != 0 { reason = "The certificate has been revoked" }
        if status & GNUTLS_CERT_INSECURE_ALGORITHM.rawValue != 0 { reason = "The certificate uses an insecure algorithm" }
        if status & GNUTLS_CERT_EXPIRED.rawValue != 0 { reason = "The certificate has expired" }
        if status & GNUTLS_CERT_NOT_ACTIVATED.rawValue != 0 { reason = "The certificate is not yet activated" }
        if status & GNUTLS_CERT_UNEXPECTED_OWNER.rawValue != 0 { reason = "The certificate does not match the expected name" }
        var out = gnutls_datum_t()
        if gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0, let data = out.data {
            var detail = String(cString: UnsafeRawPointer(data).assumingMemoryBound(to: CChar.self))
            while detail.last == " " { detail.removeLast() }
            cgnutls_free(data)
            if !detail.isEmpty { return "\(reason) (\(detail))" }
        }
        return reason
    }

    /// The distinguished name in RFC 4514 order (`CN=…,O=…,C=…`), as `certtool -i` and
    /// OpenSSL print it: the reverse of `distinguishedName`'s order.
    static func rfc4514Name(_ cert: gnutls_x509_crt_t) -> String? {
        var datum = gnutls_datum_t()
        guard gnutls_x509_crt_get_dn3(cert, &datum, 0) >= 0, let data = datum.data else { return nil }
        defer { cgnutls_free(data) }
        return String(decoding: UnsafeRawBufferPointer(start: data, count: Int(datum.size)), as: UTF8.self)
    }

    /// The distinguished name as QEMU compares it with authz-simple's identity
    /// (`gnutls_x509_crt_get_dn`: `C=…,O=…,CN=…` for a certificate made by certtool).
    static func distinguishedName(_ cert: gnutls_x509_crt_t) -> String? {
        var size = 1024
        while true {
            var buffer = [CChar](repeating: 0, count: size)
            var used = size
            let rc = gnutls_x509_crt_get_dn(cert, &buffer, &used)
            if rc == GNUTLS_E_SHORT_MEMORY_BUFFER && size < 65536 {
                size = max(used + 1, size * 2)
                continue
            }
            if rc < 0 { return nil }
            buffer[min(used, size - 1)] = 0
            return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        }
    }
}
