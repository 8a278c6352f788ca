import BlockCore
import BlockDrivers
import NBDProtocol
@testable import NBDServer
import Testing

func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
func string32(_ s: String) -> [UInt8] { be(UInt32(s.utf8.count)) + Array(s.utf8) }

/// Splits concatenated option replies into (option, type, payload).
func replies(_ bytes: [UInt8]) -> [(option: UInt32, type: UInt32, payload: [UInt8])] {
    var out: [(UInt32, UInt32, [UInt8])] = []
    var i = 0
    func u32(_ at: Int) -> UInt32 { bytes[at..<at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
    while i + 20 <= bytes.count {
        let n = Int(u32(i + 16))
        out.append((u32(i + 8), u32(i + 12), Array(bytes[i + 20..<i + 20 + n])))
        i += 20 + n
    }
    return out
}

@Suite struct OptionHandlerTests {
    static func table(writable: Bool = true) -> ExportTable {
        let t = ExportTable()
        let node = BlockNode(name: "n0", driver: NullDriver(size: 1 << 30, readZeroes: true))
        t.add(Export(id: "e0", name: "disk", description: "a disk", node: node, writable: writable))
        return t
    }

    static let rep = (ack: UInt32(1), server: UInt32(2), info: UInt32(3), meta: UInt32(4),
                      unsup: UInt32(0x8000_0001), invalid: UInt32(0x8000_0003), unknown: UInt32(0x8000_0006),
                      extHeaderReqd: UInt32(0x8000_000a))

    /// Transmission flags from the NBD_INFO_EXPORT reply among `bytes`.
    static func exportFlags(_ bytes: [UInt8]) -> UInt16? {
        guard let info = replies(bytes).first(where: { $0.type == rep.info && $0.payload.count == 12 && $0.payload[1] == 0 }) else {
            return nil
        }
        return info.payload[10...].reduce(0) { $0 << 8 | UInt16($1) }
    }

    static func info(_ h: inout OptionHandler) -> UInt16? {
        guard case .reply(let b) = h.handle(option: 6, payload: string32("disk") + be(UInt16(0))) else { return nil }
        return exportFlags(b)
    }

    @Test func unknownOptionIsUnsupported() {
        var h = OptionHandler(exports: Self.table())
        guard case .reply(let b) = h.handle(option: 0x1234, payload: [1]) else { Issue.record("not a reply"); return }
        #expect(replies(b).map(\.type) == [Self.rep.unsup])
        #expect(replies(b)[0].option == 0x1234)
    }

    @Test func listNamesEveryExport() {
        var h = OptionHandler(exports: Self.table())
        guard case .reply(let b) = h.handle(option: 3, payload: []) else { Issue.record("not a reply"); return }
        let r = replies(b)
        #expect(r.map(\.type) == [Self.rep.server, Self.rep.ack])
        #expect(r[0].payload == string32("disk") + Array("a disk".utf8))
        guard case .reply(let bad) = h.handle(option: 3, payload: [0]) else { Issue.record("not a reply"); return }
        #expect(replies(bad).map(\.type) == [Self.rep.invalid])
    }

    @Test func abortAcksAndCloses() {
        var h = OptionHandler(exports: Self.table())
        guard case .close(let b, _) = h.handle(option: 2, payload: []) else { Issue.record("not close"); return }
        #expect(replies(b).map(\.type) == [Self.rep.ack])
    }

    @Test func infoThenGo() {
        var h = OptionHandler(exports: Self.table())
        let payload = string32("disk") + be(UInt16(2)) + be(UInt16(1)) + be(UInt16(2))
        guard case .reply(let b) = h.handle(option: 6, payload: payload) else { Issue.record("INFO must not enter transmission"); return }
        let r = replies(b)
        #expect(r.map(\.type) == [Self.rep.info, Self.rep.info, Self.rep.info, Self.rep.info, Self.rep.ack])
        // No SEND_DF (0x80): structured replies were not negotiated.
        #expect(r[0].payload == be(UInt16(0)) + be(UInt64(1 << 30)) + be(UInt16(0x0d6d)))
        #expect(r[1].payload == be(UInt16(1)) + Array("disk".utf8))
        #expect(r[2].payload == be(UInt16(2)) + Array("a disk".utf8))
        #expect(r[3].payload == be(UInt16(3)) + be(UInt32(1)) + be(UInt32(4096)) + be(UInt32(32 << 20)))
        guard case .go(let g, let export) = h.handle(option: 7, payload: string32("") + be(UInt16(0))) else {
            Issue.record("GO with the default name"); return
        }
        #expect(export.name == "disk")
        #expect(replies(g).last?.type == Self.rep.ack)
    }

    @Test func readOnlyExportAdvertisesReadOnly() {
        var h = OptionHandler(exports: Self.table(writable: false))
        guard case .go(let g, _) = h.handle(option: 7, payload: string32("disk") + be(UInt16(0))) else { Issue.record("no go"); return }
        let flags = replies(g)[0].payload[10...].reduce(0) { $0 << 8 | UInt16($1) }
        #expect(flags & TransmissionFlags.readOnly.rawValue != 0)
        #expect(flags & TransmissionFlags.sendTrim.rawValue == 0)
        #expect(flags & TransmissionFlags.sendWriteZeroes.rawValue == 0)
    }

    @Test func goForAMissingExportIsUnknown() {
        var h = OptionHandler(exports: Self.table())
        guard case .reply(let b) = h.handle(option: 7, payload: string32("nope") + be(UInt16(0))) else { Issue.record("no reply"); return }
        #expect(replies(b).map(\.type) == [Self.rep.unknown])
        guard case .reply(let m) = h.handle(option: 7, payload: [0, 0]) else { Issue.record("no reply"); return }
        #expect(replies(m).map(\.type) == [Self.rep.invalid])
    }

    @Test func exportNameForAMissingExportCloses() {
        var h = OptionHandler(exports: Self.table())
        guard case .close = h.handle(option: 1, payload: Array("nope".utf8)) else { Issue.record("must close"); return }
        guard case .go(let b, _) = h.handle(option: 1, payload: Array("disk".utf8)) else { Issue.record("must go"); return }
        #expect(b.count == 8 + 2 + 124)
    }

    @Test func metaContextsNeedStructuredReplies() {
        var h = OptionHandler(exports: Self.table())
        let q = string32("disk") + be(UInt32(1)) + string32("base:allocation")
        guard case .reply(let b) = h.handle(option: 10, payload: q) else { Issue.record("no reply"); return }
        #expect(replies(b).map(\.type) == [Self.rep.invalid])
        guard case .reply(let s) = h.handle(option: 8, payload: []) else { Issue.record("no reply"); return }
        #expect(replies(s).map(\.type) == [Self.rep.ack])
        #expect(h.structuredReplies)
        guard case .reply(let set) = h.handle(option: 10, payload: q) else { Issue.record("no reply"); return }
        let r = replies(set)
        #expect(r.map(\.type) == [Self.rep.meta, Self.rep.ack])
        #expect(r[0].payload == be(UInt32(1)) + Array("base:allocation".utf8))
        #expect(h.selected.map(\.name) == ["base:allocation"])
        // GO for the same export keeps the selection.
        guard case .go = h.handle(option: 7, payload: string32("disk") + be(UInt16(0))) else { Issue.record("no go"); return }
        #expect(h.selected.count == 1)
    }

    @Test func listMetaContextsByNamespace() {
        var h = OptionHandler(exports: Self.table())
        _ = h.handle(option: 8, payload: [])
        guard case .reply(let all) = h.handle(option: 9, payload: string32("disk") + be(UInt32(0))) else { Issue.record("no reply"); return }
        #expect(replies(all).map(\.type) == [Self.rep.meta, Self.rep.meta, Self.rep.ack])
        guard case .reply(let qemu) = h.handle(option: 9, payload: string32("disk") + be(UInt32(1)) + string32("qemu:")) else {
            Issue.record("no reply"); return
        }
        let names = replies(qemu).dropLast().map { String(decoding: $0.payload.dropFirst(4), as: UTF8.self) }
        #expect(names == ["qemu:allocation-depth"])
        // Unknown contexts are simply not listed.
        guard case .reply(let none) = h.handle(option: 9, payload: string32("disk") + be(UInt32(1)) + string32("x:y")) else {
            Issue.record("no reply"); return
        }
        #expect(replies(none).map(\.type) == [Self.rep.ack])
        // LIST does not change the selection.
        #expect(h.selected.isEmpty)
    }

    @Test func structuredReplyWithDataIsInvalid() {
        var h = OptionHandler(exports: Self.table())
        guard case .reply(let b) = h.handle(option: 8, payload: [1]) else { Issue.record("no reply"); return }
        #expect(replies(b).map(\.type) == [Self.rep.invalid])
        #expect(!h.structuredReplies)
    }

    @Test func sendDFOnlyWithStructuredRepliesOrExtendedHeaders() {
        var plain = OptionHandler(exports: Self.table())
        #expect(Self.info(&plain).map { $0 & TransmissionFlags.sendDF.rawValue } == 0)
        var structured = OptionHandler(exports: Self.table())
        _ = structured.handle(option: 8, payload: [])
        #expect(Self.info(&structured).map { $0 & TransmissionFlags.sendDF.rawValue } == TransmissionFlags.sendDF.rawValue)
        var extended = OptionHandler(exports: Self.table())
        _ = extended.handle(option: 11, payload: [])
        #expect(Self.info(&extended).map { $0 & TransmissionFlags.sendDF.rawValue } == TransmissionFlags.sendDF.rawValue)
        // NBD_OPT_EXPORT_NAME's reply follows the same rule.
        guard case .go(let b, _) = plain.handle(option: 1, payload: Array("disk".utf8)) else { Issue.record("no go"); return }
        #expect((UInt16(b[8]) << 8 | UInt16(b[9])) & TransmissionFlags.sendDF.rawValue == 0)
    }

    @Test func noMultiConnWhenOneConnectionIsAllowed() {
        var one = OptionHandler(exports: Self.table(), multiConn: false)
        #expect(Self.info(&one).map { $0 & TransmissionFlags.canMultiConn.rawValue } == 0)
        var many = OptionHandler(exports: Self.table(), multiConn: true)
        #expect(Self.info(&many).map { $0 & TransmissionFlags.canMultiConn.rawValue } == TransmissionFlags.canMultiConn.rawValue)
    }

    static func names(_ b: [UInt8]) -> [String] {
        replies(b).filter { $0.type == rep.meta }.map { String(decoding: $0.payload.dropFirst(4), as: UTF8.self) }
    }

    @Test func namespaceOnlyQueriesListButDoNotSelect() {
        var h = OptionHandler(exports: Self.table())
        _ = h.handle(option: 8, payload: [])
        // LIST with `base:` lists base:allocation (the spec: "MUST support this as a wildcard").
        guard case .reply(let list) = h.handle(option: 9, payload: string32("disk") + be(UInt32(1)) + string32("base:")) else {
            Issue.record("no reply"); return
        }
        #expect(Self.names(list) == ["base:allocation"])
        // SET with `base:` selects nothing (the spec: "MUST ignore this form").
        guard case .reply(let set) = h.handle(option: 10, payload: string32("disk") + be(UInt32(1)) + string32("base:")) else {
            Issue.record("no reply"); return
        }
        #expect(replies(set).map(\.type) == [Self.rep.ack])
        #expect(h.selected.isEmpty)
        guard case .reply(let set2) = h.handle(option: 10, payload: string32("disk") + be(UInt32(2)) + string32("qemu:")
                                                + string32("base:allocation")) else { Issue.record("no reply"); return }
        #expect(Self.names(set2) == ["base:allocation"])
        // LIST works before structured replies (QEMU allows it; the spec says MAY refuse).
        var early = OptionHandler(exports: Self.table())
        guard case .reply(let l) = early.handle(option: 9, payload: string32("disk") + be(UInt32(0))) else { Issue.record("no reply"); return }
        #expect(Self.names(l) == ["base:allocation", "qemu:allocation-depth"])
    }

    @Test func aFailedSetClearsTheSelection() {
        var h = OptionHandler(exports: Self.table())
        _ = h.handle(option: 8, payload: [])
        let good = string32("disk") + be(UInt32(1)) + string32("base:allocation")
        _ = h.handle(option: 10, payload: good)
        #expect(h.selected.count == 1)
        // Unknown export.
        guard case .reply(let e1) = h.handle(option: 10, payload: string32("nope") + be(UInt32(1)) + string32("base:allocation")) else {
            Issue.record("no reply"); return
        }
        #expect(replies(e1).map(\.type) == [Self.rep.unknown])
        #expect(h.selected.isEmpty && h.selectedFor == nil)
        // Malformed payload.
        _ = h.handle(option: 10, payload: good)
        guard case .reply(let e2) = h.handle(option: 10, payload: [0, 0, 0, 9]) else { Issue.record("no reply"); return }
        #expect(replies(e2).map(\.type) == [Self.rep.invalid])
        #expect(h.selected.isEmpty)
        // Without structured replies (a fresh handler that selected nothing yet still refuses).
        var plain = OptionHandler(exports: Self.table())
        guard case .reply(let e3) = plain.handle(option: 10, payload: good) else { Issue.record("no reply"); return }
        #expect(replies(e3).map(\.type) == [Self.rep.invalid])
        #expect(plain.selected.isEmpty)
        // GO afterwards has no contexts.
        guard case .go = h.handle(option: 7, payload: string32("disk") + be(UInt16(0))) else { Issue.record("no go"); return }
        #expect(h.selected.isEmpty)
    }

    @Test func extendedHeadersNegotiation() {
        var h = OptionHandler(exports: Self.table())
        guard case .reply(let bad) = h.handle(option: 11, payload: [0]) else { Issue.record("no reply"); return }
        #expect(replies(bad).map(\.type) == [Self.rep.invalid])
        #expect(h.mode == .simple)
        guard case .reply(let ok) = h.handle(option: 11, payload: []) else { Issue.record("no reply"); return }
        #expect(replies(ok).map(\.type) == [Self.rep.ack])
        #expect(h.mode == .extended && h.structuredReplies)
        guard case .reply(let again) = h.handle(option: 11, payload: []) else { Issue.record("no reply"); return }
        #expect(replies(again).map(\.type) == [Self.rep.invalid])
        // Structured replies cannot downgrade extended headers.
        guard case .reply(let sr) = h.handle(option: 8, payload: []) else { Issue.record("no reply"); return }
        #expect(replies(sr).map(\.type) == [Self.rep.extHeaderReqd])
        #expect(h.mode == .extended)
        // Meta contexts are allowed; BLOCK_STAT_PAYLOAD appears once some are selected.
        #expect(Self.info(&h).map { $0 & TransmissionFlags.blockStatusPayload.rawValue } == 0)
        guard case .reply(let set) = h.handle(option: 10, payload: string32("disk") + be(UInt32(1)) + string32("base:allocation")) else {
            Issue.record("no reply"); return
        }
        #expect(Self.names(set) == ["base:allocation"])
        #expect(Self.info(&h).map { $0 & TransmissionFlags.blockStatusPayload.rawValue } == TransmissionFlags.blockStatusPayload.rawValue)
        // NBD_OPT_EXPORT_NAME is not allowed after extended headers: hard disconnect.
        guard case .close = h.handle(option: 1, payload: Array("disk".utf8)) else { Issue.record("must close"); return }
    }

    @Test func structuredReplyTwiceIsInvalid() {
        var h = OptionHandler(exports: Self.table())
        _ = h.handle(option: 8, payload: [])
        guard case .reply(let b) = h.handle(option: 8, payload: []) else { Issue.record("no reply"); return }
        #expect(replies(b).map(\.type) == [Self.rep.invalid])
        #expect(h.mode == .structured)
    }
}
