#if canImport(Glibc)
import Glibc
#endif

// The client side of the transmission phase: reply headers and chunk payloads as a client
// receives them, each checked against the request it answers. Pure: bytes in, values out.

/// A structured reply chunk header (`NBD_REPLY_TYPE_*`): 20 bytes on the wire, or 32 with
/// extended headers, which add the request's offset and widen the length to 64 bits.
public struct ChunkHeader: Sendable, Equatable {
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var length: UInt64
    /// Extended headers: the offset of the request this chunk answers (0 in compact chunks).
    public var offset: UInt64

    public init(flags: UInt16, type: UInt16, cookie: UInt64, length: UInt64, offset: UInt64 = 0) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.length = length
        self.offset = offset
    }

    public var isDone: Bool { flags & ReplyFlags.done != 0 }
    /// Error chunk types have the high bit set; unknown ones are errors too (spec).
    public var isError: Bool { type & 0x8000 != 0 }
}

/// The start of one reply: a simple reply (16 bytes) or a structured chunk header (20 bytes;
/// 32 with extended headers, where every reply is a chunk).
public enum ReplyHeader: Sendable, Equatable {
    case simple(error: UInt32, cookie: UInt64)
    case chunk(ChunkHeader)

    public var cookie: UInt64 {
        switch self {
        case .simple(_, let cookie): cookie
        case .chunk(let c): c.cookie
        }
    }
}

/// A reply the client cannot accept: the stream or the server is broken, so the connection
/// is dropped (and requests retried on a new one). The text is for logs and errors.
public struct ReplyViolation: Error, Sendable, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What the client does with a chunk's payload, decided from the header and the request.
public enum ChunkPlan: Sendable, Equatable {
    /// No payload (`NBD_REPLY_TYPE_NONE`).
    case empty
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: an 8-byte offset, then `length - 8` bytes of data.
    case data
    /// A payload small enough to collect whole (hole, block status, error).
    case collect
}

public enum ClientReplies {
    public static let simpleSize = 16
    public static let chunkSize = 20
    public static let extendedChunkSize = 32
    /// Largest payload collected in memory (block status with `REQ_ONE`, errors with their
    /// message: the message is at most 4096 bytes by spec). Longer is a protocol violation.
    public static let maxCollected: UInt64 = 64 * 1024

    /// Size of a chunk header.
    @inline(__always)
    public static func chunkSize(extended: Bool) -> Int { extended ? extendedChunkSize : chunkSize }

    /// Parses a reply header from the start of `count` bytes; nil means "need more bytes".
    /// With `extended` (`NBD_OPT_EXTENDED_HEADERS` negotiated) only 32-byte extended headers
    /// are valid; without it, only simple replies and 20-byte chunks.
    public static func parseHeader(_ base: UnsafeRawPointer, count: Int,
                                   extended: Bool = false) throws(ReplyViolation) -> (ReplyHeader, size: Int)? {
        guard count >= 4 else { return nil }
        let magic: UInt32 = loadBE(base, 0, as: UInt32.self)
        switch magic {
        case NBD.simpleReplyMagic where !extended:
            guard count >= simpleSize else { return nil }
            return (.simple(error: loadBE(base, 4, as: UInt32.self), cookie: loadBE(base, 8, as: UInt64.self)), simpleSize)
        case NBD.structuredReplyMagic where !extended:
            guard count >= chunkSize else { return nil }
            let length: UInt32 = loadBE(base, 16, as: UInt32.self)
            let h = ChunkHeader(flags: loadBE(base, 4, as: UInt16.self), type: loadBE(base, 6, as: UInt16.self),
                                cookie: loadBE(base, 8, as: UInt64.self), length: UInt64(length))
            return (.chunk(h), chunkSize)
        case NBD.extendedReplyMagic where extended:
            guard count >= extendedChunkSize else { return nil }
            let h = ChunkHeader(flags: loadBE(base, 4, as: UInt16.self), type: loadBE(base, 6, as: UInt16.self),
                                cookie: loadBE(base, 8, as: UInt64.self), length: loadBE(base, 24, as: UInt64.self),
                                offset: loadBE(base, 16, as: UInt64.self))
            return (.chunk(h), extendedChunkSize)
        case NBD.simpleReplyMagic, NBD.structuredReplyMagic:
            throw ReplyViolation("compact reply header (magic 0x\(String(magic, radix: 16))) after extended headers were negotiated")
        case NBD.extendedReplyMagic:
            throw ReplyViolation("extended reply header without extended headers negotiated")
        default:
            throw ReplyViolation("invalid reply magic 0x\(String(magic, radix: 16))")
        }
    }

