/// One transmission-phase request header: compact (28 bytes on the wire, 32-bit length) or,
/// once `NBD_OPT_EXTENDED_HEADERS` is negotiated, extended (32 bytes, 64-bit length).
public struct RequestHeader: Sendable, Equatable {
    public var flags: CommandFlags
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    /// Effect length, or the length of the payload that follows (`NBD_CMD_WRITE`, and with
    /// extended headers any request flagged `NBD_CMD_FLAG_PAYLOAD_LEN`).
    public var length: UInt64

    public init(flags: CommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt64) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// Size of a compact request header.
    public static let size = 28
    /// Size of an extended request header.
    public static let extendedSize = 32

    public var command: Command? { Command(rawValue: type) }

    /// Bytes of payload that follow this header on the wire (compact headers).
    public var payloadLength: Int { payloadLength(extended: false) }

    /// Bytes of payload that follow this header on the wire. With extended headers a write
    /// always carries its payload (a client that forgets `PAYLOAD_LEN` on a write still
    /// sends the data, as QEMU tolerates), and any other request does when it is flagged.
    public func payloadLength(extended: Bool) -> Int {
        if type == Command.write.rawValue || (extended && flags.contains(.payloadLen)) {
            return Int(clamping: length)
        }
        return 0
    }
}

/// A request the connection cannot answer in place: the stream is lost (bad magic), or its
/// payload is too large to take (compact headers: skipped and answered `EINVAL`; extended
/// headers: the spec asks for a hard disconnect).
public enum TransmissionError: Error, Sendable, Equatable {
    case badMagic(UInt32)
    case payloadTooLarge(UInt64)
}

public enum Transmission {
    /// Largest request payload accepted (and advertised maximum block size); larger writes are
    /// a protocol error (we cannot skip their payload safely without reading it all).
    public static let maxPayload: UInt32 = 32 << 20

    /// Parses one compact request header; nil means "need more bytes".
    @inline(__always)
    public static func parseRequest(_ base: UnsafeRawPointer, count: Int) throws(TransmissionError) -> RequestHeader? {
        guard count >= RequestHeader.size else { return nil }
        let magic: UInt32 = loadBE(base, 0, as: UInt32.self)
        guard magic == NBD.requestMagic else { throw .badMagic(magic) }
        let flags = CommandFlags(rawValue: loadBE(base, 4, as: UInt16.self))
        let type: UInt16 = loadBE(base, 6, as: UInt16.self)
        let cookie: UInt64 = loadBE(base, 8, as: UInt64.self)
        let offset: UInt64 = loadBE(base, 16, as: UInt64.self)
        let length = UInt64(loadBE(base, 24, as: UInt32.self))
        if type == Command.write.rawValue && length > UInt64(maxPayload) { throw .payloadTooLarge(length) }
        return RequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
    }

    /// Parses one extended request header (magic `0x21e41c71`, 64-bit length); nil means
    /// "need more bytes". A payload over `maxPayload` throws `payloadTooLarge`.
    @inline(__always)
    public static func parseExtendedRequest(_ base: UnsafeRawPointer, count: Int) throws(TransmissionError) -> RequestHeader? {
        guard count >= RequestHeader.extendedSize else { return nil }
        let magic: UInt32 = loadBE(base, 0, as: UInt32.self)
        guard magic == NBD.extendedRequestMagic else { throw .badMagic(magic) }
        let flags = CommandFlags(rawValue: loadBE(base, 4, as: UInt16.self))
        let type: UInt16 = loadBE(base, 6, as: UInt16.self)
        let cookie: UInt64 = loadBE(base, 8, as: UInt64.self)
        let offset: UInt64 = loadBE(base, 16, as: UInt64.self)
        let length: UInt64 = loadBE(base, 24, as: UInt64.self)
        let header = RequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
        if header.payloadLength(extended: true) > 0 && length > UInt64(maxPayload) { throw .payloadTooLarge(length) }
        return header
    }

    /// Parses a compact or an extended header, as negotiated.
    @inline(__always)
    public static func parseRequest(_ base: UnsafeRawPointer, count: Int, extended: Bool) throws(TransmissionError) -> RequestHeader? {
        extended ? try parseExtendedRequest(base, count: count) : try parseRequest(base, count: count)
    }

