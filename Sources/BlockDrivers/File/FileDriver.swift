import BlockCore
import CLinux
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The `file` protocol driver: a regular file or block device through pread/pwrite,
/// `fallocate` for zeroes and discard, `SEEK_DATA`/`SEEK_HOLE` for block status.
public final class FileDriver: BlockDriver {
    public let driverName = "file"
    public let role = DriverRole.protocol
    public let path: String
    public let fd: Int32
    public let isReadOnly: Bool
    private let size: Atomic<UInt64>
    private let isBlockDevice: Bool
    /// The length is counted in whole 512-byte sectors, as QEMU's block layer counts every
    /// node's (`bdrv_getlength`): a 1000-byte file is 1024 bytes long, the tail past the end
    /// of file reading as zeroes (a hole) and growing the file when written. qemu-nbd's front
    /// end asks for it; blockd's default is the file's own length, so that a copy of an export
    /// is byte for byte the file.
    public let sectorLength: Bool
    /// Cleared the first time the kernel refuses `RWF_NOWAIT` writes (ext4 buffered writes).
    private let nowaitWrites = Atomic<Bool>(true)
    private let closed = Atomic<Bool>(false)

    public init(path: String, readOnly: Bool, sectorLength: Bool = false) throws(BlockError) {
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        if fd < 0 {
            let code = errno
            throw BlockError(code, "Could not open '\(path)': \(String(cString: strerror(code)))")
        }
        var st = stat()
        if fstat(fd, &st) != 0 {
            let e = BlockError.system("Could not stat '\(path)'")
            Glibc.close(fd)
            throw e
        }
        var length = UInt64(st.st_size)
        let isBlock = (st.st_mode & S_IFMT) == S_IFBLK
        if isBlock {
            var n: UInt64 = 0
            if clinux_blkgetsize64(fd, &n) == 0 { length = n }
        } else if (st.st_mode & S_IFMT) != S_IFREG {
            Glibc.close(fd)
            throw BlockError(EINVAL, "'\(path)' is not a file")
        }
        self.path = path
        self.fd = fd
        self.isReadOnly = readOnly
        self.size = Atomic(length)
        self.isBlockDevice = isBlock
        self.sectorLength = sectorLength
        self.allocationUnit = BlockLimits.allocationUnit(UInt64(max(st.st_blksize, 512)))
    }

    deinit {
        if !closed.load(ordering: .relaxed) { Glibc.close(fd) }
    }

    public var length: UInt64 {
        let n = size.load(ordering: .relaxed)
        return sectorLength ? (n + 511) & ~511 : n
    }
    public var growsOnWrite: Bool { !isBlockDevice }

