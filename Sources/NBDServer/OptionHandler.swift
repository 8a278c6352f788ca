import NBDProtocol

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
    var noZeroes = false
    var structuredReplies = false
    /// Contexts chosen by the last SET_META_CONTEXT, and for which export name.
    var selected: [any MetaContextProvider] = []
    var selectedFor: String?

    init(exports: ExportTable) { self.exports = exports }

    mutating func handle(option: UInt32, payload: [UInt8]) -> Outcome {
        guard let code = OptionCode(rawValue: option) else {
            return .reply(Handshake.errorReply(option: option, type: .errUnsup, message: "option \(option) is not supported"))
        }
        switch code {
        case .exportName:
            let name = String(decoding: payload, as: UTF8.self)
            guard let export = exports.lookup(name: name) else {
                return .close([], reason: "client asked for unknown export '\(name)' with NBD_OPT_EXPORT_NAME")
            }
            let bytes = Handshake.exportNameReply(size: export.size, flags: export.transmissionFlags, noZeroes: noZeroes)
            if selectedFor != export.name { selected = [] }
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
            var out = Handshake.optionReply(option: option, type: .info,
                                            payload: Handshake.infoExport(size: export.size, flags: export.transmissionFlags))
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
            if selectedFor != request.name && selectedFor != export.name { selected = [] }
            return .go(out, export)
        case .structuredReply:
            if !payload.isEmpty {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "NBD_OPT_STRUCTURED_REPLY takes no data"))
            }
            structuredReplies = true
            return .reply(Handshake.optionReply(option: option, type: .ack))
        case .listMetaContext, .setMetaContext:
            let isSet = code == .setMetaContext
            if !structuredReplies {
                return .reply(Handshake.errorReply(option: option, type: .errInvalid,
                                                   message: "meta contexts need structured replies first (NBD_OPT_STRUCTURED_REPLY)"))
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
                    for c in export.contexts(matching: q) where !matches.contains(where: { $0 === c }) {
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
        case .peekExport, .startTLS, .extendedHeaders:
            return .reply(Handshake.errorReply(option: option, type: .errUnsup, message: "option \(option) is not supported"))
        }
    }
}
