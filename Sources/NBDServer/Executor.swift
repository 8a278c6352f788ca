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
    static func perform(_ r: Request, node: BlockNode, root: BlockRoot?, contexts: [any MetaContextProvider],
                        structured: Bool, noWait: Bool, inlineWrite: Bool = false) -> Bool {
        let h = r.header
        var flags: RequestFlags = noWait ? [.noWait] : []
        if inlineWrite { flags.insert(.bufferedWriteMayBlock) }
        if h.flags.contains(.fua) { flags.insert(.fua) }
        do throws(BlockError) {
            switch h.command {
            case .read:
                try node.read(at: h.offset, into: r.data, flags: flags, via: root)
                if structured && !h.flags.contains(.df) { splitHoles(r) }
            case .write:
                try node.write(at: h.offset, from: UnsafeRawBufferPointer(r.data), flags: flags, via: root)
            case .flush:
                if noWait { return false }
                try node.flush(via: root)
            case .trim:
                if noWait { return false }
                try node.discard(at: h.offset, length: UInt64(h.length), flags: flags.union(.mayUnmap), via: root)
                if h.flags.contains(.fua) { try node.flush(via: root) }
            case .writeZeroes:
                if noWait { return false }
                if !h.flags.contains(.noHole) { flags.insert(.mayUnmap) }
                if h.flags.contains(.fastZero) { flags.insert(.noFallback) }
                try node.writeZeroes(at: h.offset, length: UInt64(h.length), flags: flags, via: root)
            case .cache:
                if noWait { return false }
                try node.prefetch(at: h.offset, length: UInt64(h.length), via: root)
            case .blockStatus:
                // Bitmap contexts answer from memory: no worker round trip.
                if noWait && !contexts.allSatisfy(\.isNonBlocking) { return false }
                r.replyBytes = try blockStatus(h, contexts: contexts)
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

    private static func blockStatus(_ h: RequestHeader, contexts: [any MetaContextProvider]) throws(BlockError) -> [UInt8] {
        var out: [UInt8] = []
        let maxExtents = h.flags.contains(.reqOne) ? 1 : maxExtents
        for (i, context) in contexts.enumerated() {
            var extents = try context.extents(offset: h.offset, length: UInt64(h.length), maxExtents: maxExtents)
            if extents.isEmpty {
                extents = [Transmission.Extent(length: h.length, flags: 0)]
            }
            let chunk = Transmission.blockStatusChunk(cookie: h.cookie, contextID: UInt32(i + 1), extents: extents,
                                                 done: i == contexts.count - 1)
            // One context (the usual case): the chunk is the reply, no second copy.
            if contexts.count == 1 { return chunk }
            out += chunk
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
        if n <= holeGranule {
            if data.isAllZero { r.chunks = [(0, n, true)] }
            return
        }
        var chunks: [(offset: Int, length: Int, hole: Bool)] = []
        var at = 0
        var sawHole = false
        while at < n {
            let len = min(holeGranule, n - at)
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
