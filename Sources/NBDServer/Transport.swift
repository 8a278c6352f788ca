import Glibc
import TLS

/// Where a connection's bytes go: straight to its socket, or through the TLS session on it
/// after NBD_OPT_STARTTLS. Every socket read and write of a `Connection` goes through here,
/// with `recv`/`writev` semantics (bytes, 0 at end of stream, -1 with `errno`).
enum Transport {
    case plain(Int32)
    case tls(TLSSession)

    @inline(__always)
    func receive(_ buffer: UnsafeMutableRawPointer, _ count: Int) -> Int {
        switch self {
        case .plain(let fd): return recv(fd, buffer, count, 0)
        case .tls(let session): return session.receive(into: buffer, count: count)
        }
    }

    @inline(__always)
    func send(_ iov: UnsafePointer<iovec>, _ count: Int32) -> Int {
        switch self {
        case .plain(let fd): return writev(fd, iov, count)
        case .tls(let session): return session.send(iovecs: iov, count: Int(count))
        }
    }

    var isTLS: Bool {
        if case .tls = self { return true }
        return false
    }

    /// The TLS handshake is over (always true for a plain socket).
    var isEstablished: Bool {
        if case .tls(let session) = self { return session.state == .established }
        return true
    }

    /// TLS records wait for the socket: wait for `EPOLLOUT` even with no replies queued.
    var wantsWrite: Bool {
        if case .tls(let session) = self { return session.wantsWrite }
        return false
    }

    /// Sends TLS records already made (plain sockets have nothing below the reply queue).
    func flush() {
        if case .tls(let session) = self { session.flush() }
    }

    /// Input `epoll` will not report (decrypted or undecrypted bytes inside the session): a
    /// connection that stopped reading early must come back for it.
    var hasBufferedInput: Bool {
        if case .tls(let session) = self { return session.hasBufferedInput }
        return false
    }

    /// Why a `receive`/`send` failed with `code`.
    func errorText(_ code: Int32, reading: Bool) -> String {
        if case .tls(let session) = self, let failure = session.failure { return failure }
        return "\(reading ? "read" : "write") error: \(String(cString: strerror(code)))"
    }

    /// ", TLS1.3 AES-256-GCM, peer CN=…" for the debug log.
    var tlsSummary: String {
        guard case .tls(let session) = self else { return "" }
        return ", \(session.parameters)\(session.peerIdentity.map { ", peer \($0)" } ?? "")"
    }

    /// Before a clean close: TLS close_notify (best effort, never waits).
    func goodbye() {
        if case .tls(let session) = self { session.bye() }
    }
}