    /// Records growth after a write or zero-write that ended past the old end of file.
    @inline(__always)
    private func extend(to end: UInt64) {
        var current = size.load(ordering: .relaxed)
        while end > current {
            let (exchanged, original) = size.compareExchange(expected: current, desired: end, ordering: .relaxed)
            if exchanged { return }
            current = original
        }
    }
    /// The file system's block size (`st_blksize`), where a regular file's holes begin and end.
    private let allocationUnit: UInt32
    public var limits: BlockLimits { BlockLimits(minimum: 1, preferred: 4096, maximum: 32 << 20, allocationUnit: allocationUnit) }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        var done = 0
        let rwf: Int32 = flags.contains(.noWait) ? Int32(clinux_RWF_NOWAIT) : 0
        while done < buffer.count {
            var iov = iovec(iov_base: buffer.baseAddress! + done, iov_len: buffer.count - done)
            let n = clinux_preadv2(fd, &iov, 1, off_t(offset) + off_t(done), rwf)
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                if code == EAGAIN && rwf != 0 {
                    if done == 0 { throw .wouldBlock }
                    // Partly read: finish the rest blocking would be wrong here; report would-block
                    // so the whole request is retried on a worker (reads are idempotent).
                    throw .wouldBlock
                }
                throw BlockError.system("read from '\(path)' at \(offset)", errno: code)
            }
            if n == 0 {
                // Past the end of a file that shrank under us: reads as zeroes.
                memset(buffer.baseAddress! + done, 0, buffer.count - done)
                return
            }
            done += n
        }
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        var rwf: Int32 = flags.contains(.fua) ? Int32(clinux_RWF_DSYNC) : 0
        if flags.contains(.noWait) {
            if flags.contains(.fua) { throw .wouldBlock }
            if nowaitWrites.load(ordering: .relaxed) {
                rwf |= Int32(clinux_RWF_NOWAIT)
            } else if !flags.contains(.bufferedWriteMayBlock) {
                throw .wouldBlock
            }
        }
        var done = 0
        while done < buffer.count {
            var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer.baseAddress! + done),
                            iov_len: buffer.count - done)
            let n = clinux_pwritev2(fd, &iov, 1, off_t(offset) + off_t(done), rwf)
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                if rwf & Int32(clinux_RWF_NOWAIT) != 0 {
                    if code == EOPNOTSUPP || code == EINVAL { nowaitWrites.store(false, ordering: .relaxed) }
                    if code == EAGAIN || code == EOPNOTSUPP || code == EINVAL {
                        // Nothing or part written: rewriting the same bytes from a worker is safe.
                        throw .wouldBlock
                    }
                }
                throw BlockError.system("write to '\(path)' at \(offset)", errno: code)
            }
            done += n
        }
        extend(to: offset + UInt64(buffer.count))
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        if length == 0 { return }
        if offset + length > self.length {
            // Zeroes past the end: growing the file makes them (holes read as zeroes).
            let oldEnd = self.length
            try truncate(to: offset + length)
            if offset >= oldEnd { return }
            return try writeZeroes(at: offset, length: oldEnd - offset, flags: flags)
        }
        var mode: Int32
        if flags.contains(.mayUnmap) && !isBlockDevice {
            mode = Int32(clinux_FALLOC_FL_PUNCH_HOLE | clinux_FALLOC_FL_KEEP_SIZE)
        } else {
            mode = Int32(clinux_FALLOC_FL_ZERO_RANGE | clinux_FALLOC_FL_KEEP_SIZE)
        }
        if clinux_fallocate(fd, mode, off_t(offset), off_t(length)) == 0 {
            if flags.contains(.fua) { try flush() }
            return
        }
        let code = errno
        if mode & Int32(clinux_FALLOC_FL_PUNCH_HOLE) != 0, code == EOPNOTSUPP {
            mode = Int32(clinux_FALLOC_FL_ZERO_RANGE | clinux_FALLOC_FL_KEEP_SIZE)
            if clinux_fallocate(fd, mode, off_t(offset), off_t(length)) == 0 {
                if flags.contains(.fua) { try flush() }
                return
            }
        }
        if flags.contains(.noFallback) {
            throw BlockError(ENOTSUP, "fast zeroing is not supported by '\(path)'")
        }
        try writeZeroBytes(at: offset, length: length, flags: flags)
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        if length == 0 || isBlockDevice { return }
        let mode = Int32(clinux_FALLOC_FL_PUNCH_HOLE | clinux_FALLOC_FL_KEEP_SIZE)
        if clinux_fallocate(fd, mode, off_t(offset), off_t(length)) != 0 {
            let code = errno
            // Discard is advisory: a filesystem that cannot punch holes simply keeps the data.
            if code != EOPNOTSUPP && code != ENOSYS {
                throw BlockError.system("discard on '\(path)'", errno: code)
            }
        }
    }

    public func flush() throws(BlockError) {
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw BlockError.system("flush of '\(path)'")
        }
    }

    public func prefetch(at offset: UInt64, length: UInt64) throws(BlockError) {
        _ = posix_fadvise(fd, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws(BlockError) -> BlockStatus {
        let end = min(offset + length, self.length)
        if isBlockDevice || offset >= end {
            return BlockStatus(length: max(end - min(offset, end), 1), flags: [.data, .allocated])
        }
        let data = lseek(fd, off_t(offset), clinux_SEEK_DATA)
        if data < 0 {
            let code = errno
            if code == ENXIO {
                // No data from here to EOF: a hole.
                return BlockStatus(length: end - offset, flags: [.zero, .allocated])
            }
            // SEEK_DATA unsupported: say everything is data, which is always true.
            return BlockStatus(length: end - offset, flags: [.data, .allocated])
        }
        if UInt64(data) > offset {
            return BlockStatus(length: min(UInt64(data), end) - offset, flags: [.zero, .allocated])
        }
        var hole = lseek(fd, off_t(offset), clinux_SEEK_HOLE)
        if hole < 0 { hole = off_t(end) }
        let stop = max(min(UInt64(hole), end), offset + 1)
        return BlockStatus(length: stop - offset, flags: [.data, .allocated])
    }

    /// Grows or shrinks the file (used by format drivers that allocate at the end).
    public func truncate(to newLength: UInt64) throws(BlockError) {
        if ftruncate(fd, off_t(newLength)) != 0 { throw BlockError.system("resize of '\(path)'") }
        size.store(newLength, ordering: .relaxed)
    }

    public func close() throws(BlockError) {
        if closed.exchange(true, ordering: .relaxed) { return }
        Glibc.close(fd)
    }
}
