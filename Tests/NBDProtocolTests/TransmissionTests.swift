@testable import NBDProtocol
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Helpers: bytes of a request header.
func requestBytes(magic: UInt32 = 0x2560_9513, flags: UInt16 = 0, type: UInt16, cookie: UInt64 = 7,
                  offset: UInt64 = 0, length: UInt32 = 0) -> [UInt8] {
    func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
    return be(magic) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
}

func parse(_ bytes: [UInt8]) throws(TransmissionError) -> RequestHeader? {
    let result: Result<RequestHeader?, TransmissionError> = bytes.withUnsafeBytes { raw in
        Result { () throws(TransmissionError) in
            try Transmission.parseRequest(raw.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, count: raw.count)
        }
    }
    return try result.get()
}

@Suite struct RequestParsingTests {
    @Test func parsesAReadHeader() throws {
        let h = try parse(requestBytes(flags: 4, type: 0, cookie: 0x0102_0304_0506_0708, offset: 1 << 40, length: 4096))
        #expect(h == RequestHeader(flags: .df, type: 0, cookie: 0x0102_0304_0506_0708, offset: 1 << 40, length: 4096))
        #expect(h?.command == .read)
        #expect(h?.payloadLength == 0)
    }

    @Test func writeCarriesPayloadLength() throws {
        let h = try parse(requestBytes(flags: 1, type: 1, length: 512))
        #expect(h?.command == .write && h?.flags == .fua && h?.payloadLength == 512)
    }

    @Test(arguments: [0, 1, 16, 27])
    func shortInputNeedsMoreBytes(count: Int) throws {
        #expect(try parse(Array(requestBytes(type: 0).prefix(count))) == nil)
    }

    @Test func badMagicThrows() {
        #expect(throws: TransmissionError.badMagic(0xdead_beef)) { try parse(requestBytes(magic: 0xdead_beef, type: 0)) }
        // Even the simple-reply magic is not a request.
        #expect(throws: TransmissionError.badMagic(0x6744_6698)) { try parse(requestBytes(magic: 0x6744_6698, type: 0)) }
    }

    @Test func oversizedWritePayloadThrows() throws {
        let big = Transmission.maxPayload + 1
        #expect(throws: TransmissionError.payloadTooLarge(UInt64(big))) { try parse(requestBytes(type: 1, length: big)) }
        // Exactly the maximum is fine; reads that long are not a framing problem.
        #expect(try parse(requestBytes(type: 1, length: Transmission.maxPayload)) != nil)
        #expect(try parse(requestBytes(type: 0, length: .max)) != nil)
    }

    @Test func encodeRequestRoundTrips() throws {
        let h = RequestHeader(flags: [.fua, .noHole], type: 6, cookie: .max, offset: 12345, length: 99)
        var bytes = [UInt8](repeating: 0, count: RequestHeader.size)
        bytes.withUnsafeMutableBytes { Transmission.encodeRequest(h, into: $0.baseAddress!) }
        #expect(bytes == requestBytes(flags: 3, type: 6, cookie: .max, offset: 12345, length: 99))
        #expect(try parse(bytes) == h)
    }

    @Test func unknownCommandStillParses() throws {
        let h = try parse(requestBytes(type: 99))
        #expect(h?.type == 99 && h?.command == nil)
    }
}

@Suite struct ValidateTests {
    static let size: UInt64 = 1 << 20
    static let rw = Transmission.Limits(size: size, readOnly: false, maxPayload: 32 << 20, structuredReplies: true,
                                        hasMetaContexts: true)
    static let ro = Transmission.Limits(size: size, readOnly: true, maxPayload: 32 << 20, structuredReplies: false,
                                        hasMetaContexts: false)

    static func req(_ c: Command, _ flags: CommandFlags = [], _ offset: UInt64 = 0, _ length: UInt64 = 512) -> RequestHeader {
        RequestHeader(flags: flags, type: c.rawValue, cookie: 1, offset: offset, length: length)
    }

    @Test func validRequestsPass() {
        for c in [Command.read, .write, .trim, .writeZeroes, .cache, .blockStatus] {
            #expect(Transmission.validate(Self.req(c), Self.rw) == nil, "\(c)")
        }
        #expect(Transmission.validate(Self.req(.flush, [], 0, 0), Self.rw) == nil)
        #expect(Transmission.validate(Self.req(.disconnect, [], 0, 0), Self.rw) == nil)
        // Ends exactly at the end of the export.
        #expect(Transmission.validate(Self.req(.read, [], Self.size - 512, 512), Self.rw) == nil)
        #expect(Transmission.validate(Self.req(.read, .df), Self.rw) == nil)
        #expect(Transmission.validate(Self.req(.writeZeroes, [.fua, .noHole, .fastZero]), Self.rw) == nil)
        #expect(Transmission.validate(Self.req(.blockStatus, .reqOne), Self.rw) == nil)
    }

