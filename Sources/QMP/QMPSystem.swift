import EventLoop
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Small blocking-socket and thread helpers for the control plane (Glibc, no Foundation).
enum QMPSystem {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func errnoString(_ err: Int32 = errno) -> String {
        String(cString: strerror(err))
    }

    /// Runs `body` on a new detached pthread.
    static func spawn(_ body: @escaping @Sendable () -> Void) {
        final class Box: Sendable { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        var tid = pthread_t()
        let rc = pthread_create(&tid, &attr, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        pthread_attr_destroy(&attr)
        precondition(rc == 0, "pthread_create failed: \(rc)")
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
        unlink(path)
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
            let n = bytes.withUnsafeBytes { raw in
                send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
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
            let n = recv(fd, buffer.baseAddress, buffer.count, 0)
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