    /// Encodes a compact request header (28 bytes); the length must fit 32 bits.
    public static func encodeRequest(_ r: RequestHeader, into base: UnsafeMutableRawPointer) {
        storeBE(NBD.requestMagic, base, 0)
        storeBE(r.flags.rawValue, base, 4)
        storeBE(r.type, base, 6)
        storeBE(r.cookie, base, 8)
        storeBE(r.offset, base, 16)
        storeBE(UInt32(truncatingIfNeeded: r.length), base, 24)
    }

    /// Encodes an extended request header (32 bytes).
    public static func encodeExtendedRequest(_ r: RequestHeader, into base: UnsafeMutableRawPointer) {
        storeBE(NBD.extendedRequestMagic, base, 0)
        storeBE(r.flags.rawValue, base, 4)
        storeBE(r.type, base, 6)
        storeBE(r.cookie, base, 8)
        storeBE(r.offset, base, 16)
        storeBE(r.length, base, 24)
    }

    /// What the server negotiated for one export, used to validate requests.
    public struct Limits: Sendable {
        public var size: UInt64
        public var readOnly: Bool
        public var maxPayload: UInt32
        /// Structured replies or extended headers (both give reads a chunked reply).
        public var structuredReplies: Bool
        public var hasMetaContexts: Bool
        public var extendedHeaders: Bool
        public init(size: UInt64, readOnly: Bool, maxPayload: UInt32, structuredReplies: Bool, hasMetaContexts: Bool,
                    extendedHeaders: Bool = false) {
            self.size = size
            self.readOnly = readOnly
            self.maxPayload = maxPayload
            self.structuredReplies = structuredReplies || extendedHeaders
            self.hasMetaContexts = hasMetaContexts
            self.extendedHeaders = extendedHeaders
        }
    }

    /// Checks a parsed request against the export (nbdkit `validate_request`); returns the
    /// error to reply with, or nil when the request may run. Never traps on client input.
    ///
    /// - `NBD_CMD_FLAG_FUA` is accepted on every command: `NBD_FLAG_SEND_FUA` is always
    ///   advertised, and then the spec says the server "MUST accept all commands with this
    ///   bit set" (it means nothing where nothing is written).
    /// - Past the end: `ENOSPC` for writes and write-zeroes, `EINVAL` otherwise (the spec's
    ///   SHOULDs, nbdkit and QEMU); a write-type request to a read-only export is `EPERM` first.
    /// - A zero-length block status is `EINVAL` (QEMU: "need non-zero length"); the answer
    ///   would need a descriptor of length 0, which the spec forbids.
    public static func validate(_ r: RequestHeader, _ limits: Limits) -> NBDErrorCode? {
        guard let command = r.command else { return .inval }
        var allowed: CommandFlags = [.fua]
        switch command {
        case .read:
            if limits.structuredReplies { allowed.insert(.df) }
        case .write:
            if limits.extendedHeaders { allowed.insert(.payloadLen) }
        case .writeZeroes:
            allowed.formUnion([.noHole, .fastZero])
        case .blockStatus:
            allowed.insert(.reqOne)
            if limits.extendedHeaders { allowed.insert(.payloadLen) }
        case .trim, .flush, .cache, .disconnect, .resize:
            break
        }
        if !r.flags.subtracting(allowed).isEmpty { return .inval }
        let writes = command == .write || command == .trim || command == .writeZeroes
        switch command {
        case .disconnect:
            return nil
        case .flush:
            if r.offset != 0 || r.length != 0 { return .inval }
            return nil
        case .resize:
            return .inval
        case .read, .write, .cache:
            if r.length > UInt64(limits.maxPayload) { return .inval }
        case .blockStatus:
            // A zero-length query has no extent to answer with (each must be non-zero; QEMU:
            // "need non-zero length").
            if !limits.hasMetaContexts || r.length == 0 { return .inval }
        case .trim, .writeZeroes:
            break
        }
        if limits.readOnly && writes { return .perm }
        let (end, overflow) = r.offset.addingReportingOverflow(r.length)
        if overflow || end > limits.size {
            return command == .write || command == .writeZeroes ? .nospc : .inval
        }
        return nil
    }

    // MARK: block status payload (extended headers)

    /// The payload of an `NBD_CMD_BLOCK_STATUS` flagged `PAYLOAD_LEN`: the effect length,
    /// then the ids of the contexts wanted (a subset of those selected).
    public struct BlockStatusPayload: Sendable, Equatable {
        public var effectLength: UInt64
        public var contextIDs: [UInt32]
        public init(effectLength: UInt64, contextIDs: [UInt32]) {
            self.effectLength = effectLength
            self.contextIDs = contextIDs
        }
    }