    @Test func pastTheEndIsEINVALForReadsAndENOSPCForWrites() {
        // The spec: ENOSPC for a write (and write-zeroes) past the end, EINVAL for a read
        // or trim; as nbdkit and QEMU answer.
        #expect(Transmission.validate(Self.req(.read, [], Self.size - 511, 512), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.write, [], Self.size, 1), Self.rw) == .nospc)
        #expect(Transmission.validate(Self.req(.writeZeroes, [], Self.size - 4096, 8192), Self.rw) == .nospc)
        #expect(Transmission.validate(Self.req(.trim, [], Self.size + 1, 0), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.cache, [], Self.size, 512), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.blockStatus, [], Self.size, 512), Self.rw) == .inval)
    }

    @Test func offsetPlusLengthOverflowIsEINVAL() {
        #expect(Transmission.validate(Self.req(.read, [], .max, 1), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.writeZeroes, [], .max - 10, .max), Self.rw) == .nospc)
        #expect(Transmission.validate(Self.req(.trim, [], .max - 10, .max), Self.rw) == .inval)
        let huge = Transmission.Limits(size: .max, readOnly: false, maxPayload: 32 << 20, structuredReplies: true, hasMetaContexts: true)
        #expect(Transmission.validate(Self.req(.read, [], .max - 100, 512), huge) == .inval)
    }

    @Test func writesToReadOnlyAreEPERM() {
        for c in [Command.write, .trim, .writeZeroes] {
            #expect(Transmission.validate(Self.req(c), Self.ro) == .perm, "\(c)")
            // Even past the end, the read-only answer wins.
            #expect(Transmission.validate(Self.req(c, [], Self.size, 512), Self.ro) == .perm, "\(c)")
        }
        #expect(Transmission.validate(Self.req(.read), Self.ro) == nil)
    }

    @Test func tooLongIsEINVAL() {
        #expect(Transmission.validate(Self.req(.read, [], 0, (32 << 20) + 1), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.write, [], 0, (32 << 20) + 1), Self.rw) == .inval)
    }

    @Test func flagsACommandDoesNotTakeAreEINVAL() {
        #expect(Transmission.validate(Self.req(.read, .df), Self.ro) == .inval, "DF needs structured replies")
        #expect(Transmission.validate(Self.req(.write, .noHole), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.trim, .fastZero), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.blockStatus, .df), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.read, CommandFlags(rawValue: 1 << 15)), Self.rw) == .inval)
        // PAYLOAD_LEN only exists with extended headers.
        #expect(Transmission.validate(Self.req(.write, .payloadLen), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.blockStatus, .payloadLen), Self.rw) == .inval)
    }

    @Test func fuaIsAcceptedOnEveryCommand() {
        // SEND_FUA is advertised, so the spec says the server "MUST accept all commands with
        // this bit set".
        for c in [Command.read, .write, .trim, .writeZeroes, .cache, .blockStatus] {
            #expect(Transmission.validate(Self.req(c, .fua), Self.rw) == nil, "\(c)")
        }
        #expect(Transmission.validate(Self.req(.flush, .fua, 0, 0), Self.rw) == nil)
        #expect(Transmission.validate(Self.req(.disconnect, .fua, 0, 0), Self.rw) == nil)
        #expect(Transmission.validate(Self.req(.read, .fua), Self.ro) == nil)
        #expect(Transmission.validate(Self.req(.read, [.fua, .df]), Self.rw) == nil)
    }

    @Test func zeroLengthBlockStatusIsEINVAL() {
        // A reply would need a descriptor of length 0, which the spec forbids.
        #expect(Transmission.validate(Self.req(.blockStatus, [], 0, 0), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.read, [], 0, 0), Self.rw) == nil, "a zero-length read is answered")
    }

