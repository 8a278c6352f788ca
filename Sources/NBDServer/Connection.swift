import BlockCore
import CLinux
import EventLoop
import Glibc
import NBDProtocol
import TLS

/// One NBD client, from greeting to close, driven by its event loop's thread.
///
/// Requests are parsed from a read buffer, executed inline with `.noWait` (served from the
/// page cache without a thread hand-off), and only those that would sleep go to the worker
/// pool. Replies leave in completion order, batched into one `writev` per wake-up.
///
/// Resources are bounded per connection (see docs/architecture.md, "Bounded resources"):
/// - memory: every request is charged what it keeps alive (its buffer's capacity, its reply
///   scratch, a fixed overhead) from the moment it is taken until the last byte of its reply
///   has left the socket; a request is taken only while the total stays within
///   `memoryBudget`, including requests already sitting in the read buffer. A client that
///   stops reading its replies therefore stops being read.
/// - time: one wake-up takes at most `requestsPerWake` requests and `readRoundsPerWake`
///   reads; what is left runs on the loop's next turn, after the other ready connections.
/// - the handshake: closed when not finished within the server's `handshakeMaxSeconds`,
///   the TLS handshake after NBD_OPT_STARTTLS included.
///
/// Every socket read and write goes through `socketRead`/`socketWrite`, and from there through
/// the connection's `Transport`: the plain socket, or the TLS session after STARTTLS, whose
/// buffers are charged to the memory budget like the requests' (`tlsCharge`).
final class Connection: EventHandler {
    enum Phase {
        case clientFlags
        case options
        case transmission
        case closed
    }

    /// Why parsing stopped.
    private enum Progress {
        /// The buffer holds no complete request (or a payload is being read).
        case needMore
        /// The next request does not fit the memory budget or the in-flight cap.
        case paused
        /// This wake-up's share of work is used up.
        case yielded
        /// Closed, or no more requests will be taken (`NBD_CMD_DISC`).
        case stopped
    }

    private enum Step {
        case taken
        case needMore
        case paused
        case stopped
    }

    private struct OutItem {
        var base: UnsafeRawPointer
        var count: Int
        /// The request whose memory this is, on the last item of its reply: released (and
        /// its charge returned) once sent.
        var request: Request?
        /// Handshake bytes (kept alive while queued).
        var owned: [UInt8]?
    }

    static let readBufferSize = 256 * 1024
    /// Most requests alive at once: taken and not yet answered to the last byte (executing,
    /// or with a reply queued). A client that does not read its replies stops being read
    /// after this many small requests even before the memory budget is reached.
    static let maxAlive = 512
    /// Most bytes a connection keeps alive for its requests and queued replies.
    static let memoryBudget = 32 << 20
    /// What a request is charged besides its buffer and scratch: the Request object and its
    /// inline scratch, its output-queue slot, allocator overhead (rounded up).
    static let requestOverhead = 512
    /// Charged per queued handshake reply besides its bytes.
    static let ownedOverhead = 64
    /// Fair share of one wake-up.
    static let requestsPerWake = 256
    static let readRoundsPerWake = 8
    /// Reads and writes up to this size run inline when they can; larger ones go to a worker
    /// so the copy to or from the page cache overlaps with this loop's socket I/O (one loop
    /// thread doing both copies of a 1 MiB request is the bottleneck of sequential I/O).
    static let inlineLimit: UInt64 = 128 * 1024
    static let maxFreeRequests = 256
    /// Charged for a TLS session besides its own input and ciphertext buffers
    /// (`TLSSession.bufferBytes`): GnuTLS's record buffers (a 16 KiB record being received, the
    /// corked plaintext of up to 16 KiB, the sealed record) and its handshake state.
    static let tlsSessionOverhead = 64 * 1024

    let fd: Int32
    let loop: EventLoop
    let server: NBDServer
    let peer: String
    private var registration: UInt64 = 0
    /// Every socket read and write: plain, or through TLS after STARTTLS (Transport.swift).
    private var transport: Transport
    /// What the TLS session is charged now (its buffers grow with queued ciphertext).
    private var tlsCharge = 0
    private var fixedNewstyle = false
    private var interest: UInt32 = 0
    private(set) var phase = Phase.clientFlags
    private var options: OptionHandler
    private var export: Export?
    var exportIdentity: ObjectIdentifier? { export.map(ObjectIdentifier.init) }
    private var contexts: [any MetaContextProvider] = []
    private var limits = Transmission.Limits(size: 0, readOnly: true, maxPayload: 0, structuredReplies: false, hasMetaContexts: false)
    private var mode = ReplyMode.simple
    private var extended: Bool { mode == .extended }
    private var handshakeTimer: UInt64 = 0
    private var logLimiter = LogRateLimiter(burst: 10, perSecond: 2)

    // Input.
    private let input: UnsafeMutableRawBufferPointer
    private var inStart = 0
    private var inEnd = 0
    /// A write whose payload is still arriving, read straight into its buffer.
    private var payloadRequest: Request?
    private var payloadReceived = 0
    /// Most bytes the next recv into `input` takes (see the end of a large write payload).
    private var nextReadLimit = Int.max
    /// Payload bytes of a refused request being skipped before its error reply.
    private var skipRemaining = 0
    private var skipRequest: Request?
    /// An option whose data is being skipped (too long to take) before its error reply.
    private var skipOption: UInt32?
    private var skipCode = NBDErrorCode.inval
    private var skipMessage = ""
    /// The client shut down its sending side: no more reads; what was received is answered.
    private var inputClosed = false
    /// Complete requests may be waiting in the read buffer (parsing paused or yielded).
    private var parsePending = false
    /// The next request did not fit (budget, in-flight cap); `pausedNeed` is its cost.
    private var paused = false
    private var pausedNeed = 0
    /// Requests this wake-up may still take.
    private var workLeft = 0
    private var runAgainScheduled = false