    /// Checks a chunk header against the command it answers (`requestLength` bytes asked
    /// for at `requestOffset`); returns how to take its payload. Mirrors QEMU's and libnbd's
    /// checks. With `extended` the header must echo the request's offset, and block status
    /// comes as `BLOCK_STATUS_EXT`.
    public static func plan(for chunk: ChunkHeader, command: Command, requestLength: UInt64, requestOffset: UInt64 = 0,
                            extended: Bool = false) throws(ReplyViolation) -> ChunkPlan {
        if extended && chunk.offset != requestOffset {
            throw ReplyViolation("reply header offset \(chunk.offset) does not match the request's \(requestOffset)")
        }
        if chunk.isError {
            let minimum: UInt64 = chunk.type == ReplyType.errorOffset.rawValue ? 14 : 6
            if chunk.length < minimum { throw ReplyViolation("invalid payload for structured error (\(chunk.length) bytes)") }
            if chunk.length > maxCollected { throw ReplyViolation("structured error payload of \(chunk.length) bytes is too long") }
            return .collect
        }
        switch ReplyType(rawValue: chunk.type) {
        case .none?:
            if !chunk.isDone { throw ReplyViolation("NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE flag set") }
            if chunk.length != 0 { throw ReplyViolation("NBD_REPLY_TYPE_NONE chunk with nonzero length") }
            return .empty
        case .offsetData?:
            guard command == .read else { throw ReplyViolation("unexpected NBD_REPLY_TYPE_OFFSET_DATA chunk for \(command)") }
            if chunk.length <= 8 || chunk.length - 8 > requestLength {
                throw ReplyViolation("invalid payload length \(chunk.length) for NBD_REPLY_TYPE_OFFSET_DATA")
            }
            return .data
        case .offsetHole?:
            guard command == .read else { throw ReplyViolation("unexpected NBD_REPLY_TYPE_OFFSET_HOLE chunk for \(command)") }
            if chunk.length != 12 { throw ReplyViolation("invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE") }
            return .collect
        case .blockStatus?:
            guard command == .blockStatus else { throw ReplyViolation("unexpected NBD_REPLY_TYPE_BLOCK_STATUS chunk for \(command)") }
            if extended { throw ReplyViolation("NBD_REPLY_TYPE_BLOCK_STATUS chunk after extended headers were negotiated") }
            if chunk.length < 12 || (chunk.length - 4) % 8 != 0 {
                throw ReplyViolation("invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS (\(chunk.length) bytes)")
            }
            if chunk.length > maxCollected { throw ReplyViolation("block status chunk of \(chunk.length) bytes is too long") }
            return .collect
        case .blockStatusExt?:
            guard command == .blockStatus else { throw ReplyViolation("unexpected NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk for \(command)") }
            if !extended { throw ReplyViolation("NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk without extended headers negotiated") }
            if chunk.length < 24 || (chunk.length - 8) % 16 != 0 {
                throw ReplyViolation("invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS_EXT (\(chunk.length) bytes)")
            }
            if chunk.length > maxCollected { throw ReplyViolation("block status chunk of \(chunk.length) bytes is too long") }
            return .collect
        default:
            throw ReplyViolation("unexpected reply type \(chunk.type) for \(command)")
        }
    }

