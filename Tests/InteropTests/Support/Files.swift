#if canImport(Glibc)
import Glibc
#endif

/// A fresh directory under /tmp for one test (short path: unix socket paths must stay
/// under 108 bytes). Removed with everything in it when the value is released.
public final class TempDir: @unchecked Sendable {
    public let path: String

    /// A new directory `BASE/PREFIX-XXXXXX` (`base` /tmp unless a test needs another filesystem).
    public init(prefix: String = "blockd-test", base: String = "/tmp") throws {
        var template = Array("\(base)/\(prefix)-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw HarnessError("mkdtemp failed: \(String(cString: strerror(errno)))")
        }
        path = String(cString: p)
    }

    /// `path/name`.
    public func file(_ name: String) -> String { path + "/" + name }

    deinit {
        if getenv("BLOCKD_KEEP_TEST_DIRS") != nil { return }
        Files.removeTree(path)
    }
}

/// Small file helpers without Foundation.
public enum Files {
    public static func read(_ path: String) throws -> String {
        String(decoding: try readBytes(path), as: UTF8.self)
    }

    public static func readBytes(_ path: String, offset: Int = 0, count: Int? = nil) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw HarnessError("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        var at = offset
        while count.map({ out.count < $0 }) ?? true {
            let want = min(chunk.count, count.map { $0 - out.count } ?? chunk.count)
            let n = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, want, off_t(at)) }
            if n < 0 { if errno == EINTR { continue }; throw HarnessError("read \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            out += chunk[0..<n]
            at += n
        }
        return out
    }

    public static func write(_ path: String, _ text: String) throws {
        try write(path, bytes: Array(text.utf8))
    }

    /// Writes `bytes` at `offset` (creating the file; truncating it first unless `offset` is given).
    public static func write(_ path: String, bytes: [UInt8], offset: Int? = nil) throws {
        let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (offset == nil ? O_TRUNC : 0)
        let fd = open(path, flags, 0o644)
        if fd < 0 { throw HarnessError("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, $0.count - done, off_t((offset ?? 0) + done)) }
            if n < 0 { if errno == EINTR { continue }; throw HarnessError("write \(path): \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    /// A sparse file of `size` bytes (all holes).
    public static func createSparse(_ path: String, size: Int) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw HarnessError("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        if ftruncate(fd, off_t(size)) != 0 { throw HarnessError("ftruncate \(path) failed") }
    }

    /// Deterministic pseudo-random bytes (same seed, same bytes).
    public static func pattern(count: Int, seed: UInt64) -> [UInt8] {
        var x = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { raw in
            var i = 0
            while i < count {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                var v = x
                for _ in 0..<8 where i < count {
                    raw[i] = UInt8(truncatingIfNeeded: v)
                    v >>= 8
                    i += 1
                }
            }
        }
        return out
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func size(_ path: String) -> Int? {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_size) : nil
    }

    /// `rm -rf` without a subprocess.
    public static func removeTree(_ path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            if let dir = opendir(path) {
                var names: [String] = []
                while let entry = readdir(dir) {
                    let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                    if name != "." && name != ".." { names.append(name) }
                }
                closedir(dir)
                for n in names { removeTree(path + "/" + n) }
            }
            rmdir(path)
        } else {
            unlink(path)
        }
    }
}
