import BlockCore
import Glibc
import NBDProtocol

/// Runs one request against the export's node; the same code serves the inline (`noWait`)
/// attempt on the loop thread and the retry on a worker. Wire flags become block flags here
/// and nowhere else.
enum Executor {
    /// Most descriptors one block-status chunk carries.
    static let maxExtents = 1 << 16

    /// Returns false only when `noWait` was set and the request would have slept (nothing
    /// was changed; run it again without `noWait`). Otherwise the outcome is in `r`.
    /// `inlineWrite`: with `noWait`, a buffered write may run even if the filesystem cannot
    /// promise not to sleep (see `InlineWritePolicy`).
    /// `root`: the export's root `node` was loaded from (a request that raced with the root's
    /// switch to another node backs out: `.wouldBlock` inline, `.replaced` on a worker).
    /// `writethrough`: the export's writes and zero writes are all FUA.
    static func perform(_ r: Request, node: BlockNode, root: BlockRoot?, contexts: [any MetaContextProvider],
                        structured: Bool, noWait: Bool, inlineWrite: Bool = false, writethrough: Bool) -> Bool {
        let h = r.header
        var flags = blockFlags(h, writethrough: writethrough)
        if noWait { flags.insert(.noWait) }
        if inlineWrite { flags.insert(.bufferedWriteMayBlock) }
        do throws(BlockError) {
            switch h.command {
            case .read:
                if h.length == 0 { return true }
                try node.read(at: h.offset, into: r.data, flags: flags, via: root)
                if structured && !h.flags.contains(.df) { splitHoles(r) }
            case .write:
                if h.length == 0 {
                    if !h.flags.contains(.fua) { return true }
                    if noWait { return false }
                    try node.flush(via: root)
                    return true
                }
                try node.write(at: h.offset, from: UnsafeRawBufferPointer(r.data), flags: flags, via: root)
            case .flush:
                if noWait { return false }
                try node.flush(via: root)
            case .trim:
                if noWait { return false }
                try node.discard(at: h.offset, length: h.length, flags: flags, via: root)
                if h.flags.contains(.fua) { try node.flush(via: root) }
            case .writeZeroes:
                if noWait { return false }
                try node.writeZeroes(at: h.offset, length: h.length, flags: flags, via: root)
            case .cache:
                if noWait { return false }
                try node.prefetch(at: h.offset, length: h.length, via: root)
            case .blockStatus:
                // Bitmap contexts answer from memory: no worker round trip.
                if noWait && !selectedContexts(r, contexts).allSatisfy({ contexts[$0].isNonBlocking }) { return false }
                r.statusResults = try blockStatus(h, r, contexts: contexts)
            case .disconnect, .resize, .none:
                r.errno = EINVAL
            }
        } catch {
            if noWait && error.isWouldBlock { return false }
            r.errno = error.errno
            r.message = error.message
        }
        return true
    }

    /// Wire flags as block flags (QEMU's `nbd_handle_request` switch), for both paths.
    /// `writethrough` (the export's `writethrough=on`): every write and zero write is FUA.
    static func blockFlags(_ h: RequestHeader, writethrough: Bool = false) -> RequestFlags {
        var flags: RequestFlags = []
        switch h.command {
        case .write?:
            // FUA matters only where data is written; on reads, cache and block status the
            // spec lets the server ignore it.
            if h.flags.contains(.fua) || writethrough { flags.insert(.fua) }
        case .trim?:
            if h.flags.contains(.fua) { flags.insert(.fua) }
            flags.insert(.mayUnmap)
        case .writeZeroes?:
            if h.flags.contains(.fua) || writethrough { flags.insert(.fua) }
            if !h.flags.contains(.noHole) { flags.insert(.mayUnmap) }
            if h.flags.contains(.fastZero) { flags.insert(.noFallback) }
        default:
            break
        }
        return flags
    }

