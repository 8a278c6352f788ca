import BlockCore
import BlockGraph
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// `block-stream`: copies into `top` every region allocated between top and base, then makes
/// base (or nothing) top's backing and drops the layers between. See `docs/jobs.md`.
public final class StreamJob: JobBody {
    public let type = "stream"
    public let plan: StreamPlan
    /// `backing-file`: the name to write into top's header instead of the computed one.
    public let backingFile: String?
    private let graph: BlockGraph
    private let holds: JobHolds
    /// Control context only (creation, completion, clean).
    private let control: Mutex<(frozen: FrozenChain?, cleaned: Bool)>
    /// Bytes copied per step, as QEMU: bigger chunks cost clients more latency.
    public static let chunk: UInt64 = 512 << 10

    /// Freezes the chain, takes QEMU's stream permissions (its copy-on-read filter's on the
    /// users of top, its I/O on top, holds on top and the intermediate nodes) and makes client
    /// writes to top serialise against the copies. Throws, changing nothing, when a link is
    /// already frozen or a permission conflicts.
    /// `failedAfterCreation`: see `JobCreation` (QEMU creates the job after the copy-on-read
    /// filter is in, before it takes its holds).
    public init(plan: StreamPlan, backingFile: String?, graph: BlockGraph, id: String,
                failedAfterCreation: (@Sendable () -> Void)? = nil) throws(BlockError) {
        self.plan = plan
        self.backingFile = backingFile
        self.graph = graph
        if plan.top.isReadOnly {
            throw BlockError(EPERM, "Block node '\(plan.top.nodeName)' is read-only")
        }
        let frozen = try FrozenChain.freeze(from: plan.top, through: plan.aboveBase, owner: id)
        // stream_start: the copy-on-read filter goes above top; the job reads and writes
        // through it (consistent read; shares write); it holds top ("active node") and every
        // node down to base ("intermediate node": no writes, no resize).
        let basic: BlockPermissions = [.consistentRead, .writeUnchanged]
        var roots = [JobHolds.backend(plan.top, perm: .consistentRead, shared: basic.union(.write), filter: .copyOnRead),
                     JobHolds.hold(plan.top, "active node", type: "stream", id: id, shared: basic.union(.write))]
        var node = plan.top.chainChild?.node
        let base = plan.aboveBase.chainChild?.node
        while let n = node, n !== base {
            roots.append(JobHolds.hold(n, "intermediate node", type: "stream", id: id, shared: basic))
            node = n.chainChild?.node
        }
        do throws(BlockError) {
            holds = try JobHolds.take(graph, filter: (.copyOnRead, plan.top), roots: roots,
                                      creation: JobCreation(beforeFilter: false, failed: failedAfterCreation))
        } catch {
            frozen.unfreeze()
            throw error
        }
        control = Mutex((frozen, false))
        plan.top.beginSerialising()
    }

