import NBDProtocol

/// How replies are framed in transmission, as the client negotiated.
enum ReplyMode: Sendable, Equatable {
    /// Simple replies only (nothing negotiated).
    case simple
    /// `NBD_OPT_STRUCTURED_REPLY`: chunks with 20-byte headers; simple replies for
    /// commands without data.
    case structured
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte request and reply headers, 64-bit lengths, only
    /// chunked replies.
    case extended
}

/// The option-haggling half of a connection, without I/O: given one option, it answers
/// the reply bytes and what the connection does next. Kept apart so it is tested directly.
struct OptionHandler {
    enum Outcome {
        /// Send these bytes and wait for the next option.
        case reply([UInt8])
        /// Send these bytes and enter transmission with this export.
        case go([UInt8], Export)
        /// Send these bytes (maybe none) and close the connection.
        case close([UInt8], reason: String)
    }

    let exports: ExportTable
    /// Whether exports may advertise `CAN_MULTI_CONN` (not when max-connections is 1).
    let multiConn: Bool
    var noZeroes = false
    var mode = ReplyMode.simple
    /// Contexts chosen by the last SET_META_CONTEXT, and for which export name.
    var selected: [any MetaContextProvider] = []
    var selectedFor: String?

    var structuredReplies: Bool { mode != .simple }

    init(exports: ExportTable, multiConn: Bool = true) {
        self.exports = exports
        self.multiConn = multiConn
    }

    /// The flags a client that negotiated what this handler saw gets for `export`.
    func transmissionFlags(for export: Export, requestedName: String) -> TransmissionFlags {
        let contextsForThis = !selected.isEmpty && (selectedFor == requestedName || selectedFor == export.name)
        return export.transmissionFlags(structured: mode != .simple, extended: mode == .extended, multiConn: multiConn,
                                        blockStatusPayload: contextsForThis)
    }

    mutating func handle(option: UInt32, payload: [UInt8]) -> Outcome {
        guard let code = OptionCode(rawValue: option) else {
            return .reply(Handshake.errorReply(option: option, type: .errUnsup, message: "option \(option) is not supported"))
        }
        switch code {
        case .exportName:
            if mode == .extended {
                // The spec: a client that negotiated extended headers MUST NOT use this
                // option, and it cannot carry an error: hard disconnect (QEMU does too).
                return .close([], reason: "client used NBD_OPT_EXPORT_NAME after negotiating extended headers")
            }
            let name = String(decoding: payload, as: UTF8.self)
            guard let export = exports.lookup(name: name) else {
                return .close([], reason: "client asked for unknown export '\(name)' with NBD_OPT_EXPORT_NAME")
            }
            if selectedFor != export.name && selectedFor != name { selected = [] }
            let bytes = Handshake.exportNameReply(size: export.size, flags: transmissionFlags(for: export, requestedName: name),
                                                  noZeroes: noZeroes)
            return .go(bytes, export)
        case .abort:
            return .close(Handshake.optionReply(option: option, type: .ack), reason: "client aborted the handshake")
        case .list:
            if !payload.isEmpty {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "NBD_OPT_LIST takes no data"))
            }
            var out: [UInt8] = []
            for export in exports.all {
                out += Handshake.optionReply(option: option, type: .server,
                                             payload: Handshake.serverReplyPayload(name: export.name, description: export.description))
            }
            out += Handshake.optionReply(option: option, type: .ack)
            return .reply(out)
        case .info, .go:
            guard let request = Handshake.parseInfoRequest(payload) else {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "malformed NBD_OPT_INFO/GO request"))
            }
            guard let export = exports.lookup(name: request.name) else {
                return .reply(Handshake.errorReply(option: option, type: .errUnknown, message: "export '\(request.name)' not present"))
            }
            if code == .go && selectedFor != request.name && selectedFor != export.name { selected = [] }
            let flags = transmissionFlags(for: export, requestedName: request.name)
            var out = Handshake.optionReply(option: option, type: .info,
                                            payload: Handshake.infoExport(size: export.size, flags: flags))
            if request.requests.contains(InfoType.name.rawValue) {
                out += Handshake.optionReply(option: option, type: .info, payload: Handshake.infoName(export.name))
            }
            if request.requests.contains(InfoType.description.rawValue), let d = export.description {
                out += Handshake.optionReply(option: option, type: .info, payload: Handshake.infoDescription(d))
            }
            let limits = export.limits
            out += Handshake.optionReply(option: option, type: .info,
                                         payload: Handshake.infoBlockSize(minimum: limits.minimum, preferred: limits.preferred,
                                                                          maximum: limits.maximum))
            out += Handshake.optionReply(option: option, type: .ack)
            if code == .info { return .reply(out) }
            return .go(out, export)
        case .structuredReply:
            if !payload.isEmpty {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "NBD_OPT_STRUCTURED_REPLY takes no data"))
            }
            switch mode {
            case .extended:
                return .reply(Handshake.errorReply(option: option, type: .errExtHeaderReqd,
                                                   message: "extended headers already negotiated"))
            case .structured:
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "structured reply already negotiated"))
            case .simple:
                mode = .structured
                return .reply(Handshake.optionReply(option: option, type: .ack))
            }
        case .extendedHeaders:
            if !payload.isEmpty {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "NBD_OPT_EXTENDED_HEADERS takes no data"))
            }
            if mode == .extended {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "extended headers already negotiated"))
            }
            mode = .extended
            return .reply(Handshake.optionReply(option: option, type: .ack))
        case .listMetaContext, .setMetaContext:
            let isSet = code == .setMetaContext
            if isSet {
                // The spec: SET "replaces all previously-set metadata contexts (including
                // when this command fails)".
                selected = []
                selectedFor = nil
                if mode == .simple {
                    return .reply(Handshake.errorReply(option: option, type: .errInvalid,
                                                       message: "meta contexts need structured replies first (NBD_OPT_STRUCTURED_REPLY)"))
                }
            }
            guard let request = Handshake.parseMetaContextRequest(payload) else {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "malformed meta context request"))
            }
            guard let export = exports.lookup(name: request.exportName) else {
                return .reply(Handshake.errorReply(option: option, type: .errUnknown, message: "export '\(request.exportName)' not present"))
            }
            var matches: [any MetaContextProvider] = []
            if request.queries.isEmpty {
                // LIST with no query lists everything; SET with none selects nothing.
                if !isSet { matches = export.contexts }
            } else {
                for q in request.queries {
                    for c in export.contexts(matching: q, forSet: isSet) where !matches.contains(where: { $0 === c }) {
                        matches.append(c)
                    }
                }
            }
            var out: [UInt8] = []
            for (i, c) in matches.enumerated() {
                out += Handshake.optionReply(option: option, type: .metaContext,
                                             payload: Handshake.metaContextPayload(id: isSet ? UInt32(i + 1) : 0, name: c.name))
            }
            out += Handshake.optionReply(option: option, type: .ack)
            if isSet {
                selected = matches
                selectedFor = request.exportName
            }
            return .reply(out)
        case .peekExport, .startTLS:
            return .reply(Handshake.errorReply(option: option, type: .errUnsup, message: "option \(option) is not supported"))
        }
    }
}
