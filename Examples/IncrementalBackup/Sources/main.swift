// incremental-backup: full and incremental backups of an NBD export to a local raw file,
// using a dirty bitmap exported as `qemu:dirty-bitmap:NAME` (blockd or qemu-storage-daemon).
//
//   incremental-backup --uri URI --backup FILE [--bitmap NAME] [--full] [--no-verify] [--progress]
//
// Without FILE (or with --full) it copies the whole export. Otherwise it asks the server for
// the bitmap's dirty extents (NBD_CMD_BLOCK_STATUS on the meta context) and copies only those.
// Then it reads the export and the backup again and compares them (crc32 of each).
// --progress prints the bytes copied, the rate and an ETA to stderr once a second.
//
// Point in time: pointed at a snapshot-access export (docs/backup.md, `blockctl backup
// start`), the backup is the disk as it was when the backup started, however much clients
// write meanwhile, and the verify pass compares against that frozen view.
// See docs/incremental-backup.md and docs/backup.md for the whole flow with blockd.
import CLibNBD
import CZlib
import Glibc

func die(_ message: String) -> Never {
    let text = Array("incremental-backup: \(message)\n".utf8)
    _ = text.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(1)
}

func nbdError() -> String { nbd_get_error().map { String(cString: $0) } ?? "unknown error" }

struct Options {
    var uri: String?
    var bitmap: String?
    var backup: String?
    var full = false
    var verify = true
    var progress = false
}

let usage = "usage: incremental-backup --uri URI --backup FILE [--bitmap NAME] [--full] [--no-verify] [--progress]"
var options = Options()
var args = CommandLine.arguments.dropFirst()
while let arg = args.popFirst() {
    func value() -> String {
        guard let v = args.popFirst() else { die("\(arg) needs a value\n\(usage)") }
        return v
    }
    switch arg {
    case "--uri": options.uri = value()
    case "--bitmap": options.bitmap = value()
    case "--backup": options.backup = value()
    case "--full": options.full = true
    case "--no-verify": options.verify = false
    case "--progress": options.progress = true
    case "-h", "--help": print(usage); exit(0)
    default: die("unknown argument '\(arg)'\n\(usage)")
    }
}
guard let uri = options.uri, let backupPath = options.backup else { die(usage) }
let full = options.full || access(backupPath, F_OK) != 0
if !full && options.bitmap == nil { die("an incremental backup needs --bitmap NAME (or --full)") }
let contextName = options.bitmap.map { "qemu:dirty-bitmap:" + $0 }

// MARK: progress

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Bytes copied out of `total`, printed with the rate and an ETA at most once a second.
struct Progress {
    let enabled: Bool
    let total: UInt64
    let start = monotonicSeconds()
    var done: UInt64 = 0
    var lastPrint = monotonicSeconds()

    mutating func add(_ bytes: UInt64) {
        done += bytes
        guard enabled else { return }
        let now = monotonicSeconds()
        if now - lastPrint < 1 && done < total { return }
        lastPrint = now
        let rate = Double(done) / max(now - start, 1e-6)
        let eta = rate > 0 ? Int((Double(total - min(done, total)) / rate).rounded(.up)) : 0
        let pct = total > 0 ? Double(done) * 100 / Double(total) : 100
        let line = "progress: \(done >> 20)/\(total >> 20) MiB (\(Int(pct))%), \(Int(rate) >> 20) MiB/s, ETA \(eta) s\n"
        _ = Array(line.utf8).withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }
}

// MARK: connect

