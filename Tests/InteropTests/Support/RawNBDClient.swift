#if canImport(Glibc)
import Glibc
#endif

/// A deliberately small NBD client over a unix socket for tests that must send exactly the
/// bytes they want (malformed requests, half payloads) and see exactly what comes back.
/// Simple replies only unless `structured` is negotiated; every receive has a timeout.
public final class RawNBDClient {
    public let fd: Int32
    public private(set) var size: UInt64 = 0
    public private(set) var transmissionFlags: UInt16 = 0
    private var nextCookie: UInt64 = 1

    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698

    public init(unixPath: String, timeout: Double = 5) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket failed") }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - timeout.rounded(.down)) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(unixPath.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 {
            close(fd)
            throw HarnessError("connect \(unixPath): \(String(cString: strerror(errno)))")
        }
    }

    deinit { close(fd) }

    // MARK: bytes

    public func send(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 { if errno == EINTR { continue }; throw HarnessError("send: \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    /// Exactly `count` bytes; nil if the server closed first; throws on timeout.
    public func receive(_ count: Int) throws -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
            if n == 0 { return nil }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == ECONNRESET { return nil }
                throw HarnessError("recv: \(String(cString: strerror(errno))) after \(done)/\(count) bytes")
            }
            done += n
        }
        return out
    }

    /// True when the server closes the connection (EOF or reset) within the receive timeout;
    /// any bytes still arriving before that are discarded.
    public func waitForClose() -> Bool {
        var scratch = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = scratch.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET || errno == EPIPE }
        }
    }

    // MARK: handshake

    public static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
    public static func load<T: FixedWidthInteger>(_ b: [UInt8], _ at: Int, _: T.Type) -> T {
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v = v << 8 | T(b[at + i]) }
        return v
    }

    /// Reads the greeting and sends the client flags (fixed newstyle, no zeroes).
    public func greet() throws {
        guard let g = try receive(18) else { throw HarnessError("no greeting") }
        guard Self.load(g, 0, UInt64.self) == 0x4e42_444d_4147_4943 else { throw HarnessError("bad greeting magic") }
        try send(Self.be(UInt32(3)))
    }

    public func sendOption(_ option: UInt32, _ payload: [UInt8] = []) throws {
        try send(Self.be(UInt64(0x4948_4156_454f_5054)) + Self.be(option) + Self.be(UInt32(payload.count)) + payload)
    }

    /// One option reply: (reply type, payload).
    public func receiveOptionReply() throws -> (type: UInt32, payload: [UInt8])? {
        guard let h = try receive(20) else { return nil }
        guard Self.load(h, 0, UInt64.self) == 0x0003_e889_0455_65a9 else { throw HarnessError("bad option reply magic") }
        let type = Self.load(h, 12, UInt32.self)
        let length = Int(Self.load(h, 16, UInt32.self))
        guard let payload = try receive(length) else { return nil }
        return (type, payload)
    }

    /// Greeting, then NBD_OPT_GO for `export`; fills `size` and `transmissionFlags`.
    public func connect(export: String) throws {
        try greet()
        let name = Array(export.utf8)
        try sendOption(7, Self.be(UInt32(name.count)) + name + Self.be(UInt16(0)))
        while let (type, payload) = try receiveOptionReply() {
            if type == 1 { return }                // ACK
            if type == 3, payload.count >= 12, Self.load(payload, 0, UInt16.self) == 0 {
                size = Self.load(payload, 2, UInt64.self)
                transmissionFlags = Self.load(payload, 10, UInt16.self)
            }
            if type & 0x8000_0000 != 0 {
                throw HarnessError("NBD_OPT_GO failed: \(type) \(String(decoding: payload, as: UTF8.self))")
            }
        }
        throw HarnessError("server closed during NBD_OPT_GO")
    }

    // MARK: transmission

    /// Sends one request header (and payload); returns its cookie.
    @discardableResult
    public func sendRequest(type: UInt16, flags: UInt16 = 0, offset: UInt64, length: UInt32, payload: [UInt8] = [],
                            magic: UInt32 = RawNBDClient.requestMagic) throws -> UInt64 {
        let cookie = nextCookie
        nextCookie += 1
        try send(Self.be(magic) + Self.be(flags) + Self.be(type) + Self.be(cookie) + Self.be(offset) + Self.be(length) + payload)
        return cookie
    }

    /// One simple reply: (error, cookie), and `dataLength` bytes of data when error is 0.
    public func receiveSimpleReply(dataLength: Int = 0) throws -> (error: UInt32, cookie: UInt64, data: [UInt8])? {
        guard let h = try receive(16) else { return nil }
        guard Self.load(h, 0, UInt32.self) == Self.simpleReplyMagic else {
            throw HarnessError("bad reply magic \(Self.load(h, 0, UInt32.self))")
        }
        let error = Self.load(h, 4, UInt32.self)
        let cookie = Self.load(h, 8, UInt64.self)
        var data: [UInt8] = []
        if error == 0 && dataLength > 0 {
            guard let d = try receive(dataLength) else { return nil }
            data = d
        }
        return (error, cookie, data)
    }

    /// NBD_CMD_READ; returns (error, data).
    public func read(offset: UInt64, length: UInt32) throws -> (error: UInt32, data: [UInt8]) {
        let cookie = try sendRequest(type: 0, offset: offset, length: length)
        guard let r = try receiveSimpleReply(dataLength: Int(length)) else { throw HarnessError("closed during read") }
        guard r.cookie == cookie else { throw HarnessError("cookie mismatch") }
        return (r.error, r.data)
    }

    /// NBD_CMD_WRITE; returns the error (0 on success).
    public func write(offset: UInt64, _ data: [UInt8], fua: Bool = false) throws -> UInt32 {
        let cookie = try sendRequest(type: 1, flags: fua ? 1 : 0, offset: offset, length: UInt32(data.count), payload: data)
        guard let r = try receiveSimpleReply() else { throw HarnessError("closed during write") }
        guard r.cookie == cookie else { throw HarnessError("cookie mismatch") }
        return r.error
    }

    public func flush() throws -> UInt32 {
        try sendRequest(type: 3, offset: 0, length: 0)
        guard let r = try receiveSimpleReply() else { throw HarnessError("closed during flush") }
        return r.error
    }

    /// NBD_CMD_DISC.
    public func disconnect() throws { try sendRequest(type: 2, offset: 0, length: 0) }
}
