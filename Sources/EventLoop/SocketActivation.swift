import CLinux
import Glibc

/// Listening sockets handed over by systemd (or `systemd-socket-activate`, or any launcher
/// following the same protocol, as qemu-nbd accepts them): `LISTEN_PID` is our pid,
/// `LISTEN_FDS` counts descriptors from 3 up, `LISTEN_FDNAMES` optionally names them
/// (colon-separated, from `FileDescriptorName=`).
public enum SocketActivation {
    public struct Socket: Sendable, Equatable {
        public let fd: Int32
        public let name: String
    }

    /// What systemd's variables said, read once (`passed`).
    public struct Passed: Sendable {
        /// The open descriptors, from 3 up.
        public var sockets: [Socket] = []
        /// `LISTEN_FDS` as given (0 when the variables are absent or for another process).
        public var count = 0
        /// The first descriptor of the `count` that is not open, and why (QEMU's
        /// `check_socket_activation` exits on it; qemu-nbd's front end does too).
        public var invalid: (fd: Int32, errno: Int32)?
    }

    /// The variables, read once. They are removed from the environment (children never see
    /// them) and the descriptors made close-on-exec, as qemu-nbd does. Touch it first at
    /// start-up, before other threads run (`Runner.main` does).
    public static let passed: Passed = take()

    /// The sockets passed to this process.
    public static var inherited: [Socket] { passed.sockets }

    static func take() -> Passed {
        var passed = Passed()
        // QEMU's rules: LISTEN_PID must be this process and LISTEN_FDS a number.
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }), let pid = Int32(pidText),
              pid == getpid(), let countText = getenv("LISTEN_FDS").map({ String(cString: $0) }),
              let count = Int(countText), count >= 0 else { return passed }
        let names = getenv("LISTEN_FDNAMES").map { String(cString: $0).split(separator: ":", omittingEmptySubsequences: false).map(String.init) } ?? []
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        passed.count = count
        for i in 0..<min(count, Int(Int32.max) - 3) {
            let fd = Int32(3 + i)
            let flags = fcntl(fd, F_GETFD)
            if flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0 {
                passed.invalid = (fd, errno)
                break
            }
            passed.sockets.append(Socket(fd: fd, name: i < names.count && !names[i].isEmpty ? names[i] : "unknown"))
        }
        return passed
    }

    /// The descriptor a QAPI `SocketAddress` of type `fd` names: a number, or the name of an
    /// activated socket (`LISTEN_FDNAMES`).
    public static func descriptor(named text: String) throws(SocketError) -> Int32 {
        if let n = Int32(text), n >= 0 { return n }
        let matches = inherited.filter { $0.name == text }
        if matches.count == 1 { return matches[0].fd }
        if matches.count > 1 {
            throw SocketError(message: "More than one socket-activated socket is named '\(text)'; give its number")
        }
        if inherited.isEmpty {
            throw SocketError(message: "Unable to parse FD number \(text): no socket-activated socket has that name (LISTEN_FDNAMES is not set)")
        }
        throw SocketError(message: "Unable to parse FD number \(text): the socket-activated sockets are named \(inherited.map { "'\($0.name)'" }.joined(separator: ", "))")
    }
}

extension Sockets {
    /// Takes over an inherited socket as a listener (QEMU's `addr.type=fd`): it must be a
    /// stream socket; it is put in the listening state if it is not already, and made
    /// non-blocking and close-on-exec.
    public static func adoptListener(_ fd: Int32, backlog: Int32 = 128) throws(SocketError) -> Int32 {
        var st = stat()
        if fstat(fd, &st) != 0 {
            throw SocketError("File descriptor '\(fd)' cannot be used")
        }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else {
            throw SocketError(message: "File descriptor '\(fd)' is not a socket")
        }
        var type: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != Int32(SOCK_STREAM.rawValue) {
            throw SocketError(message: "File descriptor '\(fd)' is not a stream socket")
        }
        // Listening already (systemd's case) or not: listen() sets the backlog either way.
        if listen(fd, backlog) != 0 {
            throw SocketError("Failed to listen on file descriptor '\(fd)'")
        }
        let fl = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, fl | O_NONBLOCK)
        let fdFlags = fcntl(fd, F_GETFD)
        _ = fcntl(fd, F_SETFD, fdFlags | FD_CLOEXEC)
        return fd
    }

    /// Where a socket is bound, for people (and URIs): a unix path or a TCP host and port.
    public enum LocalAddress: Sendable, Equatable {
        case unix(path: String)
        case inet(host: String, port: Int)
    }

    public static func localAddress(_ fd: Int32) -> LocalAddress? {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard rc == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_UNIX:
            let path = withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_un.self, capacity: 1) { un -> String in
                    withUnsafeBytes(of: un.pointee.sun_path) { raw in
                        let bytes = raw.prefix(max(0, Int(len) - 2))
                        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
                    }
                }
            }
            return .unix(path: path)
        case AF_INET, AF_INET6:
            var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            let port = boundPort(fd)
            _ = withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    getnameinfo($0, len, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST)
                }
            }
            return .inet(host: host.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }, port: port)
        default:
            return nil
        }
    }
}