/// One connection to the export and the backup file's path.
final class Session {
    let nbd: OpaquePointer
    let backupPath: String
    let exportSize: UInt64
    /// Largest read sent in one request (NBD servers accept at least 32 MiB).
    let chunk = 4 << 20
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4 << 20, alignment: 4096)

    /// `--progress`.
    let showProgress: Bool

    init(uri: String, context: String?, backupPath: String, showProgress: Bool) {
        guard let nbd = nbd_create() else { die(nbdError()) }
        self.nbd = nbd
        self.showProgress = showProgress
        self.backupPath = backupPath
        if let context, nbd_add_meta_context(nbd, context) == -1 { die(nbdError()) }
        if nbd_connect_uri(nbd, uri) == -1 { die("\(uri): \(nbdError())") }
        let size = nbd_get_size(nbd)
        if size < 0 { die(nbdError()) }
        exportSize = UInt64(size)
    }

    deinit {
        buffer.deallocate()
        nbd_close(nbd)
    }

    func readExport(_ count: Int, at offset: UInt64) {
        if nbd_pread(nbd, buffer, count, offset, 0) == -1 { die("read at \(offset): \(nbdError())") }
    }

    func writeBackup(_ fd: Int32, _ count: Int, at offset: UInt64) {
        var done = 0
        while done < count {
            let n = pwrite(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n < 0 { die("\(backupPath): \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    func isZero(_ count: Int) -> Bool {
        var i = 0
        while i + 8 <= count {
            if buffer.load(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < count {
            if buffer.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }

    // MARK: full backup

    func fullBackup() {
        let fd = open(backupPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { die("\(backupPath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        if ftruncate(fd, off_t(exportSize)) != 0 { die("\(backupPath): \(String(cString: strerror(errno)))") }
        var offset: UInt64 = 0
        var data: UInt64 = 0
        var progress = Progress(enabled: showProgress, total: exportSize)
        while offset < exportSize {
            let n = Int(min(UInt64(chunk), exportSize - offset))
            readExport(n, at: offset)
            progress.add(UInt64(n))
            // The file starts sparse: zero chunks stay holes.
            if !isZero(n) {
                writeBackup(fd, n, at: offset)
                data += UInt64(n)
            }
            offset += UInt64(n)
        }
        if fsync(fd) != 0 { die("\(backupPath): \(String(cString: strerror(errno)))") }
        print("full: transferred \(exportSize) bytes in 1 extents (\(data) bytes of data) to \(backupPath)")
    }

    // MARK: incremental backup

    func incrementalBackup(context: String) {
        if nbd_can_meta_context(nbd, context) != 1 {
            die("the export does not offer \(context) (export the node with the bitmap: blockctl export NODE --bitmap NAME)")
        }
        let fd = open(backupPath, O_WRONLY | O_CLOEXEC)
        if fd < 0 { die("\(backupPath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        if UInt64(st.st_size) != exportSize {
            die("\(backupPath) has \(st.st_size) bytes but the export has \(exportSize): make a new full backup (--full)")
        }
        let collector = DirtyExtents(context: context, limit: exportSize)
        let box = Unmanaged.passRetained(collector)
        defer { box.release() }
        while collector.covered < exportSize {
            let before = collector.covered
            // One request covers at most 2 GiB (the length is 32 bits on the wire).
            let count = min(exportSize - before, 1 << 31)
            let callback = nbd_extent_callback(
                callback: { user, metacontext, offset, entries, n, _ in
                    let c = Unmanaged<DirtyExtents>.fromOpaque(user!).takeUnretainedValue()
                    if let metacontext, let entries, String(cString: metacontext) == c.context {
                        c.add(at: offset, entries: entries, count: n)
                    }
                    return 0
                },
                user_data: box.toOpaque(), free: nil)
            if nbd_block_status(nbd, count, before, callback, 0) == -1 {
                die("block status at \(before): \(nbdError())")
            }
            if collector.covered <= before { die("the server reported no extents at \(before)") }
        }
        var bytes: UInt64 = 0
        var progress = Progress(enabled: showProgress, total: collector.extents.reduce(0) { $0 + $1.length })
        for e in collector.extents {
            var offset = e.offset
            let end = e.offset + e.length
            while offset < end {
                let n = Int(min(UInt64(chunk), end - offset))
                readExport(n, at: offset)
                writeBackup(fd, n, at: offset)
                progress.add(UInt64(n))
                offset += UInt64(n)
            }
            bytes += e.length
        }
        if fsync(fd) != 0 { die("\(backupPath): \(String(cString: strerror(errno)))") }
        print("incremental: transferred \(bytes) bytes in \(collector.extents.count) extents (dirty in \(context)) to \(backupPath)")
    }

    // MARK: verify

    func verify() {
        let fd = open(backupPath, O_RDONLY | O_CLOEXEC)
        if fd < 0 { die("\(backupPath): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let local = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { local.deallocate() }
        var crcExport: uLong = crc32(0, nil, 0)
        var crcBackup: uLong = crcExport
        var offset: UInt64 = 0
        var firstDifference: UInt64?
        while offset < exportSize {
            let n = Int(min(UInt64(chunk), exportSize - offset))
            readExport(n, at: offset)
            var got = 0
            while got < n {
                let r = pread(fd, local + got, n - got, off_t(offset) + off_t(got))
                if r <= 0 { die("\(backupPath): short read at \(offset + UInt64(got))") }
                got += r
            }
            crcExport = crc32(crcExport, buffer.assumingMemoryBound(to: Bytef.self), uInt(n))
            crcBackup = crc32(crcBackup, local.assumingMemoryBound(to: Bytef.self), uInt(n))
            if firstDifference == nil && memcmp(buffer, local, n) != 0 { firstDifference = offset }
            offset += UInt64(n)
        }
        let hex = { (v: uLong) in "0x" + String(v, radix: 16) }
        if let firstDifference {
            print("verify: MISMATCH: export crc32 \(hex(crcExport)), backup crc32 \(hex(crcBackup)); first difference in the 4 MiB at \(firstDifference)")
            exit(2)
        }
        print("verify: ok, backup equals export (crc32 \(hex(crcExport)), \(exportSize) bytes)")
    }

}

/// Collects the dirty extents the server reports for our context, merging neighbours.
final class DirtyExtents {
    let context: String
    let limit: UInt64
    /// End of the range the replies covered so far.
    var covered: UInt64 = 0
    var extents: [(offset: UInt64, length: UInt64)] = []
    init(context: String, limit: UInt64) {
        self.context = context
        self.limit = limit
    }

    func add(at offset: UInt64, entries: UnsafePointer<UInt32>, count: Int) {
        var at = offset
        for i in stride(from: 0, to: count - 1, by: 2) {
            let length = UInt64(entries[i])
            let flags = entries[i + 1]
            let end = min(at + length, limit)
            if flags & 1 != 0 && end > at {   // NBD_STATE_DIRTY
                if let last = extents.last, last.offset + last.length == at {
                    extents[extents.count - 1].length += end - at
                } else {
                    extents.append((at, end - at))
                }
            }
            at = end
            if at >= limit { break }
        }
        covered = max(covered, at)
    }
}

let session = Session(uri: uri, context: contextName, backupPath: backupPath, showProgress: options.progress)
if full {
    session.fullBackup()
} else {
    session.incrementalBackup(context: contextName!)
}
if options.verify { session.verify() }
if nbd_shutdown(session.nbd, 0) == -1 { die(nbdError()) }
