import BlockCore
import BlockDrivers
import EventLoop
import Glibc
import JSON
import NBDProtocol
import NBDServer

/// One fuzz input is a whole client byte stream — client flags, options, then requests — fed
/// in wire order to a real `NBDServer` (its `Connection` state machine, `OptionHandler`,
/// executor and drivers) over a unix socket. The server's answer is decoded as a client
/// would and checked against what was sent.
final class NBDFuzzHarness: Sendable {
    static let shared = NBDFuzzHarness()

    let socketPath: String
    let server: NBDServer
    let bitmap: DirtyBitmap
    let loops: EventLoopGroup
    let workers: WorkerPool

    /// Exports: "" (null-co, writable, with `qemu:dirty-bitmap:b0`), "ro" (null-co that
    /// reads garbage, read-only, an odd size) and "disk" (raw over a small file).
    private init() {
        signal(SIGPIPE, SIG_IGN)
        let dir = FuzzSupport.scratchDirectory("nbd")
        loops = EventLoopGroup(count: 1, name: "fuzz-loop")
        workers = WorkerPool(threads: 2, name: "fuzz-worker")
        server = NBDServer(loops: loops, workers: workers)
        let size: UInt64 = 256 << 10
        let null = BlockNode(name: "null0", driver: NullDriver(size: size, readZeroes: true))
        bitmap = DirtyBitmap(name: "b0", granularity: 4096, length: size)
        null.addObserver(bitmap)
        server.exports.add(Export(id: "e0", name: "", description: "null-co", node: null, writable: true,
                                  extraContexts: [DirtyBitmapContext(bitmap: bitmap)]))
        let ro = BlockNode(name: "null1", driver: NullDriver(size: size + 1536, readZeroes: false))
        server.exports.add(Export(id: "e1", name: "ro", description: nil, node: ro, writable: false))
        let image = dir + "/disk.raw"
        FuzzSupport.writeFile(image, [UInt8](repeating: 0x5a, count: 64 << 10) + [UInt8](repeating: 0, count: Int(size) - (64 << 10)))
        let registry = FuzzRegistry()
        do {
            let disk = try BlockdevFactory.open(["driver": "raw", "node-name": "disk",
                                                 "file": ["driver": "file", "filename": .string(image)]], in: registry)
            server.exports.add(Export(id: "e2", name: "disk", description: "raw over file", node: disk, writable: true))
            socketPath = dir + "/nbd.sock"
            try server.listen(on: .unix(path: socketPath))
        } catch {
            fatalError("NBD fuzz harness: \(error)")
        }
    }

    func run(_ input: [UInt8]) -> [String] {
        bitmap.clearAll()   // every input starts from the same state
        switch FuzzSupport.exchange(unixPath: socketPath, input: input, seconds: 20) {
        case .failed(let why):
            return ["NBD harness: \(why)"]
        case .timedOut(let got):
            return ["the server neither answered nor closed within 20 s (received \(got.count) bytes)"]
        case .closed(let got):
            return NBDStreamCheck.check(sent: input, received: got)
        }
    }
}

/// A node registry for harnesses that open nodes through `BlockdevFactory`.
final class FuzzRegistry: NodeRegistry {
    var nodes: [String: BlockNode] = [:]
    var order: [BlockNode] = []
    var counter = 0
    func node(named name: String) -> BlockNode? { nodes[name] }
    func makeAutoName() -> String { counter += 1; return "#block\(counter)" }
    func register(_ node: BlockNode) throws(BlockError) {
        if nodes[node.nodeName] != nil { throw BlockError.invalid("duplicate \(node.nodeName)") }
        nodes[node.nodeName] = node
        order.append(node)
    }
    /// Closes format and filter nodes (newest first), then protocol nodes; returns errors.
    func closeAll() -> [BlockError] {
        var errors: [BlockError] = []
        for n in order.reversed() where n.driver.role != .protocol {
            do { try n.driver.close() } catch { errors.append(error) }
        }
        for n in order.reversed() where n.driver.role == .protocol {
            do { try n.driver.close() } catch { errors.append(error) }
        }
        order.removeAll()
        nodes.removeAll()
        return errors
    }
}

