import BlockCore
import BlockDrivers
import Glibc
import JSON

/// One fuzz input is an 8-byte prefix (open mode and a seed for the operations) followed by a
/// qcow2 image file. The image is written to a temporary file and opened through the real
/// driver (`BlockdevFactory` → `QCOW2Opener` → `QCOW2Driver`): header and extensions, L1/L2,
/// refcounts, the bitmap directory, compressed clusters. Then it is read, written,
/// zeroed, discarded, block-status'd and flushed at offsets the seed picks, closed, and — when
/// everything succeeded — opened again read-only: it must open, and read back what was written.
///
/// Prefix byte 0: bit 0 read-only, bit 1 a 1 MiB null-co node as backing (otherwise
/// `backing: null`, so no file named in the image is ever opened), bit 2 lazy-refcounts,
/// bit 3 small caches, bit 4 discard-no-unref, bit 5 `.noWait` requests (the event-loop
/// path), bits 6-7 how many operations (4, 8, 16 or 32). Bytes 1-7: the seed.
enum QCOW2Fuzz {
    static let prefixSize = 8
    static let imagePath: String = FuzzSupport.scratchDirectory("qcow2") + "/image.qcow2"
    static let registered: Bool = {
        registerFormats()
        return true
    }()

    /// What the operations left in the image, for the reopen check: later ranges win.
    struct Shadow {
        /// `bytes` nil: unknown after a discard.
        var ranges: [(offset: UInt64, length: Int, bytes: [UInt8]?)] = []

        mutating func record(_ offset: UInt64, _ bytes: [UInt8]?, length: Int) {
            ranges.append((offset, length, bytes))
        }

        /// For range `i`: the bytes expected there now, as runs of (start within the range,
        /// bytes), with what later writes replaced and later discards made unknown.
        func expected(_ i: Int) -> [(Int, ArraySlice<UInt8>)] {
            let r = ranges[i]
            guard var bytes = r.bytes else { return [] }
            var known = [(0, r.length)]          // half-open runs still known
            for later in ranges[(i + 1)...] {
                let lo = max(r.offset, later.offset), hi = min(r.offset + UInt64(r.length), later.offset + UInt64(later.length))
                guard lo < hi else { continue }
                let a = Int(lo - r.offset), b = Int(hi - r.offset)
                if let newer = later.bytes {
                    let from = Int(lo - later.offset)
                    bytes.replaceSubrange(a..<b, with: newer[from..<(from + b - a)])
                } else {
                    known = known.flatMap { run -> [(Int, Int)] in
                        if run.1 <= a || run.0 >= b { return [run] }
                        return [(run.0, a), (b, run.1)].filter { $0.0 < $0.1 }
                    }
                }
            }
            return known.map { ($0.0, bytes[$0.0..<$0.1]) }
        }
    }

