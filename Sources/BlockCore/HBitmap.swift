#if canImport(Glibc)
import Glibc
#endif

/// A hierarchical bitset: a flat array of 64-bit words (one bit per item) plus two small
/// summary pyramids, so "next set bit from X" and "next clear bit from X" cost one step per
/// level (six levels cover 2^36 bits) whatever the distance, and memory stays at one bit per
/// item plus about 1/32 for the summaries.
///
/// - `any[k]`: bit j set iff word j one level down is non-zero (has a set bit).
/// - `full[k]`: bit j set iff word j one level down is all ones (bits past the end count as
///   ones, so a search for clear bits never finds padding above level 0).
///
/// Words are allocated with `calloc`, so pages of a mostly clean bitmap are never touched.
/// Not thread-safe: the owner (`DirtyBitmap`) keeps it behind a `Mutex`; it is `@unchecked
/// Sendable` only so that a copy can cross into that lock (`merge`).
public final class HBitmap: @unchecked Sendable {
    /// Number of bits.
    public let count: Int
    /// Number of set bits.
    public private(set) var popcount: Int = 0
    let wordCount: Int
    let words: UnsafeMutablePointer<UInt64>
    /// Summary levels, bottom (level 1) first; the last has a single word.
    /// (`let`s, filled in `init`: `var` arrays in a class cost a dynamic exclusivity check on
    /// every access, which dominated extent scans.)
    private let any: [UnsafeMutablePointer<UInt64>]
    private let full: [UnsafeMutablePointer<UInt64>]
    /// Word counts per level, level 0 (the bits themselves) first.
    private let levelWords: [Int]

    public init(count: Int) {
        precondition(count >= 0)
        self.count = count
        wordCount = max(1, (count + 63) >> 6)
        words = calloc(wordCount, 8)!.bindMemory(to: UInt64.self, capacity: wordCount)
        var levelWords = [wordCount]
        var any: [UnsafeMutablePointer<UInt64>] = []
        var full: [UnsafeMutablePointer<UInt64>] = []
        var below = wordCount
        while below > 1 {
            let n = (below + 63) >> 6
            let a = calloc(n, 8)!.bindMemory(to: UInt64.self, capacity: n)
            let f = calloc(n, 8)!.bindMemory(to: UInt64.self, capacity: n)
            // Children that do not exist count as full.
            for j in below..<(n << 6) { f[j >> 6] |= 1 << UInt64(j & 63) }
            any.append(a)
            full.append(f)
            levelWords.append(n)
            below = n
        }
        self.levelWords = levelWords
        self.any = any
        self.full = full
    }

    deinit {
        free(words)
        for p in any { free(p) }
        for p in full { free(p) }
    }

    /// Bytes of memory held (words and summaries).
    public var memoryBytes: Int { levelWords[0] * 8 + 2 * 8 * levelWords.dropFirst().reduce(0, +) }

    /// Bits of word `j` of level 0 that lie past `count`.
    @inline(__always)
    private func padding(_ j: Int) -> UInt64 {
        let valid = count - j * 64
        if valid >= 64 { return 0 }
        if valid <= 0 { return ~0 }
        return ~0 << UInt64(valid)
    }

    @inline(__always)
    private static func mask(_ lo: Int, _ hi: Int) -> UInt64 {
        // Bits [lo, hi) of a word, 0 <= lo < hi <= 64.
        let upper: UInt64 = hi == 64 ? ~0 : (1 << UInt64(hi)) - 1
        return upper & ~((1 << UInt64(lo)) - 1)
    }

    public func get(_ i: Int) -> Bool {
        precondition(i >= 0 && i < count)
        return words[i >> 6] & (1 << UInt64(i & 63)) != 0
    }

    /// Sets bits [lo, hi). Returns how many were newly set.
    @discardableResult
    public func set(_ lo: Int, _ hi: Int) -> Int { modify(lo, min(hi, count), set: true) }

    /// Clears bits [lo, hi). Returns how many were set before.
    @discardableResult
    public func clear(_ lo: Int, _ hi: Int) -> Int { modify(lo, min(hi, count), set: false) }

    public func clearAll() {
        if popcount == 0 { return }
        memset(words, 0, wordCount * 8)
        popcount = 0
        for k in 0..<any.count {
            memset(any[k], 0, levelWords[k + 1] * 8)
            memset(full[k], 0, levelWords[k + 1] * 8)
            let below = levelWords[k]
            for j in below..<(levelWords[k + 1] << 6) { full[k][j >> 6] |= 1 << UInt64(j & 63) }
        }
    }

    private func modify(_ lo: Int, _ hi: Int, set: Bool) -> Int {
        guard lo < hi, lo >= 0 else { return 0 }
        let wlo = lo >> 6
        let whi = (hi - 1) >> 6
        var changed = 0
        for j in wlo...whi {
            let a = j == wlo ? lo & 63 : 0
            let b = j == whi ? ((hi - 1) & 63) + 1 : 64
            let m = HBitmap.mask(a, b)
            let old = words[j]
            let new = set ? old | m : old & ~m
            if new != old {
                changed += (old ^ new).nonzeroBitCount
                words[j] = new
            }
        }
        popcount += set ? changed : -changed
        if changed != 0 { updateSummaries(wlo, whi) }
        return changed
    }