    // Output.
    private var output: [OutItem] = []
    private var outputHead = 0
    private var outputOffset = 0
    private var iovecs: UnsafeMutablePointer<iovec>
    private let maxIOV = 512

    // Requests and memory.
    private var freeRequests: [Request] = []
    /// Requests executing (taken, reply not built yet).
    private var inFlight = 0
    /// Requests taken whose reply has not been sent completely.
    private var alive = 0
    /// Bytes kept alive for requests (taken until their reply is sent) and handshake replies.
    private(set) var charged = 0
    private var disconnectRequested = false
    /// A flush of replies to asynchronous requests is queued for the end of this wake-up.
    private var asyncFlushScheduled = false

    init(fd: Int32, loop: EventLoop, server: NBDServer, peer: String) {
        self.fd = fd
        self.loop = loop
        self.server = server
        self.peer = peer
        self.options = OptionHandler(exports: server.exports, multiConn: server.maxConnections != 1)
        self.transport = .plain(fd)
        input = .allocate(byteCount: Connection.readBufferSize, alignment: 64)
        iovecs = .allocate(capacity: maxIOV)
    }

    deinit {
        input.deallocate()
        iovecs.deallocate()
    }

    // MARK: lifecycle

    func start() {
        assert(loop.inLoopThread, "Connection used off its event loop")
        Sockets.setNoDelay(fd)
        interest = clinux_EPOLLIN | clinux_EPOLLRDHUP
        registration = loop.register(fd: fd, events: interest, handler: self)
        if registration == 0 {
            Glibc.close(fd)
            phase = .closed
            server.connectionClosed(self)
            return
        }
        let seconds = server.handshakeMaxSeconds
        if seconds > 0 {
            handshakeTimer = loop.schedule(after: Double(seconds)) { [self] in handshakeExpired(seconds) }
        }
        enqueueOwned(Handshake.greeting())
        flushOutput()
        updateInterest()
    }

    /// Closes the socket now. Requests still in flight finish (writes are never abandoned
    /// half-way); their replies are dropped.
    func close(reason: String?) {
        assert(loop.inLoopThread, "Connection used off its event loop")
        guard phase != .closed else { return }
        if let reason { logClient(.info, reason) }
        if reason == nil { transport.goodbye() }
        phase = .closed
        if handshakeTimer != 0 {
            loop.cancelTimer(handshakeTimer)
            handshakeTimer = 0
        }
        loop.unregister(fd: fd, id: registration)
        Glibc.close(fd)
        transport = .plain(fd)
        charged -= tlsCharge
        tlsCharge = 0
        if let r = payloadRequest {
            payloadRequest = nil
            abandon(r)
        }
        if let r = skipRequest {
            skipRequest = nil
            abandon(r)
        }
        while outputHead < output.count {
            if let r = output[outputHead].request { releaseRequest(r) }
            outputHead += 1
        }
        output.removeAll()
        freeRequests.removeAll()
        export?.connectionClosed()
        server.connectionClosed(self)
    }

    private func handshakeExpired(_ seconds: Int) {
        handshakeTimer = 0
        guard phase == .clientFlags || phase == .options else { return }
        let stage = transport.isTLS && !transport.isEstablished ? "TLS handshake" : "handshake"
        close(reason: "\(stage) not finished within \(seconds) s (handshake-max-seconds); closing")
    }

    /// Logs a line about this client, at most `logLimiter` allows (a hostile client must not
    /// be able to flood the log).
    private func logClient(_ level: Log.Level, _ message: @autoclosure () -> String) {
        guard Log.isEnabled(level), logLimiter.allow() else { return }
        let suppressed = logLimiter.takeSuppressed()
        let note = suppressed > 0 ? " (\(suppressed) earlier messages about this client suppressed)" : ""
        Log.write(level, "client \(peer): \(message())\(note)")
    }

    // MARK: events

    func handleEvents(_ events: UInt32) {
        assert(loop.inLoopThread, "Connection used off its event loop")
        if phase == .closed { return }
        if events == 0 { runAgainScheduled = false }
        workLeft = Connection.requestsPerWake
        if events & clinux_EPOLLOUT != 0 { flushOutput() }
        if phase == .closed { return }
        if events & (clinux_EPOLLHUP | clinux_EPOLLERR) != 0 && !wantsInput {
            // epoll reports HUP/ERR even with no interest: the peer is gone while reading is
            // off (budget, in-flight cap, half-closed, after NBD_CMD_DISC). Close now rather
            // than spin; in-flight requests still finish, only their replies are dropped.
            close(reason: disconnectRequested ? nil : "hung up with \(inFlight) requests in flight")
            return
        }
        if events == 0 || events & (clinux_EPOLLIN | clinux_EPOLLHUP | clinux_EPOLLERR | clinux_EPOLLRDHUP) != 0 {
            readInput()
        }
        if phase == .closed { return }
        flushOutput()
        updateInterest()
    }