    @Test func extendedHeadersAllowPayloadLenAnd64BitEffectLengths() {
        let ext = Transmission.Limits(size: 1 << 40, readOnly: false, maxPayload: 32 << 20, structuredReplies: false,
                                      hasMetaContexts: true, extendedHeaders: true)
        #expect(ext.structuredReplies, "extended headers imply chunked replies")
        #expect(Transmission.validate(Self.req(.write, .payloadLen, 0, 4096), ext) == nil)
        #expect(Transmission.validate(Self.req(.blockStatus, .payloadLen, 0, 4096), ext) == nil)
        #expect(Transmission.validate(Self.req(.read, .payloadLen, 0, 4096), ext) == .inval)
        #expect(Transmission.validate(Self.req(.read, .df, 0, 4096), ext) == nil)
        // Effect lengths past 4 GiB for commands without a payload.
        #expect(Transmission.validate(Self.req(.writeZeroes, [], 0, 6 << 30), ext) == nil)
        #expect(Transmission.validate(Self.req(.trim, [], 1 << 30, 6 << 30), ext) == nil)
        #expect(Transmission.validate(Self.req(.blockStatus, [], 0, 6 << 30), ext) == nil)
        // Payload-carrying and cache lengths stay within the maximum payload.
        #expect(Transmission.validate(Self.req(.read, [], 0, 6 << 30), ext) == .inval)
        #expect(Transmission.validate(Self.req(.cache, [], 0, 6 << 30), ext) == .inval)
        #expect(Transmission.validate(Self.req(.writeZeroes, [], (1 << 40) - 4096, 8192), ext) == .nospc)
    }

    @Test func otherMalformedRequests() {
        #expect(Transmission.validate(RequestHeader(flags: [], type: 99, cookie: 0, offset: 0, length: 0), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.flush, [], 0, 1), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.resize, [], 0, 0), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.blockStatus), Self.ro) == .inval, "no meta context negotiated")
        // Found by FuzzNBD: a zero-length query at the end of the export got a zero-length extent.
        #expect(Transmission.validate(Self.req(.blockStatus, [], Self.size, 0), Self.rw) == .inval)
        #expect(Transmission.validate(Self.req(.blockStatus, [], 0, 0), Self.rw) == .inval)
    }
}

@Suite struct ReplyEncodingTests {
    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

    @Test func simpleReply() {
        var b = [UInt8](repeating: 0xff, count: 16)
        b.withUnsafeMutableBytes { Transmission.encodeSimpleReply(error: .perm, cookie: 0xabcdef, into: $0.baseAddress!) }
        #expect(b == Self.be(UInt32(0x6744_6698)) + Self.be(UInt32(1)) + Self.be(UInt64(0xabcdef)))
    }

    @Test func offsetDataHeader() {
        var b = [UInt8](repeating: 0, count: Transmission.offsetDataHeaderSize)
        b.withUnsafeMutableBytes {
            Transmission.encodeOffsetDataHeader(cookie: 5, offset: 4096, dataLength: 512, done: true, into: $0.baseAddress!)
        }
        #expect(b == Self.be(UInt32(0x668e_33ef)) + Self.be(UInt16(1)) + Self.be(UInt16(1)) + Self.be(UInt64(5))
                + Self.be(UInt32(520)) + Self.be(UInt64(4096)))
    }

    @Test func offsetHole() {
        var b = [UInt8](repeating: 0, count: Transmission.offsetHoleSize)
        b.withUnsafeMutableBytes {
            Transmission.encodeOffsetHole(cookie: 6, offset: 8192, length: 65536, done: false, into: $0.baseAddress!)
        }
        #expect(b == Self.be(UInt32(0x668e_33ef)) + Self.be(UInt16(0)) + Self.be(UInt16(2)) + Self.be(UInt64(6))
                + Self.be(UInt32(12)) + Self.be(UInt64(8192)) + Self.be(UInt32(65536)))
    }

    @Test func errorChunkCarriesTheMessage() {
        let b = Transmission.errorChunk(cookie: 9, error: .inval, message: "bad")
        #expect(b == Self.be(UInt32(0x668e_33ef)) + Self.be(UInt16(1)) + Self.be(UInt16(0x8001)) + Self.be(UInt64(9))
                + Self.be(UInt32(9)) + Self.be(UInt32(22)) + Self.be(UInt16(3)) + Array("bad".utf8))
        // Long messages are cut to 4096 bytes; the length fields agree.
        let long = Transmission.errorChunk(cookie: 1, error: .io, message: String(repeating: "x", count: 5000))
        #expect(long.count == 20 + 6 + 4096)
    }

    @Test func noneChunk() {
        #expect(Transmission.noneChunk(cookie: 3) == Self.be(UInt32(0x668e_33ef)) + Self.be(UInt16(1)) + Self.be(UInt16(0))
                + Self.be(UInt64(3)) + Self.be(UInt32(0)))
    }

    @Test func blockStatusChunk() {
        let b = Transmission.blockStatusChunk(cookie: 4, contextID: 1,
                                              extents: [.init(length: 4096, flags: 3), .init(length: 8192, flags: 0)], done: true)
        #expect(b == Self.be(UInt32(0x668e_33ef)) + Self.be(UInt16(1)) + Self.be(UInt16(5)) + Self.be(UInt64(4))
                + Self.be(UInt32(20)) + Self.be(UInt32(1)) + Self.be(UInt32(4096)) + Self.be(UInt32(3))
                + Self.be(UInt32(8192)) + Self.be(UInt32(0)))
    }
}

