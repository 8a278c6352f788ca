import BlockCore
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How a converging copy treats client writes to its source (QAPI `MirrorCopyMode`, plus
/// blockd's `auto` for active commit's `x-copy-mode`).
public enum MirrorCopyMode: String, Sendable, CaseIterable {
    /// Start in background mode; switch to write-blocking when the copy is not catching up.
    case auto
    /// Record written ranges and copy them later (QEMU's default `background`).
    case background
    /// Write each client write to the target as well before it is acknowledged (QEMU's
    /// `write-blocking`).
    case writeBlocking = "write-blocking"
}

/// Active commit's name for the same modes.
public typealias CommitCopyMode = MirrorCopyMode

/// A bitset of `granularity`-sized chunks that need copying, guarded by a mutex.
final class DirtyChunks: Sendable {
    let granularity: UInt64
    let count: Int
    private let state: Mutex<(words: [UInt64], set: Int)>

    init(length: UInt64, granularity: UInt64) {
        self.granularity = granularity
        count = Int((length + granularity - 1) / granularity)
        state = Mutex((words: [UInt64](repeating: 0, count: (count + 63) / 64), set: 0))
    }

    func mark(_ offset: UInt64, _ length: UInt64) {
        guard length > 0, count > 0 else { return }
        let first = Int(offset / granularity)
        let last = min(count - 1, Int((offset + length - 1) / granularity))
        if first > last { return }
        state.withLock { s in
            for i in first...last where s.words[i >> 6] & (1 << UInt64(i & 63)) == 0 {
                s.words[i >> 6] |= 1 << UInt64(i & 63)
                s.set += 1
            }
        }
    }

    func clear(_ first: Int, _ n: Int) {
        state.withLock { s in
            for i in first..<(first + n) where s.words[i >> 6] & (1 << UInt64(i & 63)) != 0 {
                s.words[i >> 6] &= ~(1 << UInt64(i & 63))
                s.set -= 1
            }
        }
    }

    var dirtyChunks: Int { state.withLock { $0.set } }

    /// The first run of dirty chunks at or after `from` (wrapping), at most `max` long.
    func nextRun(from: Int, max: Int) -> (first: Int, count: Int)? {
        state.withLock { s -> (Int, Int)? in
            if s.set == 0 { return nil }
            func find(_ lo: Int, _ hi: Int) -> Int? {
                var i = lo
                while i < hi {
                    let w = s.words[i >> 6] >> UInt64(i & 63)
                    if w == 0 { i = (i | 63) + 1; continue }
                    i += w.trailingZeroBitCount
                    return i < hi ? i : nil
                }
                return nil
            }
            guard let start = find(from, count) ?? find(0, from) else { return nil }
            var n = 1
            while n < max, start + n < count, s.words[(start + n) >> 6] & (1 << UInt64((start + n) & 63)) != 0 { n += 1 }
            return (start, n)
        }
    }
}

/// "Copy the dirty regions until converged": the one implementation behind active commit
/// (source = top, target = base) and `blockdev-mirror` (source = the device, target = any node).
///
/// While installed, it is the source node's `WriteMirror`: every guest-visible change to the
/// source is either recorded (background) or also written to the target before the client's
/// reply (write-blocking). `run` copies the recorded chunks — read through the source, so the
/// whole chain's view — into the target under the source's exclusive range lock, reports
/// READY once nothing is dirty, and keeps copying new changes until the job is completed or
/// cancelled. `copyRemainingDrained` copies what is left inside the caller's drained section
/// (the pivot). Copies and mirrored writes carry `.commitCopy`: they make the target equal
/// to the disk the client sees, so they mark none of the target's dirty bitmaps (drive
/// semantics; the jobs carry the source's bitmaps over at the pivot instead).
final class ConvergingCopy: WriteMirror, Sendable {
    let source: BlockNode
    let target: BlockNode
    /// Bytes of the source that are copied (the source's length at job start).
    let length: UInt64
    let dirty: DirtyChunks
    /// Bytes per copy step (a multiple of the granularity).
    let step: UInt64
    let mode: MirrorCopyMode
    /// Zero ranges become zero writes that may deallocate (QEMU's `unmap`).
    let unmap: Bool
    private let writeBlocking = Atomic<Bool>(false)
    /// Serialises overlapping client writes in write-blocking mode (source write + target write).
    private let mirrorLock = RangeLock()
    private let installed = Atomic<Bool>(false)

    init(source: BlockNode, target: BlockNode, granularity: UInt64, step: UInt64, mode: MirrorCopyMode, unmap: Bool) {
        self.source = source
        self.target = target
        self.length = source.length
        self.dirty = DirtyChunks(length: source.length, granularity: granularity)
        self.step = max(granularity, step / granularity * granularity)
        self.mode = mode
        self.unmap = unmap
        writeBlocking.store(mode == .writeBlocking, ordering: .relaxed)
    }

    var granularity: UInt64 { dirty.granularity }

    /// Whether client writes are written through to the target now.
    var isWriteBlocking: Bool { writeBlocking.load(ordering: .relaxed) }

    /// Makes client writes to the source serialise against the copies and go through `mirror`.
    func install() {
        source.beginSerialising()
        source.setMirror(self)
        installed.store(true, ordering: .sequentiallyConsistent)
    }

    /// Undoes `install` (idempotent). `drained`: the caller is inside a drained section of the source.
    func uninstall(drained: Bool = false) {
        guard installed.exchange(false, ordering: .sequentiallyConsistent) else { return }
        if drained { source.setMirrorDrained(nil) } else { source.setMirror(nil) }
        source.endSerialising()
    }

    // MARK: initial dirty set

    /// Marks every range allocated above `base` (the whole chain when `base` is nil) dirty.
    /// Called after `install`, so no write falls in between the scan and the hook.
    func markAllocated(above base: BlockNode?) throws(BlockError) {
        var offset: UInt64 = 0
        while offset < length {
            let status = try source.blockStatusAbove(base: base, at: offset, length: min(1 << 30, length - offset))
            if status.depth >= 1 { dirty.mark(offset, status.length) }
            offset += status.length
        }
    }

    /// `sync=full`'s `zero_target`: zeroes the whole target first, so only allocated ranges of
    /// the source need copying; a target that cannot zero gets every range copied instead.
    func zeroTargetOrMarkAll(above base: BlockNode?) throws(BlockError) {
        var offset: UInt64 = 0
        while offset < length {
            let n = min(UInt64(1) << 30, length - offset)
            do throws(BlockError) {
                try target.writeZeroes(at: offset, length: n, flags: [.mayUnmap, .commitCopy])
            } catch {
                if error.errno == ENOTSUP || error.errno == EOPNOTSUPP {
                    dirty.mark(0, length)
                    return
                }
                throw error
            }
            offset += n
        }
        try markAllocated(above: base)
    }

    // MARK: the loop

    /// Where a copy step failed: QAPI's `IoOperationType` for `BLOCK_JOB_ERROR`.
    enum Side { case source, target }

    struct CopyError: Error {
        let side: Side
        let error: BlockError
    }

    /// Copies dirty chunks until nothing is dirty, reports READY (flushing the target first),
    /// and goes on copying new changes until the job should finish (complete or soft cancel).
    /// `onError(side, error)` applies the job's error policy: it throws to fail the job and
    /// returns otherwise (the chunk stays dirty and is copied again). `autoSwitch`: in `auto`
    /// mode, switch to write-blocking when two half-second windows in a row ended with no
    /// fewer dirty chunks (clients dirty faster than the job copies).
    func run(_ job: Job, onError: (Side, BlockError) throws(BlockError) -> Void) throws(BlockError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(step), alignment: 4096)
        defer { buffer.deallocate() }
        let g = granularity
        var cursor = 0
        var ready = false
        var lastCheck = monotonicNanos()
        var lastDirty = dirty.dirtyChunks
        var stalled = 0
        job.setTotal(job.info.current + UInt64(dirty.dirtyChunks) * g)
        try job.checkpoint()
        while true {
            let now = monotonicNanos()
            if mode == .auto && now - lastCheck >= 500_000_000 {
                let d = dirty.dirtyChunks
                stalled = d > 0 && d >= lastDirty ? stalled + 1 : 0
                if !writeBlocking.load(ordering: .relaxed) && stalled >= 2 {
                    writeBlocking.store(true, ordering: .sequentiallyConsistent)
                    Log.info("job '\(job.id)': copy is not catching up (\(d) dirty chunks); switching to write-blocking mode")
                }
                lastDirty = d
                lastCheck = now
            }
            if let run = dirty.nextRun(from: cursor, max: Int(step / g)) {
                let start = UInt64(run.first) * g
                let n = min(UInt64(run.count) * g, length - start)
                var copied: UInt64 = 0
                do throws(CopyError) {
                    let token: RangeLock.Token
                    do throws(BlockError) {
                        token = try source.rangeLock.lock(offset: start, length: n, exclusive: true)
                    } catch {
                        throw CopyError(side: .source, error: error)
                    }
                    defer { source.rangeLock.unlock(token) }
                    dirty.clear(run.first, run.count)
                    do throws(CopyError) {
                        try copy(at: start, length: n, buffer: buffer) { (dst) throws(BlockError) in
                            try source.read(at: start, into: dst)
                        }
                    } catch {
                        dirty.mark(start, n)
                        throw error
                    }
                    copied = n
                } catch {
                    if error.error.errno == jobCancelled.errno { throw error.error }
                    try onError(error.side, error.error)
                }
                cursor = run.first + run.count
                if cursor >= dirty.count { cursor = 0 }
                job.addProgress(copied)
                job.setTotal(job.info.current + UInt64(dirty.dirtyChunks) * g)
                try job.checkpoint(copied: copied)
                continue
            }
            if !ready {
                do throws(BlockError) { try target.flush() } catch { try onError(.target, error); continue }
                ready = true
                job.setReady()
            }
            if job.shouldFinish { break }
            try job.idle(nanos: 10_000_000)
        }
    }

    /// Copies what is still dirty while the source is drained (no client write can come in):
    /// the source's driver is read directly. Then flushes the target.
    func copyRemainingDrained() throws(BlockError) {
        let g = granularity
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(step), alignment: 4096)
        defer { buffer.deallocate() }
        while let run = dirty.nextRun(from: 0, max: Int(step / g)) {
            let start = UInt64(run.first) * g
            let n = min(UInt64(run.count) * g, length - start)
            do throws(CopyError) {
                try copy(at: start, length: n, buffer: buffer) { (dst) throws(BlockError) in
                    try source.driver.read(at: start, into: dst, flags: [])
                }
            } catch {
                throw error.error
            }
            dirty.clear(run.first, run.count)
        }
        try target.flush()
    }

    /// Reads a range with `read` and writes it into the target (all-zero data as a zero write).
    private func copy(at offset: UInt64, length n: UInt64, buffer: UnsafeMutableRawBufferPointer,
                      read: (UnsafeMutableRawBufferPointer) throws(BlockError) -> Void) throws(CopyError) {
        let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(n)])
        do throws(BlockError) { try read(dst) } catch { throw CopyError(side: .source, error: error) }
        do throws(BlockError) {
            if UnsafeRawBufferPointer(dst).isAllZero {
                try target.writeZeroes(at: offset, length: n, flags: unmap ? [.mayUnmap, .commitCopy] : [.commitCopy])
            } else {
                try target.write(at: offset, from: UnsafeRawBufferPointer(dst), flags: [.commitCopy])
            }
        } catch {
            throw CopyError(side: .target, error: error)
        }
    }

    // MARK: WriteMirror (client writes to the source)

    func mirror(offset: UInt64, length: UInt64, change: MirroredChange, flags: RequestFlags,
                apply: () throws(BlockError) -> Void) throws(BlockError) {
        if !writeBlocking.load(ordering: .relaxed) {
            try apply()
            dirty.mark(offset, length)
            return
        }
        // Write-blocking: the target write happens before the client's reply; never on a loop.
        if flags.contains(.noWait) { throw .wouldBlock }
        let g = granularity
        let start = offset / g * g
        let end = min(((offset + max(length, 1) + g - 1) / g) * g, self.length)
        let token = try mirrorLock.lock(offset: start, length: max(end, start + 1) - start, exclusive: true)
        defer { mirrorLock.unlock(token) }
        try apply()
        if offset >= self.length { return }
        let n = min(length, self.length - offset)
        do throws(BlockError) {
            switch change {
            case .write(let data):
                try target.write(at: offset, from: UnsafeRawBufferPointer(rebasing: data[0..<Int(n)]),
                                 flags: flags.intersection(.fua).union(.commitCopy))
            case .zeroes(let f):
                try target.writeZeroes(at: offset, length: n, flags: f.intersection([.fua, .mayUnmap]).union(.commitCopy))
            case .discard:
                dirty.mark(offset, n)
            }
        } catch {
            // The client's write succeeded on the source; copy the range again later.
            dirty.mark(offset, n)
        }
    }
}