    private var wantsInput: Bool {
        phase != .closed && !inputClosed && !disconnectRequested && !paused && !parsePending
    }

    /// Whether a request costing `need` may be taken now.
    @inline(__always)
    private func fits(_ need: Int) -> Bool {
        alive < Connection.maxAlive && (charged == 0 || charged + need <= Connection.memoryBudget)
    }

    private func updateInterest() {
        guard phase != .closed else { return }
        if paused && fits(pausedNeed) { paused = false }
        var want: UInt32 = 0
        if wantsInput { want |= clinux_EPOLLIN | clinux_EPOLLRDHUP }
        if outputHead < output.count || transport.wantsWrite { want |= clinux_EPOLLOUT }
        if want != interest {
            interest = want
            loop.modify(fd: fd, id: registration, events: want)
        }
        // Requests already in the buffer, or input already inside the TLS session (decrypted,
        // or ciphertext read past what was asked for): no epoll event will announce them.
        if ((parsePending && !paused) || (wantsInput && transport.hasBufferedInput)) && !runAgainScheduled {
            runAgainScheduled = true
            loop.runAgain(id: registration)
        }
        if (disconnectRequested || inputClosed) && inFlight == 0 && outputHead == output.count && !parsePending
            && payloadRequest == nil && skipRequest == nil && skipOption == nil && !transport.wantsWrite {
            close(reason: nil)
        }
    }

    // MARK: input

    private func readInput() {
        var rounds = 0
        while phase != .closed {
            if payloadRequest == nil && (buffered > 0 || parsePending) {
                if process() != .needMore { return }
            }
            if phase == .closed || inputClosed || disconnectRequested || rounds >= Connection.readRoundsPerWake { return }
            rounds += 1
            if let r = payloadRequest {
                let total = Int(r.header.length)
                let n = socketRead(r.data.baseAddress! + payloadReceived, total - payloadReceived)
                if n <= 0 { handleReadEnd(n); return }
                payloadReceived += n
                if payloadReceived == total {
                    payloadRequest = nil
                    // Large writes tend to follow each other: read just the next header, so
                    // its payload goes straight into its own buffer instead of being copied.
                    if total >= 64 * 1024 { nextReadLimit = extended ? RequestHeader.extendedSize : RequestHeader.size }
                    dispatch(r)
                }
                continue
            }
            if inStart == inEnd {
                inStart = 0
                inEnd = 0
            } else if inStart > Connection.readBufferSize / 2 {
                input.baseAddress!.copyMemory(from: input.baseAddress! + inStart, byteCount: inEnd - inStart)
                inEnd -= inStart
                inStart = 0
            }
            let space = min(Connection.readBufferSize - inEnd, nextReadLimit)
            nextReadLimit = Int.max
            if space == 0 {
                // A full buffer that parsed nothing would be a bug in the parser.
                close(reason: "protocol error: request too large to parse")
                return
            }
            let n = socketRead(input.baseAddress! + inEnd, space)
            if n <= 0 { handleReadEnd(n); return }
            inEnd += n
        }
    }

    /// Handles recv's 0 (the client shut down its sending side) and -1.
    private func handleReadEnd(_ n: Int) {
        if n == 0 {
            inputEnded()
            return
        }
        let code = errno
        if code == EAGAIN || code == EWOULDBLOCK || code == EINTR { return }
        close(reason: transport.errorText(code, reading: true))
    }

    /// End of input: every request already received is still answered (the spec's
    /// NBD_CMD_DISC semantics are the polite form; a half-close gets the same), then the
    /// connection closes once nothing is in flight or queued.
    private func inputEnded() {
        inputClosed = true
        if let r = payloadRequest {
            payloadRequest = nil
            abandon(r)
            logClient(.info, "disconnected in the middle of a write payload (request not acknowledged)")
        } else if let r = skipRequest {
            skipRequest = nil
            skipRemaining = 0
            abandon(r)
            logClient(.info, "disconnected in the middle of a refused request's payload")
        } else if skipOption != nil {
            skipOption = nil
            skipRemaining = 0
            logClient(.info, "disconnected in the middle of a refused option's data")
        } else if phase == .transmission && !disconnectRequested {
            logClient(.info, "disconnected without NBD_CMD_DISC")
        } else if phase != .transmission {
            logClient(.info, "disconnected during the handshake")
        }
        // Bytes of a request or option that can never be completed.
        if !parsePending {
            inStart = 0
            inEnd = 0
        }
    }

    private var buffered: Int { inEnd - inStart }
    private var bufferedBase: UnsafeRawPointer { UnsafeRawPointer(input.baseAddress! + inStart) }

