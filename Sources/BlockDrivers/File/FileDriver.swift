import BlockCore
import CLinux
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Options of the `file` driver: QEMU's `BlockdevOptionsFile` members that change behaviour,
/// plus the `cache.*` and `force-share` options of the node.
public struct FileOptions: Sendable, Equatable {
    /// `locking=auto|on|off`: take QEMU's OFD byte-range locks on the image (auto = on, as
    /// OFD locks exist on every Linux blockd runs on).
    public enum Locking: String, Sendable, CaseIterable {
        case auto, on, off
    }

    public var locking: Locking = .auto
    /// `cache.direct`: `O_DIRECT`, bypassing the page cache. Requests and buffers that are not
    /// aligned to the probed alignment go through an aligned bounce buffer.
    public var direct = false
    /// `cache.no-flush`: flush and FUA do not sync (QEMU's `cache=unsafe`).
    public var noFlush = false
    /// `force-share`: users of this node share every permission, so the locks never refuse
    /// another process (read-only nodes only; checked by `BlockdevFactory`).
    public var forceShare = false
    /// blockd's own `x-blockd-sector-length`: the length is counted in whole 512-byte
    /// sectors, as QEMU's block layer counts every node's (`bdrv_getlength`): a 1000-byte file
    /// is 1024 bytes long, the tail past the end of file reading as zeroes (a hole) and growing
    /// the file when written. qemu-nbd's front end asks for it; blockd's default is the file's
    /// own length, so that a copy of an export is byte for byte the file.
    public var sectorLength = false

    public init() {}
}

/// The `file` protocol driver: a regular file or block device through pread/pwrite,
/// `fallocate` for zeroes and discard, `SEEK_DATA`/`SEEK_HOLE` for block status.
///
/// Every syscall that may sleep on the disk (a `pread`/`pwrite` without `RWF_NOWAIT`,
/// `fdatasync`, `fallocate`, `lseek(SEEK_DATA)`, `ftruncate`) asserts in debug builds that it
/// does not run on an event-loop thread; the only exception is a buffered write the NBD server
/// runs inline on purpose (`RequestFlags.bufferedWriteMayBlock`, see docs/architecture.md).
public final class FileDriver: BlockDriver {
    public let driverName = "file"
    public let role = DriverRole.protocol
    public let path: String
    public let fd: Int32
    public let isReadOnly: Bool
    public let options: FileOptions
    /// Offsets and lengths of `O_DIRECT` I/O are multiples of this (1 without `cache.direct`).
    public let requestAlignment: Int
    /// Buffers of `O_DIRECT` I/O are aligned to this (1 without `cache.direct`).
    public let memoryAlignment: Int
    private let size: Atomic<UInt64>
    private let isBlockDevice: Bool
    /// The file system's block size (`st_blksize`), where a regular file's holes begin and end.
    private let allocationUnit: UInt32
    /// Cleared the first time the kernel refuses `RWF_NOWAIT` writes (ext4 buffered writes).
    private let nowaitWrites = Atomic<Bool>(true)
    /// Cleared the first time the kernel refuses `RWF_NOWAIT` reads (tmpfs: `EOPNOTSUPP`);
    /// `.noWait` reads then go to a worker without trying.
    private let nowaitReads = Atomic<Bool>(true)
    private let closed = Atomic<Bool>(false)
    /// `cache.direct`: a second descriptor without `O_DIRECT`, for the one write `O_DIRECT`
    /// cannot do: an unaligned one whose whole blocks would grow the file past its end.
    private let bufferedFD: Int32
    /// `cache.direct`: a read-modify-write of partial blocks holds its blocks exclusively,
    /// every other write holds its range shared, so no write lands between the read and the
    /// write-back of a partial block.
    private let blockLock: RangeLock?
    // internal for FileLocks.swift
    let locks: Mutex<FileLocks>

    public convenience init(path: String, readOnly: Bool) throws(BlockError) {
        try self.init(path: path, readOnly: readOnly, options: FileOptions())
    }

