/// The client side of the fixed newstyle handshake, as a state machine that does no I/O:
/// feed it what the server sent (`receive`), send what it produced (`takeOutput`), until it
/// is `.done` (or throws). The order of options is QEMU's: (STARTTLS), (EXTENDED_HEADERS when
/// `offerExtendedHeaders`, falling back to STRUCTURED_REPLY when refused), STRUCTURED_REPLY,
/// SET_META_CONTEXT, GO with an `NBD_INFO_BLOCK_SIZE` request; EXPORT_NAME for servers
/// without GO. Error texts follow QEMU's `nbd/client.c`.
public struct ClientHandshake: Sendable {
    /// What the server told us about the export.
    public struct ExportInfo: Sendable, Equatable {
        public var size: UInt64 = 0
        public var flags = TransmissionFlags()
        public var minimumBlock: UInt32 = 0
        public var preferredBlock: UInt32 = 0
        public var maximumBlock: UInt32 = 0
        public var structuredReplies = false
        /// `NBD_OPT_EXTENDED_HEADERS` accepted: 32-byte requests and replies, 64-bit lengths,
        /// `BLOCK_STATUS_EXT` (implies structured replies).
        public var extendedHeaders = false
        /// Negotiated meta contexts: name → id.
        public var contexts: [String: UInt32] = [:]
        public init() {}
    }

    public enum State: Sendable, Equatable {
        case negotiating
        /// The server accepted STARTTLS: the caller wraps the connection in TLS, completes
        /// the TLS handshake, then calls `transportSecured()`.
        case upgradeToTLS
        case done(ExportInfo)
    }

    /// Why negotiation failed, in QEMU's words; `isExportMissing` for `NBD_REP_ERR_UNKNOWN`.
    public struct Failure: Error, Sendable, Equatable, CustomStringConvertible {
        public let message: String
        /// The text the server sent with its error reply, if any (QEMU's "server reported").
        public let serverText: String?
        /// The server did not know the export. Still worth retrying within `open-timeout` or
        /// `reconnect-delay`: a server that is starting listens before its exports exist.
        public let isExportMissing: Bool
        /// The server refused on purpose (policy, TLS required, bad parameters): retrying the
        /// same negotiation cannot help.
        public let isPermanent: Bool
        public init(_ message: String, serverText: String? = nil, exportMissing: Bool = false, permanent: Bool = false) {
            self.message = message
            self.serverText = serverText
            self.isExportMissing = exportMissing
            self.isPermanent = permanent
        }
        public var description: String { serverText.map { "\(message) (server reported: \($0))" } ?? message }
    }

    private enum Step: Sendable {
        case greeting
        case startTLS
        case awaitingTLS
        case extendedHeaders
        case structuredReply
        case metaContext
        case go
        case exportNameReply
        case finished
    }

    public let exportName: String
    public let metaContexts: [String]
    public let useTLS: Bool
    /// Ask for extended headers first (servers that refuse get STRUCTURED_REPLY instead).
    public let offerExtendedHeaders: Bool
    public private(set) var state = State.negotiating
    private var step = Step.greeting
    private var info = ExportInfo()
    private var output: [UInt8] = []
    private var noZeroes = false
    /// Longest option reply accepted (info and context replies are small; an error message
    /// is at most 4096 bytes by spec).
    public static let maxReplyLength: UInt32 = 64 * 1024
    public static let oldstyleMagic: UInt64 = 0x0000_4202_8186_1253

    public init(exportName: String, metaContexts: [String], useTLS: Bool = false, offerExtendedHeaders: Bool = false) {
        self.exportName = exportName
        self.metaContexts = metaContexts
        self.useTLS = useTLS
        self.offerExtendedHeaders = offerExtendedHeaders
    }

    /// Bytes to send to the server now.
    public mutating func takeOutput() -> [UInt8] {
        defer { output.removeAll() }
        return output
    }

