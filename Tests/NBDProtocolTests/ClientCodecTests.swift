@testable import NBDProtocol
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The client side of the codec: the handshake state machine fed with what a server sends
/// (built with the server side's own encoders), and reply checks against their requests.
@Suite struct ClientHandshakeTests {
    static let contexts = ["base:allocation", "qemu:allocation-depth"]

    /// Runs `h` against scripted server bytes, feeding `chunk` bytes at a time; returns what
    /// the client sent.
    func run(_ h: inout ClientHandshake, _ server: [UInt8], chunk: Int = Int.max) throws -> [UInt8] {
        var sent: [UInt8] = []
        var pending: [UInt8] = []
        var at = 0
        while at < server.count {
            let n = min(chunk, server.count - at)
            pending += server[at..<at + n]
            at += n
            let used = try pending.withUnsafeBytes { raw in try h.receive(raw) }
            pending.removeFirst(used)
            sent += h.takeOutput()
            if case .done = h.state { break }
        }
        return sent
    }

    static func option(_ code: OptionCode, _ payload: [UInt8] = []) -> [UInt8] {
        be(NBD.optMagic) + be(code.rawValue) + be(UInt32(payload.count)) + payload
    }

    static func goPayload(_ name: String) -> [UInt8] { string32(name) + be(UInt16(1)) + be(UInt16(3)) }

    static func metaPayload(_ name: String) -> [UInt8] {
        string32(name) + be(UInt32(contexts.count)) + contexts.flatMap { string32($0) }
    }

    /// A blockd-like server: structured replies, both contexts, export info and block sizes.
    static func goodServer(size: UInt64 = 1 << 20, flags: TransmissionFlags = [.hasFlags, .sendFlush, .canMultiConn]) -> [UInt8] {
        Handshake.greeting()
            + Handshake.optionReply(option: OptionCode.structuredReply.rawValue, type: .ack)
            + Handshake.optionReply(option: OptionCode.setMetaContext.rawValue, type: .metaContext,
                                    payload: Handshake.metaContextPayload(id: 7, name: "base:allocation"))
            + Handshake.optionReply(option: OptionCode.setMetaContext.rawValue, type: .metaContext,
                                    payload: Handshake.metaContextPayload(id: 9, name: "qemu:allocation-depth"))
            + Handshake.optionReply(option: OptionCode.setMetaContext.rawValue, type: .ack)
            + Handshake.optionReply(option: OptionCode.go.rawValue, type: .info, payload: Handshake.infoExport(size: size, flags: flags))
            + Handshake.optionReply(option: OptionCode.go.rawValue, type: .info,
                                    payload: Handshake.infoBlockSize(minimum: 1, preferred: 4096, maximum: 32 << 20))
            + Handshake.optionReply(option: OptionCode.go.rawValue, type: .ack)
    }

    /// Offered extended headers: accepted, they replace STRUCTURED_REPLY; refused, the client
    /// falls back to structured replies.
    @Test func extendedHeadersWhenOffered() throws {
        var h = ClientHandshake(exportName: "disk", metaContexts: Self.contexts, offerExtendedHeaders: true)
        let server = Handshake.greeting()
            + Handshake.optionReply(option: OptionCode.extendedHeaders.rawValue, type: .ack)
            + Array(Self.goodServer().dropFirst(Handshake.greeting().count + 20))
        let sent = try run(&h, server)
        #expect(Array(sent.prefix(4 + 16)) == be(UInt32(3)) + Self.option(.extendedHeaders))
        #expect(Array(sent.dropFirst(20).prefix(16)) == Array(Self.option(.setMetaContext, Self.metaPayload("disk")).prefix(16)))
        guard case .done(let info) = h.state else { Issue.record("not done: \(h.state)"); return }
        #expect(info.extendedHeaders && info.structuredReplies && info.contexts == ["base:allocation": 7, "qemu:allocation-depth": 9])

        var old = ClientHandshake(exportName: "disk", metaContexts: Self.contexts, offerExtendedHeaders: true)
        let refusing = Handshake.greeting()
            + Handshake.errorReply(option: OptionCode.extendedHeaders.rawValue, type: .errUnsup, message: "no")
            + Array(Self.goodServer().dropFirst(Handshake.greeting().count))
        let sentOld = try run(&old, refusing)
        #expect(Array(sentOld.prefix(4 + 16 + 16)) == be(UInt32(3)) + Self.option(.extendedHeaders) + Self.option(.structuredReply))
        guard case .done(let oldInfo) = old.state else { Issue.record("not done: \(old.state)"); return }
        #expect(!oldInfo.extendedHeaders && oldInfo.structuredReplies)
    }