    /// Parses and acts on what is complete in the read buffer, within the budget and this
    /// wake-up's share.
    private func process() -> Progress {
        while true {
            if phase == .closed { return .stopped }
            if skipRemaining > 0 {
                let n = min(skipRemaining, buffered)
                if n == 0 {
                    parsePending = false
                    return .needMore
                }
                inStart += n
                skipRemaining -= n
                if skipRemaining == 0, let r = skipRequest {
                    skipRequest = nil
                    replyError(r, code: skipCode, message: skipMessage)
                }
                if skipRemaining == 0, let option = skipOption {
                    skipOption = nil
                    enqueueOwned(Handshake.errorReply(option: option, type: .errTooBig, message: skipMessage))
                }
                continue
            }
            if buffered == 0 {
                parsePending = false
                return .needMore
            }
            switch phase {
            case .clientFlags:
                let flags: UInt32?
                do {
                    flags = try Handshake.parseClientFlags(UnsafeRawBufferPointer(start: bufferedBase, count: buffered))
                } catch {
                    close(reason: "handshake: bad client flags (\(error)); is this an NBD client?")
                    return .stopped
                }
                guard let flags else {
                    parsePending = false
                    return .needMore
                }
                inStart += 4
                options.noZeroes = flags & NBD.clientNoZeroes != 0
                fixedNewstyle = flags & NBD.clientFixedNewstyle != 0
                phase = .options
            case .options:
                if workLeft == 0 {
                    parsePending = true
                    return .yielded
                }
                if !fits(0) {
                    paused = true
                    pausedNeed = 0
                    parsePending = true
                    return .paused
                }
                let header: Handshake.OptionHeader?
                do {
                    header = try Handshake.parseOptionHeader(UnsafeRawBufferPointer(start: bufferedBase, count: buffered))
                } catch .optionTooLong(let length) {
                    // Skip its data and refuse it; the client may go on (the spec: a server
                    // "MUST NOT fail to parse the next message").
                    let option: UInt32 = loadBE(bufferedBase, 8, UInt32.self)
                    inStart += 16
                    workLeft -= 1
                    skipOption = option
                    skipRemaining = Int(length)
                    skipMessage = "option data of \(length) bytes is too large (at most \(NBD.maxOptionLength))"
                    logClient(.info, "option \(option) refused: \(skipMessage)")
                    continue
                } catch {
                    close(reason: "handshake: \(error)")
                    return .stopped
                }
                guard let header, buffered >= 16 + Int(header.length) else {
                    parsePending = false
                    return .needMore
                }
                let payload = Array(UnsafeRawBufferPointer(start: bufferedBase + 16, count: Int(header.length)))
                inStart += 16 + Int(header.length)
                workLeft -= 1
                handleOption(header.option, payload)
            case .transmission:
                if disconnectRequested {
                    inStart = inEnd
                    parsePending = false
                    return .stopped
                }
                if workLeft == 0 {
                    parsePending = true
                    return .yielded
                }
                switch processRequest() {
                case .taken:
                    continue
                case .needMore:
                    parsePending = false
                    return .needMore
                case .paused:
                    parsePending = true
                    return .paused
                case .stopped:
                    parsePending = false
                    return .stopped
                }
            case .closed:
                return .stopped
            }
        }
    }

    private func handleOption(_ option: UInt32, _ payload: [UInt8]) {
        switch StartTLSGate.decide(option: option, payloadLength: payload.count, tlsConfigured: server.tls != nil,
                                   tlsActive: transport.isTLS, fixedNewstyle: fixedNewstyle) {
        case .pass: break
        case .reply(let bytes):
            logClient(.info, "option \(option) refused: \(Handshake.errorMessage(inReply: bytes) ?? "")")
            enqueueOwned(bytes)
            return
        case .close(let bytes, let reason):
            if !bytes.isEmpty { enqueueOwned(bytes); flushOutput() }
            close(reason: reason)
            return
        case .startTLS(let ack):
            enqueueOwned(ack)
            startTLS()
            return
        }
        switch options.handle(option: option, payload: payload) {
        case .reply(let bytes):
            if let message = Handshake.errorMessage(inReply: bytes) {
                logClient(.info, "option \(option) refused: \(message)")
            }
            enqueueOwned(bytes)
        case .close(let bytes, let reason):
            if !bytes.isEmpty { enqueueOwned(bytes); flushOutput() }
            close(reason: reason)
        case .go(let bytes, let export):
            enqueueOwned(bytes)
            enterTransmission(export)
        }
    }

    /// NBD_OPT_STARTTLS acknowledged: the rest of the handshake runs inside TLS. The
    /// acknowledgement still queued goes out in the clear ahead of the server's first TLS
    /// bytes; whatever the client sent behind its STARTTLS is the start of its ClientHello.
    /// The handshake timer keeps running: a client stalled in the TLS handshake is closed
    /// like one stalled in option haggling.
    private func startTLS() {
        guard let policy = server.tls else { return }
        var clear: [UInt8] = []
        for i in outputHead..<output.count {
            let item = output[i]
            let skip = i == outputHead ? outputOffset : 0
            if let owned = item.owned {
                clear += owned[skip...]
                charged -= owned.count + Connection.ownedOverhead
            } else {
                clear += UnsafeRawBufferPointer(start: item.base, count: item.count)[skip...]
            }
            if let r = item.request { releaseRequest(r) }
        }
        output.removeAll()
        outputHead = 0
        outputOffset = 0
        let early = Array(UnsafeRawBufferPointer(start: bufferedBase, count: buffered))
        inStart = inEnd
        do {
            transport = .tls(try TLSSession(fd: fd, credentials: policy.credentials, authorization: policy.authorization,
                                            clearOutput: clear, earlyInput: early))
        } catch {
            close(reason: "STARTTLS: \(error.message)")
            return
        }
        rechargeTLS()
        // Nothing negotiated before TLS counts after it (the spec's rule; with TLS required
        // every earlier option was refused anyway).
        let noZeroes = options.noZeroes
        options = OptionHandler(exports: server.exports, multiConn: server.maxConnections != 1)
        options.noZeroes = noZeroes
    }