    /// The data range of an `OFFSET_DATA` chunk (its offset from the payload's first 8 bytes),
    /// as a position inside the request's buffer, checked to lie inside the request.
    public static func dataRange(chunkLength: UInt64, offset: UInt64, requestOffset: UInt64,
                                 requestLength: UInt64) throws(ReplyViolation) -> Range<Int> {
        try placed(offset: offset, length: chunkLength - 8, requestOffset: requestOffset, requestLength: requestLength)
    }

    /// The range an `OFFSET_HOLE` payload zeroes, checked to lie inside the request.
    public static func holeRange(_ payload: UnsafeRawBufferPointer, requestOffset: UInt64,
                                 requestLength: UInt64) throws(ReplyViolation) -> Range<Int> {
        precondition(payload.count == 12)
        let offset: UInt64 = loadBE(payload.baseAddress!, 0, as: UInt64.self)
        let length: UInt32 = loadBE(payload.baseAddress!, 8, as: UInt32.self)
        if length == 0 { throw ReplyViolation("NBD_REPLY_TYPE_OFFSET_HOLE of zero length") }
        return try placed(offset: offset, length: UInt64(length), requestOffset: requestOffset, requestLength: requestLength)
    }

    private static func placed(offset: UInt64, length: UInt64, requestOffset: UInt64,
                               requestLength: UInt64) throws(ReplyViolation) -> Range<Int> {
        let (requestEnd, requestOverflow) = requestOffset.addingReportingOverflow(requestLength)
        if requestOverflow || requestLength > UInt64(Int32.max) {
            throw ReplyViolation("request \(requestOffset)+\(requestLength) cannot carry data")
        }
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || offset < requestOffset || end > requestEnd {
            throw ReplyViolation("server sent chunk exceeding requested region (\(offset)+\(length) outside \(requestOffset)+\(requestLength))")
        }
        return Int(offset - requestOffset)..<Int(end - requestOffset)
    }

    /// The first extent of a block status chunk for one context, and how many it carried.
    public struct StatusChunk: Sendable, Equatable {
        public var contextID: UInt32
        public var first: Transmission.Extent
        public var extentCount: Int
    }

    /// A `BLOCK_STATUS` payload (32-bit descriptors), or with `extended` a `BLOCK_STATUS_EXT`
    /// one (a descriptor count, then 64-bit lengths and status flags; flags beyond 32 bits,
    /// which no context blockd asks for defines, read as all ones).
    public static func parseBlockStatus(_ payload: UnsafeRawBufferPointer, extended: Bool = false) throws(ReplyViolation) -> StatusChunk {
        let base = payload.baseAddress!
        let contextID: UInt32 = loadBE(base, 0, as: UInt32.self)
        if extended {
            precondition(payload.count >= 24)
            let count: UInt32 = loadBE(base, 4, as: UInt32.self)
            let carried = (payload.count - 8) / 16
            if Int(count) != carried {
                throw ReplyViolation("NBD_REPLY_TYPE_BLOCK_STATUS_EXT says \(count) descriptors but carries \(carried)")
            }
            let flags: UInt64 = loadBE(base, 16, as: UInt64.self)
            let extent = Transmission.Extent(length: loadBE(base, 8, as: UInt64.self),
                                             flags: flags > UInt64(UInt32.max) ? UInt32.max : UInt32(flags))
            if extent.length == 0 { throw ReplyViolation("server sent status chunk with zero length") }
            return StatusChunk(contextID: contextID, first: extent, extentCount: carried)
        }
        precondition(payload.count >= 12)
        let length: UInt32 = loadBE(base, 4, as: UInt32.self)
        let extent = Transmission.Extent(length: UInt64(length), flags: loadBE(base, 8, as: UInt32.self))
        if extent.length == 0 { throw ReplyViolation("server sent status chunk with zero length") }
        return StatusChunk(contextID: contextID, first: extent, extentCount: (payload.count - 4) / 8)
    }

    /// A structured error chunk's error (as an errno) and message.
    public struct ErrorChunk: Sendable, Equatable {
        public var errno: Int32
        public var message: String
        public var offset: UInt64?
    }