    static func run(_ data: [UInt8]) -> [String] {
        guard data.count > prefixSize, registered else { return [] }
        let mode = data[0]
        var seed: UInt64 = 0
        for b in data[1..<prefixSize] { seed = seed << 8 | UInt64(b) }
        let original = Array(data[prefixSize...])
        FuzzSupport.writeFile(imagePath, original)
        // Only an image qemu-img check would pass is held to the data and consistency oracles.
        let consistent = QCOW2Consistency.check(original) == .consistent

        let readOnly = mode & 1 != 0
        let noWait = mode & (1 << 5) != 0
        let registry = FuzzRegistry()
        var options: JSONObject = ["driver": "qcow2", "node-name": "img",
                                   "file": ["driver": "file", "filename": .string(imagePath), "read-only": .bool(readOnly)],
                                   "read-only": .bool(readOnly)]
        if mode & 2 != 0 {
            do {
                _ = try BlockdevFactory.open(["driver": "null-co", "node-name": "bk", "size": .int(1 << 20), "read-zeroes": true], in: registry)
            } catch {
                return ["cannot open the null-co backing node: \(error)"]
            }
            options["backing"] = "bk"
        } else {
            options["backing"] = .null
        }
        if mode & 4 != 0 { options["lazy-refcounts"] = true }
        if mode & 8 != 0 { options["l2-cache-size"] = 4096; options["refcount-cache-size"] = 4096 }
        if mode & 16 != 0 { options["discard-no-unref"] = true }

        let node: BlockNode
        do {
            node = try BlockdevFactory.open(options, in: registry)
        } catch {
            _ = registry.closeAll()
            return []                      // refused with an error: what a bad image should get
        }
        var rng = FuzzRandom(seed: seed)
        var shadow = Shadow()
        var failed = false
        let length = node.length
        let operations = 4 << Int(mode >> 6)
        let flags: RequestFlags = noWait ? [.noWait] : []
        var buffer = [UInt8](repeating: 0, count: 32 << 10)
        /// The byte values written (each write is one odd value repeated), for the metadata oracle.
        var patterns = Set<UInt8>()

        func place(_ maxLength: UInt64) -> (UInt64, UInt64) {
            guard length > 0 else { return (0, 0) }
            // Cluster-aligned or not, near the start, the end, or anywhere.
            var offset: UInt64
            switch rng.below(4) {
            case 0: offset = rng.below(min(length, 1 << 20))
            case 1: offset = length - min(length, rng.below(1 << 20) + 1)
            case 2: offset = rng.below(length) & ~0xffff
            default: offset = rng.below(length)
            }
            if rng.below(2) == 0 { offset &= ~511 }
            let count = min(length - offset, rng.below(maxLength) + 1)
            return (offset, count)
        }

        let trace = getenv("BLOCKD_FUZZ_TRACE") != nil
        if trace {
            FuzzSupport.trace("qcow2 fuzz: mode \(String(mode, radix: 16)), \(length) bytes, \(operations) operations, "
                              + "image \(QCOW2Consistency.check(original))")
        }
        for _ in 0..<operations {
            let (offset, count) = place(UInt64(buffer.count))
            let n = Int(count)
            let op = rng.below(9)
            if trace { FuzzSupport.trace("  \(["read", "read", "write", "write", "zeroes", "discard", "status", "status-above", "flush"][Int(op)]) \(offset)+\(count)") }
            do throws(BlockError) {
                switch op {
                case 0, 1:
                    try typed {
                        try buffer.withUnsafeMutableBytes { p in
                            try node.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: p[0..<n]), flags: flags)
                        }
                    }
                case 2, 3:
                    if readOnly { continue }
                    let byte = UInt8(truncatingIfNeeded: rng.next() | 1)
                    patterns.insert(byte)
                    let bytes = [UInt8](repeating: byte, count: n)
                    try typed { try bytes.withUnsafeBytes { p in try node.write(at: offset, from: p, flags: flags) } }
                    shadow.record(offset, bytes, length: n)
                case 4:
                    if readOnly { continue }
                    let zeroFlags: RequestFlags = rng.below(2) == 0 ? flags.union(.mayUnmap) : flags
                    try node.writeZeroes(at: offset, length: count, flags: zeroFlags)
                    shadow.record(offset, [UInt8](repeating: 0, count: n), length: n)
                case 5:
                    if readOnly { continue }
                    try node.discard(at: offset, length: count, flags: flags)
                    shadow.record(offset, nil, length: n)
                case 6:
                    _ = try node.blockStatus(at: offset, length: max(count, 1))
                case 7:
                    _ = try node.blockStatusAbove(at: offset, length: max(count, 1))
                default:
                    if !noWait { try node.flush() }
                }
            } catch {
                if trace { FuzzSupport.trace("    -> \(error.message)") }
                // `.wouldBlock` must change nothing; other errors end the read-back check.
                if error.errno != BlockError.wouldBlock.errno { failed = true }
            }
        }
        // Persistent bitmaps found in the image were loaded and marked; close writes them back.
        let closeErrors = registry.closeAll()
        if readOnly {
            if FuzzSupport.fileSize(imagePath) != original.count || FuzzSupport.readFile(imagePath) != original {
                return ["a read-only open changed the image file"]
            }
            return []
        }
        // Whatever the image's refcounts say, guest data never lands on its metadata (QEMU's
        // overlap check; an image that calls its L1 table free must not get data there).
        // Metadata the check looks at lies within the original image's bytes.
        if let problem = metadataOverwritten(original: original,
                                             now: FuzzSupport.readFile(imagePath, limit: original.count) ?? [],
                                             patterns: patterns) {
            return [problem]
        }
        if failed || !closeErrors.isEmpty || !consistent { return [] }

        // Everything succeeded on a consistent image: it is still consistent (leaks allowed),
        // opens again and holds what was written.
        // The in-memory check reads the whole file; a file grown past 256 MiB (clusters placed
        // after what a corrupt refcount table claims) is checked by reopening and reading back only.
        let grown = (FuzzSupport.fileSize(imagePath) ?? 0) > 256 << 20
        switch grown ? .consistent : QCOW2Consistency.check(FuzzSupport.readFile(imagePath) ?? []) {
        case .consistent: break
        case .inconsistent(let why): return ["blockd left an inconsistent image: \(why)"]
        case .unsupported(let why): return ["after a clean close the image cannot be checked: \(why)"]
        }
        let again = FuzzRegistry()
        var reopen = options
        reopen["read-only"] = true
        reopen["file"] = ["driver": "file", "filename": .string(imagePath), "read-only": true]
        if mode & 2 != 0 {
            _ = try? BlockdevFactory.open(["driver": "null-co", "node-name": "bk", "size": .int(1 << 20), "read-zeroes": true], in: again)
        }
        let check: BlockNode
        do {
            check = try BlockdevFactory.open(reopen, in: again)
        } catch {
            return ["an image blockd wrote and closed without error no longer opens: \(error.message)"]
        }
        defer { _ = again.closeAll() }
        var problems: [String] = []
        for (i, r) in shadow.ranges.enumerated() where r.bytes != nil && r.length > 0 {
            var got = [UInt8](repeating: 0, count: r.length)
            do throws(BlockError) {
                try typed { try got.withUnsafeMutableBytes { p in try check.read(at: r.offset, into: p) } }
            } catch {
                problems.append("reading back \(r.offset)+\(r.length) after reopen: \(error.message)")
                break
            }
            for (start, want) in shadow.expected(i) where !FuzzSupport.equal(got[start..<(start + want.count)], want) {
                problems.append("\(r.offset + UInt64(start))+\(want.count) reads back other bytes after reopen than were written")
                break
            }
            if !problems.isEmpty { break }
        }
        return problems
    }
}

