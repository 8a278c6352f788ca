#if canImport(Glibc)
import Glibc
#endif

/// A strict NBD client for tests: speaks simple replies, structured replies and extended
/// headers (`NBD_OPT_EXTENDED_HEADERS`, which the installed libnbd 1.14 predates), sends
/// exactly the requests a test asks for, and checks every reply message against the spec as
/// it decodes it (magic for the negotiated mode, cookie, OFFSET_DATA ≥ 9 bytes, nonzero hole
/// and descriptor lengths, the extended header's offset echoing the request's, DONE on the
/// last chunk). A violation throws `HarnessError`, so a test fails on any malformed reply.
public final class ProtocolClient {
    public enum Mode: Sendable { case simple, structured, extended }

    public let raw: RawNBDClient
    public private(set) var mode = Mode.simple
    public private(set) var size: UInt64 = 0
    public private(set) var flags: UInt16 = 0
    /// Context ids the server assigned in SET_META_CONTEXT, by name.
    public private(set) var contextIDs: [String: UInt32] = [:]
    private var nextCookie: UInt64 = 1
    /// Offsets of requests sent and not answered yet (extended replies must echo them).
    private var pendingOffsets: [UInt64: UInt64] = [:]

    public static let magicSimple: UInt32 = 0x6744_6698
    public static let magicStructured: UInt32 = 0x668e_33ef
    public static let magicExtended: UInt32 = 0x6e8a_278c

    public init(unixPath: String, timeout: Double = 5) throws {
        raw = try RawNBDClient(unixPath: unixPath, timeout: timeout)
    }

    public var fd: Int32 { raw.fd }

    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { RawNBDClient.be(v) }
    static func load<T: FixedWidthInteger>(_ b: [UInt8], _ at: Int, _ t: T.Type) -> T { RawNBDClient.load(b, at, t) }
    static func string32(_ s: String) -> [UInt8] { be(UInt32(s.utf8.count)) + Array(s.utf8) }

    // MARK: handshake

    /// Sends one option and collects its replies up to the final one (ACK or an error).
    public func option(_ code: UInt32, _ payload: [UInt8] = []) throws -> [(type: UInt32, payload: [UInt8])] {
        try raw.sendOption(code, payload)
        var out: [(type: UInt32, payload: [UInt8])] = []
        while true {
            guard let r = try raw.receiveOptionReply() else { throw HarnessError("server closed during option \(code)") }
            out.append(r)
            if r.type == 1 || r.type & 0x8000_0000 != 0 { return out }
        }
    }

    /// Greeting, the requested extensions, SET_META_CONTEXT for `contexts`, then NBD_OPT_GO.
    public func handshake(export: String, structured: Bool = false, extended: Bool = false,
                          contexts: [String] = []) throws {
        try raw.greet()
        if extended {
            let r = try option(11)
            guard r.last?.type == 1 else { throw HarnessError("NBD_OPT_EXTENDED_HEADERS refused: \(r.map(\.type))") }
            mode = .extended
        } else if structured {
            let r = try option(8)
            guard r.last?.type == 1 else { throw HarnessError("NBD_OPT_STRUCTURED_REPLY refused: \(r.map(\.type))") }
            mode = .structured
        }
        if !contexts.isEmpty {
            var payload = Self.string32(export) + Self.be(UInt32(contexts.count))
            for c in contexts { payload += Self.string32(c) }
            for r in try option(10, payload) where r.type == 4 {
                contextIDs[String(decoding: r.payload.dropFirst(4), as: UTF8.self)] = Self.load(r.payload, 0, UInt32.self)
            }
        }
        try go(export: export)
    }

