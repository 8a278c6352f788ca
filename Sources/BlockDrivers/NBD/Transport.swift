import BlockCore
import CLinux
import EventLoop
#if canImport(Glibc)
import Glibc
#endif

/// How a client connection moves bytes: a plain socket, or (after `NBD_OPT_STARTTLS`) a TLS
/// session over it (the daemon's `TLSSession`, through `NBDClientTLSProvider`). The
/// connection never touches the socket except through this, so TLS plugs in without changing
/// the protocol code. Used by one loop thread at a time.
///
/// The calls mirror the TLS module's session (`receive`/`send` return a count, 0 at the end
/// of the stream, or -1 with `errno` — `EAGAIN` meaning "wait for the socket").
public protocol NBDTransport: AnyObject {
    func receive(into buffer: UnsafeMutableRawPointer, count: Int) -> Int
    func send(iovecs: UnsafePointer<iovec>, count: Int) -> Int
    /// Drives a handshake of the transport itself (TLS); plain sockets are done at once.
    func handshake() -> NBDTransportProgress
    /// Output is buffered inside the transport, waiting for the socket (wait for `EPOLLOUT`).
    var wantsWrite: Bool { get }
    /// Sends output buffered inside the transport (TLS records `send` already sealed).
    func flush()
    /// Input is buffered that `epoll` will not announce (decrypted records).
    var hasBufferedInput: Bool { get }
    /// Ends the session politely (TLS close_notify); the caller closes the socket.
    func shutdown()
    /// Why the transport failed, for messages.
    var failure: String? { get }
}

public enum NBDTransportProgress: Sendable, Equatable {
    case done
    case wouldBlock
    case failed
}

/// Resolves `tls-creds` for `nbd` nodes: the daemon gives one to its block graph
/// (`NodeRegistry.nbdClientTLS`), which looks its credentials objects up by id. Without one,
/// `tls-creds` is refused when the node opens.
public protocol NBDClientTLSProvider: Sendable {
    /// The client credentials object `id` names, resolved when the node opens (on the control
    /// thread), with QEMU's messages ("No TLS credentials with id 'x'", "Expected TLS
    /// credentials for a client endpoint"). The node keeps them: every connection and
    /// reconnect makes its session from them, and a later `object-del` does not affect it.
    func clientSessions(credentials id: String) throws(BlockError) -> any NBDClientTLSSessions
}

/// Client credentials an `nbd` node holds; makes one TLS session per connection, on the
/// connection's event loop.
public protocol NBDClientTLSSessions: Sendable {
    /// A client session over the connected socket `fd`, checking the server's certificate
    /// against `hostname` (X.509).
    func session(fd: Int32, hostname: String?) throws(BlockError) -> any NBDTransport
}

/// The plain socket transport.
final class SocketTransport: NBDTransport {
    let fd: Int32
    init(fd: Int32) { self.fd = fd }

    func receive(into buffer: UnsafeMutableRawPointer, count: Int) -> Int {
        recv(fd, buffer, count, 0)
    }

    func send(iovecs: UnsafePointer<iovec>, count: Int) -> Int {
        var msg = msghdr()
        msg.msg_iov = UnsafeMutablePointer(mutating: iovecs)
        msg.msg_iovlen = count
        return sendmsg(fd, &msg, clinux_MSG_NOSIGNAL)
    }

    func handshake() -> NBDTransportProgress { .done }
    var wantsWrite: Bool { false }
    func flush() {}
    var hasBufferedInput: Bool { false }
    func shutdown() {}
    var failure: String? { nil }
}

/// Socket set-up for the client: address resolution and non-blocking connects.
enum NBDSocket {
    /// One address to try.
    struct Endpoint: Sendable {
        var family: Int32
        var socketType: Int32
        var proto: Int32
        var address: [UInt8]
        var keepAlive: Bool
    }

    /// Resolves `server` (inet: `getaddrinfo`, at open on the control thread; reconnects
    /// reuse the result, so no event loop ever waits for DNS).
    static func resolve(_ server: NBDServerAddress) throws(BlockError) -> [Endpoint] {
        switch server {
        case .unix(let path, let abstract, let tight):
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            let capacity = MemoryLayout.size(ofValue: addr.sun_path)
            let start = abstract ? 1 : 0
            guard bytes.count + start < capacity else {
                throw BlockError.invalid("UNIX socket path '\(path)' is too long")
            }
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                for (i, b) in bytes.enumerated() { raw[start + i] = b }
            }
            let pathOffset = MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path)!
            let length = abstract && tight ? pathOffset + start + bytes.count : MemoryLayout<sockaddr_un>.size
            let raw = withUnsafeBytes(of: &addr) { Array($0.prefix(length)) }
            return [Endpoint(family: AF_UNIX, socketType: Int32(SOCK_STREAM.rawValue), proto: 0, address: raw, keepAlive: false)]
        case .inet(let host, let port, let ipv4, let ipv6, let keepAlive):
            var hints = addrinfo()
            hints.ai_family = AF_UNSPEC
            if ipv4 == true && ipv6 != true { hints.ai_family = AF_INET }
            if ipv6 == true && ipv4 != true { hints.ai_family = AF_INET6 }
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var result: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host.isEmpty ? nil : host, port, &hints, &result)
            if rc != 0 {
                throw BlockError(EINVAL, "address resolution failed for \(host):\(port): \(String(cString: gai_strerror(rc)))")
            }
            defer { freeaddrinfo(result) }
            var out: [Endpoint] = []
            var cursor = result
            while let ai = cursor {
                cursor = ai.pointee.ai_next
                if ipv4 == false && ai.pointee.ai_family == AF_INET { continue }
                if ipv6 == false && ai.pointee.ai_family == AF_INET6 { continue }
                let raw = Array(UnsafeRawBufferPointer(start: ai.pointee.ai_addr, count: Int(ai.pointee.ai_addrlen)))
                out.append(Endpoint(family: ai.pointee.ai_family, socketType: ai.pointee.ai_socktype,
                                    proto: ai.pointee.ai_protocol, address: raw, keepAlive: keepAlive))
            }
            if out.isEmpty { throw BlockError(EINVAL, "address resolution failed for \(host):\(port): no usable address") }
            return out
        case .fd:
            return []
        }
    }

    /// Starts connecting to `endpoint`: the socket, and whether the connect is still in
    /// progress (wait for `EPOLLOUT`, then `finishConnect`). Throws the errno on failure.
    static func startConnect(_ endpoint: Endpoint) -> (fd: Int32, inProgress: Bool, errno: Int32) {
        let fd = socket(endpoint.family, endpoint.socketType | clinux_SOCK_NONBLOCK | clinux_SOCK_CLOEXEC, endpoint.proto)
        if fd < 0 { return (-1, false, errno) }
        if endpoint.family != AF_UNIX {
            Sockets.setNoDelay(fd)
            if endpoint.keepAlive {
                var one: Int32 = 1
                setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
            }
        }
        let rc = endpoint.address.withUnsafeBytes { raw in
            connect(fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(raw.count))
        }
        if rc == 0 { return (fd, false, 0) }
        let code = errno
        if code == EINPROGRESS || code == EINTR { return (fd, true, 0) }
        Glibc.close(fd)
        return (-1, false, code)
    }

    /// The outcome of a connect that was in progress (0 when connected).
    static func finishConnect(_ fd: Int32) -> Int32 {
        var code: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_ERROR, &code, &len) != 0 { return errno }
        return code
    }
}
