import BlockCore
import CLinux
import EventLoop
import Glibc
import NBDProtocol

/// One NBD client, from greeting to close, driven by its event loop's thread.
///
/// Requests are parsed from a read buffer, executed inline with `.noWait` (served from the
/// page cache without a thread hand-off), and only those that would sleep go to the worker
/// pool. Replies leave in completion order, batched into one `writev` per wake-up.
final class Connection: EventHandler {
    enum Phase {
        case clientFlags
        case options
        case transmission
        case closed
    }

    private struct OutItem {
        var base: UnsafeRawPointer
        var count: Int
        /// Pool buffer to give back once sent.
        var release: UnsafeMutableRawBufferPointer?
        /// Owned bytes (kept alive while queued).
        var owned: [UInt8]?
    }

    static let readBufferSize = 256 * 1024
    static let maxInFlight = 512
    static let maxQueuedOutput = 64 << 20
    /// Reads and writes up to this size run inline when they can; larger ones go to a worker
    /// so the copy to or from the page cache overlaps with this loop's socket I/O (one loop
    /// thread doing both copies of a 1 MiB request is the bottleneck of sequential I/O).
    static let inlineLimit: UInt32 = 128 * 1024

    let fd: Int32
    let loop: EventLoop
    let server: NBDServer
    let peer: String
    private var registration: UInt64 = 0
    private var interest: UInt32 = 0
    private(set) var phase = Phase.clientFlags
    private var options: OptionHandler
    private var export: Export?
    var exportIdentity: ObjectIdentifier? { export.map(ObjectIdentifier.init) }
    private var contexts: [any MetaContextProvider] = []
    private var limits = Transmission.Limits(size: 0, readOnly: true, maxPayload: 0, structuredReplies: false, hasMetaContexts: false)
    private var structured = false

    // Input.
    private let input: UnsafeMutableRawBufferPointer
    private var inStart = 0
    private var inEnd = 0
    /// A write whose payload is still arriving, read straight into its buffer.
    private var payloadRequest: Request?
    private var payloadReceived = 0
    /// Most bytes the next recv into `input` takes (see the end of a large write payload).
    private var nextReadLimit = Int.max
    /// Bytes of an over-long write payload being skipped before its error reply.
    private var skipRemaining = 0
    private var skipCookie: UInt64 = 0
    private var skipCode = NBDErrorCode.inval

    // Output.
    private var output: [OutItem] = []
    private var outputHead = 0
    private var outputOffset = 0
    private var queuedBytes = 0
    private var iovecs: UnsafeMutablePointer<iovec>
    private let maxIOV = 512

    // Requests.
    private var freeRequests: [Request] = []
    private var inFlight = 0
    private var disconnectRequested = false