/// Decodes the server's side of an NBD conversation, following the client's side to know
/// what each reply answers. Returns the protocol violations found (empty when the stream
/// is well formed). Stops quietly where the server may legitimately have closed.
enum NBDStreamCheck {
    struct Sent {
        var type: UInt16
        var offset: UInt64
        var length: UInt64
    }

    static let extendedRequestMagic: UInt32 = 0x21e4_1c71
    static let extendedReplyMagic: UInt32 = 0x6e8a_278c

    static func check(sent: [UInt8], received: [UInt8]) -> [String] {
        var c = ByteReader(sent)
        var s = ByteReader(received)
        var problems: [String] = []
        func problem(_ text: String) { problems.append("NBD reply stream at byte \(s.at): \(text)") }

        // Greeting: NBDMAGIC IHAVEOPT flags.
        guard let m1 = s.u64(), let m2 = s.u64(), let _ = s.u16() else {
            if !received.isEmpty && received.count < 18 { problem("truncated greeting (\(received.count) bytes)") }
            return problems
        }
        if m1 != NBD.initMagic || m2 != NBD.optMagic { problem("bad greeting magic"); return problems }
        guard let clientFlags = c.u32() else { return problems }
        let noZeroes = clientFlags & NBD.clientNoZeroes != 0
        var structured = false
        var extended = false

        // Options, each answered before the next is read.
        options: while true {
            guard let magic = c.u64(), let option = c.u32(), let length = c.u32() else { return problems }
            if magic != NBD.optMagic { return problems }                 // the server drops the client
            if length > NBD.maxOptionLength { return problems }
            guard c.skip(UInt64(length)) else { return problems }        // incomplete: the server waits, then EOF
            if option == OptionCode.exportName.rawValue {
                if s.isAtEnd { return problems }                         // unknown export: closed
                guard s.skip(8), let flags = s.u16() else { problem("truncated NBD_OPT_EXPORT_NAME reply"); return problems }
                if flags & TransmissionFlags.hasFlags.rawValue == 0 { problem("export flags without NBD_FLAG_HAS_FLAGS") }
                if !noZeroes && !s.skip(124) { problem("NBD_OPT_EXPORT_NAME reply lacks its 124 zero bytes") }
                break options
            }
            // Replies to this option until its final one (ACK or an error).
            while true {
                if s.isAtEnd { return problems }                         // closed (ABORT, or a fatal error)
                guard let rmagic = s.u64(), let roption = s.u32(), let rtype = s.u32(), let rlength = s.u32() else {
                    problem("truncated option reply header"); return problems
                }
                if rmagic != NBD.optReplyMagic { problem("option reply magic 0x\(String(rmagic, radix: 16))"); return problems }
                if roption != option { problem("reply for option \(roption) to option \(option)"); return problems }
                guard let payload = s.take(UInt64(rlength)) else { problem("truncated option reply payload"); return problems }
                if rtype & 0x8000_0000 != 0 {
                    if OptionReplyType(rawValue: rtype) == nil { problem("unknown error reply type \(rtype)") }
                    break
                }
                switch OptionReplyType(rawValue: rtype) {
                case .ack:
                    if rlength != 0 { problem("ACK with \(rlength) bytes of payload") }
                    if option == OptionCode.go.rawValue { break options }
                    if option == OptionCode.structuredReply.rawValue { structured = true }
                    if option == OptionCode.extendedHeaders.rawValue { extended = true; structured = true }
                    if option == OptionCode.abort.rawValue {
                        if !s.isAtEnd { problem("bytes after the reply to NBD_OPT_ABORT") }
                        return problems
                    }
                case .server:
                    if option != OptionCode.list.rawValue { problem("NBD_REP_SERVER for option \(option)") }
                    if rlength < 4 { problem("NBD_REP_SERVER of \(rlength) bytes") }
                    continue
                case .info:
                    if option != OptionCode.info.rawValue && option != OptionCode.go.rawValue { problem("NBD_REP_INFO for option \(option)") }
                    checkInfo(payload, problem)
                    continue
                case .metaContext:
                    if option != OptionCode.listMetaContext.rawValue && option != OptionCode.setMetaContext.rawValue {
                        problem("NBD_REP_META_CONTEXT for option \(option)")
                    }
                    if rlength < 5 { problem("NBD_REP_META_CONTEXT of \(rlength) bytes") }
                    continue
                default:
                    problem("unknown option reply type \(rtype)")
                    return problems
                }
                break
            }
        }

        // Transmission: collect the requests the server will answer.
        var requests: [UInt64: [Sent]] = [:]
        while true {
            guard let magic = c.u32() else { break }
            let isExtended = magic == extendedRequestMagic
            if magic != NBD.requestMagic && !(extended && isExtended) { break }   // the server drops the client
            guard let flags = c.u16(), let type = c.u16(), let cookie = c.u64(), let offset = c.u64() else { break }
            guard let length = isExtended ? c.u64() : c.u32().map(UInt64.init) else { break }
            requests[cookie, default: []].append(Sent(type: type, offset: offset, length: length))
            if type == Command.disconnect.rawValue { break }
            let hasPayload = type == Command.write.rawValue
                || (isExtended && flags & CommandFlags.payloadLen.rawValue != 0)
            if hasPayload && !c.skip(length) { break }
        }

        // Replies, in any order. A cookie may have been used again (QEMU's client reuses them
        // once answered, but this replay sends everything at once): a reply is matched to a
        // request of its cookie by its shape, and checking stops where that is ambiguous.
        let isRead: (Sent) -> Bool = { $0.type == Command.read.rawValue }
        // Cookies sent for different requests: which one a reply answers is unknowable, so
        // their replies are checked for framing only.
        let ambiguous = Set(requests.filter { Set($0.value.map { "\($0.type) \($0.offset) \($0.length)" }).count > 1 }.keys)
        func take(_ cookie: UInt64, _ match: (Sent) -> Bool) {
            if let i = requests[cookie]?.firstIndex(where: match) { requests[cookie]!.remove(at: i) }
        }
        while !s.isAtEnd {
            guard let magic = s.u32() else { problem("truncated reply magic"); break }
            switch magic {
            case NBD.simpleReplyMagic:
                guard let error = s.u32(), let cookie = s.u64() else { return problems }   // cut short by a close
                guard let candidates = requests[cookie], !candidates.isEmpty else {
                    problem("simple reply to cookie \(cookie), which no request is waiting for"); return problems
                }
                if error != 0 { if !ambiguous.contains(cookie) { take(cookie) { _ in true } }; continue }
                let reads = candidates.filter(isRead)
                if reads.isEmpty { if !ambiguous.contains(cookie) { take(cookie) { _ in true } }; continue }
                if ambiguous.contains(cookie) { return problems }   // how much data follows is unknowable
                if structured { problem("simple reply with data to a read after structured replies were negotiated"); return problems }
                if !s.skip(reads[0].length) { return problems }
                take(cookie, isRead)
            case NBD.structuredReplyMagic, extendedReplyMagic:
                let ext = magic == extendedReplyMagic
                if ext && !extended { problem("extended reply without extended headers"); return problems }
                if !ext && !structured { problem("structured reply without NBD_OPT_STRUCTURED_REPLY"); return problems }
                guard let flags = s.u16(), let type = s.u16(), let cookie = s.u64() else { return problems }
                if ext { guard s.skip(8) else { return problems } }
                guard let length = ext ? s.u64() : s.u32().map(UInt64.init) else { return problems }
                guard let candidates = requests[cookie], !candidates.isEmpty else {
                    problem("structured reply to cookie \(cookie), which no request is waiting for"); return problems
                }
                guard let payload = s.take(length) else { return problems }
                if ambiguous.contains(cookie) { continue }
                // Chunks that name their command narrow the candidates; others may answer any.
                let kind: ((Sent) -> Bool)? = switch ReplyType(rawValue: type) {
                case .offsetData?, .offsetHole?: isRead
                case .blockStatus?, .blockStatusExt?: { $0.type == Command.blockStatus.rawValue }
                default: nil
                }
                let mine = kind.map { candidates.filter($0) } ?? candidates
                if mine.isEmpty { problem("reply chunk type \(type) for a cookie with no such request"); return problems }
                checkChunk(type: type, flags: flags, payload: payload, for: mine, problem)
                if flags & ReplyFlags.done != 0 { take(cookie, kind ?? { _ in true }) }
            default:
                problem("bad reply magic 0x\(String(magic, radix: 16))")
                return problems
            }
        }
        return problems
    }

