import Glibc
import Synchronization

/// Helpers shared by the fuzz harnesses: a scratch directory, a unix-socket client that
/// writes a whole byte stream and reads everything back before a deadline, and a byte reader.
enum FuzzSupport {
    /// Scratch directories to remove at exit (libFuzzer ends with exit(), so atexit runs; a
    /// killed fuzzer leaves its few small files behind).
    static let scratch = Mutex<[String]>([])
    static let removeAtExit: Void = {
        atexit {
            if getenv("BLOCKD_FUZZ_KEEP_SCRATCH") != nil { return }   // to look at what a run left
            for dir in FuzzSupport.scratch.withLock({ $0 }) { FuzzSupport.removeTree(dir) }
        }
    }()

    /// `rm -rf` of a scratch directory (regular files, sockets and one level of directories).
    static func removeTree(_ path: String) {
        if let dir = opendir(path) {
            var names: [String] = []
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if name != "." && name != ".." { names.append(name) }
            }
            closedir(dir)
            for n in names where unlink(path + "/" + n) != 0 { removeTree(path + "/" + n) }
        }
        rmdir(path)
    }

    /// A fresh directory for one harness (`/dev/shm/blockd-fuzz-NAME-XXXXXX`, on tmpfs where
    /// fdatasync costs nothing, else under TMPDIR or /tmp; short, as unix socket paths must
    /// stay under 108 bytes), removed at exit.
    static func scratchDirectory(_ name: String) -> String {
        _ = removeAtExit
        var base = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        if getenv("BLOCKD_FUZZ_NO_SHM") == nil && access("/dev/shm", W_OK) == 0 { base = "/dev/shm" }
        var template = Array("\(base)/blockd-fuzz-\(name)-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            fatalError("fuzz harness: mkdtemp in \(base) failed: \(String(cString: strerror(errno)))")
        }
        let dir = String(cString: p)
        scratch.withLock { $0.append(dir) }
        return dir
    }

    /// Writes `bytes` to `path` (created or truncated).
    static func writeFile(_ path: String, _ bytes: [UInt8]) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        precondition(fd >= 0, "fuzz harness: cannot create \(path): \(String(cString: strerror(errno)))")
        defer { close(fd) }
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            precondition(n > 0, "fuzz harness: write \(path) failed")
            done += n
        }
    }

    /// The file's bytes, at most `limit` of them (the harness bounds its own memory: a corrupt
    /// image's refcounts can put newly allocated clusters gigabytes into a sparse file).
    static func readFile(_ path: String, limit: Int = Int.max) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let want = min(chunk.count, limit - out.count)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, want) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += chunk[0..<n]
        }
        return out
    }

    /// The file's size in bytes, or nil when it cannot be read.
    static func fileSize(_ path: String) -> Int? {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_size) : nil
    }

    enum Exchange {
        /// Everything the peer sent until it closed (at most `limit` bytes kept).
        case closed([UInt8])
        /// The peer neither closed nor answered in time.
        case timedOut([UInt8])
        /// Could not connect.
        case failed(String)
    }

    /// Connects to `path`, sends `input` (reading concurrently, so neither side can block on a
    /// full socket), half-closes, and reads until the peer closes or `seconds` pass. With
    /// `afterGreeting`, waits for the first bytes from the peer before sending (QMP's greeting).
    static func exchange(unixPath path: String, input: [UInt8], seconds: Double,
                         limit: Int = 16 << 20) -> Exchange {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return .failed("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return .failed("socket path too long") }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
        let deadline = now() + seconds
        while true {
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc == 0 { break }
            // A full accept backlog answers EAGAIN on a non-blocking unix connect: retry.
            if (errno == EAGAIN || errno == EINTR) && now() < deadline { usleep(100); continue }
            return .failed("connect \(path): \(String(cString: strerror(errno)))")
        }
        var output: [UInt8] = []
        output.reserveCapacity(4096)
        var sent = 0
        var writing = true
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            if writing && sent == input.count {
                shutdown(fd, Int32(SHUT_WR))
                writing = false
            }
            let remaining = deadline - now()
            if remaining <= 0 { return .timedOut(output) }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN) | (writing ? Int16(POLLOUT) : 0), revents: 0)
            let ready = poll(&pfd, 1, Int32(min(remaining * 1000 + 1, 1000)))
            if ready < 0 && errno != EINTR { return .failed("poll: \(String(cString: strerror(errno)))") }
            if ready <= 0 { continue }
            if writing && pfd.revents & Int16(POLLOUT) != 0 {
                let n = input.withUnsafeBytes { send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
                if n > 0 {
                    sent += n
                } else if n < 0 && errno != EAGAIN && errno != EINTR {
                    // The peer closed (a fatal protocol error): nothing more goes out.
                    writing = false
                }
            }
            if pfd.revents & (Int16(POLLIN) | Int16(POLLHUP) | Int16(POLLERR)) != 0 {
                let n = recv(fd, buffer.baseAddress!, buffer.count, 0)
                if n == 0 { return .closed(output) }
                if n < 0 {
                    if errno == EAGAIN || errno == EINTR { continue }
                    return .closed(output)   // ECONNRESET: the peer is gone
                }
                if output.count < limit {
                    output += UnsafeRawBufferPointer(rebasing: buffer[0..<min(n, limit - output.count)])
                }
            }
        }
    }

    /// memcmp: the harness is built without optimisation, where `==` on slices compares
    /// element by element through value witnesses.
    static func equal(_ a: ArraySlice<UInt8>, _ b: ArraySlice<UInt8>) -> Bool {
        guard a.count == b.count else { return false }
        return a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in
            a.isEmpty || memcmp(pa.baseAddress!, pb.baseAddress!, a.count) == 0
        } }
    }

    /// One line on stderr, unbuffered (traces must survive the crash they explain).
    static func trace(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(2, $0.baseAddress!, $0.count) }
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// Big-endian reads from a byte array; nil when the bytes run out.
struct ByteReader {
    let bytes: [UInt8]
    var at: Int

    init(_ bytes: [UInt8], at: Int = 0) {
        self.bytes = bytes
        self.at = at
    }

    var remaining: Int { bytes.count - at }
    var isAtEnd: Bool { at >= bytes.count }

    mutating func u8() -> UInt8? {
        guard remaining >= 1 else { return nil }
        defer { at += 1 }
        return bytes[at]
    }

    mutating func u16() -> UInt16? { uint(2).map { UInt16($0) } }
    mutating func u32() -> UInt32? { uint(4).map { UInt32($0) } }
    mutating func u64() -> UInt64? { uint(8) }

    private mutating func uint(_ n: Int) -> UInt64? {
        guard remaining >= n else { return nil }
        var v: UInt64 = 0
        for i in 0..<n { v = v << 8 | UInt64(bytes[at + i]) }
        at += n
        return v
    }

    /// Skips `n` bytes; false (and nothing skipped) when fewer remain.
    mutating func skip(_ n: UInt64) -> Bool {
        guard n <= UInt64(remaining) else { return false }
        at += Int(n)
        return true
    }

    mutating func take(_ n: UInt64) -> ArraySlice<UInt8>? {
        guard n <= UInt64(remaining) else { return nil }
        defer { at += Int(n) }
        return bytes[at..<(at + Int(n))]
    }
}

/// A small deterministic generator (SplitMix64) for choices derived from the input.
struct FuzzRandom {
    var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform-ish in 0..<bound (bound > 0).
    mutating func below(_ bound: UInt64) -> UInt64 { bound == 0 ? 0 : next() % bound }
}
