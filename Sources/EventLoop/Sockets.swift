import CLinux
import Glibc

/// Errors from setting up sockets, with a sentence for people.
public struct SocketError: Error, Sendable, CustomStringConvertible {
    public let errno: Int32
    public let message: String
    public var description: String { message }
    init(_ what: String, errno code: Int32 = Glibc.errno) {
        self.errno = code
        self.message = "\(what): \(String(cString: strerror(code)))"
    }
    init(message: String) {
        self.errno = EINVAL
        self.message = message
    }
}

/// Socket set-up helpers. All returned fds are non-blocking and close-on-exec.
public enum Sockets {
    /// Binds and listens on a unix socket path, replacing a stale socket file.
    public static func listenUnix(path: String, backlog: Int32 = 128) throws(SocketError) -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw SocketError(message: "socket path '\(path)' is too long")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | clinux_SOCK_NONBLOCK | clinux_SOCK_CLOEXEC, 0)
        if fd < 0 { throw SocketError("socket") }
        // Replace a leftover socket file, but never another kind of file.
        var st = stat()
        if lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if rc != 0 {
            let e = SocketError("Failed to bind socket to \(path)")
            close(fd)
            throw e
        }
        if listen(fd, backlog) != 0 {
            let e = SocketError("listen on \(path)")
            close(fd)
            throw e
        }
        return fd
    }

    /// Binds and listens on every address `host` resolves to (IPv4 and IPv6) at `port`.
    public static func listenTCP(host: String, port: String, backlog: Int32 = 128) throws(SocketError) -> [Int32] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE
        var result: UnsafeMutablePointer<addrinfo>?
        let node: String? = host.isEmpty ? nil : host
        let rc = getaddrinfo(node, port, &hints, &result)
        if rc != 0 {
            throw SocketError(message: "address resolution failed for \(host):\(port): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(result) }
        var fds: [Int32] = []
        var lastError: SocketError?
        var cursor = result
        while let ai = cursor {
            cursor = ai.pointee.ai_next
            let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | clinux_SOCK_NONBLOCK | clinux_SOCK_CLOEXEC,
                            ai.pointee.ai_protocol)
            if fd < 0 { lastError = SocketError("socket"); continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if ai.pointee.ai_family == AF_INET6 {
                setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            if bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) != 0 || listen(fd, backlog) != 0 {
                lastError = SocketError("Failed to bind socket to \(host):\(port)")
                close(fd)
                continue
            }
            fds.append(fd)
        }
        if fds.isEmpty { throw lastError ?? SocketError(message: "no address for \(host):\(port)") }
        return fds
    }

    /// The port a TCP listener is bound to (for `port=0`).
    public static func boundPort(_ fd: Int32) -> Int {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        if storage.ss_family == sa_family_t(AF_INET) {
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
            }
        }
        return withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
        }
    }

    /// What one `accept4` on a listener gave.
    public enum AcceptResult: Sendable, Equatable {
        /// A client, non-blocking and close-on-exec.
        case client(Int32)
        /// Nothing pending.
        case wouldBlock
        /// This client was lost before it was accepted (`ECONNABORTED`, `EPROTO`, …);
        /// try the next one.
        case lost(Int32)
        /// Out of file descriptors or kernel memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
        /// `ENOMEM`): the client stays queued; retrying at once would spin, so back off.
        case exhausted(Int32)
    }

    /// Accepts one connection (non-blocking, close-on-exec).
    public static func acceptClient(_ listener: Int32) -> AcceptResult {
        while true {
            let fd = clinux_accept4(listener, clinux_SOCK_NONBLOCK | clinux_SOCK_CLOEXEC)
            if fd >= 0 { return .client(fd) }
            let code = errno
            switch code {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return .wouldBlock
            case EMFILE, ENFILE, ENOBUFS, ENOMEM: return .exhausted(code)
            default: return .lost(code)
            }
        }
    }

    /// Accepts one connection (non-blocking, close-on-exec); nil when none was accepted.
    public static func accept(_ listener: Int32) -> Int32? {
        if case .client(let fd) = acceptClient(listener) { return fd }
        return nil
    }

    /// Disables Nagle on TCP sockets (harmless on unix sockets): replies go out at once,
    /// which is what keeps a TCP connect far below QEMU's delayed-ACK stall.
    public static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    public static func setBuffers(_ fd: Int32, bytes: Int32) {
        var size = bytes
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }
}
