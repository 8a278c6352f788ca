import Glibc
import NBDProtocol
import TLS

/// `qemu-nbd -L`: asks a server for its exports and prints them exactly as QEMU 7.2's
/// `qemu_nbd_client_list` does. It speaks the handshake as QEMU's client does
/// (`nbd_receive_export_list`): structured replies if offered, `NBD_OPT_LIST`, then
/// `NBD_OPT_INFO` (asking for block sizes) and `NBD_OPT_LIST_META_CONTEXT` per export, then
/// `NBD_OPT_ABORT`. With `--tls-creds` (client credentials) it first upgrades the connection
/// with `NBD_OPT_STARTTLS` and the client side of `TLSSession`, checking the server's
/// certificate against `hostname` (`--tls-hostname`, else the `-b` address) as QEMU does.
/// Blocking I/O (poll while TLS waits): it is a one-shot command, not the daemon.
enum NBDExportLister {
    enum Address {
        case unix(String)
        case inet(host: String, port: String)
    }

    struct Failure: Error { let message: String }

    struct ExportInfo {
        var name: String
        var description: String
        var size: UInt64 = 0
        var flags: UInt16 = 0
        var minBlock: UInt32 = 0
        var optBlock: UInt32 = 0
        var maxBlock: UInt32 = 0
        var contexts: [String] = []
    }

    /// Connects, lists, prints; returns the exit status (errors printed as QEMU words them).
    static func run(_ address: Address, tls: TLSCredentials? = nil, hostname: String? = nil) -> Int32 {
        do {
            let fd = try connect(address)
            defer { close(fd) }
            var client = Client(fd: fd)
            let exports = try client.list(tls: tls, hostname: hostname)
            Report.stdout(format(exports))
            return 0
        } catch {
            Report.line(error.message)
            return 1
        }
    }

    /// QEMU's output, line for line.
    static func format(_ exports: [ExportInfo]) -> String {
        let names: [Int: String] = [1: "readonly", 2: "flush", 3: "fua", 4: "rotational", 5: "trim", 6: "zeroes",
                                    7: "df", 8: "multi", 9: "resize", 10: "cache", 11: "fast-zero"]
        var out = "exports available: \(exports.count)\n"
        for e in exports {
            out += " export: '\(e.name)'\n"
            if !e.description.isEmpty { out += "  description: \(e.description)\n" }
            if e.flags & 1 != 0 {
                out += "  size:  \(e.size)\n"
                out += "  flags: 0x\(String(e.flags, radix: 16)) ("
                for bit in 0..<12 where e.flags & (1 << bit) != 0 {
                    if let n = names[bit] { out += " \(n)" }
                }
                out += " )\n"
            }
            if e.minBlock != 0 {
                out += "  min block: \(e.minBlock)\n"
                out += "  opt block: \(e.optBlock)\n"
                out += "  max block: \(e.maxBlock)\n"
            }
            if !e.contexts.isEmpty {
                out += "  available meta contexts: \(e.contexts.count)\n"
                for c in e.contexts { out += "   \(c)\n" }
            }
        }
        return out
    }