@Suite struct ExtendedHeaderCodecTests {
    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

    static func extRequest(magic: UInt32 = 0x21e4_1c71, flags: UInt16 = 0, type: UInt16, cookie: UInt64 = 7,
                           offset: UInt64 = 0, length: UInt64 = 0) -> [UInt8] {
        be(magic) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
    }

    static func parseExt(_ bytes: [UInt8]) throws(TransmissionError) -> RequestHeader? {
        let result: Result<RequestHeader?, TransmissionError> = bytes.withUnsafeBytes { raw in
            Result { () throws(TransmissionError) in
                try Transmission.parseRequest(raw.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, count: raw.count, extended: true)
            }
        }
        return try result.get()
    }

    @Test func parsesA64BitLength() throws {
        let h = try Self.parseExt(Self.extRequest(flags: 0, type: 6, cookie: 9, offset: 1 << 33, length: 5 << 30))
        #expect(h == RequestHeader(flags: [], type: 6, cookie: 9, offset: 1 << 33, length: 5 << 30))
        #expect(h?.payloadLength(extended: true) == 0, "write-zeroes carries no payload")
        #expect(try Self.parseExt(Array(Self.extRequest(type: 0).prefix(31))) == nil)
    }

    @Test func payloadLengthFollowsTheFlag() throws {
        let w = try Self.parseExt(Self.extRequest(flags: 1 << 5, type: 1, length: 4096))
        #expect(w?.payloadLength(extended: true) == 4096)
        let bs = try Self.parseExt(Self.extRequest(flags: 1 << 5, type: 7, length: 16))
        #expect(bs?.payloadLength(extended: true) == 16)
        #expect(bs?.payloadLength(extended: false) == 0)
        // A read flagged PAYLOAD_LEN carries one too (refused later, after it is skipped).
        #expect(try Self.parseExt(Self.extRequest(flags: 1 << 5, type: 0, length: 8))?.payloadLength(extended: true) == 8)
    }

    @Test func compactMagicIsRejectedOnceExtended() {
        #expect(throws: TransmissionError.badMagic(0x2560_9513)) { try Self.parseExt(Self.extRequest(magic: 0x2560_9513, type: 0)) }
    }

    @Test func oversizedPayloadThrows() {
        let big = UInt64(Transmission.maxPayload) + 1
        #expect(throws: TransmissionError.payloadTooLarge(big)) { try Self.parseExt(Self.extRequest(flags: 1 << 5, type: 1, length: big)) }
        #expect(throws: TransmissionError.payloadTooLarge(1 << 40)) { try Self.parseExt(Self.extRequest(flags: 1 << 5, type: 7, length: 1 << 40)) }
        // An effect length is not a payload.
        #expect(throws: Never.self) { _ = try Self.parseExt(Self.extRequest(type: 4, length: 1 << 40)) }
    }

    @Test func encodeExtendedRequestRoundTrips() throws {
        let h = RequestHeader(flags: [.fua, .payloadLen], type: 1, cookie: 42, offset: 1 << 35, length: 65536)
        var bytes = [UInt8](repeating: 0, count: RequestHeader.extendedSize)
        bytes.withUnsafeMutableBytes { Transmission.encodeExtendedRequest(h, into: $0.baseAddress!) }
        #expect(bytes == Self.extRequest(flags: 0x21, type: 1, cookie: 42, offset: 1 << 35, length: 65536))
        #expect(try Self.parseExt(bytes) == h)
    }