    public init(path: String, readOnly: Bool, options: FileOptions) throws(BlockError) {
        var flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if options.direct { flags |= clinux_o_direct() }
        let fd = open(path, flags)
        if fd < 0 {
            let code = errno
            if code == EINVAL && options.direct {
                throw BlockError(code, "Could not open '\(path)': the filesystem does not support O_DIRECT (cache.direct=on)")
            }
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
        var buffered: Int32 = -1
        var alignment = (request: 1, memory: 1)
        if options.direct {
            alignment = FileDriver.probeAlignment(fd)
            if !isBlock {
                buffered = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
                if buffered < 0 {
                    let e = BlockError.system("Could not open '\(path)'")
                    Glibc.close(fd)
                    throw e
                }
            }
        }
        self.path = path
        self.fd = fd
        self.isReadOnly = readOnly
        self.options = options
        self.size = Atomic(length)
        self.isBlockDevice = isBlock
        self.allocationUnit = BlockLimits.allocationUnit(UInt64(max(st.st_blksize, 512)))
        self.bufferedFD = buffered
        self.requestAlignment = alignment.request
        self.memoryAlignment = alignment.memory
        self.blockLock = options.direct ? RangeLock() : nil
        self.locks = Mutex(FileLocks(enabled: options.locking != .off))
    }

    deinit {
        if !closed.load(ordering: .relaxed) {
            Glibc.close(fd)
            if bufferedFD >= 0 { Glibc.close(bufferedFD) }
        }
    }

    /// QEMU's `raw_probe_alignment`: the logical block size of a block device, else the
    /// smallest of 1, 512 … 4096 bytes that an `O_DIRECT` read accepts (4096 if even one
    /// byte works, which only says the kernel did not check), for offsets and for buffers.
    private static func probeAlignment(_ fd: Int32) -> (request: Int, memory: Int) {
        let maxAlign = max(4096, Int(sysconf(Int32(_SC_PAGESIZE))))
        let candidates = [1, 512, 1024, 2048, 4096]
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 * maxAlign, alignment: maxAlign)
        defer { buf.deallocate() }
        func works(_ at: UnsafeMutableRawPointer, _ length: Int) -> Bool {
            if pread(fd, at, length, 0) >= 0 { return true }
            // Linux returns EINVAL for misaligned O_DIRECT reads; other errors say nothing.
            return errno != EINVAL
        }
        var request = 0
        var logical: Int32 = 0
        if clinux_blksszget(fd, &logical) == 0 && logical > 0 { request = Int(logical) }
        if request == 0 {
            request = candidates.first { works(buf.baseAddress!, $0) }.map { $0 == 1 ? maxAlign : $0 } ?? maxAlign
        }
        let memory = candidates.first { works(buf.baseAddress! + $0, maxAlign) }.map { $0 == 1 ? maxAlign : $0 } ?? maxAlign
        return (request, memory)
    }

    public var length: UInt64 {
        let n = size.load(ordering: .relaxed)
        return options.sectorLength ? (n + 511) & ~511 : n
    }
    public var filename: String? { path }
    public var answersImageInfo: Bool { true }