    /// Brings the TLS session's charge up to date with its buffers.
    @inline(__always)
    private func rechargeTLS() {
        guard case .tls(let session) = transport else { return }
        let now = session.bufferBytes + Connection.tlsSessionOverhead
        if now != tlsCharge {
            charged += now - tlsCharge
            tlsCharge = now
        }
    }

    private func enterTransmission(_ export: Export) {
        if handshakeTimer != 0 {
            loop.cancelTimer(handshakeTimer)
            handshakeTimer = 0
        }
        self.export = export
        export.connectionOpened()
        mode = options.mode
        contexts = options.selected
        limits = Transmission.Limits(size: export.size, readOnly: !export.writable,
                                     maxPayload: export.limits.maximum, structuredReplies: mode != .simple,
                                     hasMetaContexts: !contexts.isEmpty, extendedHeaders: mode == .extended)
        phase = .transmission
        Log.debug("client \(peer): export '\(export.name)', replies \(mode), contexts=\(contexts.map(\.name))\(transport.tlsSummary)")
    }

    /// What taking `h` costs the budget up front: the overhead and its data buffer.
    @inline(__always)
    private func admissionCost(_ h: RequestHeader) -> Int {
        var cost = Connection.requestOverhead
        if (h.type == Command.read.rawValue || h.type == Command.write.rawValue) && h.length > 0
            && h.length <= UInt64(Transmission.maxPayload) {
            cost += BufferPool.capacity(for: Request.headroom + Int(h.length))
        }
        return cost
    }

    /// Parses one request from the buffer and takes it, if it fits.
    private func processRequest() -> Step {
        let headerSize = extended ? RequestHeader.extendedSize : RequestHeader.size
        let header: RequestHeader?
        do {
            header = try Transmission.parseRequest(bufferedBase, count: buffered, extended: extended)
        } catch .payloadTooLarge(let n) {
            if extended {
                // The spec: a server SHOULD hard-disconnect a client whose PAYLOAD_LEN
                // exceeds the maximum payload.
                close(reason: "protocol error: request payload of \(n) bytes exceeds the maximum \(Transmission.maxPayload); dropping the client")
                return .stopped
            }
            // A compact write header is sound: skip its payload and answer EINVAL.
            if !fits(Connection.requestOverhead) {
                paused = true
                pausedNeed = Connection.requestOverhead
                return .paused
            }
            let h = RequestHeader(flags: CommandFlags(rawValue: loadBE(bufferedBase, 4, UInt16.self)),
                                  type: Command.write.rawValue, cookie: loadBE(bufferedBase, 8, UInt64.self),
                                  offset: loadBE(bufferedBase, 16, UInt64.self), length: n)
            inStart += headerSize
            workLeft -= 1
            let r = takeRequest(h)
            let text = "write of \(n) bytes exceeds the maximum \(Transmission.maxPayload)"
            logClient(.info, "\(text); skipping its payload, replying EINVAL")
            startSkip(r, Int(n), .inval, text)
            return .taken
        } catch {
            close(reason: "protocol error: \(error); dropping the client")
            return .stopped
        }
        guard let header else { return .needMore }
        let payload = header.payloadLength(extended: extended)
        // A block-status payload (the contexts wanted) is small; it is parsed from the buffer
        // whole. One that cannot be valid is skipped like any unexpected payload.
        let statusPayload = extended && header.type == Command.blockStatus.rawValue && header.flags.contains(.payloadLen)
        let statusPayloadUsable = statusPayload && payload >= 12 && payload % 4 == 0 && payload <= 8 + 4 * contexts.count
        if statusPayloadUsable && buffered < headerSize + payload { return .needMore }
        let cost = admissionCost(header)
        if !fits(cost) {
            paused = true
            pausedNeed = cost
            return .paused
        }
        inStart += headerSize
        workLeft -= 1
        let r = takeRequest(header)
        if statusPayload {
            let text = "CMD_BLOCK_STATUS payload not valid"
            guard statusPayloadUsable else {
                logClient(.info, "\(text); replying EINVAL")
                startSkip(r, payload, .inval, text)
                return .taken
            }
            let parsed = Transmission.parseBlockStatusPayload(UnsafeRawBufferPointer(start: bufferedBase, count: payload))
            inStart += payload
            guard let parsed, let selection = contextIndices(parsed.contextIDs) else {
                logClient(.info, "\(text); replying EINVAL")
                replyError(r, code: .inval, message: text)
                return .taken
            }
            r.header.length = parsed.effectLength
            r.header.flags.remove(.payloadLen)
            r.statusSelection = selection
        }
        if let code = Transmission.validate(r.header, limits) {
            let text = errorText(code, r.header)
            logClient(.info, "\(text); replying \(code.name)")
            if payload > 0 && !statusPayload {
                // Reply once the payload is consumed, so the stream stays in step.
                startSkip(r, payload, code, text)
            } else {
                replyError(r, code: code, message: text)
            }
            return .taken
        }
        guard let command = r.header.command else {
            replyError(r, code: .inval, message: "unknown command")
            return .taken
        }
        switch command {
        case .disconnect:
            abandon(r)
            disconnectRequested = true
            inStart = inEnd
            return .stopped
        case .read:
            if r.header.length > 0 { takeBuffer(r, Request.headroom + Int(r.header.length)) }
        case .write:
            let length = Int(r.header.length)
            if length > 0 {
                takeBuffer(r, Request.headroom + length)
                let have = min(buffered, length)
                if have > 0 {
                    r.data.baseAddress!.copyMemory(from: bufferedBase, byteCount: have)
                    inStart += have
                }
                if have < length {
                    payloadRequest = r
                    payloadReceived = have
                    return .needMore
                }
            }
        default:
            break
        }
        dispatch(r)
        return .taken
    }