    /// Starts `r` on the node's asynchronous path (a chain ending in an `nbd` node): sent
    /// from this loop and completed on it, no worker thread. Returns false when the request
    /// must take the usual path instead (no asynchronous path for it, or something would
    /// have to wait: nothing was started). True when it started (`io` completes later) or
    /// failed at once — then `r.errno` is set and the caller replies now. `root` as for
    /// `perform` (a request that raced with the root's switch takes the usual path).
    static func submit(_ r: Request, node: BlockNode, root: BlockRoot?, io: BlockIO,
                       writethrough: Bool) -> (handled: Bool, started: Bool) {
        let h = r.header
        let flags = blockFlags(h, writethrough: writethrough)
        let request: BlockRequest
        switch h.command {
        // Zero-length reads and writes do nothing (or only flush): `perform` answers them.
        case .read? where h.length > 0: request = .read(at: h.offset, into: r.data, flags: flags)
        case .write? where h.length > 0: request = .write(at: h.offset, from: UnsafeRawBufferPointer(r.data), flags: flags)
        case .flush?: request = BlockRequest(.flush)
        case .trim?: request = BlockRequest(.discard, offset: h.offset, length: h.length, flags: flags)
        case .writeZeroes?: request = BlockRequest(.writeZeroes, offset: h.offset, length: h.length, flags: flags)
        default: return (false, false)
        }
        do throws(BlockError) {
            try node.submit(io, request, via: root)
            return (true, true)
        } catch {
            if error.isWouldBlock { return (false, false) }
            r.errno = error.errno
            r.message = error.message
            return (true, false)
        }
    }

    /// Takes the outcome of an asynchronous request into `r` (on the connection's loop).
    static func finishAsync(_ r: Request, io: BlockIO, structured: Bool) {
        if let error = io.error {
            r.errno = error.errno
            r.message = error.message
        } else if r.header.type == Command.read.rawValue && structured && !r.header.flags.contains(.df) {
            splitHoles(r)
        }
    }

    /// Indices of the contexts a block-status request is answered for.
    static func selectedContexts(_ r: Request, _ contexts: [any MetaContextProvider]) -> [Int] {
        r.statusSelection.isEmpty ? Array(contexts.indices) : r.statusSelection
    }

    /// Extents per context, none of length 0; a context that reports nothing for a nonempty
    /// range answers one extent of status 0 (always safe, the spec says) for the whole range.
    private static func blockStatus(_ h: RequestHeader, _ r: Request,
                                    contexts: [any MetaContextProvider]) throws(BlockError) -> [[Transmission.Extent]] {
        var out: [[Transmission.Extent]] = []
        let maxExtents = h.flags.contains(.reqOne) ? 1 : maxExtents
        for i in selectedContexts(r, contexts) {
            var extents = try contexts[i].extents(offset: h.offset, length: h.length, maxExtents: maxExtents)
            extents.removeAll { $0.length == 0 }
            if extents.isEmpty { extents = [Transmission.Extent(length: h.length, flags: 0)] }
            out.append(extents)
        }
        return out
    }

    /// Granule at which a sparse read is split into data and hole chunks.
    static let holeGranule = 64 * 1024

    /// Marks all-zero stretches of read data as holes (`NBD_REPLY_TYPE_OFFSET_HOLE`), so
    /// clients skip them; a read that is data throughout stays one chunk.
    static func splitHoles(_ r: Request) {
        let data = UnsafeRawBufferPointer(r.data)
        let n = data.count
        if n == 0 { return }
        if n <= holeGranule && r.header.offset % UInt64(holeGranule) + UInt64(n) <= UInt64(holeGranule) {
            if data.isAllZero { r.chunks = [(0, n, true)] }
            return
        }
        var chunks: [(offset: Int, length: Int, hole: Bool)] = []
        // Granules start at absolute multiples of `holeGranule`, so chunk boundaries are
        // aligned (the spec asks for multiples of 512 where possible) whatever the offset.
        var at = 0
        var sawHole = false
        while at < n {
            let intoGranule = Int((r.header.offset + UInt64(at)) % UInt64(holeGranule))
            let len = min(holeGranule - intoGranule, n - at)
            let hole = UnsafeRawBufferPointer(rebasing: data[at..<at + len]).isAllZero
            sawHole = sawHole || hole
            if let last = chunks.last, last.hole == hole {
                chunks[chunks.count - 1].length += len
            } else {
                chunks.append((at, len, hole))
            }
            at += len
        }
        if sawHole { r.chunks = chunks }
    }

}