    /// The same file opened again with the same options (`locking`, `cache.*`); read-write
    /// drops `force-share`, which QEMU allows on read-only nodes only.
    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        var o = options
        if !readOnly { o.forceShare = false }
        return try FileDriver(path: path, readOnly: readOnly, options: o)
    }

    /// The graph's permissions on this node become its image locks (QEMU's `raw_check_perm`
    /// and `raw_set_perm`: lock bytes 100+i held, 200+i not shared), so every user counts —
    /// exports, jobs, format nodes above, whatever lies between.
    public func setPermissions(_ cumulative: PermissionPair) throws(BlockError) {
        try claim(ObjectIdentifier(self), perm: cumulative.perm,
                  shared: cumulative.shared)
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

    /// With `cache.direct`, the minimum is the alignment `O_DIRECT` needs (QEMU advertises its
    /// `request_alignment` the same way); smaller requests still work, through a bounce buffer.
    public var limits: BlockLimits {
        BlockLimits(minimum: UInt32(requestAlignment), preferred: UInt32(max(4096, requestAlignment)), maximum: 32 << 20,
                    allocationUnit: allocationUnit)
    }

    /// Debug builds: a syscall that may sleep on the disk must not run on an event-loop thread.
    @inline(__always)
    private func assertOffLoop(_ what: @autoclosure () -> String) {
        assert(clinux_is_loop_thread() == 0, "blockd: \(what()) on '\(path)' may sleep and ran on an event-loop thread")
    }

    // MARK: reads

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        if options.direct { return try readDirect(at: offset, into: buffer, flags: flags) }
        var done = 0
        let rwf: Int32 = flags.contains(.noWait) ? Int32(clinux_RWF_NOWAIT) : 0
        if rwf != 0 && !nowaitReads.load(ordering: .relaxed) { throw .wouldBlock }
        if rwf == 0 { assertOffLoop("pread") }
        while done < buffer.count {
            var iov = iovec(iov_base: buffer.baseAddress! + done, iov_len: buffer.count - done)
            let n = clinux_preadv2(fd, &iov, 1, off_t(offset) + off_t(done), rwf)
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                if rwf != 0 && (code == EAGAIN || code == EOPNOTSUPP) {
                    // EAGAIN: not (all) in the page cache; EOPNOTSUPP: the filesystem has no
                    // RWF_NOWAIT reads (tmpfs), remembered so that later reads skip the attempt.
                    // Either way the whole request is retried on a worker (reads are idempotent).
                    if code == EOPNOTSUPP { nowaitReads.store(false, ordering: .relaxed) }
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

    @inline(__always)
    private func isAligned(_ offset: UInt64, _ count: Int) -> Bool {
        let mask = UInt64(requestAlignment - 1)
        return offset & mask == 0 && UInt64(count) & mask == 0
    }

    @inline(__always)
    private func isAligned(_ pointer: UnsafeRawPointer?) -> Bool {
        guard let pointer else { return true }
        return UInt(bitPattern: pointer) & UInt(memoryAlignment - 1) == 0
    }

    /// Reads `buffer.count` bytes at `offset` from `descriptor`; past the end of the file
    /// (a short read, which `O_DIRECT` gives only there) the rest reads as zeroes.
    private func preadFully(_ descriptor: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockError) {
        var done = 0
        while done < buffer.count {
            let n = pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockError.system("read from '\(path)' at \(offset)")
            }
            if n == 0 || (options.direct && descriptor == fd && n % requestAlignment != 0) {
                done += max(n, 0)
                memset(buffer.baseAddress! + done, 0, buffer.count - done)
                return
            }
            done += n
        }
    }

    private func pwriteFully(_ descriptor: Int32, _ buffer: UnsafeRawBufferPointer, at offset: UInt64,
                             rwf: Int32) throws(BlockError) {
        var done = 0
        while done < buffer.count {
            var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer.baseAddress! + done),
                            iov_len: buffer.count - done)
            let n = clinux_pwritev2(descriptor, &iov, 1, off_t(offset) + off_t(done), rwf)
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockError.system("write to '\(path)' at \(offset)")
            }
            done += n
        }
    }

    /// `cache.direct` read: straight into the caller's buffer when offset, length and address
    /// are aligned, else through an aligned bounce buffer covering whole blocks.
    private func readDirect(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                            flags: RequestFlags) throws(BlockError) {
        // Direct I/O always waits for the device: never on an event loop.
        if flags.contains(.noWait) { throw .wouldBlock }
        assertOffLoop("O_DIRECT pread")
        if buffer.count == 0 { return }
        if isAligned(offset, buffer.count) && isAligned(buffer.baseAddress) {
            return try preadFully(fd, buffer, at: offset)
        }
        let a = UInt64(requestAlignment)
        let start = offset & ~(a - 1)
        let end = (offset + UInt64(buffer.count) + a - 1) & ~(a - 1)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(end - start), alignment: max(memoryAlignment, 16))
        defer { bounce.deallocate() }
        try preadFully(fd, bounce, at: start)
        memcpy(buffer.baseAddress!, bounce.baseAddress! + Int(offset - start), buffer.count)
    }

    // MARK: writes

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        if options.direct { return try writeDirect(at: offset, from: buffer, flags: flags) }
        var rwf: Int32 = flags.contains(.fua) && !options.noFlush ? Int32(clinux_RWF_DSYNC) : 0
        if flags.contains(.noWait) {
            if rwf != 0 { throw .wouldBlock }
            if nowaitWrites.load(ordering: .relaxed) {
                rwf |= Int32(clinux_RWF_NOWAIT)
            } else if !flags.contains(.bufferedWriteMayBlock) {
                throw .wouldBlock
            }
        }
        if rwf & Int32(clinux_RWF_NOWAIT) == 0 && !flags.contains(.bufferedWriteMayBlock) { assertOffLoop("pwrite") }
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

    /// `cache.direct` write. Aligned requests go straight out (through a bounce buffer when
    /// only the memory is misaligned); a partial block is read, patched and written back while
    /// its blocks are held exclusively. A partial block that would grow the file past the
    /// write is written through the page cache instead, so the file ends where the write ends
    /// (the kernel writes those pages back before any direct I/O touches them).
    private func writeDirect(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                             flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        assertOffLoop("O_DIRECT pwrite")
        let count = buffer.count
        if count == 0 { return }
        let rwf: Int32 = flags.contains(.fua) && !options.noFlush ? Int32(clinux_RWF_DSYNC) : 0
        let lock = blockLock!
        if isAligned(offset, count) {
            let token = try lock.lock(offset: offset, length: UInt64(count), exclusive: false)
            defer { lock.unlock(token) }
            if isAligned(buffer.baseAddress) {
                try pwriteFully(fd, buffer, at: offset, rwf: rwf)
            } else {
                let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: max(memoryAlignment, 16))
                defer { bounce.deallocate() }
                bounce.copyMemory(from: buffer)
                try pwriteFully(fd, UnsafeRawBufferPointer(bounce), at: offset, rwf: rwf)
            }
            extend(to: offset + UInt64(count))
            return
        }
        let a = UInt64(requestAlignment)
        let start = offset & ~(a - 1)
        let end = (offset + UInt64(count) + a - 1) & ~(a - 1)
        let token = try lock.lock(offset: start, length: end - start, exclusive: true)
        defer { lock.unlock(token) }
        if end > length && bufferedFD >= 0 {
            try pwriteFully(bufferedFD, buffer, at: offset, rwf: rwf)
            extend(to: offset + UInt64(count))
            return
        }
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(end - start), alignment: max(memoryAlignment, 16))
        defer { bounce.deallocate() }
        // Only the first and the last block keep old bytes. Each is read into an aligned block
        // of its own (inside `bounce` the last one may be misaligned for the memory alignment).
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(a), alignment: max(memoryAlignment, 16))
        defer { block.deallocate() }
        if offset != start {
            try preadFully(fd, block, at: start)
            memcpy(bounce.baseAddress!, block.baseAddress!, Int(a))
        }
        let tailStart = end - a
        if offset + UInt64(count) != end && (tailStart != start || offset == start) {
            try preadFully(fd, block, at: tailStart)
            memcpy(bounce.baseAddress! + Int(tailStart - start), block.baseAddress!, Int(a))
        }
        memcpy(bounce.baseAddress! + Int(offset - start), buffer.baseAddress!, count)
        try pwriteFully(fd, UnsafeRawBufferPointer(bounce), at: start, rwf: rwf)
        extend(to: offset + UInt64(count))
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) { throw .wouldBlock }
        if length == 0 { return }
        assertOffLoop("fallocate")
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
        assertOffLoop("fallocate")
        let mode = Int32(clinux_FALLOC_FL_PUNCH_HOLE | clinux_FALLOC_FL_KEEP_SIZE)
        if clinux_fallocate(fd, mode, off_t(offset), off_t(length)) != 0 {
            let code = errno
            // Discard is advisory: a filesystem that cannot punch holes simply keeps the data.
            if code != EOPNOTSUPP && code != ENOSYS {
                throw BlockError.system("discard on '\(path)'", errno: code)
            }
        }
    }

    /// `fdatasync`; nothing with `cache.no-flush` (QEMU skips the flush to disk of such a node).
    public func flush() throws(BlockError) {
        if options.noFlush { return }
        assertOffLoop("fdatasync")
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw BlockError.system("flush of '\(path)'")
        }
    }

    public func prefetch(at offset: UInt64, length: UInt64) throws(BlockError) {
        _ = posix_fadvise(fd, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)
    }

    /// `SEEK_DATA`/`SEEK_HOLE` may read the filesystem's extent tree: with `.noWait` a regular
    /// file answers `.wouldBlock` (a block device is all data and answers at once).
    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        let end = min(offset + length, self.length)
        if isBlockDevice || offset >= end {
            return BlockStatus(length: max(end - min(offset, end), 1), flags: [.data, .allocated])
        }
        if flags.contains(.noWait) { throw .wouldBlock }
        assertOffLoop("lseek(SEEK_DATA)")
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
        assertOffLoop("ftruncate")
        if ftruncate(fd, off_t(newLength)) != 0 { throw BlockError.system("resize of '\(path)'") }
        size.store(newLength, ordering: .relaxed)
    }

    public func close() throws(BlockError) {
        if closed.exchange(true, ordering: .relaxed) { return }
        // Closing the descriptor drops its OFD locks.
        Glibc.close(fd)
        if bufferedFD >= 0 { Glibc.close(bufferedFD) }
    }
}