    @Test func negotiatesLikeQEMU() throws {
        for chunk in [Int.max, 1, 7] {
            var h = ClientHandshake(exportName: "disk", metaContexts: Self.contexts)
            let sent = try run(&h, Self.goodServer(), chunk: chunk)
            let expected = be(UInt32(3))
                + Self.option(.structuredReply)
                + Self.option(.setMetaContext, Self.metaPayload("disk"))
                + Self.option(.go, Self.goPayload("disk"))
            #expect(sent == expected, "chunk \(chunk)")
            guard case .done(let info) = h.state else { Issue.record("not done: \(h.state)"); continue }
            #expect(info.size == 1 << 20)
            #expect(info.flags == [.hasFlags, .sendFlush, .canMultiConn])
            #expect(info.structuredReplies)
            #expect(info.contexts == ["base:allocation": 7, "qemu:allocation-depth": 9])
            #expect(info.minimumBlock == 1 && info.preferredBlock == 4096 && info.maximumBlock == 32 << 20)
        }
    }

    @Test func unknownExportIsQEMUsMessage() {
        var h = ClientHandshake(exportName: "nope", metaContexts: [])
        let server = Handshake.greeting()
            + Handshake.optionReply(option: OptionCode.structuredReply.rawValue, type: .ack)
            + Handshake.errorReply(option: OptionCode.go.rawValue, type: .errUnknown, message: "export 'nope' not present")
        do {
            _ = try run(&h, server)
            Issue.record("negotiation should fail")
        } catch let error as ClientHandshake.Failure {
            #expect(error.message == "Requested export not available")
            #expect(error.serverText == "export 'nope' not present")
            #expect(error.isExportMissing && !error.isPermanent)
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test func policyAndTLSRefusalsArePermanent() {
        for (type, text) in [(OptionReplyType.errPolicy, "Denied by server for option 7 (go)"),
                             (.errTLSReqd, "TLS negotiation required before option 7 (go)"),
                             (.errShutdown, "Server shutting down before option 7 (go)")] {
            var h = ClientHandshake(exportName: "d", metaContexts: [])
            let server = Handshake.greeting()
                + Handshake.optionReply(option: OptionCode.structuredReply.rawValue, type: .ack)
                + Handshake.optionReply(option: OptionCode.go.rawValue, type: type)
            do {
                _ = try run(&h, server)
                Issue.record("should fail")
            } catch let error as ClientHandshake.Failure {
                #expect(error.message == text)
                #expect(error.isPermanent == (type != .errShutdown))
            } catch {
                Issue.record("\(error)")
            }
        }
    }

    @Test func withoutStructuredRepliesNoContextsAreAsked() throws {
        var h = ClientHandshake(exportName: "d", metaContexts: Self.contexts)
        let server = Handshake.greeting()
            + Handshake.errorReply(option: OptionCode.structuredReply.rawValue, type: .errUnsup, message: "")
            + Handshake.optionReply(option: OptionCode.go.rawValue, type: .info, payload: Handshake.infoExport(size: 4096, flags: [.hasFlags]))
            + Handshake.optionReply(option: OptionCode.go.rawValue, type: .ack)
        let sent = try run(&h, server)
        #expect(sent == be(UInt32(3)) + Self.option(.structuredReply) + Self.option(.go, Self.goPayload("d")))
        guard case .done(let info) = h.state else { Issue.record("not done"); return }
        #expect(!info.structuredReplies && info.contexts.isEmpty && info.size == 4096)
    }

    @Test func oldServerWithoutGoUsesExportName() throws {
        for noZeroes in [true, false] {
            var h = ClientHandshake(exportName: "d", metaContexts: [])
            let reply = be(UInt64(8192)) + be(TransmissionFlags([.hasFlags, .readOnly]).rawValue)
                + (noZeroes ? [] : [UInt8](repeating: 0, count: 124))
            let server = Handshake.greeting(flags: NBD.flagFixedNewstyle | (noZeroes ? NBD.flagNoZeroes : 0))
                + Handshake.optionReply(option: OptionCode.structuredReply.rawValue, type: .ack)
                + Handshake.errorReply(option: OptionCode.go.rawValue, type: .errUnsup, message: "")
                + reply
            let sent = try run(&h, server)
            #expect(sent.suffix(17) == Self.option(.exportName, Array("d".utf8)))
            guard case .done(let info) = h.state else { Issue.record("not done"); continue }
            #expect(info.size == 8192 && info.flags.contains(.readOnly) && !info.structuredReplies)
        }
    }

    @Test func brokenServersAreRefused() {
        let cases: [([UInt8], String)] = [
            (Array("NBDMAGIX".utf8) + [UInt8](repeating: 0, count: 10), "Bad initial magic"),
            (be(NBD.initMagic) + be(ClientHandshake.oldstyleMagic) + [0, 0], "oldstyle"),
            (Handshake.greeting() + Handshake.optionReply(option: OptionCode.go.rawValue, type: .ack),
             "Unexpected option type 7 (go), expected 8 (structured reply)"),
            (Handshake.greeting() + Handshake.optionReply(option: OptionCode.structuredReply.rawValue, type: .ack)
                + Handshake.optionReply(option: OptionCode.go.rawValue, type: .info,
                                        payload: Handshake.infoBlockSize(minimum: 3, preferred: 4096, maximum: 1 << 20)),
             "server minimum block size 3 is not a power of two"),
            (Handshake.greeting() + Handshake.optionReply(option: OptionCode.structuredReply.rawValue, type: .ack)
                + Handshake.optionReply(option: OptionCode.go.rawValue, type: .ack),
             "broken server omitted NBD_INFO_EXPORT"),
            (Handshake.greeting() + Handshake.optionReply(option: OptionCode.structuredReply.rawValue, type: .ack)
                + be(NBD.optReplyMagic) + be(OptionCode.go.rawValue) + be(OptionReplyType.info.rawValue) + be(UInt32(1 << 30)),
             "is too long"),
        ]
        for (server, text) in cases {
            var h = ClientHandshake(exportName: "d", metaContexts: [])
            do {
                _ = try run(&h, server)
                Issue.record("should fail: \(text)")
            } catch let error as ClientHandshake.Failure {
                #expect(error.message.contains(text), "\(error.message)")
            } catch {
                Issue.record("\(error)")
            }
        }
    }
}

@Suite struct ClientRepliesTests {
    @Test func headers() throws {
        var simple = [UInt8](repeating: 0, count: 16)
        simple.withUnsafeMutableBytes { Transmission.encodeSimpleReply(error: .io, cookie: 42, into: $0.baseAddress!) }
        #expect(try simple.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: 16) }?.0 == .simple(error: 5, cookie: 42))
        #expect(try simple.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: 15) } == nil)
        let chunk = Transmission.noneChunk(cookie: 7)
        let parsed = try chunk.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: $0.count) }
        #expect(parsed?.0 == .chunk(ChunkHeader(flags: 1, type: 0, cookie: 7, length: 0)) && parsed?.size == 20)
        #expect(throws: ReplyViolation.self) {
            try [UInt8](repeating: 0x55, count: 20).withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: 20) }
        }
    }

    @Test func chunkTypesMustFitTheCommand() throws {
        func plan(_ type: ReplyType, flags: UInt16 = 0, length: UInt64, _ command: Command, request: UInt64 = 4096) throws(ReplyViolation) -> ChunkPlan {
            try ClientReplies.plan(for: ChunkHeader(flags: flags, type: type.rawValue, cookie: 1, length: length), command: command,
                                   requestLength: request)
        }
        #expect(try plan(.offsetData, length: 8 + 4096, .read) == .data)
        #expect(throws: ReplyViolation.self) { try plan(.offsetData, length: 8 + 4097, .read) }
        #expect(throws: ReplyViolation.self) { try plan(.offsetData, length: 8, .read) }
        #expect(throws: ReplyViolation.self) { try plan(.offsetData, length: 100, .write) }
        #expect(try plan(.offsetHole, length: 12, .read) == .collect)
        #expect(throws: ReplyViolation.self) { try plan(.offsetHole, length: 13, .read) }
        #expect(try plan(.blockStatus, length: 12, .blockStatus) == .collect)
        #expect(throws: ReplyViolation.self) { try plan(.blockStatus, length: 14, .blockStatus) }
        #expect(throws: ReplyViolation.self) { try plan(.blockStatus, length: 4 + 8 * 100_000, .blockStatus) }
        #expect(throws: ReplyViolation.self) { try plan(.blockStatus, length: 12, .read) }
        #expect(try plan(.none, flags: 1, length: 0, .write) == .empty)
        #expect(throws: ReplyViolation.self) { try plan(.none, flags: 0, length: 0, .write) }
        #expect(throws: ReplyViolation.self) { try plan(.none, flags: 1, length: 4, .write) }
        #expect(try plan(.error, length: 6, .write) == .collect)
        #expect(throws: ReplyViolation.self) { try plan(.error, length: 5, .write) }
        #expect(throws: ReplyViolation.self) { try plan(.error, length: 1 << 20, .write) }
        // Unknown types: errors when the high bit is set, violations otherwise.
        #expect(try ClientReplies.plan(for: ChunkHeader(flags: 1, type: 0x8123, cookie: 1, length: 6), command: .read,
                                       requestLength: 1) == .collect)
        #expect(throws: ReplyViolation.self) {
            try ClientReplies.plan(for: ChunkHeader(flags: 1, type: 77, cookie: 1, length: 0), command: .read, requestLength: 1)
        }
    }

    @Test func rangesStayInsideTheRequest() throws {
        #expect(try ClientReplies.dataRange(chunkLength: 8 + 512, offset: 1024 + 512, requestOffset: 1024, requestLength: 1024) == 512..<1024)
        #expect(throws: ReplyViolation.self) {
            try ClientReplies.dataRange(chunkLength: 8 + 512, offset: 1024 + 513, requestOffset: 1024, requestLength: 1024)
        }
        #expect(throws: ReplyViolation.self) {
            try ClientReplies.dataRange(chunkLength: 8 + 512, offset: 512, requestOffset: 1024, requestLength: 1024)
        }
        #expect(throws: ReplyViolation.self) {
            try ClientReplies.dataRange(chunkLength: 8 + 512, offset: UInt64.max - 100, requestOffset: 1024, requestLength: 1024)
        }
        let hole = be(UInt64(1024)) + be(UInt32(0))
        #expect(throws: ReplyViolation.self) {
            try hole.withUnsafeBytes { try ClientReplies.holeRange($0, requestOffset: 1024, requestLength: 10) }
        }
    }

    @Test func errorChunks() throws {
        let chunk = Transmission.errorChunk(cookie: 1, error: .nospc, message: "disk full")
        let e = try chunk.withUnsafeBytes { raw in
            try ClientReplies.parseError(UnsafeRawBufferPointer(rebasing: raw[20...]), type: ReplyType.error.rawValue,
                                         requestOffset: 0, requestLength: 4096)
        }
        #expect(e == ClientReplies.ErrorChunk(errno: ENOSPC, message: "disk full", offset: nil))
        let lying = be(UInt32(5)) + be(UInt16(100)) + Array("short".utf8)
        #expect(throws: ReplyViolation.self) {
            try lying.withUnsafeBytes { try ClientReplies.parseError($0, type: ReplyType.error.rawValue, requestOffset: 0, requestLength: 1) }
        }
        let zero = be(UInt32(0)) + be(UInt16(0))
        #expect(throws: ReplyViolation.self) {
            try zero.withUnsafeBytes { try ClientReplies.parseError($0, type: ReplyType.error.rawValue, requestOffset: 0, requestLength: 1) }
        }
        #expect(ClientReplies.errnoFromWire(1234) == EINVAL)
        #expect(ClientReplies.errnoFromWire(NBDErrorCode.shutdown.rawValue) == ESHUTDOWN)
    }

    @Test func blockStatusChunk() throws {
        let chunk = Transmission.blockStatusChunk(cookie: 1, contextID: 3, extents: [.init(length: 4096, flags: 3), .init(length: 1, flags: 0)], done: true)
        let s = try chunk.withUnsafeBytes { try ClientReplies.parseBlockStatus(UnsafeRawBufferPointer(rebasing: $0[20...])) }
        #expect(s == ClientReplies.StatusChunk(contextID: 3, first: .init(length: 4096, flags: 3), extentCount: 2))
        let empty = be(UInt32(3)) + be(UInt32(0)) + be(UInt32(0))
        #expect(throws: ReplyViolation.self) { try empty.withUnsafeBytes { try ClientReplies.parseBlockStatus($0) } }
    }

    /// Extended headers: 32-byte chunks that echo the request's offset, 64-bit lengths,
    /// `BLOCK_STATUS_EXT`; compact replies are violations then, and extended ones before.
    @Test func extendedReplies() throws {
        var none = [UInt8](repeating: 0, count: 32)
        none.withUnsafeMutableBytes { _ = Transmission.encodeNone(extended: true, cookie: 9, requestOffset: 4096, into: $0.baseAddress!) }
        let parsed = try none.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: $0.count, extended: true) }
        let header = ChunkHeader(flags: 1, type: 0, cookie: 9, length: 0, offset: 4096)
        #expect(parsed?.0 == .chunk(header) && parsed?.size == 32)
        #expect(try none.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: 31, extended: true) } == nil)
        #expect(throws: ReplyViolation.self) {
            try none.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: $0.count) }
        }
        var simple = [UInt8](repeating: 0, count: 16)
        simple.withUnsafeMutableBytes { Transmission.encodeSimpleReply(error: .ok, cookie: 1, into: $0.baseAddress!) }
        #expect(throws: ReplyViolation.self) {
            try simple.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: 16, extended: true) }
        }
        #expect(throws: ReplyViolation.self) {
            try Transmission.noneChunk(cookie: 1).withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: 20, extended: true) }
        }
        // The offset must be the request's.
        #expect(try ClientReplies.plan(for: header, command: .write, requestLength: 512, requestOffset: 4096, extended: true) == .empty)
        #expect(throws: ReplyViolation.self) {
            try ClientReplies.plan(for: header, command: .write, requestLength: 512, requestOffset: 0, extended: true)
        }
        // Block status: EXT only with extended headers, the compact type only without.
        let extents: [Transmission.Extent] = [.init(length: 6 << 30, flags: 2), .init(length: 512, flags: 0)]
        var chunk = [UInt8](repeating: 0, count: Transmission.blockStatusChunkSize(extended: true, count: 2))
        chunk.withUnsafeMutableBytes {
            _ = Transmission.encodeBlockStatusChunk(extended: true, cookie: 3, requestOffset: 0, contextID: 5, extents: extents,
                                                    done: true, into: $0.baseAddress!)
        }
        let (h, size) = try #require(try chunk.withUnsafeBytes { try ClientReplies.parseHeader($0.baseAddress!, count: $0.count, extended: true) })
        guard case .chunk(let c) = h else { Issue.record("not a chunk"); return }
        #expect(try ClientReplies.plan(for: c, command: .blockStatus, requestLength: 8 << 30, extended: true) == .collect)
        #expect(throws: ReplyViolation.self) { try ClientReplies.plan(for: c, command: .blockStatus, requestLength: 8 << 30) }
        let s = try chunk.withUnsafeBytes { try ClientReplies.parseBlockStatus(UnsafeRawBufferPointer(rebasing: $0[size...]), extended: true) }
        #expect(s == ClientReplies.StatusChunk(contextID: 5, first: .init(length: 6 << 30, flags: 2), extentCount: 2))
        var compact = c
        compact.type = ReplyType.blockStatus.rawValue
        compact.length = 12
        #expect(throws: ReplyViolation.self) {
            try ClientReplies.plan(for: compact, command: .blockStatus, requestLength: 4096, extended: true)
        }
        // A descriptor count that does not match the payload.
        var lying = chunk
        lying[size + 7] = 3
        #expect(throws: ReplyViolation.self) {
            try lying.withUnsafeBytes { try ClientReplies.parseBlockStatus(UnsafeRawBufferPointer(rebasing: $0[size...]), extended: true) }
        }
    }

    @Test func readCoverage() throws {
        var c = ReadCoverage()
        try c.add(0..<10)
        try c.add(10..<20)
        #expect(c.isComplete(length: 20))
        c.reset()
        try c.add(10..<20)
        try c.add(30..<40)
        #expect(!c.isComplete(length: 40))
        try c.add(20..<30)
        #expect(throws: ReplyViolation.self) { try c.add(15..<16) }
        try c.add(0..<10)
        #expect(c.isComplete(length: 40) && c.covered == 40)
        c.reset()
        for i in 0..<ReadCoverage.maxRanges { try c.add(i * 2..<i * 2 + 1) }
        #expect(throws: ReplyViolation.self) { try c.add(1000..<1001) }
    }
}
