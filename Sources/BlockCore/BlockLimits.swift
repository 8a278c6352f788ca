/// Request size constraints a node advertises (NBD `NBD_INFO_BLOCK_SIZE`).
public struct BlockLimits: Sendable, Equatable {
    /// Smallest unit of I/O the node handles without read-modify-write.
    public var minimum: UInt32
    /// Preferred unit; smaller or unaligned requests may cost more.
    public var preferred: UInt32
    /// Largest request payload accepted.
    public var maximum: UInt32
    /// Unit in which the node allocates storage, a power of two from 512 to 64 KiB: holes
    /// start and end on its multiples (a qcow2 cluster, a file system block). Sparse NBD
    /// reads split data and hole chunks at it, where QEMU splits at its block status.
    /// 64 KiB when unknown.
    public var allocationUnit: UInt32

    public init(minimum: UInt32 = 1, preferred: UInt32 = 4096, maximum: UInt32 = 32 << 20,
                allocationUnit: UInt32 = 65536) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
        self.allocationUnit = allocationUnit
    }

    /// `n` as an allocation unit: the power of two at or below it, within 512...65536.
    public static func allocationUnit(_ n: UInt64) -> UInt32 {
        let clamped = min(max(n, 512), 65536)
        return UInt32(1) << UInt32(63 - clamped.leadingZeroBitCount)
    }
}