    init(fd: Int32, loop: EventLoop, server: NBDServer, peer: String) {
        self.fd = fd
        self.loop = loop
        self.server = server
        self.peer = peer
        self.options = OptionHandler(exports: server.exports)
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
            return
        }
        enqueue(Handshake.greeting())
        flushOutput()
        updateInterest()
    }

    /// Closes the socket now. Requests still in flight finish (writes are never abandoned
    /// half-way); their replies are dropped.
    func close(reason: String?) {
        assert(loop.inLoopThread, "Connection used off its event loop")
        guard phase != .closed else { return }
        if let reason { Log.info("client \(peer): \(reason)") }
        phase = .closed
        loop.unregister(fd: fd, id: registration)
        Glibc.close(fd)
        if let r = payloadRequest {
            releaseRequest(r)
            payloadRequest = nil
        }
        while outputHead < output.count {
            if let b = output[outputHead].release { server.pool(for: loop).give(b) }
            outputHead += 1
        }
        output.removeAll()
        export?.connectionClosed()
        server.connectionClosed(self)
    }

    // MARK: events

    func handleEvents(_ events: UInt32) {
        assert(loop.inLoopThread, "Connection used off its event loop")
        if phase == .closed { return }
        if events & clinux_EPOLLOUT != 0 { flushOutput() }
        if events & (clinux_EPOLLIN | clinux_EPOLLHUP | clinux_EPOLLERR | clinux_EPOLLRDHUP) != 0 {
            if !wantsInput && events & (clinux_EPOLLHUP | clinux_EPOLLERR) != 0 {
                // epoll reports HUP/ERR even with no interest: the peer is gone while reading is
                // paused (in-flight cap, or after NBD_CMD_DISC). Close now rather than spin;
                // in-flight requests still finish, only their replies are dropped.
                close(reason: disconnectRequested ? nil : "hung up with \(inFlight) requests in flight")
                return
            }
            readInput()
        }
        if phase == .closed { return }
        flushOutput()
        updateInterest()
    }

    private var wantsInput: Bool {
        !disconnectRequested && inFlight < Connection.maxInFlight && queuedBytes < Connection.maxQueuedOutput
    }

    private func updateInterest() {
        guard phase != .closed else { return }
        var want: UInt32 = 0
        if wantsInput { want |= clinux_EPOLLIN | clinux_EPOLLRDHUP }
        if outputHead < output.count { want |= clinux_EPOLLOUT }
        if want != interest {
            interest = want
            loop.modify(fd: fd, id: registration, events: want)
        }
        if disconnectRequested && inFlight == 0 && outputHead == output.count {
            close(reason: nil)
        }
    }

    // MARK: input

    private func readInput() {
        var rounds = 0
        while phase != .closed && wantsInput && rounds < 16 {
            rounds += 1
            if let r = payloadRequest {
                let want = Int(r.header.length) - payloadReceived
                let n = recv(fd, r.data.baseAddress! + payloadReceived, want, 0)
                if n <= 0 { if handleReadEnd(n) { return } else { break } }
                payloadReceived += n
                if payloadReceived == Int(r.header.length) {
                    payloadRequest = nil
                    // Large writes tend to follow each other: read just the next header, so
                    // its payload goes straight into its own buffer instead of being copied.
                    if payloadReceived >= 64 * 1024 { nextReadLimit = RequestHeader.size }
                    dispatch(r)
                }
                continue
            }
            if inStart == inEnd {
                inStart = 0
                inEnd = 0
            } else if inStart > Connection.readBufferSize / 2 {
                (input.baseAddress! ).copyMemory(from: input.baseAddress! + inStart, byteCount: inEnd - inStart)
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
            let n = recv(fd, input.baseAddress! + inEnd, space, 0)
            if n <= 0 { if handleReadEnd(n) { return } else { break } }
            inEnd += n
            process()
        }
    }

    /// Handles recv's 0 (peer closed) and -1; returns true if the connection closed.
    private func handleReadEnd(_ n: Int) -> Bool {
        if n == 0 {
            if payloadRequest != nil {
                close(reason: "disconnected in the middle of a write payload (request not acknowledged)")
            } else if phase == .transmission && !disconnectRequested {
                close(reason: "disconnected without NBD_CMD_DISC")
            } else if phase != .transmission {
                close(reason: "disconnected during the handshake")
            } else {
                close(reason: nil)
            }
            return true
        }
        let code = errno
        if code == EAGAIN || code == EWOULDBLOCK || code == EINTR { return false }
        close(reason: "read error: \(String(cString: strerror(code)))")
        return true
    }

    private var buffered: Int { inEnd - inStart }
    private var bufferedBase: UnsafeRawPointer { UnsafeRawPointer(input.baseAddress! + inStart) }

    /// Parses and acts on everything complete in the read buffer.
    private func process() {
        while phase != .closed && buffered > 0 {
            if skipRemaining > 0 {
                let n = min(skipRemaining, buffered)
                inStart += n
                skipRemaining -= n
                if skipRemaining == 0 { replySimple(error: skipCode, cookie: skipCookie) }
                continue
            }
            switch phase {
            case .clientFlags:
                let flags: UInt32?
                do {
                    flags = try Handshake.parseClientFlags(UnsafeRawBufferPointer(start: bufferedBase, count: buffered))
                } catch {
                    close(reason: "handshake: bad client flags (\(error)); is this an NBD client?")
                    return
                }
                guard let flags else { return }
                inStart += 4
                options.noZeroes = flags & NBD.clientNoZeroes != 0
                phase = .options
            case .options:
                let header: Handshake.OptionHeader?
                do {
                    header = try Handshake.parseOptionHeader(UnsafeRawBufferPointer(start: bufferedBase, count: buffered))
                } catch {
                    close(reason: "handshake: \(error)")
                    return
                }
                guard let header, buffered >= 16 + Int(header.length) else { return }
                let payload = Array(UnsafeRawBufferPointer(start: bufferedBase + 16, count: Int(header.length)))
                inStart += 16 + Int(header.length)
                handleOption(header.option, payload)
            case .transmission:
                if !processRequest() { return }
            case .closed:
                return
            }
        }
    }

    private func handleOption(_ option: UInt32, _ payload: [UInt8]) {
        switch options.handle(option: option, payload: payload) {
        case .reply(let bytes):
            if let message = Handshake.errorMessage(inReply: bytes) {
                Log.info("client \(peer): option \(option) refused: \(message)")
            }
            enqueue(bytes)
        case .close(let bytes, let reason):
            if !bytes.isEmpty { enqueue(bytes); flushOutput() }
            close(reason: reason)
        case .go(let bytes, let export):
            enqueue(bytes)
            enterTransmission(export)
        }
    }

    private func enterTransmission(_ export: Export) {
        self.export = export
        export.connectionOpened()
        structured = options.structuredReplies
        contexts = options.selected
        limits = Transmission.Limits(size: export.size, readOnly: !export.writable,
                                     maxPayload: export.limits.maximum, structuredReplies: structured,
                                     hasMetaContexts: !contexts.isEmpty)
        phase = .transmission
        Log.debug("client \(peer): export '\(export.name)', structured=\(structured), contexts=\(contexts.map(\.name))")
    }

    /// Parses one request from the buffer; false when more bytes are needed.
    private func processRequest() -> Bool {
        let header: RequestHeader?
        do {
            header = try Transmission.parseRequest(bufferedBase, count: buffered)
        } catch .payloadTooLarge(let n) {
            // The header is sound: skip its payload and answer EINVAL, keeping the connection.
            let cookie: UInt64 = UInt64(bigEndian: bufferedBase.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            inStart += RequestHeader.size
            Log.info("client \(peer): write of \(n) bytes exceeds the maximum \(Transmission.maxPayload); skipping its payload, replying EINVAL")
            skipRemaining = Int(n)
            skipCookie = cookie
            skipCode = .inval
            return true
        } catch {
            close(reason: "protocol error: \(error); dropping the client")
            return false
        }
        guard let header else { return false }
        inStart += RequestHeader.size
        let r = takeRequest()
        r.header = header
        if let code = Transmission.validate(header, limits) {
            Log.info("client \(peer): \(errorText(code, header)); replying \(code.name)")
            if header.type == Command.write.rawValue && header.length > 0 {
                // Reply once the payload is consumed, so the stream stays in step.
                skipRemaining = Int(header.length)
                skipCookie = header.cookie
                skipCode = code
                releaseRequest(r)
                return true
            }
            replyError(r, code: code, message: errorText(code, header))
            return true
        }
        guard let command = header.command else { return true }
        switch command {
        case .disconnect:
            releaseRequest(r)
            disconnectRequested = true
            inStart = inEnd
            return false
        case .read, .write:
            let length = Int(header.length)
            r.buffer = server.pool(for: loop).take(Request.headroom + length)
            if command == .write {
                let have = min(buffered, length)
                if have > 0 {
                    r.data.baseAddress!.copyMemory(from: bufferedBase, byteCount: have)
                    inStart += have
                }
                if have < length {
                    payloadRequest = r
                    payloadReceived = have
                    return false
                }
            }
        default:
            break
        }
        dispatch(r)
        return true
    }

    private func errorText(_ code: NBDErrorCode, _ h: RequestHeader) -> String {
        let name = h.command.map { "\($0)" } ?? "command \(h.type)"
        switch code {
        case .perm: return "\(name) refused: export is read-only"
        default: return "invalid \(name) request at offset \(h.offset) length \(h.length)"
        }
    }

    // MARK: execution

    private func takeRequest() -> Request {
        inFlight += 1
        if let r = freeRequests.popLast() { return r }
        return Request()
    }

    private func releaseRequest(_ r: Request) {
        inFlight -= 1
        if r.buffer.baseAddress != nil {
            server.pool(for: loop).give(r.buffer)
            r.buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        }
        r.reset()
        if freeRequests.count < 64 { freeRequests.append(r) }
    }

    /// Runs a request inline if it can complete without sleeping, else on a worker.
    private func dispatch(_ r: Request) {
        guard let export else { return }
        let node = export.node
        let contexts = self.contexts
        let structured = self.structured
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
                let done = Executor.perform(r, node: node, root: export.root, contexts: contexts, structured: structured, noWait: true,
                                            inlineWrite: inline)
                if inline {
                    let end = monotonicNanos()
                    policy.record(elapsed: end - start, sleepsBefore: sleeps, now: end, exportName: export.name)
                }
                if done {
                    complete(r)
                    return
                }
            } else if Executor.perform(r, node: node, root: export.root, contexts: contexts, structured: structured, noWait: true) {
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
                _ = Executor.perform(r, node: current, root: export.root, contexts: contexts, structured: structured, noWait: false)
                guard r.errno == ESTALE, export.node !== current else { break }
                r.errno = 0
                r.message = ""
                current = export.node
            }
            loop.execute { me.value.completeFromWorker(r) }
        }
    }

    private func completeFromWorker(_ r: Request) {
        assert(loop.inLoopThread, "Connection used off its event loop")
        if phase == .closed {
            releaseRequest(r)
            return
        }
        complete(r)
        flushOutput()
        if phase != .closed { updateInterest() }
        // Reading may have paused at the in-flight cap; pick up what is already buffered.
        if phase == .transmission && wantsInput && buffered > 0 && payloadRequest == nil {
            process()
            flushOutput()
            updateInterest()
        }
    }

    // MARK: replies

    private func complete(_ r: Request) {
        let h = r.header
        if r.errno != 0 {
            let code = NBDErrorCode.from(errno: r.errno, flags: h.flags)
            Log.debug("client \(peer): \(h.command.map { "\($0)" } ?? "?") \(h.offset)+\(h.length) failed: \(r.message)")
            replyError(r, code: code, message: r.message)
            return
        }
        let base = r.buffer.baseAddress
        switch h.command {
        case .read:
            if !structured {
                Transmission.encodeSimpleReply(error: .ok, cookie: h.cookie, into: base! + Request.headroom - 16)
                enqueue(UnsafeRawPointer(base! + Request.headroom - 16), 16 + Int(h.length), release: r.buffer)
                r.buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
            } else if r.chunks.isEmpty {
                let hs = Transmission.offsetDataHeaderSize
                Transmission.encodeOffsetDataHeader(cookie: h.cookie, offset: h.offset, dataLength: h.length, done: true,
                                                    into: base! + Request.headroom - hs)
                enqueue(UnsafeRawPointer(base! + Request.headroom - hs), hs + Int(h.length), release: r.buffer)
                r.buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
            } else {
                // Releases the request itself (its buffer goes with the last chunk).
                enqueueChunks(r)
                return
            }
        case .blockStatus:
            enqueue(r.replyBytes)
        default:
            if let base {
                Transmission.encodeSimpleReply(error: .ok, cookie: h.cookie, into: base)
                enqueue(UnsafeRawPointer(base), 16, release: r.buffer)
                r.buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
            } else {
                replySimple(error: .ok, cookie: h.cookie)
            }
        }
        releaseRequest(r)
    }

    /// A sparse read: data and hole chunks, the last one flagged done.
    private func enqueueChunks(_ r: Request) {
        let h = r.header
        let data = r.data
        for (i, c) in r.chunks.enumerated() {
            let done = i == r.chunks.count - 1
            let at = h.offset + UInt64(c.offset)
            if c.hole {
                var bytes = [UInt8](repeating: 0, count: Transmission.offsetHoleSize)
                bytes.withUnsafeMutableBytes {
                    Transmission.encodeOffsetHole(cookie: h.cookie, offset: at, length: UInt32(c.length), done: done, into: $0.baseAddress!)
                }
                enqueue(bytes)
            } else {
                var head = [UInt8](repeating: 0, count: Transmission.offsetDataHeaderSize)
                head.withUnsafeMutableBytes {
                    Transmission.encodeOffsetDataHeader(cookie: h.cookie, offset: at, dataLength: UInt32(c.length), done: done,
                                                        into: $0.baseAddress!)
                }
                enqueue(head)
                enqueue(UnsafeRawPointer(data.baseAddress! + c.offset), c.length, release: nil)
            }
        }
        // The data buffer must outlive the queued slices: hand it to the last item.
        if let last = output.indices.last {
            output[last].release = r.buffer
            r.buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        }
        releaseRequest(r)
    }

    private func replyError(_ r: Request, code: NBDErrorCode, message: String) {
        let h = r.header
        if structured && (h.type == Command.read.rawValue || h.type == Command.blockStatus.rawValue) {
            enqueue(Transmission.errorChunk(cookie: h.cookie, error: code, message: message))
        } else {
            replySimple(error: code, cookie: h.cookie)
        }
        releaseRequest(r)
    }

    private func replySimple(error: NBDErrorCode, cookie: UInt64) {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes.withUnsafeMutableBytes { Transmission.encodeSimpleReply(error: error, cookie: cookie, into: $0.baseAddress!) }
        enqueue(bytes)
    }

    // MARK: output

    private func enqueue(_ bytes: [UInt8]) {
        if bytes.isEmpty { return }
        let base = bytes.withUnsafeBytes { $0.baseAddress! }
        output.append(OutItem(base: base, count: bytes.count, release: nil, owned: bytes))
        queuedBytes += bytes.count
    }

    private func enqueue(_ base: UnsafeRawPointer, _ count: Int, release: UnsafeMutableRawBufferPointer?) {
        output.append(OutItem(base: base, count: count, release: release, owned: nil))
        queuedBytes += count
    }

    /// Writes as much queued output as the socket takes, in `writev` batches.
    private func flushOutput() {
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
            var written = writev(fd, iovecs, Int32(n))
            if written < 0 {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK { return }
                if code == EINTR { continue }
                close(reason: "write error: \(String(cString: strerror(code)))")
                return
            }
            queuedBytes -= written
            while written > 0 {
                let remaining = output[outputHead].count - outputOffset
                if written >= remaining {
                    written -= remaining
                    if let b = output[outputHead].release { server.pool(for: loop).give(b) }
                    output[outputHead].owned = nil
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