    /// Parses a block-status payload; nil when its length is not 8 + 4·n with n ≥ 1, or an id
    /// repeats. Whether the ids were selected is the caller's check.
    public static func parseBlockStatusPayload(_ bytes: UnsafeRawBufferPointer) -> BlockStatusPayload? {
        guard bytes.count >= 12, bytes.count % 4 == 0, let base = bytes.baseAddress else { return nil }
        let effect: UInt64 = loadBE(base, 0, as: UInt64.self)
        var ids: [UInt32] = []
        ids.reserveCapacity((bytes.count - 8) / 4)
        var at = 8
        while at < bytes.count {
            let id: UInt32 = loadBE(base, at, as: UInt32.self)
            if ids.contains(id) { return nil }
            ids.append(id)
            at += 4
        }
        return BlockStatusPayload(effectLength: effect, contextIDs: ids)
    }

    // MARK: replies

    public static let simpleReplySize = 16
    public static let chunkHeaderSize = 20
    public static let extendedChunkHeaderSize = 32

    /// Size of a reply chunk header: structured (20) or extended (32).
    @inline(__always)
    public static func chunkHeaderSize(extended: Bool) -> Int { extended ? extendedChunkHeaderSize : chunkHeaderSize }

    @inline(__always)
    public static func encodeSimpleReply(error: NBDErrorCode, cookie: UInt64, into base: UnsafeMutableRawPointer) {
        storeBE(NBD.simpleReplyMagic, base, 0)
        storeBE(error.rawValue, base, 4)
        storeBE(cookie, base, 8)
    }

    /// A structured reply chunk header (20 bytes).
    @inline(__always)
    public static func encodeChunkHeader(flags: UInt16, type: ReplyType, cookie: UInt64, length: UInt32,
                                         into base: UnsafeMutableRawPointer) {
        storeBE(NBD.structuredReplyMagic, base, 0)
        storeBE(flags, base, 4)
        storeBE(type.rawValue, base, 6)
        storeBE(cookie, base, 8)
        storeBE(length, base, 16)
    }

    /// An extended reply chunk header (32 bytes): like the structured one, plus the request's
    /// offset and a 64-bit payload length.
    @inline(__always)
    public static func encodeExtendedChunkHeader(flags: UInt16, type: ReplyType, cookie: UInt64, offset: UInt64,
                                                 length: UInt64, into base: UnsafeMutableRawPointer) {
        storeBE(NBD.extendedReplyMagic, base, 0)
        storeBE(flags, base, 4)
        storeBE(type.rawValue, base, 6)
        storeBE(cookie, base, 8)
        storeBE(offset, base, 16)
        storeBE(length, base, 24)
    }

    /// A chunk header of either kind; returns its size. `requestOffset` goes into extended
    /// headers only (the spec: it "MUST match the *offset* of the client's request").
    @inline(__always)
    @discardableResult
    public static func encodeChunk(extended: Bool, flags: UInt16, type: ReplyType, cookie: UInt64, requestOffset: UInt64,
                                   payloadLength: Int, into base: UnsafeMutableRawPointer) -> Int {
        if extended {
            encodeExtendedChunkHeader(flags: flags, type: type, cookie: cookie, offset: requestOffset,
                                      length: UInt64(payloadLength), into: base)
            return extendedChunkHeaderSize
        }
        encodeChunkHeader(flags: flags, type: type, cookie: cookie, length: UInt32(truncatingIfNeeded: payloadLength), into: base)
        return chunkHeaderSize
    }

    /// `NBD_REPLY_TYPE_OFFSET_DATA` header plus its 8-byte offset (28 bytes); the data follows.
    public static let offsetDataHeaderSize = 28
    /// The same with an extended header (40 bytes).
    public static let extendedOffsetDataHeaderSize = 40

    @inline(__always)
    public static func offsetDataHeaderSize(extended: Bool) -> Int { extended ? extendedOffsetDataHeaderSize : offsetDataHeaderSize }

    /// The header of an `OFFSET_DATA` chunk of `dataLength` bytes (≥ 1: the spec requires a
    /// chunk length of at least 9) at `offset`; returns the header size (28 or 40).
    @inline(__always)
    @discardableResult
    public static func encodeOffsetDataHeader(extended: Bool, cookie: UInt64, requestOffset: UInt64, offset: UInt64,
                                              dataLength: Int, done: Bool, into base: UnsafeMutableRawPointer) -> Int {
        let h = encodeChunk(extended: extended, flags: done ? ReplyFlags.done : 0, type: .offsetData, cookie: cookie,
                            requestOffset: requestOffset, payloadLength: dataLength + 8, into: base)
        storeBE(offset, base, h)
        return h + 8
    }

