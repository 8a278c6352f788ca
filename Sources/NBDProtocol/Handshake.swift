/// Codec for the fixed newstyle handshake. Pure: bytes in, values out.
public enum Handshake {
    /// The server's first 18 bytes: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
    public static func greeting(flags: UInt16 = NBD.flagFixedNewstyle | NBD.flagNoZeroes) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(18)
        out.appendBE(NBD.initMagic)
        out.appendBE(NBD.optMagic)
        out.appendBE(flags)
        return out
    }

    /// One client option header: `IHAVEOPT`, option code, payload length.
    public struct OptionHeader: Sendable, Equatable {
        public var option: UInt32
        public var length: UInt32
    }

    public enum ParseError: Error, Sendable, Equatable {
        case badMagic(UInt64)
        case unknownClientFlags(UInt32)
        case optionTooLong(UInt32)
    }

    /// Parses the 4-byte client flags; nil if fewer bytes are there.
    public static func parseClientFlags(_ bytes: UnsafeRawBufferPointer) throws(ParseError) -> UInt32? {
        guard bytes.count >= 4 else { return nil }
        let flags: UInt32 = loadBE(bytes.baseAddress!, 0, as: UInt32.self)
        if flags & ~(NBD.clientFixedNewstyle | NBD.clientNoZeroes) != 0 { throw .unknownClientFlags(flags) }
        return flags
    }

    /// Parses a 16-byte option header; nil if fewer bytes are there.
    public static func parseOptionHeader(_ bytes: UnsafeRawBufferPointer) throws(ParseError) -> OptionHeader? {
        guard bytes.count >= 16 else { return nil }
        let base = bytes.baseAddress!
        let magic: UInt64 = loadBE(base, 0, as: UInt64.self)
        guard magic == NBD.optMagic else { throw .badMagic(magic) }
        let option: UInt32 = loadBE(base, 8, as: UInt32.self)
        let length: UInt32 = loadBE(base, 12, as: UInt32.self)
        if length > NBD.maxOptionLength { throw .optionTooLong(length) }
        return OptionHeader(option: option, length: length)
    }

    /// An option reply: magic, option, reply type, payload.
    public static func optionReply(option: UInt32, type: OptionReplyType, payload: [UInt8] = []) -> [UInt8] {
        optionReply(option: option, rawType: type.rawValue, payload: payload)
    }

    public static func optionReply(option: UInt32, rawType: UInt32, payload: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(20 + payload.count)
        out.appendBE(NBD.optReplyMagic)
        out.appendBE(option)
        out.appendBE(rawType)
        out.appendBE(UInt32(payload.count))
        out.append(contentsOf: payload)
        return out
    }

    /// An error reply with a message for people (the spec allows UTF-8 text in error replies).
    public static func errorReply(option: UInt32, type: OptionReplyType, message: String) -> [UInt8] {
        optionReply(option: option, type: type, payload: Array(message.utf8))
    }

    /// The text of an error option reply (`NBD_REP_ERR_*`, high bit set) that starts `bytes`;
    /// nil for any other reply. Used to log refusals in one line.
    public static func errorMessage(inReply bytes: [UInt8]) -> String? {
        guard bytes.count >= 20 else { return nil }
        let type = bytes.withUnsafeBytes { loadBE($0.baseAddress!, 12, as: UInt32.self) }
        guard type & 0x8000_0000 != 0 else { return nil }
        let length = Int(bytes.withUnsafeBytes { loadBE($0.baseAddress!, 16, as: UInt32.self) })
        let text = String(decoding: bytes[20..<min(bytes.count, 20 + length)], as: UTF8.self)
        let name = OptionReplyType(rawValue: type).map { "\($0)" } ?? "error \(type)"
        return text.isEmpty ? name : "\(name): \(text)"
    }

    /// `NBD_REP_SERVER` payload for `NBD_OPT_LIST`.
    public static func serverReplyPayload(name: String, description: String?) -> [UInt8] {
        var out: [UInt8] = []
        let n = Array(name.utf8)
        out.appendBE(UInt32(n.count))
        out.append(contentsOf: n)
        if let description { out.append(contentsOf: Array(description.utf8)) }
        return out
    }

    /// `NBD_INFO_EXPORT`: size and transmission flags.
    public static func infoExport(size: UInt64, flags: TransmissionFlags) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(InfoType.export.rawValue)
        out.appendBE(size)
        out.appendBE(flags.rawValue)
        return out
    }

    public static func infoName(_ name: String) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(InfoType.name.rawValue)
        out.append(contentsOf: Array(name.utf8))
        return out
    }

    public static func infoDescription(_ text: String) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(InfoType.description.rawValue)
        out.append(contentsOf: Array(text.utf8))
        return out
    }

    /// Block size constraints made to satisfy the spec's rules for `NBD_INFO_BLOCK_SIZE`:
    /// the minimum a power of two no larger than 64 KiB; the preferred a power of two at least
    /// max(minimum, 512); the maximum a multiple of the minimum, at least as large as the
    /// smaller of the preferred size and the export, and at most `cap`.
    public static func blockSizes(minimum: UInt32, preferred: UInt32, maximum: UInt32, exportSize: UInt64,
                                  cap: UInt32) -> (minimum: UInt32, preferred: UInt32, maximum: UInt32) {
        func powerOfTwo(atLeast n: UInt32) -> UInt32 {
            n <= 1 ? 1 : (n > 1 << 31 ? 1 << 31 : 1 << UInt32(32 - (n - 1).leadingZeroBitCount))
        }
        let minimum = min(powerOfTwo(atLeast: max(1, minimum)), 65536)
        let preferred = powerOfTwo(atLeast: max(preferred, minimum, 512))
        var maximum = min(maximum == 0 ? cap : maximum, cap)
        let floor = UInt32(min(UInt64(preferred), exportSize))
        maximum = max(maximum, floor, minimum)
        maximum -= maximum % minimum
        if maximum < floor { maximum += minimum }
        return (minimum, preferred, maximum)
    }

    public static func infoBlockSize(minimum: UInt32, preferred: UInt32, maximum: UInt32) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(InfoType.blockSize.rawValue)
        out.appendBE(minimum)
        out.appendBE(preferred)
        out.appendBE(maximum)
        return out
    }

    /// `NBD_REP_META_CONTEXT` payload: context id and name.
    public static func metaContextPayload(id: UInt32, name: String) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(id)
        out.append(contentsOf: Array(name.utf8))
        return out
    }

    /// The reply to the old `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless
    /// the client negotiated `NO_ZEROES`.
    public static func exportNameReply(size: UInt64, flags: TransmissionFlags, noZeroes: Bool) -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(size)
        out.appendBE(flags.rawValue)
        if !noZeroes { out.append(contentsOf: [UInt8](repeating: 0, count: 124)) }
        return out
    }

    /// Parsed `NBD_OPT_INFO`/`NBD_OPT_GO` payload.
    public struct InfoRequest: Sendable, Equatable {
        public var name: String
        public var requests: [UInt16]
    }

    public static func parseInfoRequest(_ payload: [UInt8]) -> InfoRequest? {
        var r = PayloadReader(payload)
        guard let name = r.string32(), let count = r.u16() else { return nil }
        var requests: [UInt16] = []
        for _ in 0..<count {
            guard let t = r.u16() else { return nil }
            requests.append(t)
        }
        guard r.remaining == 0 else { return nil }
        return InfoRequest(name: name, requests: requests)
    }

    /// Parsed `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` payload.
    public struct MetaContextRequest: Sendable, Equatable {
        public var exportName: String
        public var queries: [String]
    }

    public static func parseMetaContextRequest(_ payload: [UInt8]) -> MetaContextRequest? {
        var r = PayloadReader(payload)
        guard let name = r.string32(), let count = r.u32() else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let q = r.string32() else { return nil }
            queries.append(q)
        }
        guard r.remaining == 0 else { return nil }
        return MetaContextRequest(exportName: name, queries: queries)
    }
}
