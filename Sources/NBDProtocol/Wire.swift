/// Big-endian loads and stores over raw memory; the only byte-order code in the codec.
@inline(__always)
func loadBE<T: FixedWidthInteger>(_ base: UnsafeRawPointer, _ offset: Int, as: T.Type) -> T {
    T(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
}

@inline(__always)
func storeBE<T: FixedWidthInteger>(_ value: T, _ base: UnsafeMutableRawPointer, _ offset: Int) {
    base.storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self)
}

extension Array where Element == UInt8 {
    @inline(__always)
    mutating func appendBE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.bigEndian) { append(contentsOf: $0) }
    }
}

/// A cursor over a received option payload; every read is bounds-checked.
public struct PayloadReader {
    public let bytes: [UInt8]
    public private(set) var position = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - position }

    public mutating func u16() -> UInt16? {
        guard remaining >= 2 else { return nil }
        defer { position += 2 }
        return UInt16(bytes[position]) << 8 | UInt16(bytes[position + 1])
    }

    public mutating func u32() -> UInt32? {
        guard remaining >= 4 else { return nil }
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[position + i]) }
        position += 4
        return v
    }

    public mutating func take(_ n: Int) -> [UInt8]? {
        guard n >= 0, remaining >= n else { return nil }
        defer { position += n }
        return Array(bytes[position..<position + n])
    }

    /// A length-prefixed (u32) string.
    public mutating func string32() -> String? {
        guard let n = u32(), n <= UInt32(NBD.maxStringLength), let raw = take(Int(n)) else { return nil }
        return String(decoding: raw, as: UTF8.self)
    }
}
