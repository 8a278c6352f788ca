import EventLoop
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Small blocking-socket and thread helpers for the control plane (Glibc, no Foundation).
enum QMPSystem {
    /// A file as (device, inode).
    struct FileIdentity: Sendable, Equatable {
        let dev: UInt64
        let ino: UInt64

        init?(path: String) {
            var st = stat()
            guard stat(path, &st) == 0 else { return nil }
            dev = UInt64(st.st_dev)
            ino = UInt64(st.st_ino)
        }
    }

    /// Removes `path` only while it still names `file` (nothing when `file` is unknown).
    static func unlink(_ path: String, ifStill file: FileIdentity?) {
        guard let file, FileIdentity(path: path) == file else { return }
        Glibc.unlink(path)
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func errnoString(_ err: Int32 = errno) -> String {
        String(cString: strerror(err))
    }

    /// Starts a thread: `spawn` normally; tests replace it to make thread creation fail.
    typealias Spawner = @Sendable (_ body: @escaping @Sendable () -> Void) -> Bool

    /// Runs `body` on a new detached thread; false (and `body` never runs) when the system
    /// refuses a thread (`EAGAIN`: thread or memory limits).
    @discardableResult
    static func spawn(_ body: @escaping @Sendable () -> Void) -> Bool {
        OSThread.tryStart(name: "blockd-qmp", detached: true, body) != nil
    }

    static func makeAddress(_ path: String) throws(Failure) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { throw Failure(description: "UNIX socket path '\(path)' is too long") }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return addr
    }

    /// A listening unix socket at `path`; a stale socket file there is replaced (as QEMU does).
    static func listenUnix(path: String) throws(Failure) -> Int32 {
        var addr = try makeAddress(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "Failed to create socket: \(errnoString())") }
        Glibc.unlink(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw Failure(description: "Failed to bind socket to \(path): \(errnoString(e))")
        }
        guard listen(fd, 16) == 0 else {
            let e = errno
            close(fd)
            throw Failure(description: "Failed to listen on socket \(path): \(errnoString(e))")
        }
        return fd
    }

    /// Listening TCP sockets on every address `host` resolves to (QEMU's `inet` listener:
    /// `ipv4=off`/`ipv6=off` drop a family; an empty host means every interface).
    static func listenTCP(host: String, port: String, ipv4: Bool?, ipv6: Bool?) throws(Failure) -> [Int32] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        if ipv4 == true && ipv6 != true { hints.ai_family = AF_INET }
        if ipv6 == true && ipv4 != true { hints.ai_family = AF_INET6 }
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.isEmpty ? nil : host, port, &hints, &result)
        if rc != 0 {
            throw Failure(description: "address resolution failed for \(host):\(port): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(result) }
        var fds: [Int32] = []
        var lastError = "no address to listen on"
        var cursor = result
        while let ai = cursor {
            cursor = ai.pointee.ai_next
            let family = ai.pointee.ai_family
            if family == AF_INET && ipv4 == false { continue }
            if family == AF_INET6 && ipv6 == false { continue }
            let fd = socket(family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { lastError = "Failed to create socket: \(errnoString())"; continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if family == AF_INET6 { setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size)) }
            if bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) != 0 || listen(fd, 16) != 0 {
                lastError = "Failed to bind socket: \(errnoString())"
                close(fd)
                continue
            }
            fds.append(fd)
        }
        if fds.isEmpty { throw Failure(description: lastError) }
        return fds
    }

    /// A connected TCP socket to `host:port` (QEMU's message on failure).
    static func connectTCP(host: String, port: String) throws(Failure) -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, port, &hints, &result)
        if rc != 0 {
            throw Failure(description: "address resolution failed for \(host):\(port): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(result) }
        var lastErrno = ECONNREFUSED
        var cursor = result
        while let ai = cursor {
            cursor = ai.pointee.ai_next
            let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { lastErrno = errno; continue }
            if connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 { return fd }
            lastErrno = errno
            close(fd)
        }
        throw Failure(description: "Failed to connect to '\(host):\(port)': \(errnoString(lastErrno))")
    }

    static func connectUnix(path: String) throws(Failure) -> Int32 {
        var addr = try makeAddress(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "Failed to create socket: \(errnoString())") }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw Failure(description: "Failed to connect to '\(path)': \(errnoString(e))")
        }
        return fd
    }

    /// Writes everything; false when the peer is gone.
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var done = 0
        while done < bytes.count {
            var n = bytes.withUnsafeBytes { raw in
                send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
            }
            if n < 0 && errno == ENOTSOCK {
                // A monitor on stdio: a pipe or terminal (SIGPIPE is ignored by the daemon).
                n = bytes.withUnsafeBytes { raw in write(fd, raw.baseAddress! + done, raw.count - done) }
            }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            done += n
        }
        return true
    }

    /// Reads up to `buffer.count` bytes; 0 at end of stream, -1 on error.
    static func readSome(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        while true {
            var n = recv(fd, buffer.baseAddress, buffer.count, 0)
            if n < 0 && errno == ENOTSOCK { n = read(fd, buffer.baseAddress, buffer.count) }
            if n < 0 && errno == EINTR { continue }
            return n
        }
    }

    /// Waits until `fd` is readable; false on timeout. `timeoutMS < 0` waits forever.
    static func waitReadable(_ fd: Int32, timeoutMS: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let rc = poll(&p, 1, timeoutMS)
            if rc < 0 && errno == EINTR { continue }
            return rc > 0
        }
    }

    /// Wall-clock time for event timestamps.
    static func now() -> (seconds: Int64, microseconds: Int64) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return (Int64(ts.tv_sec), Int64(ts.tv_nsec / 1000))
    }
}

/// The server's condition (a pthread mutex and condition) and its control lock (recursive,
/// so that Daemon code that takes the lock can be called both from a QMP handler already
/// holding it and from elsewhere): the shared primitives of `EventLoop`.
typealias QMPCondition = ConditionLock
typealias QMPRecursiveLock = RecursiveLock