    public static func parseError(_ payload: UnsafeRawBufferPointer, type: UInt16, requestOffset: UInt64,
                                  requestLength: UInt64) throws(ReplyViolation) -> ErrorChunk {
        let base = payload.baseAddress!
        let code: UInt32 = loadBE(base, 0, as: UInt32.self)
        if code == 0 { throw ReplyViolation("server sent structured error chunk with error = 0") }
        let size = Int(loadBE(base, 4, as: UInt16.self) as UInt16)
        let fixed = type == ReplyType.errorOffset.rawValue ? 14 : 6
        if size > payload.count - fixed {
            throw ReplyViolation("server sent structured error chunk with incorrect message size")
        }
        let message = String(decoding: UnsafeRawBufferPointer(rebasing: payload[6..<6 + size]), as: UTF8.self)
        var offset: UInt64?
        if type == ReplyType.errorOffset.rawValue {
            let at: UInt64 = loadBE(base, 6 + size, as: UInt64.self)
            let (end, overflow) = requestOffset.addingReportingOverflow(max(requestLength, 1))
            if at < requestOffset || (!overflow && at >= end) {
                throw ReplyViolation("NBD_REPLY_TYPE_ERROR_OFFSET offset \(at) outside the request")
            }
            offset = at
        }
        return ErrorChunk(errno: errnoFromWire(code), message: message, offset: offset)
    }

    /// The errno for an error value on the wire (`NBD_E*`); unknown values become `EINVAL`,
    /// as libnbd does.
    public static func errnoFromWire(_ code: UInt32) -> Int32 {
        switch NBDErrorCode(rawValue: code) {
        case .ok?: return 0
        case .perm?: return EPERM
        case .io?: return EIO
        case .nomem?: return ENOMEM
        case .inval?: return EINVAL
        case .nospc?: return ENOSPC
        case .overflow?: return EOVERFLOW
        case .notsup?: return ENOTSUP
        case .shutdown?: return ESHUTDOWN
        case nil: return EINVAL
        }
    }
}

/// Which parts of a read's buffer the chunks received so far have filled. A server must send
/// non-overlapping chunks covering the request exactly; anything else is a violation, so a
/// hostile server can neither leave stale buffer bytes unwritten nor make this grow: at most
/// `maxRanges` disjoint ranges are kept (chunks arriving in order merge into one).
public struct ReadCoverage: Sendable {
    public static let maxRanges = 64
    private var ranges: [Range<Int>] = []
    public private(set) var covered = 0

    public init() {}

    public mutating func reset() {
        if !ranges.isEmpty { ranges.removeAll(keepingCapacity: true) }
        covered = 0
    }

    public mutating func add(_ r: Range<Int>) throws(ReplyViolation) {
        // Find the insertion point; in-order chunks append or extend the last range.
        var i = ranges.count
        while i > 0 && ranges[i - 1].lowerBound >= r.upperBound { i -= 1 }
        if i > 0 && ranges[i - 1].upperBound > r.lowerBound { throw ReplyViolation("server sent overlapping read chunks") }
        if i < ranges.count && ranges[i].lowerBound < r.upperBound { throw ReplyViolation("server sent overlapping read chunks") }
        covered += r.count
        let joinsLeft = i > 0 && ranges[i - 1].upperBound == r.lowerBound
        let joinsRight = i < ranges.count && ranges[i].lowerBound == r.upperBound
        switch (joinsLeft, joinsRight) {
        case (true, true):
            ranges[i - 1] = ranges[i - 1].lowerBound..<ranges[i].upperBound
            ranges.remove(at: i)
        case (true, false):
            ranges[i - 1] = ranges[i - 1].lowerBound..<r.upperBound
        case (false, true):
            ranges[i] = r.lowerBound..<ranges[i].upperBound
        case (false, false):
            if ranges.count == ReadCoverage.maxRanges { throw ReplyViolation("server sent too many out-of-order read chunks") }
            ranges.insert(r, at: i)
        }
    }

    /// True when exactly `0..<length` was filled.
    public func isComplete(length: Int) -> Bool {
        length == 0 ? ranges.isEmpty : (ranges.count == 1 && ranges[0] == 0..<length)
    }
}