    /// Call once the TLS session is up after `.upgradeToTLS`; negotiation goes on inside it.
    public mutating func transportSecured() {
        precondition(state == .upgradeToTLS)
        state = .negotiating
        sendReplyFormat()
    }

    /// Consumes complete messages from `bytes`; returns how many bytes were used. Call again
    /// with the rest plus new bytes. Stops consuming at `.upgradeToTLS` and `.done`.
    public mutating func receive(_ bytes: UnsafeRawBufferPointer) throws(Failure) -> Int {
        var used = 0
        while state == .negotiating {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[used...])
            guard let n = try advance(rest) else { break }
            used += n
        }
        return used
    }

    /// One message; nil when it has not fully arrived.
    private mutating func advance(_ bytes: UnsafeRawBufferPointer) throws(Failure) -> Int? {
        switch step {
        case .greeting:
            guard bytes.count >= 8 else { return nil }
            let magic: UInt64 = loadBE(bytes.baseAddress!, 0, as: UInt64.self)
            guard magic == NBD.initMagic else { throw Failure("Bad initial magic received: 0x\(String(magic, radix: 16))") }
            guard bytes.count >= 16 else { return nil }
            let second: UInt64 = loadBE(bytes.baseAddress!, 8, as: UInt64.self)
            if second == ClientHandshake.oldstyleMagic {
                throw Failure("Server uses the oldstyle NBD handshake, which blockd does not support", permanent: true)
            }
            guard second == NBD.optMagic else { throw Failure("Bad server magic received: 0x\(String(second, radix: 16))") }
            guard bytes.count >= 18 else { return nil }
            let flags: UInt16 = loadBE(bytes.baseAddress!, 16, as: UInt16.self)
            let fixed = flags & NBD.flagFixedNewstyle != 0
            noZeroes = flags & NBD.flagNoZeroes != 0
            var clientFlags: UInt32 = 0
            if fixed { clientFlags |= NBD.clientFixedNewstyle }
            if noZeroes { clientFlags |= NBD.clientNoZeroes }
            output.appendBE(clientFlags)
            if !fixed {
                // Without fixed newstyle the server may not understand other options.
                if useTLS { throw Failure("Server does not support STARTTLS", permanent: true) }
                sendExportName()
            } else if useTLS {
                sendOption(.startTLS, [])
                step = .startTLS
            } else {
                sendReplyFormat()
            }
            return 18
        case .startTLS:
            guard let (reply, payload, n) = try optionReply(bytes, expecting: .startTLS) else { return nil }
            if reply.type == OptionReplyType.errUnsup.rawValue {
                throw Failure("Server don't support STARTTLS option", permanent: true)
            }
            try checkError(reply, payload, option: .startTLS)
            guard reply.type == OptionReplyType.ack.rawValue, reply.length == 0 else {
                throw Failure("Server answered option \(OptionCode.startTLS.rawValue) (starttls) with unexpected reply \(reply.type)")
            }
            step = .awaitingTLS
            state = .upgradeToTLS
            return n
        case .awaitingTLS, .finished:
            return nil
        case .extendedHeaders:
            guard let (reply, _, n) = try optionReply(bytes, expecting: .extendedHeaders) else { return nil }
            if reply.type & 0x8000_0000 != 0 {
                // Not offered (QEMU before 8.2, nbdkit, …): structured replies instead.
                sendStructuredReply()
                return n
            }
            try checkEmptyAck(reply, option: .extendedHeaders, name: "extended headers")
            info.extendedHeaders = true
            info.structuredReplies = true
            sendAfterReplyFormat()
            return n
        case .structuredReply:
            guard let (reply, payload, n) = try optionReply(bytes, expecting: .structuredReply) else { return nil }
            if reply.type & 0x8000_0000 != 0 {
                // Not strict (QEMU): any refusal means simple replies only.
                _ = payload
                info.structuredReplies = false
                sendGo()
                return n
            }
            try checkEmptyAck(reply, option: .structuredReply, name: "structured reply")
            info.structuredReplies = true
            sendAfterReplyFormat()
            return n
        case .metaContext:
            guard let (reply, payload, n) = try optionReply(bytes, expecting: .setMetaContext) else { return nil }
            if reply.type & 0x8000_0000 != 0 {
                // Not strict: no contexts (block status then reports everything as data).
                info.contexts = [:]
                sendGo()
                return n
            }
            if reply.type == OptionReplyType.ack.rawValue {
                if reply.length != 0 { throw Failure("Unexpected length to ACK response") }
                sendGo()
                return n
            }
            guard reply.type == OptionReplyType.metaContext.rawValue else {
                throw Failure("Unexpected reply type \(reply.type), expected \(OptionReplyType.metaContext.rawValue) (meta context)")
            }
            guard payload.count > 4, payload.count <= 4 + NBD.maxStringLength else {
                throw Failure("Failed to negotiate meta context, server answered with unexpected length \(reply.length)")
            }
            let id: UInt32 = loadBE(payload.baseAddress!, 0, as: UInt32.self)
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: payload[4...]), as: UTF8.self)
            // Only contexts we asked for; a server must not invent others, but ignoring them is safe.
            if metaContexts.contains(name) { info.contexts[name] = id }
            return n
        case .go:
            guard let (reply, payload, n) = try optionReply(bytes, expecting: .go) else { return nil }
            if reply.type == OptionReplyType.errUnsup.rawValue {
                // The spec forbids EXPORT_NAME after extended headers; such a server is broken.
                if info.extendedHeaders { throw Failure("Server accepted extended headers but does not support NBD_OPT_GO") }
                // A server without NBD_OPT_GO: the old way, which cannot report errors.
                sendExportName()
                return n
            }
            try checkError(reply, payload, option: .go)
            if reply.type == OptionReplyType.ack.rawValue {
                if reply.length != 0 { throw Failure("server sent invalid NBD_REP_ACK") }
                if info.flags.rawValue == 0 { throw Failure("broken server omitted NBD_INFO_EXPORT") }
                try finish()
                return n
            }
            guard reply.type == OptionReplyType.info.rawValue else {
                throw Failure("unexpected reply type \(reply.type), expected \(OptionReplyType.info.rawValue) (info)")
            }
            try parseInfo(payload)
            return n
        case .exportNameReply:
            let need = noZeroes ? 10 : 134
            guard bytes.count >= need else { return nil }
            info.size = loadBE(bytes.baseAddress!, 0, as: UInt64.self)
            info.flags = TransmissionFlags(rawValue: loadBE(bytes.baseAddress!, 8, as: UInt16.self))
            try finish()
            return need
        }
    }

    private mutating func finish() throws(Failure) {
        if info.size > UInt64(Int64.max) { throw Failure("export size \(info.size) is too large") }
        if !info.flags.contains(.hasFlags) { info.flags = [] }
        step = .finished
        state = .done(info)
    }

    private mutating func parseInfo(_ payload: UnsafeRawBufferPointer) throws(Failure) {
        guard payload.count >= 2 else { throw Failure("NBD_REP_INFO length \(payload.count) is too short") }
        let base = payload.baseAddress!
        let type: UInt16 = loadBE(base, 0, as: UInt16.self)
        let len = payload.count - 2
        switch InfoType(rawValue: type) {
        case .export?:
            guard len == 10 else { throw Failure("remaining export info len \(len) is unexpected size") }
            info.size = loadBE(base, 2, as: UInt64.self)
            info.flags = TransmissionFlags(rawValue: loadBE(base, 10, as: UInt16.self))
            if info.minimumBlock > 0 && info.size % UInt64(info.minimumBlock) != 0 {
                throw Failure("export size \(info.size) is not multiple of minimum block size \(info.minimumBlock)")
            }
        case .blockSize?:
            guard len == 12 else { throw Failure("remaining export info len \(len) is unexpected size") }
            let minimum: UInt32 = loadBE(base, 2, as: UInt32.self)
            let preferred: UInt32 = loadBE(base, 6, as: UInt32.self)
            let maximum: UInt32 = loadBE(base, 10, as: UInt32.self)
            if minimum == 0 || minimum & (minimum - 1) != 0 || minimum > 64 * 1024 {
                throw Failure("server minimum block size \(minimum) is not a power of two")
            }
            if preferred == 0 || preferred & (preferred - 1) != 0 || preferred < minimum {
                throw Failure("server preferred block size \(preferred) is not valid")
            }
            if maximum < minimum || (maximum != UInt32.max && maximum % minimum != 0) {
                throw Failure("server maximum block size \(maximum) is not valid")
            }
            info.minimumBlock = minimum
            info.preferredBlock = preferred
            info.maximumBlock = maximum
            if info.flags.rawValue != 0 && info.size % UInt64(minimum) != 0 {
                throw Failure("export size \(info.size) is not multiple of minimum block size \(minimum)")
            }
        default:
            break  // name, description, and types we do not know: ignored
        }
    }

    /// An option reply for `option`, whole; nil until all of it has arrived.
    private func optionReply(_ bytes: UnsafeRawBufferPointer, expecting option: OptionCode) throws(Failure)
        -> (header: (type: UInt32, length: UInt32), payload: UnsafeRawBufferPointer, size: Int)? {
        guard bytes.count >= 20 else { return nil }
        let base = bytes.baseAddress!
        let magic: UInt64 = loadBE(base, 0, as: UInt64.self)
        guard magic == NBD.optReplyMagic else { throw Failure("Unexpected option reply magic") }
        let opt: UInt32 = loadBE(base, 8, as: UInt32.self)
        let type: UInt32 = loadBE(base, 12, as: UInt32.self)
        let length: UInt32 = loadBE(base, 16, as: UInt32.self)
        guard opt == option.rawValue else {
            throw Failure("Unexpected option type \(opt) (\(ClientHandshake.name(of: opt))), expected \(option.rawValue) (\(ClientHandshake.name(of: option.rawValue)))")
        }
        guard length <= ClientHandshake.maxReplyLength else {
            throw Failure("server reply to option \(option.rawValue) (\(ClientHandshake.name(of: option.rawValue))) is too long (\(length) bytes)")
        }
        guard bytes.count >= 20 + Int(length) else { return nil }
        return ((type, length), UnsafeRawBufferPointer(rebasing: bytes[20..<20 + Int(length)]), 20 + Int(length))
    }

    /// An option that carries no data must be answered with an empty ACK (QEMU's messages).
    private func checkEmptyAck(_ reply: (type: UInt32, length: UInt32), option: OptionCode, name: String) throws(Failure) {
        guard reply.type == OptionReplyType.ack.rawValue else {
            throw Failure("Server answered option \(option.rawValue) (\(name)) with unexpected reply \(reply.type)")
        }
        if reply.length != 0 {
            throw Failure("Option \(option.rawValue) ('\(name)') response length is \(reply.length) (it should be zero)")
        }
    }

    /// Throws QEMU's message for an error reply (`nbd_handle_reply_err`, strict).
    private func checkError(_ reply: (type: UInt32, length: UInt32), _ payload: UnsafeRawBufferPointer,
                            option: OptionCode) throws(Failure) {
        guard reply.type & 0x8000_0000 != 0 else { return }
        let o = "option \(option.rawValue) (\(ClientHandshake.name(of: option.rawValue)))"
        let said: String? = payload.isEmpty ? nil : String(decoding: payload.prefix(NBD.maxStringLength), as: UTF8.self)
        switch OptionReplyType(rawValue: reply.type) {
        case .errPolicy?: throw Failure("Denied by server for \(o)", serverText: said, permanent: true)
        case .errInvalid?: throw Failure("Invalid parameters for \(o)", serverText: said, permanent: true)
        case .errPlatform?: throw Failure("Server lacks support for \(o)", serverText: said, permanent: true)
        case .errTLSReqd?: throw Failure("TLS negotiation required before \(o)", serverText: said, permanent: true)
        case .errUnknown?: throw Failure("Requested export not available", serverText: said, exportMissing: true)
        case .errShutdown?: throw Failure("Server shutting down before \(o)", serverText: said)
        case .errBlockSizeReqd?: throw Failure("Server requires INFO_BLOCK_SIZE for \(o)", serverText: said, permanent: true)
        default: throw Failure("Unknown error code when asking for \(o)", serverText: said)
        }
    }

    // MARK: requests

    private mutating func sendOption(_ option: OptionCode, _ payload: [UInt8]) {
        output.appendBE(NBD.optMagic)
        output.appendBE(option.rawValue)
        output.appendBE(UInt32(payload.count))
        output.append(contentsOf: payload)
    }

    /// Extended headers when offered, else structured replies.
    private mutating func sendReplyFormat() {
        if offerExtendedHeaders {
            sendOption(.extendedHeaders, [])
            step = .extendedHeaders
        } else {
            sendStructuredReply()
        }
    }

    /// Once the reply format is settled: meta contexts when any were asked for, then GO.
    private mutating func sendAfterReplyFormat() {
        if metaContexts.isEmpty {
            sendGo()
        } else {
            sendSetMetaContext()
        }
    }

    private mutating func sendStructuredReply() {
        sendOption(.structuredReply, [])
        step = .structuredReply
    }

    private mutating func sendSetMetaContext() {
        var p: [UInt8] = []
        let name = Array(exportName.utf8)
        p.appendBE(UInt32(name.count))
        p.append(contentsOf: name)
        p.appendBE(UInt32(metaContexts.count))
        for q in metaContexts {
            let b = Array(q.utf8)
            p.appendBE(UInt32(b.count))
            p.append(contentsOf: b)
        }
        sendOption(.setMetaContext, p)
        step = .metaContext
    }

    private mutating func sendGo() {
        var p: [UInt8] = []
        let name = Array(exportName.utf8)
        p.appendBE(UInt32(name.count))
        p.append(contentsOf: name)
        p.appendBE(UInt16(1))
        p.appendBE(InfoType.blockSize.rawValue)
        sendOption(.go, p)
        step = .go
    }

    private mutating func sendExportName() {
        // NBD_OPT_EXPORT_NAME cannot carry the other options' results (and a client that
        // negotiated extended headers must not use it: only servers without fixed newstyle,
        // which took no options, or without GO, get here).
        info.structuredReplies = false
        info.extendedHeaders = false
        info.contexts = [:]
        sendOption(.exportName, Array(exportName.utf8))
        step = .exportNameReply
    }

    /// QEMU's names for options in messages (`nbd_opt_lookup`).
    public static func name(of option: UInt32) -> String {
        switch OptionCode(rawValue: option) {
        case .exportName?: "export name"
        case .abort?: "abort"
        case .list?: "list"
        case .peekExport?: "peek export"
        case .startTLS?: "starttls"
        case .info?: "info"
        case .go?: "go"
        case .structuredReply?: "structured reply"
        case .listMetaContext?: "list meta context"
        case .setMetaContext?: "set meta context"
        case .extendedHeaders?: "extended headers"
        case nil: "<unknown>"
        }
    }

    /// `NBD_OPT_ABORT`, sent as a courtesy before closing a connection that failed negotiation.
    public static func abortOption() -> [UInt8] {
        var out: [UInt8] = []
        out.appendBE(NBD.optMagic)
        out.appendBE(OptionCode.abort.rawValue)
        out.appendBE(UInt32(0))
        return out
    }
}
