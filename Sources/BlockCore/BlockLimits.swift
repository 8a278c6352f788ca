/// Request size constraints a node advertises (NBD `NBD_INFO_BLOCK_SIZE`).
public struct BlockLimits: Sendable, Equatable {
    /// Smallest unit of I/O the node handles without read-modify-write.
    public var minimum: UInt32
    /// Preferred unit; smaller or unaligned requests may cost more.
    public var preferred: UInt32
    /// Largest request payload accepted.
    public var maximum: UInt32

    public init(minimum: UInt32 = 1, preferred: UInt32 = 4096, maximum: UInt32 = 32 << 20) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
    }
}
