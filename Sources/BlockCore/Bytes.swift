extension UnsafeRawBufferPointer {
    /// True when every byte is zero: a word at a time, and most data fails on the first word.
    /// Used to send holes instead of zero data (NBD sparse reads) and zero writes instead of
    /// zero bytes (job copies).
    @inlinable
    public var isAllZero: Bool {
        guard let base = baseAddress else { return true }
        let n = count
        var i = 0
        while i + 32 <= n {
            let a = base.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            let b = base.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)
            let c = base.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)
            let d = base.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)
            if (a | b | c | d) != 0 { return false }
            i += 32
        }
        while i < n {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }
}