    static func connect(_ address: Address) throws(Failure) -> Int32 {
        switch address {
        case .unix(let path):
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
                throw Failure(message: "UNIX socket path '\(path)' is too long")
            }
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw Failure(message: "Failed to create socket: \(String(cString: strerror(errno)))") }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc != 0 {
                let e = errno
                close(fd)
                throw Failure(message: "Failed to connect to '\(path)': \(String(cString: strerror(e)))")
            }
            return fd
        case .inet(let host, let port):
            var hints = addrinfo()
            hints.ai_family = AF_UNSPEC
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var result: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, port, &hints, &result)
            if rc != 0 {
                throw Failure(message: "address resolution failed for \(host):\(port): \(String(cString: gai_strerror(rc)))")
            }
            defer { freeaddrinfo(result) }
            var lastErrno = ECONNREFUSED
            var cursor = result
            while let ai = cursor {
                cursor = ai.pointee.ai_next
                let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
                if fd < 0 { lastErrno = errno; continue }
                if Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 { return fd }
                lastErrno = errno
                close(fd)
            }
            throw Failure(message: "Failed to connect to '\(host):\(port)': \(String(cString: strerror(lastErrno)))")
        }
    }

    /// The client side of the option haggling.
    struct Client {
        let fd: Int32
        /// After STARTTLS: every byte goes through this session (the socket is non-blocking).
        var tls: TLSSession?

        init(fd: Int32) { self.fd = fd }

        // MARK: wire

        mutating func readExact(_ n: Int, _ what: String) throws(Failure) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: n)
            var done = 0
            while done < n {
                let r: Int
                if let tls {
                    r = out.withUnsafeMutableBytes { tls.receive(into: $0.baseAddress! + done, count: n - done) }
                    if r < 0 && errno == EAGAIN {
                        try wait(for: tls)
                        continue
                    }
                    if r < 0 { throw Failure(message: "Failed to read \(what): \(tls.failure ?? String(cString: strerror(errno)))") }
                } else {
                    r = out.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, n - done) }
                    if r < 0 && errno == EINTR { continue }
                    if r < 0 { throw Failure(message: "Failed to read \(what): \(String(cString: strerror(errno)))") }
                }
                if r == 0 { throw Failure(message: "Failed to read \(what): Unexpected end-of-file before all data were read") }
                done += r
            }
            return out
        }

        func writeAll(_ bytes: [UInt8]) throws(Failure) {
            var done = 0
            while done < bytes.count {
                if let tls {
                    let r = bytes.withUnsafeBytes { tls.send($0.baseAddress! + done, count: bytes.count - done) }
                    if r > 0 {
                        done += r
                    } else if errno == EAGAIN {
                        try wait(for: tls)
                    } else {
                        throw Failure(message: "Failed to send option request: \(tls.failure ?? String(cString: strerror(errno)))")
                    }
                    continue
                }
                let r = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
                if r < 0 && errno == EINTR { continue }
                if r <= 0 { throw Failure(message: "Failed to send option request: \(String(cString: strerror(errno)))") }
                done += r
            }
            // Everything encrypted reaches the socket before we wait for the reply.
            while let tls, !tls.flush() {
                guard tls.wantsWrite else {
                    throw Failure(message: "Failed to send option request: \(tls.failure ?? "the connection is closed")")
                }
                try wait(for: tls)
            }
        }

        /// Blocks until the socket can move what `tls` waits for (input; output if queued).
        func wait(for tls: TLSSession) throws(Failure) {
            var p = pollfd(fd: fd, events: Int16(POLLIN) | (tls.wantsWrite ? Int16(POLLOUT) : 0), revents: 0)
            while poll(&p, 1, -1) < 0 {
                if errno != EINTR { throw Failure(message: "poll: \(String(cString: strerror(errno)))") }
            }
        }

        /// `NBD_OPT_STARTTLS`, then the TLS handshake; QEMU's `nbd_receive_starttls`.
        mutating func startTLS(_ credentials: TLSCredentials, hostname: String?) throws(Failure) {
            try sendOption(.startTLS)
            let r = try readReply(for: .startTLS)
            if r.type == OptionReplyType.errUnsup.rawValue {
                try? sendOption(.abort)
                throw Failure(message: "Server don't support STARTTLS option")
            }
            if r.isError {
                try? sendOption(.abort)
                throw Failure(message: Client.errorText(r, option: .startTLS))
            }
            guard r.type == OptionReplyType.ack.rawValue else {
                try? sendOption(.abort)
                throw Failure(message: "Server answered option 5 (starttls) with unexpected reply \(r.type)")
            }
            guard r.payload.isEmpty else {
                try? sendOption(.abort)
                throw Failure(message: "Option 5 ('starttls') response length is \(r.payload.count) (it should be zero)")
            }
            let session: TLSSession
            do {
                session = try TLSSession(fd: fd, credentials: credentials, hostname: hostname)
            } catch {
                throw Failure(message: error.message)
            }
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            while true {
                switch session.handshake() {
                case .done:
                    tls = session
                    return
                case .wouldBlock:
                    try wait(for: session)
                case .failed:
                    throw Failure(message: session.failure ?? "TLS handshake failed")
                }
            }
        }

        static func be<T: FixedWidthInteger>(_ bytes: ArraySlice<UInt8>, _: T.Type) -> T {
            bytes.reduce(T(0)) { $0 << 8 | T($1) }
        }

        static func append<T: FixedWidthInteger>(_ v: T, to out: inout [UInt8]) {
            withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) }
        }

        func sendOption(_ option: OptionCode, _ payload: [UInt8] = []) throws(Failure) {
            var out: [UInt8] = []
            Client.append(NBD.optMagic, to: &out)
            Client.append(option.rawValue, to: &out)
            Client.append(UInt32(payload.count), to: &out)
            try writeAll(out + payload)
        }

        struct Reply {
            var type: UInt32
            var payload: [UInt8]
            var isError: Bool { type & 0x8000_0000 != 0 }
        }

        mutating func readReply(for option: OptionCode) throws(Failure) -> Reply {
            let header = try readExact(20, "option reply")
            let magic = Client.be(header[0..<8], UInt64.self)
            guard magic == NBD.optReplyMagic else {
                throw Failure(message: "Unexpected option reply magic 0x\(String(magic, radix: 16))")
            }
            let opt = Client.be(header[8..<12], UInt32.self)
            guard opt == option.rawValue else {
                throw Failure(message: "Unexpected option type \(opt), expected \(option.rawValue)")
            }
            let type = Client.be(header[12..<16], UInt32.self)
            let length = Client.be(header[16..<20], UInt32.self)
            guard length <= 64 << 10 else { throw Failure(message: "server option reply of \(length) bytes is too long") }
            return Reply(type: type, payload: try readExact(Int(length), "option reply payload"))
        }

        /// QEMU's `nbd_handle_reply_err` wording (its message, then its hints) for an error
        /// the list cannot go past.
        static func errorText(_ reply: Reply, option: OptionCode) -> String {
            let message = String(decoding: reply.payload, as: UTF8.self)
            let names: [OptionCode: String] = [.exportName: "export name", .abort: "abort", .list: "list",
                                               .startTLS: "starttls", .info: "info", .go: "go",
                                               .structuredReply: "structured reply", .listMetaContext: "list meta context",
                                               .setMetaContext: "set meta context"]
            let which = "option \(option.rawValue) (\(names[option] ?? "<unknown>"))"
            var text: String
            switch reply.type {
            case OptionReplyType.errPolicy.rawValue: text = "Denied by server for \(which)"
            case OptionReplyType.errInvalid.rawValue: text = "Invalid parameters for \(which)"
            case OptionReplyType.errPlatform.rawValue: text = "Server lacks support for \(which)"
            case OptionReplyType.errTLSReqd.rawValue:
                text = "TLS negotiation required before \(which)\nDid you forget a valid tls-creds?"
            case OptionReplyType.errUnknown.rawValue: text = "Requested export not available"
            case OptionReplyType.errShutdown.rawValue: text = "Server shutting down before \(which)"
            case OptionReplyType.errBlockSizeReqd.rawValue: text = "Server requires INFO_BLOCK_SIZE for \(which)"
            default: text = "Unknown error code when asking for \(which)"
            }
            if !message.isEmpty { text += "\nserver reported: \(message)" }
            return text
        }

        // MARK: handshake

        mutating func list(tls credentials: TLSCredentials? = nil, hostname: String? = nil) throws(Failure) -> [ExportInfo] {
            let greeting = try readExact(16, "initial magic")
            guard Client.be(greeting[0..<8], UInt64.self) == NBD.initMagic else {
                throw Failure(message: "Bad initial magic received: 0x\(String(Client.be(greeting[0..<8], UInt64.self), radix: 16))")
            }
            let style = Client.be(greeting[8..<16], UInt64.self)
            if style == 0x0004_2028_1861_253 {
                if credentials != nil { throw Failure(message: "Server does not support STARTTLS") }
                return [try oldstyle()]
            }
            guard style == NBD.optMagic else { throw Failure(message: "Bad server magic received: 0x\(String(style, radix: 16))") }
            let serverFlags = Client.be(try readExact(2, "server flags")[...], UInt16.self)
            var clientFlags: UInt32 = 0
            if serverFlags & NBD.flagFixedNewstyle != 0 { clientFlags |= NBD.clientFixedNewstyle }
            if serverFlags & NBD.flagNoZeroes != 0 { clientFlags |= NBD.clientNoZeroes }
            var out: [UInt8] = []
            Client.append(clientFlags, to: &out)
            try writeAll(out)
            if let credentials {
                guard serverFlags & NBD.flagFixedNewstyle != 0 else { throw Failure(message: "Server does not support STARTTLS") }
                try startTLS(credentials, hostname: hostname)
            }
            guard serverFlags & NBD.flagFixedNewstyle != 0 else {
                throw Failure(message: "Server does not support export lists")
            }
            // Structured replies first: the meta contexts are listed only with them.
            try sendOption(.structuredReply)
            let sr = try readReply(for: .structuredReply)
            let structured = sr.type == OptionReplyType.ack.rawValue
            if !structured && !sr.isError {
                throw Failure(message: "Unexpected reply type \(sr.type) to NBD_OPT_STRUCTURED_REPLY")
            }

            try sendOption(.list)
            var exports: [ExportInfo] = []
            while true {
                let r = try readReply(for: .list)
                if r.type == OptionReplyType.ack.rawValue { break }
                // QEMU's client takes NBD_REP_ERR_UNSUP as the end of the list.
                if r.type == OptionReplyType.errUnsup.rawValue { break }
                if r.isError {
                    try? sendOption(.abort)
                    throw Failure(message: Client.errorText(r, option: .list))
                }
                guard r.type == OptionReplyType.server.rawValue else {
                    throw Failure(message: "Unexpected reply type \(r.type) to NBD_OPT_LIST")
                }
                var reader = PayloadReader(r.payload)
                guard let n = reader.u32(), let nameBytes = reader.take(Int(n)) else {
                    throw Failure(message: "incorrect option name length")
                }
                let description = reader.take(reader.remaining) ?? []
                exports.append(ExportInfo(name: String(decoding: nameBytes, as: UTF8.self),
                                          description: String(decoding: description, as: UTF8.self)))
            }

            for i in exports.indices {
                guard try info(&exports[i]) else { break }
                if structured { try metaContexts(&exports[i]) }
            }
            try? sendOption(.abort)
            return exports
        }

        /// `NBD_OPT_INFO` asking for block sizes; false when the server refuses (QEMU stops there).
        mutating func info(_ e: inout ExportInfo) throws(Failure) -> Bool {
            var payload: [UInt8] = []
            let name = Array(e.name.utf8)
            Client.append(UInt32(name.count), to: &payload)
            payload += name
            Client.append(UInt16(1), to: &payload)
            Client.append(InfoType.blockSize.rawValue, to: &payload)
            try sendOption(.info, payload)
            while true {
                let r = try readReply(for: .info)
                if r.type == OptionReplyType.ack.rawValue {
                    if e.flags == 0 { throw Failure(message: "broken server omitted NBD_INFO_EXPORT") }
                    return true
                }
                if r.isError { return false }
                guard r.type == OptionReplyType.info.rawValue, r.payload.count >= 2 else {
                    throw Failure(message: "unexpected reply type \(r.type), expected \(OptionReplyType.info.rawValue)")
                }
                let type = Client.be(r.payload[0..<2], UInt16.self)
                let body = r.payload[2...]
                switch type {
                case InfoType.export.rawValue:
                    guard body.count == 10 else { throw Failure(message: "remaining export info len \(body.count) is unexpected size") }
                    e.size = Client.be(body.prefix(8), UInt64.self)
                    e.flags = Client.be(body.suffix(2), UInt16.self)
                case InfoType.blockSize.rawValue:
                    guard body.count == 12 else { throw Failure(message: "remaining export info len \(body.count) is unexpected size") }
                    let b = Array(body)
                    e.minBlock = Client.be(b[0..<4], UInt32.self)
                    e.optBlock = Client.be(b[4..<8], UInt32.self)
                    e.maxBlock = Client.be(b[8..<12], UInt32.self)
                default:
                    break   // names, descriptions: QEMU skips them here
                }
            }
        }

        /// `NBD_OPT_LIST_META_CONTEXT` with no query (every context), then `qemu:` if the
        /// server answered but listed no `qemu:` context (QEMU 3.0's server forgot those).
        mutating func metaContexts(_ e: inout ExportInfo) throws(Failure) {
            func query(_ q: String?) throws(Failure) {
                var payload: [UInt8] = []
                let name = Array(e.name.utf8)
                Client.append(UInt32(name.count), to: &payload)
                payload += name
                Client.append(UInt32(q == nil ? 0 : 1), to: &payload)
                if let q {
                    Client.append(UInt32(q.utf8.count), to: &payload)
                    payload += Array(q.utf8)
                }
                try sendOption(.listMetaContext, payload)
            }
            try query(nil)
            var seenAny = false, seenQemu = false
            while true {
                let r = try readReply(for: .listMetaContext)
                if r.type == OptionReplyType.ack.rawValue || r.isError {
                    if r.type == OptionReplyType.ack.rawValue && seenAny && !seenQemu {
                        seenQemu = true
                        try query("qemu:")
                        continue
                    }
                    return
                }
                guard r.type == OptionReplyType.metaContext.rawValue, r.payload.count >= 4 else {
                    throw Failure(message: "unexpected reply type \(r.type) to NBD_OPT_LIST_META_CONTEXT")
                }
                let context = String(decoding: r.payload[4...], as: UTF8.self)
                seenAny = true
                if context.hasPrefix("qemu:") { seenQemu = true }
                e.contexts.append(context)
            }
        }

        /// An oldstyle server has one unnamed export: size and flags follow the magic.
        mutating func oldstyle() throws(Failure) -> ExportInfo {
            let b = try readExact(12, "export length and flags")
            var e = ExportInfo(name: "", description: "")
            e.size = Client.be(b[0..<8], UInt64.self)
            let flags = Client.be(b[8..<12], UInt32.self)
            guard flags & ~0xffff == 0 else { throw Failure(message: "Unexpected export flags 0x\(String(flags, radix: 16))") }
            e.flags = UInt16(flags)
            _ = try? readExact(124, "export padding")
            return e
        }
    }
}