    /// Recomputes the summary bits above words [wlo, whi] of level 0.
    func updateSummaries(_ wlo: Int, _ whi: Int) {
        var lo = wlo
        var hi = whi
        for k in 0..<any.count {
            let a = any[k]
            let f = full[k]
            for j in lo...hi {
                let isAny: Bool
                let isFull: Bool
                if k == 0 {
                    let w = words[j]
                    isAny = w != 0
                    isFull = (w | padding(j)) == ~0
                } else {
                    isAny = any[k - 1][j] != 0
                    isFull = full[k - 1][j] == ~0
                }
                let bit: UInt64 = 1 << UInt64(j & 63)
                if isAny { a[j >> 6] |= bit } else { a[j >> 6] &= ~bit }
                if isFull { f[j >> 6] |= bit } else { f[j >> 6] &= ~bit }
            }
            lo >>= 6
            hi >>= 6
        }
    }

    /// First set bit at or after `from`, or nil.
    public func nextSet(from: Int) -> Int? {
        guard from < count else { return nil }
        let r = find(level: 0, from: max(0, from), clear: false)
        guard let r, r < count else { return nil }
        return r
    }

    /// First clear bit at or after `from`, or nil.
    public func nextClear(from: Int) -> Int? {
        guard from < count else { return nil }
        let r = find(level: 0, from: max(0, from), clear: true)
        guard let r, r < count else { return nil }
        return r
    }

    @inline(__always)
    private func word(_ level: Int, _ j: Int, clear: Bool) -> UInt64 {
        if level == 0 { return clear ? ~words[j] : words[j] }
        return clear ? ~full[level - 1][j] : any[level - 1][j]
    }

    private func find(level: Int, from pos: Int, clear: Bool) -> Int? {
        let wi = pos >> 6
        if wi >= levelWords[level] { return nil }
        let w = word(level, wi, clear: clear) & (~0 << UInt64(pos & 63))
        if w != 0 { return wi << 6 + w.trailingZeroBitCount }
        if level + 1 >= levelWords.count { return nil }
        guard let next = find(level: level + 1, from: wi + 1, clear: clear) else { return nil }
        if next >= levelWords[level] { return nil }
        let w2 = word(level, next, clear: clear)
        if w2 == 0 { return nil }
        return next << 6 + w2.trailingZeroBitCount
    }

    /// True when every bit of [lo, hi) is set.
    public func allSet(_ lo: Int, _ hi: Int) -> Bool {
        guard lo < hi else { return true }
        guard let c = nextClear(from: lo) else { return true }
        return c >= hi
    }

    /// Sets every bit that is set in `other` (same count).
    public func formUnion(_ other: HBitmap) {
        precondition(other.count == count)
        var at = 0
        while let s = other.nextSet(from: at) {
            let e = other.nextClear(from: s) ?? count
            set(s, e)
            at = e
        }
    }

    // MARK: serialisation (the qcow2 bitmap layout: bit n of byte m is item 8m+n)

    /// Bytes of the serialised form.
    public var byteCount: Int { (count + 7) / 8 }

    /// Copies serialised bytes [offset, offset+dst.count) into `dst`; bytes past the end are zero.
    public func copyBytes(from offset: Int, into dst: UnsafeMutableRawBufferPointer) {
        memset(dst.baseAddress!, 0, dst.count)
        let avail = wordCount * 8 - offset
        if avail <= 0 { return }
        let n = min(dst.count, avail)
        memcpy(dst.baseAddress!, UnsafeRawPointer(words) + offset, n)
        // Bits past `count` are never set, so the copy is exact.
    }

    /// ORs serialised bytes into the bitmap at byte `offset`.
    public func orBytes(at offset: Int, from src: UnsafeRawBufferPointer) {
        let avail = wordCount * 8 - offset
        if avail <= 0 || src.isEmpty { return }
        let n = min(src.count, avail)
        let firstWord = offset / 8
        let lastWord = (offset + n - 1) / 8
        let dst = UnsafeMutableRawPointer(words)
        var before = 0
        for j in firstWord...lastWord { before += words[j].nonzeroBitCount }
        for i in 0..<n {
            let p = dst.advanced(by: offset + i)
            p.storeBytes(of: p.load(as: UInt8.self) | src[i], as: UInt8.self)
        }
        var after = 0
        for j in firstWord...lastWord {
            words[j] &= ~padding(j)
            after += words[j].nonzeroBitCount
        }
        popcount += after - before
        updateSummaries(firstWord, lastWord)
    }

    /// Word `j` of level 0 (64 items from 64j).
    public func word(at j: Int) -> UInt64 { j < wordCount ? words[j] : 0 }
}