    @inline(__always)
    private func loadBE<T: FixedWidthInteger>(_ base: UnsafeRawPointer, _ offset: Int, _: T.Type) -> T {
        T(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    /// Indices into `contexts` for the ids a block-status payload names; nil if one was
    /// not selected (ids are 1…n, as SET_META_CONTEXT answered).
    private func contextIndices(_ ids: [UInt32]) -> [Int]? {
        var out: [Int] = []
        for id in ids {
            guard id >= 1 && Int(id) <= contexts.count else { return nil }
            out.append(Int(id) - 1)
        }
        return out
    }

    private func startSkip(_ r: Request, _ count: Int, _ code: NBDErrorCode, _ message: String) {
        skipRequest = r
        skipRemaining = count
        skipCode = code
        skipMessage = message
        if count == 0 {
            skipRequest = nil
            replyError(r, code: code, message: message)
        }
    }

    private func errorText(_ code: NBDErrorCode, _ h: RequestHeader) -> String {
        let name = h.command.map { "\($0)" } ?? "command \(h.type)"
        switch code {
        case .perm: return "\(name) refused: export is read-only"
        case .nospc: return "\(name) at offset \(h.offset) length \(h.length) is past the end of the export"
        default: return "invalid \(name) request at offset \(h.offset) length \(h.length) flags 0x\(String(h.flags.rawValue, radix: 16))"
        }
    }

    // MARK: requests and memory

    private func takeRequest(_ header: RequestHeader) -> Request {
        inFlight += 1
        alive += 1
        let r = freeRequests.popLast() ?? Request()
        r.header = header
        r.charge = Connection.requestOverhead
        charged += Connection.requestOverhead
        return r
    }

    private func takeBuffer(_ r: Request, _ count: Int) {
        r.buffer = server.pool(for: loop).take(count)
        recharge(r)
    }

    /// The buffer goes back to the pool (the reply carries no data).
    private func dropBuffer(_ r: Request) {
        if r.buffer.baseAddress != nil {
            server.pool(for: loop).give(r.buffer)
            r.buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        }
    }

    /// Brings the request's charge up to date with what it holds now.
    private func recharge(_ r: Request) {
        var now = Connection.requestOverhead + r.extraScratch
        if r.buffer.baseAddress != nil { now += BufferPool.capacity(for: r.buffer.count) }
        charged += now - r.charge
        r.charge = now
    }

    /// The request stopped executing (its reply, if any, may still be queued).
    @inline(__always)
    private func retire(_ r: Request) {
        inFlight -= 1
    }

    /// The reply is sent (or will never be): memory back, request recycled.
    private func releaseRequest(_ r: Request) {
        alive -= 1
        dropBuffer(r)
        charged -= r.charge
        r.reset()
        if freeRequests.count < Connection.maxFreeRequests && phase != .closed { freeRequests.append(r) }
    }

    /// A request that gets no reply (NBD_CMD_DISC, a payload cut short by the client).
    private func abandon(_ r: Request) {
        retire(r)
        releaseRequest(r)
    }

    // MARK: execution

    /// Runs a request inline if it can complete without sleeping, else on a worker.
    private func dispatch(_ r: Request) {
        guard let export else { return }
        let node = export.node
        let contexts = self.contexts
        let structured = mode != .simple
        if node.supportsAsync && startAsync(r, node: node, root: export.root, writethrough: export.writethrough) { return }
        // Block status moves no payload: its length says nothing about the work (bitmap
        // contexts answer from memory; others return false from the `noWait` attempt).
        if r.header.length <= Connection.inlineLimit || r.header.type == Command.blockStatus.rawValue {
            if r.header.type == Command.write.rawValue {
                // Writes: still `.noWait` for everything but the buffered write itself (drain,
                // range locks, metadata never sleep on the loop), which is timed.
                let policy = export.inlineWrites
                let start = monotonicNanos()
                let inline = policy.allows(now: start)
                let sleeps = inline ? InlineWritePolicy.sleeps() : 0
                let done = Executor.perform(r, node: node, root: export.root, contexts: contexts, structured: structured,
                                            noWait: true, inlineWrite: inline, writethrough: export.writethrough)
                if inline {
                    let end = monotonicNanos()
                    policy.record(elapsed: end - start, sleepsBefore: sleeps, now: end, exportName: export.name)
                }
                if done {
                    complete(r)
                    return
                }
            } else if Executor.perform(r, node: node, root: export.root, contexts: contexts, structured: structured, noWait: true,
                                       writethrough: export.writethrough) {
                complete(r)
                return
            }
        }
        let me = UnsafeTransfer(self)
        let loop = self.loop
        server.workers.submit {
            // The export may be re-pointed (active commit) while the request waits for the
            // drained section: then it retries on the node now served.
            var current = export.node
            while true {
                _ = Executor.perform(r, node: current, root: export.root, contexts: contexts, structured: structured,
                                     noWait: false, writethrough: export.writethrough)
                guard r.errno == ESTALE, export.node !== current else { break }
                r.errno = 0
                r.message = ""
                current = export.node
            }
            loop.execute { me.value.completeFromWorker(r) }
        }
    }

    /// Asynchronous chains (an `nbd` node, maybe under raw or filters): the request starts
    /// here and completes on this loop (`asyncCompleted`); false sends it the usual way.
    private func startAsync(_ r: Request, node: BlockNode, root: BlockRoot, writethrough: Bool) -> Bool {
        let me = UnsafeTransfer(self)
        let request = UnsafeTransfer(r)
        let io = BlockIO(loop: loop) { io in me.value.asyncCompleted(request.value, io) }
        let (handled, started) = Executor.submit(r, node: node, root: root, io: io, writethrough: writethrough)
        if handled && !started { complete(r) }
        return handled
    }

    /// Replies to asynchronous requests that complete in one wake-up (a batch of replies
    /// from the remote server) leave in one `writev`, at the end of the wake-up.
    private func asyncCompleted(_ r: Request, _ io: BlockIO) {
        assert(loop.inLoopThread, "Connection used off its event loop")
        Executor.finishAsync(r, io: io, structured: mode != .simple)
        if phase == .closed {
            abandon(r)
            return
        }
        complete(r)
        if asyncFlushScheduled { return }
        asyncFlushScheduled = true
        let me = UnsafeTransfer(self)
        loop.deferToEndOfIteration {
            me.value.asyncFlushScheduled = false
            me.value.flushAfterAsyncCompletions()
        }
    }

    /// Reading may have paused at the in-flight cap or the budget: `updateInterest` resumes
    /// it, and takes requests already in the read buffer on the loop's next turn.
    private func flushAfterAsyncCompletions() {
        guard phase != .closed else { return }
        flushOutput()
        if phase != .closed { updateInterest() }
    }

    private func completeFromWorker(_ r: Request) {
        assert(loop.inLoopThread, "Connection used off its event loop")
        if phase == .closed {
            abandon(r)
            return
        }
        complete(r)
        flushOutput()
        // Reading may have paused at the in-flight cap or the budget: updateInterest resumes.
        if phase != .closed { updateInterest() }
    }

    // MARK: replies

    /// Queues the reply of a request that finished executing.
    private func complete(_ r: Request) {
        let h = r.header
        if r.errno != 0 {
            let code = NBDErrorCode.from(errno: r.errno, flags: h.flags)
            Log.debug("client \(peer): \(h.command.map { "\($0)" } ?? "?") \(h.offset)+\(h.length) failed: \(r.message)")
            replyError(r, code: code, message: r.message)
            return
        }
        retire(r)
        switch h.command {
        case .read where h.length > 0:
            let base = r.buffer.baseAddress!
            if mode == .simple {
                Transmission.encodeSimpleReply(error: .ok, cookie: h.cookie, into: base + Request.headroom - 16)
                enqueue(UnsafeRawPointer(base + Request.headroom - 16), 16 + Int(h.length), r)
            } else if r.chunks.isEmpty {
                let hs = Transmission.offsetDataHeaderSize(extended: extended)
                Transmission.encodeOffsetDataHeader(extended: extended, cookie: h.cookie, requestOffset: h.offset,
                                                    offset: h.offset, dataLength: Int(h.length), done: true,
                                                    into: base + Request.headroom - hs)
                enqueue(UnsafeRawPointer(base + Request.headroom - hs), hs + Int(h.length), r)
            } else {
                enqueueChunks(r)
            }
        case .blockStatus:
            enqueueBlockStatus(r)
        default:
            // No data in the reply (a zero-length read too: the spec wants OFFSET_DATA chunks
            // of at least one byte, so a structured reply is just NONE).
            dropBuffer(r)
            let s = r.reserveScratch(Transmission.extendedChunkHeaderSize)
            let n: Int
            if mode == .simple || (mode == .structured && h.type != Command.read.rawValue) {
                Transmission.encodeSimpleReply(error: .ok, cookie: h.cookie, into: s)
                n = Transmission.simpleReplySize
            } else {
                n = Transmission.encodeNone(extended: extended, cookie: h.cookie, requestOffset: h.offset, into: s)
            }
            enqueue(UnsafeRawPointer(s), n, r)
        }
    }

    /// A sparse read: data and hole chunks, the last one flagged done. Chunk headers are in
    /// the request's scratch; the data stays in its buffer.
    private func enqueueChunks(_ r: Request) {
        let h = r.header
        let dataHeader = Transmission.offsetDataHeaderSize(extended: extended)
        let holeSize = Transmission.offsetHoleSize(extended: extended)
        var total = 0
        for c in r.chunks { total += c.hole ? holeSize : dataHeader }
        let s = r.reserveScratch(total)
        let data = r.data.baseAddress!
        var at = 0
        for (i, c) in r.chunks.enumerated() {
            let done = i == r.chunks.count - 1
            let offset = h.offset + UInt64(c.offset)
            if c.hole {
                let n = Transmission.encodeOffsetHole(extended: extended, cookie: h.cookie, requestOffset: h.offset,
                                                      offset: offset, length: UInt32(c.length), done: done, into: s + at)
                output.append(OutItem(base: UnsafeRawPointer(s + at), count: n, request: nil, owned: nil))
                at += n
            } else {
                let n = Transmission.encodeOffsetDataHeader(extended: extended, cookie: h.cookie, requestOffset: h.offset,
                                                            offset: offset, dataLength: c.length, done: done, into: s + at)
                output.append(OutItem(base: UnsafeRawPointer(s + at), count: n, request: nil, owned: nil))
                output.append(OutItem(base: UnsafeRawPointer(data + c.offset), count: c.length, request: nil, owned: nil))
                at += n
            }
        }
        // The request (its buffer and scratch) must outlive every queued slice: the last
        // item releases it.
        output[output.count - 1].request = r
        recharge(r)
    }

    private func enqueueBlockStatus(_ r: Request) {
        let h = r.header
        dropBuffer(r)
        let selection = Executor.selectedContexts(r, contexts)
        var results = r.statusResults
        r.statusResults = []
        if !extended {
            let alignment = UInt64(export?.limits.minimum ?? 1)
            for i in results.indices {
                Transmission.fitCompact(&results[i], alignment: max(512, alignment))
                if results[i].isEmpty { results[i] = [Transmission.Extent(length: min(h.length, 1 << 31), flags: 0)] }
            }
        }
        var total = 0
        for e in results { total += Transmission.blockStatusChunkSize(extended: extended, count: e.count) }
        let s = r.reserveScratch(total)
        var at = 0
        for (k, index) in selection.enumerated() where k < results.count {
            at += Transmission.encodeBlockStatusChunk(extended: extended, cookie: h.cookie, requestOffset: h.offset,
                                                      contextID: UInt32(index + 1), extents: results[k],
                                                      done: k == selection.count - 1, into: s + at)
        }
        recharge(r)
        enqueue(UnsafeRawPointer(s), at, r)
    }

    /// Queues an error reply: an error chunk with the message once structured replies or
    /// extended headers are negotiated (the spec prefers them), else a simple reply.
    private func replyError(_ r: Request, code: NBDErrorCode, message: String) {
        retire(r)
        dropBuffer(r)
        let h = r.header
        let n: Int
        if mode == .simple {
            let s = r.reserveScratch(Transmission.simpleReplySize)
            Transmission.encodeSimpleReply(error: code, cookie: h.cookie, into: s)
            n = Transmission.simpleReplySize
        } else {
            let text = Transmission.messageBytes(message)
            let s = r.reserveScratch(Transmission.errorChunkSize(extended: extended, messageLength: text.count))
            n = Transmission.encodeErrorChunk(extended: extended, cookie: h.cookie, requestOffset: h.offset, error: code,
                                              message: text, into: s)
        }
        recharge(r)
        enqueue(UnsafeRawPointer(r.scratch), n, r)
    }

    // MARK: transport

    /// The one place the connection reads its socket, through its transport (plaintext
    /// after STARTTLS): `recv` semantics (bytes, 0 at end of input, -1 with errno; `EAGAIN`
    /// when nothing is there).
    @inline(__always)
    private func socketRead(_ into: UnsafeMutableRawPointer, _ count: Int) -> Int {
        let n = transport.receive(into, count)
        if tlsCharge != 0 { rechargeTLS() }
        return n
    }

    /// The one place the connection writes its socket, through its transport: `writev`
    /// semantics.
    @inline(__always)
    private func socketWrite(_ iov: UnsafeMutablePointer<iovec>, _ count: Int32) -> Int {
        let n = transport.send(iov, count)
        if tlsCharge != 0 { rechargeTLS() }
        return n
    }

    // MARK: output

    private func enqueue(_ base: UnsafeRawPointer, _ count: Int, _ request: Request) {
        recharge(request)
        output.append(OutItem(base: base, count: count, request: request, owned: nil))
    }

    /// Handshake replies: owned bytes, charged while queued.
    private func enqueueOwned(_ bytes: [UInt8]) {
        if bytes.isEmpty { return }
        let base = bytes.withUnsafeBytes { $0.baseAddress! }
        charged += bytes.count + Connection.ownedOverhead
        output.append(OutItem(base: base, count: bytes.count, request: nil, owned: bytes))
    }

    /// Writes as much queued output as the socket takes, in `writev` batches.
    private func flushOutput() {
        if transport.wantsWrite { transport.flush() }
        while phase != .closed && outputHead < output.count {
            var n = 0
            var i = outputHead
            while i < output.count && n < maxIOV {
                let item = output[i]
                let skip = i == outputHead ? outputOffset : 0
                // Owned arrays: take the pointer from the array itself (stable while stored).
                let base: UnsafeRawPointer
                if let owned = item.owned {
                    base = owned.withUnsafeBytes { $0.baseAddress! }
                } else {
                    base = item.base
                }
                iovecs[n] = iovec(iov_base: UnsafeMutableRawPointer(mutating: base + skip), iov_len: item.count - skip)
                n += 1
                i += 1
            }
            var written = socketWrite(iovecs, Int32(n))
            if written < 0 {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK { return }
                if code == EINTR { continue }
                close(reason: transport.errorText(code, reading: false))
                return
            }
            while written > 0 {
                let remaining = output[outputHead].count - outputOffset
                if written >= remaining {
                    written -= remaining
                    if let owned = output[outputHead].owned {
                        charged -= owned.count + Connection.ownedOverhead
                        output[outputHead].owned = nil
                    }
                    if let r = output[outputHead].request {
                        output[outputHead].request = nil
                        releaseRequest(r)
                    }
                    outputHead += 1
                    outputOffset = 0
                } else {
                    outputOffset += written
                    written = 0
                }
            }
        }
        if outputHead == output.count && outputHead > 0 {
            output.removeAll(keepingCapacity: output.capacity <= 4096)
            outputHead = 0
            outputOffset = 0
        }
    }
}