    public func run(_ job: Job) throws(BlockError) {
        let top = plan.top
        let length = top.length
        job.setTotal(length)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(StreamJob.chunk), alignment: 4096)
        defer { buffer.deallocate() }
        var offset: UInt64 = 0
        try job.checkpoint()
        while offset < length {
            let want = min(StreamJob.chunk, length - offset)
            // Base as the graph has it now: the user may have swapped what lies below aboveBase.
            let status: BlockStatus
            do throws(BlockError) {
                status = try top.blockStatusAbove(baseBelow: plan.aboveBase, at: offset, length: want).status
            } catch {
                if try job.handleIOError(error, operation: "read") { continue }
                offset += want
                job.addProgress(want)
                continue
            }
            let n = status.length
            var copied: UInt64 = 0
            let started = monotonicNanos()
            let clientsBefore = top.requestsEntered
            if status.depth >= 2 {
                do throws(BlockError) {
                    try copy(top, at: offset, length: n, buffer: buffer)
                    copied = n
                } catch {
                    if error.errno == jobCancelled.errno { throw error }
                    if try job.handleIOError(error, operation: error.message.hasPrefix("write") ? "write" : "read") { continue }
                }
            }
            offset += n
            job.addProgress(n)
            if copied > 0 { StreamJob.yieldToClients(top, clientsBefore: clientsBefore, worked: monotonicNanos() - started) }
            try job.checkpoint(copied: copied)
        }
        try top.flush()
    }

    /// Rate-adaptive backoff: when clients sent requests to top while the job copied (more
    /// requests entered top than the copy's own read and write), sleep `backoffFactor` times
    /// as long as the copy took (capped at 8 ms), so under client load the job takes at most
    /// a fifth of a core and clients keep the CPU and the disk; with no clients it runs flat out.
    static let backoffFactor: UInt64 = 4
    /// Requests the copy itself sends through top (one read, one write).
    static let ownRequests: UInt64 = 2

    static func yieldToClients(_ top: BlockNode, clientsBefore: UInt64, worked: UInt64) {
        guard top.requestsEntered &- clientsBefore > ownRequests || top.inFlightCount > 0 else { return }
        let ns = min(worked * backoffFactor, 8_000_000)
        if ns > 10_000 { usleep(UInt32(ns / 1000)) }
    }

    /// Reads the visible data of the range through top and writes it back into top as an
    /// unchanged write, holding the range exclusively so no client write lands in between.
    private func copy(_ top: BlockNode, at offset: UInt64, length: UInt64,
                      buffer: UnsafeMutableRawBufferPointer) throws(BlockError) {
        let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(length)])
        try top.rangeLock.withLock(offset: offset, length: length, exclusive: true) { () throws(BlockError) in
            try top.read(at: offset, into: dst)
            if UnsafeRawBufferPointer(dst).isAllZero {
                try top.writeZeroes(at: offset, length: length, flags: [.writeUnchanged])
            } else {
                try top.write(at: offset, from: UnsafeRawBufferPointer(dst), flags: [.writeUnchanged])
            }
        }
    }

    public func prepare(_ job: Job) throws(BlockError) {
        let top = plan.top
        try graph.withLock { () throws(BlockError) in
            let newBase = plan.currentBase
            guard top.driver.backingChild != nil else { return }
            // The name for the header first: if it cannot be written, nothing has changed.
            let name: String?
            let format: String?
            if let newBase {
                let data = newBase.skippingFilters()
                format = data.driverName
                if let given = backingFile {
                    name = given
                } else {
                    name = try StreamJob.backingName(for: data, top: top)
                }
            } else {
                name = nil
                format = nil
            }
            guard top.driver.canRecordBackingFile else {
                throw BlockError.notSupported("Node '\(top.nodeName)' (\(top.driverName)) cannot record a backing file")
            }
            // QEMU's stream_prepare: the chain is unfrozen, the job's holds go, then top's
            // backing becomes base; the streamed layers nobody else uses are released.
            control.withLock { c in
                c.frozen?.unfreeze()
                c.frozen = nil
            }
            holds.release()
            try graph.change([.backing(of: top, to: newBase)], first: { () throws(BlockError) in
                try top.driver.setBackingFile(name: name, format: format)
            })
        }
    }

    public func abort(_ job: Job) {}

    public func clean(_ job: Job?) {
        let first = control.withLock { c -> Bool in
            c.frozen?.unfreeze()
            c.frozen = nil
            defer { c.cleaned = true }
            return !c.cleaned
        }
        holds.release()
        if first { plan.top.endSerialising() }
    }

    /// A plain file name for `base` as top's header should record it: relative to top's
    /// directory when top's old backing name was relative, otherwise absolute. Never `json:`.
    public static func backingName(for base: BlockNode, top: BlockNode) throws(BlockError) -> String {
        guard let basePath = filePath(of: base) else {
            throw BlockError.invalid("Cannot record backing file for node '\(base.nodeName)': it is not backed by a plain file; give 'backing-file'")
        }
        let oldName = top.driver.backingFileName ?? ""
        guard !oldName.hasPrefix("/"), !oldName.isEmpty, let topPath = filePath(of: top) else {
            return absolute(basePath)
        }
        return relative(absolute(basePath), from: directory(of: absolute(topPath)))
    }

    /// The path of the file node under a format node (or the node itself).
    public static func filePath(of node: BlockNode) -> String? {
        var n: BlockNode? = node.skippingFilters()
        while let cur = n {
            if let path = cur.driver.filename { return path }
            n = cur.file
        }
        return nil
    }

    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return normalize(path) }
        var buf = [CChar](repeating: 0, count: 4096)
        guard getcwd(&buf, buf.count) != nil else { return path }
        let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return normalize(cwd + "/" + path)
    }

    static func normalize(_ path: String) -> String {
        var parts: [Substring] = []
        for p in path.split(separator: "/") {
            if p == "." || p.isEmpty { continue }
            if p == ".." { if !parts.isEmpty { parts.removeLast() }; continue }
            parts.append(p)
        }
        return "/" + parts.joined(separator: "/")
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "/" }
        let d = String(path[..<slash])
        return d.isEmpty ? "/" : d
    }

    /// `path` relative to directory `dir` (both absolute, normalised).
    public static func relative(_ path: String, from dir: String) -> String {
        let p = path.split(separator: "/")
        let d = dir.split(separator: "/")
        var i = 0
        while i < p.count - 1 && i < d.count && p[i] == d[i] { i += 1 }
        let ups = Array(repeating: "..", count: d.count - i)
        return (ups + p[i...].map(String.init)).joined(separator: "/")
    }

}