    @Test func extendedChunkHeaders() {
        var b = [UInt8](repeating: 0xee, count: 40)
        let n = b.withUnsafeMutableBytes {
            Transmission.encodeOffsetDataHeader(extended: true, cookie: 5, requestOffset: 4096, offset: 8192, dataLength: 512,
                                                done: true, into: $0.baseAddress!)
        }
        #expect(n == 40)
        #expect(b == Self.be(UInt32(0x6e8a_278c)) + Self.be(UInt16(1)) + Self.be(UInt16(1)) + Self.be(UInt64(5))
                + Self.be(UInt64(4096)) + Self.be(UInt64(520)) + Self.be(UInt64(8192)))
        var none = [UInt8](repeating: 0xee, count: 32)
        let m = none.withUnsafeMutableBytes { Transmission.encodeNone(extended: true, cookie: 3, requestOffset: 77, into: $0.baseAddress!) }
        #expect(m == 32)
        #expect(none == Self.be(UInt32(0x6e8a_278c)) + Self.be(UInt16(1)) + Self.be(UInt16(0)) + Self.be(UInt64(3))
                + Self.be(UInt64(77)) + Self.be(UInt64(0)))
    }

    @Test func blockStatusExtCarries64BitLengthsAndACount() {
        let extents = [Transmission.Extent(length: 6 << 30, flags: 3), .init(length: 4096, flags: 0)]
        var b = [UInt8](repeating: 0xee, count: Transmission.blockStatusChunkSize(extended: true, count: 2))
        let n = b.withUnsafeMutableBytes {
            Transmission.encodeBlockStatusChunk(extended: true, cookie: 4, requestOffset: 512, contextID: 2, extents: extents,
                                                done: true, into: $0.baseAddress!)
        }
        #expect(n == 32 + 8 + 32)
        #expect(b == Self.be(UInt32(0x6e8a_278c)) + Self.be(UInt16(1)) + Self.be(UInt16(6)) + Self.be(UInt64(4))
                + Self.be(UInt64(512)) + Self.be(UInt64(40)) + Self.be(UInt32(2)) + Self.be(UInt32(2))
                + Self.be(UInt64(6 << 30)) + Self.be(UInt32(0)) + Self.be(UInt32(3))
                + Self.be(UInt64(4096)) + Self.be(UInt32(0)) + Self.be(UInt32(0)))
    }

    @Test func fitCompactCutsAtTheFirstTooLongDescriptor() {
        var e = [Transmission.Extent(length: 0, flags: 1), .init(length: 4096, flags: 0), .init(length: 5 << 30, flags: 3),
                 .init(length: 512, flags: 0)]
        Transmission.fitCompact(&e, alignment: 4096)
        #expect(e.count == 2, "the zero-length descriptor goes, the list ends at the long one")
        #expect(e[0] == .init(length: 4096, flags: 0))
        #expect(e[1].length <= UInt64(UInt32.max) && e[1].length % 4096 == 0 && e[1].length > 0 && e[1].flags == 3)
    }

    @Test func blockStatusPayloadParsing() {
        func parse(_ b: [UInt8]) -> Transmission.BlockStatusPayload? { b.withUnsafeBytes { Transmission.parseBlockStatusPayload($0) } }
        #expect(parse(Self.be(UInt64(1 << 33)) + Self.be(UInt32(2)) + Self.be(UInt32(1)))
                == .init(effectLength: 1 << 33, contextIDs: [2, 1]))
        #expect(parse(Self.be(UInt64(4096))) == nil, "at least one id")
        #expect(parse(Self.be(UInt64(4096)) + Self.be(UInt16(1))) == nil, "ids are 32-bit")
        #expect(parse(Self.be(UInt64(4096)) + Self.be(UInt32(1)) + Self.be(UInt32(1))) == nil, "no repeats")
    }

    @Test func errorMessagesAreCutAtACharacterBoundary() {
        let text = String(repeating: "é", count: 3000)   // 2 bytes each
        let cut = Transmission.messageBytes(text)
        #expect(cut.count <= 4096 && cut.count % 2 == 0)
        #expect(String(decoding: cut, as: UTF8.self).allSatisfy { $0 == "é" })
    }
}

@Suite struct ErrorMappingTests {
    @Test(arguments: [
        (EPERM, CommandFlags(), NBDErrorCode.perm), (EROFS, [], .perm), (EACCES, [], .perm),
        (EIO, [], .io), (ENOMEM, [], .nomem), (ENOSPC, [], .nospc), (EDQUOT, [], .nospc), (EFBIG, [], .nospc),
        (ESHUTDOWN, [], .shutdown), (EINVAL, [], .inval), (0, [], .ok), (EBADF, [], .inval), (ENOENT, [], .inval),
        (ENOTSUP, [], .inval), (ENOTSUP, .fastZero, .notsup), (EOPNOTSUPP, .fastZero, .notsup),
        (EOVERFLOW, [], .inval), (EOVERFLOW, .df, .overflow),
    ] as [(Int32, CommandFlags, NBDErrorCode)])
    func errnoMapsToTheWire(errno: Int32, flags: CommandFlags, expected: NBDErrorCode) {
        #expect(NBDErrorCode.from(errno: errno, flags: flags) == expected)
    }
}