    @inline(__always)
    public static func encodeOffsetDataHeader(cookie: UInt64, offset: UInt64, dataLength: UInt32, done: Bool,
                                              into base: UnsafeMutableRawPointer) {
        encodeOffsetDataHeader(extended: false, cookie: cookie, requestOffset: offset, offset: offset,
                               dataLength: Int(dataLength), done: done, into: base)
    }

    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (32 bytes structured, 44 extended).
    public static let offsetHoleSize = 32

    @inline(__always)
    public static func offsetHoleSize(extended: Bool) -> Int { chunkHeaderSize(extended: extended) + 12 }

    /// An `OFFSET_HOLE` chunk; `length` must be nonzero. Returns its size.
    @discardableResult
    public static func encodeOffsetHole(extended: Bool, cookie: UInt64, requestOffset: UInt64, offset: UInt64,
                                        length: UInt32, done: Bool, into base: UnsafeMutableRawPointer) -> Int {
        let h = encodeChunk(extended: extended, flags: done ? ReplyFlags.done : 0, type: .offsetHole, cookie: cookie,
                            requestOffset: requestOffset, payloadLength: 12, into: base)
        storeBE(offset, base, h)
        storeBE(length, base, h + 8)
        return h + 12
    }

    public static func encodeOffsetHole(cookie: UInt64, offset: UInt64, length: UInt32, done: Bool,
                                        into base: UnsafeMutableRawPointer) {
        encodeOffsetHole(extended: false, cookie: cookie, requestOffset: offset, offset: offset, length: length,
                         done: done, into: base)
    }

    /// `NBD_REPLY_TYPE_NONE` with the done flag: the whole reply to a request that succeeded
    /// without data (extended headers, where simple replies are not allowed; a zero-length
    /// structured read). Returns its size.
    @inline(__always)
    @discardableResult
    public static func encodeNone(extended: Bool, cookie: UInt64, requestOffset: UInt64,
                                  into base: UnsafeMutableRawPointer) -> Int {
        encodeChunk(extended: extended, flags: ReplyFlags.done, type: .none, cookie: cookie,
                    requestOffset: requestOffset, payloadLength: 0, into: base)
    }