    /// NBD_OPT_GO; fills `size` and `flags`.
    public func go(export: String) throws {
        let replies = try option(7, Self.string32(export) + Self.be(UInt16(0)))
        for r in replies where r.type == 3 && r.payload.count == 12 && Self.load(r.payload, 0, UInt16.self) == 0 {
            size = Self.load(r.payload, 2, UInt64.self)
            flags = Self.load(r.payload, 10, UInt16.self)
        }
        guard replies.last?.type == 1 else {
            throw HarnessError("NBD_OPT_GO failed: \(replies.last.map { "\($0.type) \(String(decoding: $0.payload, as: UTF8.self))" } ?? "")")
        }
    }

    /// Marks the connection as using extended headers (for tests that negotiate by hand).
    public func assume(_ mode: Mode) { self.mode = mode }

    // MARK: requests

    /// Sends one request (compact or extended header, as negotiated); returns its cookie.
    @discardableResult
    public func send(type: UInt16, flags: UInt16 = 0, offset: UInt64, length: UInt64, payload: [UInt8] = [],
                     magic: UInt32? = nil) throws -> UInt64 {
        let cookie = nextCookie
        nextCookie += 1
        pendingOffsets[cookie] = offset
        var bytes: [UInt8]
        if mode == .extended {
            bytes = Self.be(magic ?? 0x21e4_1c71) + Self.be(flags) + Self.be(type) + Self.be(cookie) + Self.be(offset) + Self.be(length)
        } else {
            bytes = Self.be(magic ?? 0x2560_9513) + Self.be(flags) + Self.be(type) + Self.be(cookie) + Self.be(offset)
                + Self.be(UInt32(truncatingIfNeeded: length))
        }
        bytes += payload
        try raw.send(bytes)
        return cookie
    }

    // MARK: replies

    public struct Chunk: Sendable {
        public var flags: UInt16
        public var type: UInt16
        public var cookie: UInt64
        public var payload: [UInt8]
        public var done: Bool { flags & 1 != 0 }
    }

    /// One whole reply, decoded.
    public struct Reply: Sendable {
        public var cookie: UInt64
        /// 0 on success; the NBD error otherwise.
        public var error: UInt32 = 0
        public var message = ""
        /// Read data, holes filled with zeroes (structured/extended), in request order.
        public var data: [UInt8] = []
        public var chunks: [Chunk] = []
        /// Block status descriptors by context id.
        public var extents: [UInt32: [(length: UInt64, flags: UInt32)]] = [:]
        /// True when the reply was a simple reply.
        public var simple = false
        public var chunkTypes: [UInt16] { chunks.map(\.type) }
    }

    /// Reads the next whole reply (all chunks up to DONE). `readLength` is the length of the
    /// read request it answers, when it is one (simple replies carry data only then).
    public func receive(readLength: Int? = nil) throws -> Reply {
        guard let head = try raw.receive(4) else { throw HarnessError("server closed before a reply") }
        let magic = Self.load(head, 0, UInt32.self)
        switch magic {
        case Self.magicSimple:
            guard mode != .extended else { throw HarnessError("simple reply with extended headers negotiated") }
            guard let rest = try raw.receive(12) else { throw HarnessError("closed in a simple reply") }
            var r = Reply(cookie: Self.load(rest, 4, UInt64.self))
            r.simple = true
            r.error = Self.load(rest, 0, UInt32.self)
            if mode == .structured, readLength != nil {
                throw HarnessError("simple reply to a read with structured replies negotiated")
            }
            if r.error == 0, let n = readLength, n > 0 {
                guard let d = try raw.receive(n) else { throw HarnessError("closed in read data") }
                r.data = d
            }
            pendingOffsets[r.cookie] = nil
            return r
        case Self.magicStructured, Self.magicExtended:
            var reply: Reply?
            var buffer = [UInt8]()
            var covered = 0
            var first = true
            var current = magic
            while true {
                if !first {
                    guard let h = try raw.receive(4) else { throw HarnessError("closed between chunks") }
                    current = Self.load(h, 0, UInt32.self)
                }
                first = false
                let chunk = try receiveChunk(magic: current)
                if reply == nil {
                    reply = Reply(cookie: chunk.cookie)
                    if let n = readLength { buffer = [UInt8](repeating: 0, count: n) }
                }
                guard chunk.cookie == reply!.cookie else {
                    throw HarnessError("chunks of two replies interleaved (\(reply!.cookie), \(chunk.cookie)); tests send one at a time")
                }
                try decode(chunk, into: &reply!, buffer: &buffer, covered: &covered, readLength: readLength)
                reply!.chunks.append(chunk)
                if chunk.done { break }
            }
            if reply!.error == 0, let n = readLength {
                guard covered == n else { throw HarnessError("read reply covers \(covered) of \(n) bytes") }
                reply!.data = buffer
            }
            pendingOffsets[reply!.cookie] = nil
            return reply!
        default:
            throw HarnessError("bad reply magic 0x\(String(magic, radix: 16))")
        }
    }