extension QCOW2Fuzz {
    /// Whether guest data was written over the input image's header, L1 table or refcount
    /// table (where its header put them): an 8-byte word there that changed and now holds one
    /// of the written patterns (an odd byte repeated, which no valid header field, L1 entry or
    /// refcount table entry is: their low bits are zero).
    static func metadataOverwritten(original: [UInt8], now: [UInt8], patterns: Set<UInt8>) -> String? {
        guard original.count >= 72, !patterns.isEmpty else { return nil }
        func be32(_ at: Int) -> UInt64 { (0..<4).reduce(UInt64(0)) { $0 << 8 | UInt64(original[at + $1]) } }
        func be64(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(original[at + $1]) } }
        let clusterBits = be32(20)
        guard clusterBits >= 9 && clusterBits <= 21 else { return nil }
        let regions: [(name: String, offset: UInt64, length: UInt64)] = [
            ("header", 0, 72),
            ("L1 table", be64(40), be32(36) * 8),
            ("refcount table", be64(48), be32(56) << clusterBits),
        ]
        for r in regions {
            let start = min(r.offset, UInt64(original.count)) & ~7
            let end = min(r.offset &+ min(r.length, 1 << 20), UInt64(min(original.count, now.count)))
            var at = Int(start)
            while at + 8 <= Int(end) {
                let word = now[at..<(at + 8)]
                if word != original[at..<(at + 8)], let b = word.first, patterns.contains(b), word.allSatisfy({ $0 == b }) {
                    return "guest data (0x\(String(b, radix: 16)) bytes) was written over the \(r.name) at \(at)"
                }
                at += 8
            }
        }
        return nil
    }
}

/// Runs an untyped-throwing body (the stdlib's `withUnsafe…` rethrow untyped) as
/// `throws(BlockError)`.
func typed<T>(_ body: () throws -> T) throws(BlockError) -> T {
    do { return try body() } catch let e as BlockError { throw e } catch { throw BlockError.io("\(error)") }
}