    /// A `NBD_REPLY_TYPE_NONE` chunk with the done flag (structured).
    public static func noneChunk(cookie: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: chunkHeaderSize)
        out.withUnsafeMutableBytes { _ = encodeNone(extended: false, cookie: cookie, requestOffset: 0, into: $0.baseAddress!) }
        return out
    }

    /// Longest error message sent (the spec's string limit).
    public static let maxMessageLength = 4096

    /// The bytes of `message` that go into an error chunk: at most 4096, cut at a character
    /// boundary.
    public static func messageBytes(_ message: String) -> ArraySlice<UInt8> {
        var utf8 = ArraySlice(message.utf8)
        if utf8.count > maxMessageLength {
            var end = maxMessageLength
            // Back up over continuation bytes (10xxxxxx) so no character is cut in half.
            while end > 0 && utf8[utf8.startIndex + end] & 0xc0 == 0x80 { end -= 1 }
            utf8 = utf8.prefix(end)
        }
        return utf8
    }

    /// Size of an error chunk carrying `messageLength` bytes of text.
    public static func errorChunkSize(extended: Bool, messageLength: Int) -> Int {
        chunkHeaderSize(extended: extended) + 6 + messageLength
    }

    /// An `NBD_REPLY_TYPE_ERROR` chunk, always the final one; `message` is at most 4096 bytes
    /// (see `messageBytes`). Returns its size.
    @discardableResult
    public static func encodeErrorChunk(extended: Bool, cookie: UInt64, requestOffset: UInt64, error: NBDErrorCode,
                                        message: ArraySlice<UInt8>, into base: UnsafeMutableRawPointer) -> Int {
        let h = encodeChunk(extended: extended, flags: ReplyFlags.done, type: .error, cookie: cookie,
                            requestOffset: requestOffset, payloadLength: 6 + message.count, into: base)
        storeBE(error.rawValue, base, h)
        storeBE(UInt16(message.count), base, h + 4)
        message.withUnsafeBytes { raw in
            if raw.count > 0 { (base + h + 6).copyMemory(from: raw.baseAddress!, byteCount: raw.count) }
        }
        return h + 6 + message.count
    }

    /// An `NBD_REPLY_TYPE_ERROR` chunk with a message (structured), always the final chunk.
    public static func errorChunk(cookie: UInt64, error: NBDErrorCode, message: String) -> [UInt8] {
        let text = messageBytes(message)
        var out = [UInt8](repeating: 0, count: errorChunkSize(extended: false, messageLength: text.count))
        out.withUnsafeMutableBytes {
            _ = encodeErrorChunk(extended: false, cookie: cookie, requestOffset: 0, error: error, message: text,
                                 into: $0.baseAddress!)
        }
        return out
    }

    /// One descriptor of a block status reply. Lengths are 64-bit (`BLOCK_STATUS_EXT`); a
    /// compact `BLOCK_STATUS` chunk carries at most `UInt32.max` per descriptor (see
    /// `fitCompact`).
    public struct Extent: Sendable, Equatable {
        public var length: UInt64
        public var flags: UInt32
        public init(length: UInt64, flags: UInt32) { self.length = length; self.flags = flags }
    }

    /// Makes `extents` fit 32-bit descriptors: cuts the list at the first descriptor longer
    /// than `UInt32.max` and shortens that one to a multiple of `alignment` (the spec lets a
    /// reply cover less than asked; descriptors stay consecutive). Zero-length descriptors
    /// (never valid on the wire) are dropped first.
    public static func fitCompact(_ extents: inout [Extent], alignment: UInt64 = 512) {
        extents.removeAll { $0.length == 0 }
        guard let i = extents.firstIndex(where: { $0.length > UInt64(UInt32.max) }) else { return }
        let step = max(1, alignment)
        extents[i].length = UInt64(UInt32.max) / step * step
        extents.removeSubrange(i + 1..<extents.count)
        if extents[i].length == 0 { extents.remove(at: i) }
    }

    /// Size of a block status chunk with `count` descriptors: `BLOCK_STATUS` (structured, 8
    /// bytes a descriptor) or `BLOCK_STATUS_EXT` (extended, 16 bytes a descriptor).
    public static func blockStatusChunkSize(extended: Bool, count: Int) -> Int {
        extended ? extendedChunkHeaderSize + 8 + 16 * count : chunkHeaderSize + 4 + 8 * count
    }

    /// A block status chunk for one meta context. Compact chunks need every descriptor to
    /// fit 32 bits (`fitCompact`); descriptors must be nonzero. Returns its size.
    @discardableResult
    public static func encodeBlockStatusChunk(extended: Bool, cookie: UInt64, requestOffset: UInt64, contextID: UInt32,
                                              extents: [Extent], done: Bool, into base: UnsafeMutableRawPointer) -> Int {
        let flags = done ? ReplyFlags.done : 0
        if extended {
            let h = encodeChunk(extended: true, flags: flags, type: .blockStatusExt, cookie: cookie,
                                requestOffset: requestOffset, payloadLength: 8 + 16 * extents.count, into: base)
            storeBE(contextID, base, h)
            storeBE(UInt32(extents.count), base, h + 4)
            for (i, e) in extents.enumerated() {
                storeBE(e.length, base, h + 8 + 16 * i)
                storeBE(UInt32(0), base, h + 16 + 16 * i)
                storeBE(e.flags, base, h + 20 + 16 * i)
            }
            return h + 8 + 16 * extents.count
        }
        let h = encodeChunk(extended: false, flags: flags, type: .blockStatus, cookie: cookie,
                            requestOffset: requestOffset, payloadLength: 4 + 8 * extents.count, into: base)
        storeBE(contextID, base, h)
        for (i, e) in extents.enumerated() {
            storeBE(UInt32(truncatingIfNeeded: e.length), base, h + 4 + 8 * i)
            storeBE(e.flags, base, h + 8 + 8 * i)
        }
        return h + 4 + 8 * extents.count
    }

    /// `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one meta context (structured).
    public static func blockStatusChunk(cookie: UInt64, contextID: UInt32, extents: [Extent], done: Bool) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: blockStatusChunkSize(extended: false, count: extents.count))
        out.withUnsafeMutableBytes {
            _ = encodeBlockStatusChunk(extended: false, cookie: cookie, requestOffset: 0, contextID: contextID,
                                       extents: extents, done: done, into: $0.baseAddress!)
        }
        return out
    }
}
