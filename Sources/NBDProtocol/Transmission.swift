/// One transmission-phase request header (compact, 28 bytes on the wire).
public struct RequestHeader: Sendable, Equatable {
    public var flags: CommandFlags
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: CommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public static let size = 28

    public var command: Command? { Command(rawValue: type) }

    /// Bytes of payload that follow this header on the wire.
    public var payloadLength: Int { type == Command.write.rawValue ? Int(length) : 0 }
}

/// A request the connection must drop the client for (the stream cannot be resynchronised).
public enum TransmissionError: Error, Sendable, Equatable {
    case badMagic(UInt32)
    case payloadTooLarge(UInt32)
}

public enum Transmission {
    /// Largest write payload accepted; larger requests are a protocol error (we cannot skip
    /// their payload safely without reading it all).
    public static let maxPayload: UInt32 = 32 << 20

    /// Parses one request header; nil means "need more bytes".
    @inline(__always)
    public static func parseRequest(_ base: UnsafeRawPointer, count: Int) throws(TransmissionError) -> RequestHeader? {
        guard count >= RequestHeader.size else { return nil }
        let magic: UInt32 = loadBE(base, 0, as: UInt32.self)
        guard magic == NBD.requestMagic else { throw .badMagic(magic) }
        let flags = CommandFlags(rawValue: loadBE(base, 4, as: UInt16.self))
        let type: UInt16 = loadBE(base, 6, as: UInt16.self)
        let cookie: UInt64 = loadBE(base, 8, as: UInt64.self)
        let offset: UInt64 = loadBE(base, 16, as: UInt64.self)
        let length: UInt32 = loadBE(base, 24, as: UInt32.self)
        if type == Command.write.rawValue && length > maxPayload { throw .payloadTooLarge(length) }
        return RequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
    }

    public static func encodeRequest(_ r: RequestHeader, into base: UnsafeMutableRawPointer) {
        storeBE(NBD.requestMagic, base, 0)
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
        public var structuredReplies: Bool
        public var hasMetaContexts: Bool
        public init(size: UInt64, readOnly: Bool, maxPayload: UInt32, structuredReplies: Bool, hasMetaContexts: Bool) {
            self.size = size
            self.readOnly = readOnly
            self.maxPayload = maxPayload
            self.structuredReplies = structuredReplies
            self.hasMetaContexts = hasMetaContexts
        }
    }

    /// Checks a parsed request against the export (nbdkit `validate_request`); returns the
    /// error to reply with, or nil when the request may run. Never traps on client input.
    public static func validate(_ r: RequestHeader, _ limits: Limits) -> NBDErrorCode? {
        guard let command = r.command else { return .inval }
        // Flags a command does not take.
        let allowed: CommandFlags
        switch command {
        case .read: allowed = limits.structuredReplies ? [.df] : []
        case .write: allowed = [.fua]
        case .writeZeroes: allowed = [.fua, .noHole, .fastZero]
        case .trim: allowed = [.fua]
        case .blockStatus: allowed = [.reqOne]
        case .flush, .cache, .disconnect, .resize: allowed = []
        }
        if !r.flags.subtracting(allowed).isEmpty { return .inval }
        switch command {
        case .disconnect:
            return nil
        case .flush:
            if r.offset != 0 || r.length != 0 { return .inval }
            return nil
        case .resize:
            return .inval
        case .read, .write, .cache:
            if r.length > limits.maxPayload { return command == .write ? .inval : .inval }
        case .blockStatus:
            // A zero-length query has no extent to answer with (each must be non-zero; QEMU:
            // "need non-zero length").
            if !limits.hasMetaContexts || r.length == 0 { return .inval }
        case .trim, .writeZeroes:
            break
        }
        let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
        if overflow || end > limits.size {
            // Past the end: the spec asks for EINVAL; writes to read-only exports still get EPERM first.
            if limits.readOnly && (command == .write || command == .trim || command == .writeZeroes) { return .perm }
            return .inval
        }
        if limits.readOnly && (command == .write || command == .trim || command == .writeZeroes) { return .perm }
        return nil
    }

