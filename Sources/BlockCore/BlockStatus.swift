/// What a node knows about the start of a range: one extent of uniform status.
///
/// Mirrors QEMU's `BDRV_BLOCK_*` bits: `data` (reads come from stored data), `zero` (reads
/// return zeroes), `allocated` (this layer decides the content; if false, reads fall through
/// to the backing child).
public struct BlockStatus: Sendable, Equatable {
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// Reads come from stored data (not a hole).
        public static let data = Flags(rawValue: 1 << 0)
        /// Reads return zeroes.
        public static let zero = Flags(rawValue: 1 << 1)
        /// This layer decides the content; without it reads fall through to the backing child.
        public static let allocated = Flags(rawValue: 1 << 2)
    }

    /// Bytes from the queried offset that share these flags; at least 1, at most the query length.
    public var length: UInt64
    public var flags: Flags
    /// Which layer decided the content, counted down the backing chain: 1 is the queried node,
    /// 2 its backing, …; 0 means no layer has it allocated. Filters do not count.
    public var depth: Int

    public init(length: UInt64, flags: Flags, depth: Int = 1) {
        self.length = length
        self.flags = flags
        self.depth = depth
    }

    public var isData: Bool { flags.contains(.data) }
    public var isZero: Bool { flags.contains(.zero) }
    public var isAllocated: Bool { flags.contains(.allocated) }
}
