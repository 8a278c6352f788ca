/// Options every node has (QEMU's `BlockdevOptionsBase`) that the block layer applies itself,
/// whatever the driver: `BlockNode` enforces `discard` and `detect-zeroes` on each request,
/// the file driver acts on `cache.*` (they are kept here too, for `query-named-block-nodes`).
public struct NodeOptions: Sendable, Equatable {
    /// `discard=ignore|unmap`.
    public enum Discard: String, Sendable, CaseIterable {
        /// Discard requests succeed and do nothing; zero writes never deallocate (QEMU's
        /// default for a node given with `blockdev-add`).
        case ignore
        /// Discards reach the driver; zero writes with `.mayUnmap` may deallocate.
        case unmap
    }

    /// `detect-zeroes=off|on|unmap`.
    public enum DetectZeroes: String, Sendable, CaseIterable {
        case off
        /// A write whose payload is all zeroes becomes a zero write (no `.mayUnmap`).
        case on
        /// As `on`, with `.mayUnmap`: zero writes may punch holes. Needs `discard=unmap`.
        case unmap
    }

    public var discard: Discard
    public var detectZeroes: DetectZeroes
    /// `cache.direct`: the file driver opens with `O_DIRECT`.
    public var cacheDirect: Bool
    /// `cache.no-flush`: the file driver skips `fdatasync` (flush and FUA succeed at once).
    public var cacheNoFlush: Bool

    /// The defaults of a node blockd opens itself (`blockd serve`, backing chains): discards
    /// and unmapping zero writes reach the storage. `blockdev-add` starts from `ignore`, as QEMU.
    public init(discard: Discard = .unmap, detectZeroes: DetectZeroes = .off,
                cacheDirect: Bool = false, cacheNoFlush: Bool = false) {
        self.discard = discard
        self.detectZeroes = detectZeroes
        self.cacheDirect = cacheDirect
        self.cacheNoFlush = cacheNoFlush
    }
}