    private func receiveChunk(magic: UInt32) throws -> Chunk {
        switch (magic, mode) {
        case (Self.magicStructured, .structured):
            guard let h = try raw.receive(16) else { throw HarnessError("closed in a chunk header") }
            let length = Int(Self.load(h, 12, UInt32.self))
            guard let p = try raw.receive(length) else { throw HarnessError("closed in a chunk payload") }
            return Chunk(flags: Self.load(h, 0, UInt16.self), type: Self.load(h, 2, UInt16.self),
                         cookie: Self.load(h, 4, UInt64.self), payload: p)
        case (Self.magicExtended, .extended):
            guard let h = try raw.receive(28) else { throw HarnessError("closed in an extended chunk header") }
            let cookie: UInt64 = Self.load(h, 4, UInt64.self)
            let offset: UInt64 = Self.load(h, 12, UInt64.self)
            let length: UInt64 = Self.load(h, 20, UInt64.self)
            guard length <= 64 << 20 else { throw HarnessError("extended chunk length \(length) is unreasonable") }
            if let sent = pendingOffsets[cookie], sent != offset {
                throw HarnessError("extended reply offset \(offset) does not echo the request's \(sent)")
            }
            guard let p = try raw.receive(Int(length)) else { throw HarnessError("closed in a chunk payload") }
            return Chunk(flags: Self.load(h, 0, UInt16.self), type: Self.load(h, 2, UInt16.self), cookie: cookie, payload: p)
        default:
            throw HarnessError("reply magic 0x\(String(magic, radix: 16)) does not match the negotiated mode \(mode)")
        }
    }