    // MARK: replies

    public static let simpleReplySize = 16
    public static let chunkHeaderSize = 20

    @inline(__always)
    public static func encodeSimpleReply(error: NBDErrorCode, cookie: UInt64, into base: UnsafeMutableRawPointer) {
        storeBE(NBD.simpleReplyMagic, base, 0)
        storeBE(error.rawValue, base, 4)
        storeBE(cookie, base, 8)
    }

    @inline(__always)
    public static func encodeChunkHeader(flags: UInt16, type: ReplyType, cookie: UInt64, length: UInt32,
                                         into base: UnsafeMutableRawPointer) {
        storeBE(NBD.structuredReplyMagic, base, 0)
        storeBE(flags, base, 4)
        storeBE(type.rawValue, base, 6)
        storeBE(cookie, base, 8)
        storeBE(length, base, 16)
    }

    /// `NBD_REPLY_TYPE_OFFSET_DATA` header plus its 8-byte offset (28 bytes); the data follows.
    public static let offsetDataHeaderSize = 28

    @inline(__always)
    public static func encodeOffsetDataHeader(cookie: UInt64, offset: UInt64, dataLength: UInt32, done: Bool,
                                              into base: UnsafeMutableRawPointer) {
        encodeChunkHeader(flags: done ? ReplyFlags.done : 0, type: .offsetData, cookie: cookie,
                          length: dataLength + 8, into: base)
        storeBE(offset, base, 20)
    }

    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (32 bytes).
    public static let offsetHoleSize = 32

    public static func encodeOffsetHole(cookie: UInt64, offset: UInt64, length: UInt32, done: Bool,
                                        into base: UnsafeMutableRawPointer) {
        encodeChunkHeader(flags: done ? ReplyFlags.done : 0, type: .offsetHole, cookie: cookie, length: 12, into: base)
        storeBE(offset, base, 20)
        storeBE(length, base, 28)
    }

    /// An `NBD_REPLY_TYPE_ERROR` chunk with a message, always the final chunk.
    public static func errorChunk(cookie: UInt64, error: NBDErrorCode, message: String) -> [UInt8] {
        let text = Array(message.utf8.prefix(4096))
        var out = [UInt8](repeating: 0, count: chunkHeaderSize + 6 + text.count)
        out.withUnsafeMutableBytes { raw in
            encodeChunkHeader(flags: ReplyFlags.done, type: .error, cookie: cookie,
                              length: UInt32(6 + text.count), into: raw.baseAddress!)
            storeBE(error.rawValue, raw.baseAddress!, 20)
            storeBE(UInt16(text.count), raw.baseAddress!, 24)
        }
        out.replaceSubrange(26..<26 + text.count, with: text)
        return out
    }

    /// A `NBD_REPLY_TYPE_NONE` chunk with the done flag.
    public static func noneChunk(cookie: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: chunkHeaderSize)
        out.withUnsafeMutableBytes { encodeChunkHeader(flags: ReplyFlags.done, type: .none, cookie: cookie, length: 0, into: $0.baseAddress!) }
        return out
    }

    /// One descriptor of a block status reply.
    public struct Extent: Sendable, Equatable {
        public var length: UInt32
        public var flags: UInt32
        public init(length: UInt32, flags: UInt32) { self.length = length; self.flags = flags }
    }

    /// `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one meta context.
    public static func blockStatusChunk(cookie: UInt64, contextID: UInt32, extents: [Extent], done: Bool) -> [UInt8] {
        let length = 4 + 8 * extents.count
        var out = [UInt8](repeating: 0, count: chunkHeaderSize + length)
        out.withUnsafeMutableBytes { raw in
            let base = raw.baseAddress!
            encodeChunkHeader(flags: done ? ReplyFlags.done : 0, type: .blockStatus, cookie: cookie,
                              length: UInt32(length), into: base)
            storeBE(contextID, base, 20)
            for (i, e) in extents.enumerated() {
                storeBE(e.length, base, 24 + 8 * i)
                storeBE(e.flags, base, 28 + 8 * i)
            }
        }
        return out
    }
}