    static func checkInfo(_ payload: ArraySlice<UInt8>, _ problem: (String) -> Void) {
        var r = ByteReader(Array(payload))
        guard let info = r.u16() else { problem("NBD_REP_INFO without a type"); return }
        switch InfoType(rawValue: info) {
        case .export:
            if payload.count != 12 { problem("NBD_INFO_EXPORT of \(payload.count) bytes") }
        case .blockSize:
            guard payload.count == 14, let minimum = r.u32(), let preferred = r.u32(), let maximum = r.u32() else {
                problem("NBD_INFO_BLOCK_SIZE of \(payload.count) bytes"); return
            }
            if minimum == 0 || minimum.nonzeroBitCount != 1 || preferred < minimum || preferred.nonzeroBitCount != 1
                || maximum < preferred && maximum != UInt32.max {
                problem("NBD_INFO_BLOCK_SIZE \(minimum)/\(preferred)/\(maximum) breaks the spec's rules")
            }
        case .name, .description:
            break
        default:
            problem("unknown NBD_REP_INFO type \(info)")
        }
    }

    static func checkChunk(type: UInt16, flags: UInt16, payload: ArraySlice<UInt8>, for candidates: [Sent],
                           _ problem: (String) -> Void) {
        var r = ByteReader(Array(payload))
        let isRead = candidates.contains { $0.type == Command.read.rawValue }
        func within(_ offset: UInt64, _ length: UInt64) -> Bool {
            candidates.contains { c in
                c.type == Command.read.rawValue && offset >= c.offset && offset.addingReportingOverflow(length).partialValue <= c.offset &+ c.length
                    && !offset.addingReportingOverflow(length).overflow
            }
        }
        switch ReplyType(rawValue: type) {
        case ReplyType.none?:
            if payload.count != 0 { problem("NBD_REPLY_TYPE_NONE with a payload") }
            if flags & ReplyFlags.done == 0 { problem("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE") }
        case .offsetData:
            guard isRead, let offset = r.u64() else { problem("NBD_REPLY_TYPE_OFFSET_DATA not for a read, or short"); return }
            if !within(offset, UInt64(payload.count - 8)) { problem("read data at \(offset)+\(payload.count - 8) outside the request") }
        case .offsetHole:
            guard isRead, payload.count == 12, let offset = r.u64(), let length = r.u32() else {
                problem("malformed NBD_REPLY_TYPE_OFFSET_HOLE"); return
            }
            if length == 0 || !within(offset, UInt64(length)) { problem("read hole at \(offset)+\(length) outside the request") }
        case .blockStatus:
            if !candidates.contains(where: { $0.type == Command.blockStatus.rawValue }) { problem("block status for another command") }
            if payload.count < 12 || (payload.count - 4) % 8 != 0 { problem("NBD_REPLY_TYPE_BLOCK_STATUS of \(payload.count) bytes") }
            _ = r.u32()
            while let length = r.u32(), let _ = r.u32() {
                if length == 0 { problem("a zero-length block status extent"); break }
            }
        case .blockStatusExt:
            if payload.count < 8 || (payload.count - 8) % 16 != 0 { problem("NBD_REPLY_TYPE_BLOCK_STATUS_EXT of \(payload.count) bytes") }
        case .error, .errorOffset:
            guard let code = r.u32(), let messageLength = r.u16() else { problem("short NBD_REPLY_TYPE_ERROR"); return }
            if code == 0 { problem("an error chunk with error 0") }
            let expected = 6 + Int(messageLength) + (type == ReplyType.errorOffset.rawValue ? 8 : 0)
            if payload.count != expected { problem("error chunk of \(payload.count) bytes, expected \(expected)") }
        default:
            problem("unknown structured reply type \(type)")
        }
    }
}