    private func decode(_ c: Chunk, into r: inout Reply, buffer: inout [UInt8], covered: inout Int, readLength: Int?) throws {
        let p = c.payload
        let base = pendingOffsets[c.cookie] ?? 0
        switch c.type {
        case 0:  // NONE
            guard p.isEmpty, c.done else { throw HarnessError("NONE chunk must be empty and final") }
        case 1:  // OFFSET_DATA
            guard p.count >= 9 else { throw HarnessError("OFFSET_DATA chunk of length \(p.count) (the minimum is 9)") }
            guard let n = readLength else { throw HarnessError("OFFSET_DATA in a reply that is not to a read") }
            let at = Int(Self.load(p, 0, UInt64.self) &- base)
            guard at >= 0, at + p.count - 8 <= n else { throw HarnessError("OFFSET_DATA outside the request") }
            buffer.replaceSubrange(at..<at + p.count - 8, with: p[8...])
            covered += p.count - 8
        case 2:  // OFFSET_HOLE
            guard p.count == 12 else { throw HarnessError("OFFSET_HOLE chunk of length \(p.count)") }
            guard let n = readLength else { throw HarnessError("OFFSET_HOLE in a reply that is not to a read") }
            let at = Int(Self.load(p, 0, UInt64.self) &- base)
            let len = Int(Self.load(p, 8, UInt32.self))
            guard len > 0 else { throw HarnessError("OFFSET_HOLE of size 0") }
            guard at >= 0, at + len <= n else { throw HarnessError("OFFSET_HOLE outside the request") }
            covered += len
        case 5:  // BLOCK_STATUS
            guard p.count >= 12, (p.count - 4) % 8 == 0 else { throw HarnessError("BLOCK_STATUS chunk of length \(p.count)") }
            let id: UInt32 = Self.load(p, 0, UInt32.self)
            var list: [(length: UInt64, flags: UInt32)] = []
            for i in stride(from: 4, to: p.count, by: 8) {
                let len = UInt64(Self.load(p, i, UInt32.self))
                guard len > 0 else { throw HarnessError("block status descriptor of length 0") }
                list.append((len, Self.load(p, i + 4, UInt32.self)))
            }
            guard r.extents[id] == nil else { throw HarnessError("two status chunks for context \(id)") }
            r.extents[id] = list
        case 6:  // BLOCK_STATUS_EXT
            guard mode == .extended else { throw HarnessError("BLOCK_STATUS_EXT without extended headers") }
            guard p.count >= 24, (p.count - 8) % 16 == 0 else { throw HarnessError("BLOCK_STATUS_EXT chunk of length \(p.count)") }
            let id: UInt32 = Self.load(p, 0, UInt32.self)
            let count = Int(Self.load(p, 4, UInt32.self))
            guard count == 0 || count == (p.count - 8) / 16 else { throw HarnessError("BLOCK_STATUS_EXT count \(count) disagrees with its length") }
            var list: [(length: UInt64, flags: UInt32)] = []
            for i in stride(from: 8, to: p.count, by: 16) {
                let len: UInt64 = Self.load(p, i, UInt64.self)
                guard len > 0 else { throw HarnessError("block status descriptor of length 0") }
                guard Self.load(p, i + 8, UInt32.self) == 0 else { throw HarnessError("descriptor padding not zero") }
                list.append((len, Self.load(p, i + 12, UInt32.self)))
            }
            guard r.extents[id] == nil else { throw HarnessError("two status chunks for context \(id)") }
            r.extents[id] = list
        case 0x8001:  // ERROR
            guard p.count >= 6 else { throw HarnessError("ERROR chunk of length \(p.count)") }
            let err: UInt32 = Self.load(p, 0, UInt32.self)
            let mlen = Int(Self.load(p, 4, UInt16.self))
            guard err != 0, mlen <= p.count - 6, mlen <= 4096 else { throw HarnessError("malformed ERROR chunk") }
            r.error = err
            r.message = String(decoding: p[6..<6 + mlen], as: UTF8.self)
        default:
            throw HarnessError("unexpected chunk type \(c.type)")
        }
    }

    /// Sends a request and reads its reply.
    public func request(type: UInt16, flags: UInt16 = 0, offset: UInt64, length: UInt64, payload: [UInt8] = []) throws -> Reply {
        let cookie = try send(type: type, flags: flags, offset: offset, length: length, payload: payload)
        let r = try receive(readLength: type == 0 ? Int(length) : nil)
        guard r.cookie == cookie else { throw HarnessError("reply for cookie \(r.cookie), expected \(cookie)") }
        return r
    }

    public func read(offset: UInt64, length: UInt64, flags: UInt16 = 0) throws -> Reply {
        try request(type: 0, flags: flags, offset: offset, length: length)
    }

    /// A write; with extended headers flagged PAYLOAD_LEN, as the spec requires.
    public func write(offset: UInt64, _ data: [UInt8], flags: UInt16 = 0) throws -> Reply {
        try request(type: 1, flags: flags | (mode == .extended ? 1 << 5 : 0), offset: offset, length: UInt64(data.count),
                    payload: data)
    }

    public func blockStatus(offset: UInt64, length: UInt64, flags: UInt16 = 0, payload: [UInt8] = []) throws -> Reply {
        try request(type: 7, flags: flags, offset: offset, length: length, payload: payload)
    }

    /// NBD_CMD_DISC.
    public func disconnect() throws { try send(type: 2, offset: 0, length: 0) }
}
