import BlockCore
import CLinux
import EventLoop
import NBDProtocol
#if canImport(Glibc)
import Glibc
#endif

/// One connection of an `nbd` node to its server, owned by one event loop thread: connect,
/// handshake, many requests in flight, replies checked against their requests, reconnects.
///
/// ```
///  idle ──attempt──▶ connecting ──▶ handshaking ──▶ ready ──lost──▶ idle (retry, backoff)
///    ▲                  │ fail          │ fail                          │ reconnect-delay over:
///    └──────────────────┴───────────────┘                               ▼ waiting requests fail
///  closed (node closed; everything fails with EIO)
/// ```
///
/// Requests wait in `waiting` while the connection is not ready (or all slots are busy) and
/// go out as slots free up. When the connection is lost, every request in flight — written
/// or not, acknowledged by nothing — goes back to the front of `waiting` in submission order
/// and is sent again on the next connection, so no request is lost and no write is
/// acknowledged without the server having acknowledged it. Requests fail with EIO only
/// once the connection has been down for `reconnect-delay` (at once when it is 0).
///
/// Replies are parsed from a 256 KiB read buffer; read data is copied (or received directly,
/// for large chunks) into the caller's buffer. Every field is checked against the request it
/// answers; a reply that breaks the protocol drops the connection (and so retries the
/// requests on a new one). Completions are collected while parsing and run afterwards, so a
/// completion that submits the next request never finds the connection half-updated.
final class ClientConnection: EventHandler {
    enum State: Equatable {
        case idle, connecting, handshaking, ready, closed
    }

    private struct Slot {
        var io: BlockIO?
        var request = BlockRequest(.flush)
        var generation: UInt32 = 0
        var sequence: UInt64 = 0
        var command = Command.flush
        var wireOffset: UInt64 = 0
        var wireLength: UInt64 = 0
        /// The whole request (header and payload) has left for the socket: replies may come.
        var sent = false
        var error: BlockError?
        var coverage = ReadCoverage()
        var baseExtent: Transmission.Extent?
        var depthExtent: Transmission.Extent?
        /// FUA emulated for a server without `SEND_FUA`: flush after the write.
        var flushAfter = false
    }

    private struct Pending {
        var io: BlockIO
        var request: BlockRequest
        var sequence: UInt64
    }

    private struct OutItem {
        var base: UnsafeRawPointer
        var count: Int
        var owned: [UInt8]?
        /// Slot whose request ends with this item (-1: none).
        var slot: Int32
    }

    /// Streaming read data into a slot's buffer.
    private struct PayloadTarget {
        var slot: Int
        var destination: UnsafeMutableRawPointer
        var remaining: Int
        var done: Bool
    }

    static let maxInFlight = 256
    static let readBufferSize = 256 * 1024
    static let headerStride = 32
    /// Reads at least this big go straight from the socket into the caller's buffer.
    static let directReadThreshold = 16 * 1024

    let loop: EventLoop
    /// What the node was opened with (the connection never touches the driver itself, so the
    /// driver can close its connections even from its deinit).
    let driver: NBDClientConfig
    /// 0 for the first connection; more with multi-conn.
    let number: Int
    private(set) var state = State.idle
    private var fd: Int32 = -1
    private var transport: (any NBDTransport)?
    private var registration: UInt64 = 0
    private var interest: UInt32 = 0
    private var handshake: ClientHandshake?
    private var tlsHandshaking = false
    /// A re-read is queued for input buffered inside the TLS session (epoll cannot see it).
    private var rereadQueued = false
    /// This connection negotiated extended headers (32-byte requests and replies).
    private var extended = false
    /// What this connection negotiated last.
    private(set) var negotiated: ClientHandshake.ExportInfo?
    /// What the node opened with: every (re)negotiation must match it.
    private var expected: ClientHandshake.ExportInfo?
    private var baseContextID: UInt32?
    private var depthContextID: UInt32?
    private var endpointIndex = 0
    private var usedInheritedFD = false
    private var attemptTimer: UInt64?
    private var retryTimer: UInt64?
    private var delayTimer: UInt64?
    /// When the connection went down (monotonic ns); 0 while up or before the first connect.
    private var lostSince: UInt64 = 0
    /// `reconnect-delay` ran out: requests fail at once until a connection is back.
    private var failFast = false
    private var backoff = 0.0
    private var lastFailure = ""
    /// Set while the node opens: told the outcome of the first attempt(s), then cleared.
    private var openReport: ((String?, Bool) -> Void)?
    private var openDeadline: UInt64 = 0
    private var everConnected = false

    private var slots: [Slot]
    private var freeSlots: [Int]
    private var active = 0
    private var sequence: UInt64 = 0
    private var waiting: [Pending] = []
    private var waitingHead = 0
    private let headers: UnsafeMutableRawPointer

    private var output: [OutItem] = []
    private var outputHead = 0
    private var outputOffset = 0
    private let iovecs: UnsafeMutablePointer<iovec>
    private let maxIOV = 256
    private var flushScheduled = false
    private var flushTask: EventLoop.Task = {}

    private let input: UnsafeMutableRawBufferPointer
    private var inStart = 0
    private var inEnd = 0
    private var payload: PayloadTarget?

    private var finished: [(BlockIO, BlockError?)] = []
    private var delivering: [(BlockIO, BlockError?)] = []
    /// > 0 while this connection is handling events or delivering completions: requests
    /// started meanwhile are written at the end of it, not through a scheduled flush.
    private var batching = 0

    init(loop: EventLoop, config: NBDClientConfig, number: Int, expected: ClientHandshake.ExportInfo?) {
        self.loop = loop
        self.driver = config
        self.number = number
        self.expected = expected
        slots = Array(repeating: Slot(), count: ClientConnection.maxInFlight)
        freeSlots = Array((0..<ClientConnection.maxInFlight).reversed())
        headers = .allocate(byteCount: ClientConnection.maxInFlight * ClientConnection.headerStride, alignment: 64)
        iovecs = .allocate(capacity: maxIOV)
        input = .allocate(byteCount: ClientConnection.readBufferSize, alignment: 64)
        // Runs on this loop only. The strong reference (a cycle until `close` breaks it) keeps
        // the connection alive while a flush is queued for the end of the loop's wake-up.
        let me = UnsafeTransfer(self)
        flushTask = { me.value.scheduledFlush() }
    }

    deinit {
        headers.deallocate()
        iovecs.deallocate()
        input.deallocate()
    }

    private var label: String { driver.label(connection: number) }

    // MARK: opening

    /// Starts connecting (loop thread). `report` hears the outcome once: nil on success, or
    /// the error and whether retrying cannot help. With `retryUntil` (monotonic ns) failed
    /// attempts are retried until then (`open-timeout`).
    func open(retryUntil deadline: UInt64, report: @escaping (String?, Bool) -> Void) {
        openReport = report
        openDeadline = deadline
        attempt()
    }

    /// A connection attempt failed (before becoming ready).
    private func attemptFailed(_ message: String, permanent: Bool = false) {
        cancelAttemptTimer()
        teardownSocket()
        state = .idle
        lastFailure = message
        if let report = openReport {
            if permanent || monotonicNanos() >= openDeadline {
                openReport = nil
                report(message, permanent)
                return
            }
        }
        if case .fd = driver.options.server {
            // An inherited socket cannot be opened again.
            giveUp("Connection to \(driver.options.server.description) lost and cannot be reopened")
            return
        }
        Log.debug("\(label): \(message)")
        scheduleRetry()
    }

    private func scheduleRetry() {
        guard state == .idle, retryTimer == nil else { return }
        let delay = backoff
        backoff = min(max(backoff * 2, 0.05), failFast ? 5 : 0.5)
        retryTimer = loop.schedule(after: delay) { [weak self] in
            guard let self else { return }
            self.retryTimer = nil
            self.attempt()
        }
    }

    /// One connect attempt.
    private func attempt() {
        guard state == .idle else { return }
        if case .fd(let inherited) = driver.options.server {
            if usedInheritedFD {
                giveUp("Connection to \(driver.options.server.description) lost and cannot be reopened")
                return
            }
            usedInheritedFD = true
            let flags = fcntl(inherited, F_GETFL)
            _ = fcntl(inherited, F_SETFL, flags | O_NONBLOCK)
            fd = inherited
            armAttemptTimer()
            connected()
            return
        }
        let endpoints = driver.endpoints
        var lastErrno: Int32 = ECONNREFUSED
        while endpointIndex < endpoints.count {
            let (socket, inProgress, code) = NBDSocket.startConnect(endpoints[endpointIndex])
            if socket < 0 {
                lastErrno = code
                endpointIndex += 1
                continue
            }
            fd = socket
            armAttemptTimer()
            if inProgress {
                state = .connecting
                interest = clinux_EPOLLOUT
                registration = loop.register(fd: fd, events: interest, handler: self)
                if registration == 0 { attemptFailed("cannot watch the socket: \(String(cString: strerror(errno)))") }
                return
            }
            connected()
            return
        }
        endpointIndex = 0
        attemptFailed("Failed to connect to '\(driver.options.server.description)': \(String(cString: strerror(lastErrno)))")
    }

    private func armAttemptTimer() {
        cancelAttemptTimer()
        attemptTimer = loop.schedule(after: NBDDriver.handshakeTimeout) { [weak self] in
            guard let self else { return }
            self.attemptTimer = nil
            if self.state == .connecting || self.state == .handshaking {
                let what = self.state == .connecting ? "connect" : "complete the NBD handshake"
                self.endpointIndex = 0
                self.attemptFailed("Failed to connect to '\(self.driver.options.server.description)': the server did not \(what) within \(Int(NBDDriver.handshakeTimeout)) s")
            }
        }
    }

    private func cancelAttemptTimer() {
        if let t = attemptTimer {
            loop.cancelTimer(t)
            attemptTimer = nil
        }
    }

    /// The socket is connected: start the NBD handshake.
    private func connected() {
        endpointIndex = 0
        transport = SocketTransport(fd: fd)
        var contexts: [String] = []
        if let bitmap = driver.options.dirtyBitmapContext {
            contexts = [bitmap]
        } else {
            contexts = [NBDDriver.baseAllocation, NBDDriver.allocationDepth]
        }
        var h = ClientHandshake(exportName: driver.options.export, metaContexts: contexts,
                                useTLS: driver.options.tlsCreds != nil, offerExtendedHeaders: NBDDriver.offerExtendedHeaders)
        let out = h.takeOutput()
        handshake = h
        state = .handshaking
        inStart = 0
        inEnd = 0
        if !out.isEmpty { enqueue(out) }
        let want = clinux_EPOLLIN | clinux_EPOLLRDHUP
        if registration == 0 {
            interest = want
            registration = loop.register(fd: fd, events: interest, handler: self)
            if registration == 0 {
                attemptFailed("cannot watch the socket: \(String(cString: strerror(errno)))")
                return
            }
        }
        updateInterest()
    }

    private func connectFinished() {
        let code = NBDSocket.finishConnect(fd)
        if code == 0 {
            connected()
            return
        }
        // Try the next resolved address, as QEMU's inet_connect does.
        teardownSocket()
        state = .idle
        endpointIndex += 1
        if endpointIndex < driver.endpoints.count {
            attempt()
        } else {
            endpointIndex = 0
            attemptFailed("Failed to connect to '\(driver.options.server.description)': \(String(cString: strerror(code)))")
        }
    }

    /// Feeds handshake bytes; moves to `ready` when negotiation is done.
    private func processHandshake() {
        guard var h = handshake else { return }
        let used: Int
        do {
            used = try h.receive(UnsafeRawBufferPointer(start: input.baseAddress! + inStart, count: inEnd - inStart))
        } catch {
            handshake = nil
            // A courtesy to the server (QEMU's nbd_send_opt_abort).
            enqueue(ClientHandshake.abortOption())
            flushOutput()
            attemptFailed(openMessage(error), permanent: error.isPermanent)
            return
        }
        inStart += used
        let out = h.takeOutput()
        handshake = h
        if !out.isEmpty { enqueue(out) }
        switch h.state {
        case .negotiating:
            break
        case .upgradeToTLS:
            startTLS()
        case .done(let info):
            handshake = nil
            established(info)
        }
    }

    /// Messages for people: QEMU's text, then the server and export it is about.
    private func openMessage(_ failure: ClientHandshake.Failure) -> String {
        let said = failure.serverText.map { "; server reported: \($0)" } ?? ""
        return "\(failure.message) (export '\(driver.options.export)' on server '\(driver.options.server.description)'\(said))"
    }

    private func startTLS() {
        guard let sessions = driver.tls else {
            attemptFailed("TLS was requested but no TLS credentials are available", permanent: true)
            return
        }
        if inEnd > inStart {
            attemptFailed("server sent data after accepting STARTTLS")
            return
        }
        var hostname = driver.options.tlsHostname
        if hostname == nil, case .inet(let host, _, _, _, _) = driver.options.server { hostname = host }
        do {
            transport = try sessions.session(fd: fd, hostname: hostname)
        } catch {
            attemptFailed(error.message, permanent: true)
            return
        }
        tlsHandshaking = true
        driveTLS()
    }

    private func driveTLS() {
        guard tlsHandshaking, let t = transport else { return }
        switch t.handshake() {
        case .done:
            tlsHandshaking = false
            handshake?.transportSecured()
            if let out = handshake?.takeOutput(), !out.isEmpty { enqueue(out) }
        case .wouldBlock:
            break
        case .failed:
            tlsHandshaking = false
            let failure = t.failure ?? "unknown error"
            attemptFailed("\(failure.hasPrefix("TLS ") ? failure : "TLS handshake failed: \(failure)") (server '\(driver.options.server.description)')",
                          permanent: true)
        }
    }

    /// Negotiation done: check the export against what the node opened with, then serve.
    private func established(_ info: ClientHandshake.ExportInfo) {
        if let expected, let problem = NBDDriver.incompatibility(expected: expected, other: info, options: driver.options) {
            if openReport == nil { Log.error("\(label): reconnected, but \(problem); not using this connection") }
            enqueue(NBDRequestEncoding.disconnect(extended: info.extendedHeaders))
            flushOutput()
            attemptFailed("\(problem) (export '\(driver.options.export)' on server '\(driver.options.server.description)')",
                          permanent: openReport != nil)
            return
        }
        cancelAttemptTimer()
        if expected == nil { expected = info }
        negotiated = info
        extended = info.extendedHeaders
        baseContextID = info.contexts[driver.options.dirtyBitmapContext ?? NBDDriver.baseAllocation]
        depthContextID = driver.options.dirtyBitmapContext == nil ? info.contexts[NBDDriver.allocationDepth] : nil
        state = .ready
        backoff = 0
        failFast = false
        if let t = delayTimer {
            loop.cancelTimer(t)
            delayTimer = nil
        }
        if lostSince != 0 {
            let seconds = Double(monotonicNanos() - lostSince) / 1e9
            Log.info("\(label): reconnected after \(String(format1: seconds)) s; \(waitingCount) requests resume")
            lostSince = 0
        }
        everConnected = true
        if let report = openReport {
            openReport = nil
            report(nil, false)
        }
        pump()
        flushOutput()
        updateInterest()
    }

    // MARK: losing the connection

    /// The connection broke (peer closed, I/O error, protocol violation): requests go back
    /// to the queue and wait for a new connection, up to `reconnect-delay`.
    private func lost(_ reason: String) {
        guard state == .handshaking || state == .ready || state == .connecting else { return }
        if state != .ready {
            endpointIndex = 0
            attemptFailed("\(reason) (server '\(driver.options.server.description)')")
            return
        }
        teardownSocket()
        state = .idle
        requeueInFlight()
        lastFailure = reason
        if case .fd = driver.options.server {
            giveUp("Connection to \(driver.options.server.description) lost (\(reason)); an inherited socket cannot be reopened")
            return
        }
        let delay = driver.options.reconnectDelay
        if delay == 0 {
            Log.warning("\(label): connection lost (\(reason)); reconnecting in the background, requests fail until then (reconnect-delay is 0)")
            failFast = true
            failWaiting(BlockError.io("Connection to NBD server '\(driver.options.server.description)' lost: \(reason)"))
        } else if lostSince == 0 {
            Log.warning("\(label): connection lost (\(reason)); \(waitingCount) requests wait up to \(delay) s for a reconnect")
            delayTimer = loop.schedule(after: Double(delay)) { [weak self] in self?.delayExpired() }
        }
        if lostSince == 0 { lostSince = monotonicNanos() }
        backoff = 0
        scheduleRetry()
        deliverFinished()
    }

    private func delayExpired() {
        delayTimer = nil
        guard state != .ready && state != .closed else { return }
        failFast = true
        let n = waitingCount
        Log.error("\(label): no connection within reconnect-delay (\(driver.options.reconnectDelay) s): \(n) requests fail with EIO (last error: \(lastFailure)); retrying in the background")
        failWaiting(BlockError.io("NBD server '\(driver.options.server.description)' unreachable for reconnect-delay (\(driver.options.reconnectDelay) s): \(lastFailure)"))
        deliverFinished()
    }

    /// The connection can never come back (inherited fd): fail everything from now on.
    private func giveUp(_ message: String) {
        Log.error("\(label): \(message)")
        failFast = true
        state = .idle
        failWaiting(BlockError.io(message))
        deliverFinished()
    }

    private func teardownSocket() {
        if registration != 0 {
            loop.unregister(fd: fd, id: registration)
            registration = 0
        }
        interest = 0
        transport?.shutdown()
        transport = nil
        tlsHandshaking = false
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
        handshake = nil
        payload = nil
        inStart = 0
        inEnd = 0
        output.removeAll(keepingCapacity: true)
        outputHead = 0
        outputOffset = 0
    }

    /// Every request in a slot goes back to the front of the queue, oldest first.
    private func requeueInFlight() {
        var again: [Pending] = []
        for i in slots.indices where slots[i].io != nil {
            // A write whose emulated FUA flush was outstanding is acknowledged already:
            // its slot holds the flush request by now, and only that is sent again.
            again.append(Pending(io: slots[i].io!, request: slots[i].request, sequence: slots[i].sequence))
            release(i)
        }
        again.sort { $0.sequence < $1.sequence }
        if !again.isEmpty {
            waiting = again + waiting[waitingHead...]
            waitingHead = 0
        }
    }

    private var waitingCount: Int { waiting.count - waitingHead + active }

    private func failWaiting(_ error: BlockError) {
        for i in slots.indices where slots[i].io != nil {
            finished.append((slots[i].io!, error))
            release(i)
        }
        while waitingHead < waiting.count {
            finished.append((waiting[waitingHead].io, error))
            waitingHead += 1
        }
        waiting.removeAll(keepingCapacity: true)
        waitingHead = 0
    }

    // MARK: closing

    /// The node is closing: a polite `NBD_CMD_DISC`, then everything still queued fails.
    func close() {
        if state == .ready && active == 0 {
            enqueue(NBDRequestEncoding.disconnect(extended: extended))
            flushOutput()
        }
        for t in [attemptTimer, retryTimer, delayTimer] { if let t { loop.cancelTimer(t) } }
        attemptTimer = nil
        retryTimer = nil
        delayTimer = nil
        openReport = nil
        teardownSocket()
        state = .closed
        failWaiting(BlockError.io("NBD node for '\(driver.uri)' is closed"))
        deliverFinished()
        flushTask = {}
    }

    // MARK: requests

    /// Starts a request submitted on this loop's thread; throws (nothing started) when it
    /// fails at once. `BlockIO`'s contract forbids completing inside `submit`.
    func start(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        switch state {
        case .closed:
            throw BlockError.io("NBD node for '\(driver.uri)' is closed")
        case .ready:
            break
        case .idle, .connecting, .handshaking:
            if failFast {
                throw BlockError.io("NBD server '\(driver.options.server.description)' is not connected: \(lastFailure)")
            }
        }
        sequence += 1
        let pending = Pending(io: io, request: request, sequence: sequence)
        if state == .ready, waitingHead == waiting.count, let i = freeSlots.popLast() {
            issue(i, pending)
            scheduleFlush()
        } else {
            waiting.append(pending)
            if state == .ready { pump() }
        }
    }

    /// A request handed over from another thread (`EventLoop.execute`): failures complete it.
    func startHandedOver(_ io: BlockIO, _ request: BlockRequest) {
        do {
            try start(io, request)
        } catch {
            io.complete(error: error)
        }
    }

    /// Moves queued requests into free slots.
    private func pump() {
        guard state == .ready, waitingHead < waiting.count else { return }
        var issued = false
        while waitingHead < waiting.count, let i = freeSlots.popLast() {
            issue(i, waiting[waitingHead])
            waitingHead += 1
            issued = true
        }
        if waitingHead == waiting.count && waitingHead > 0 {
            waiting.removeAll(keepingCapacity: waiting.capacity <= 4096)
            waitingHead = 0
        }
        if issued { scheduleFlush() }
    }

    private func issue(_ i: Int, _ p: Pending) {
        guard let info = negotiated else { return }
        active += 1
        slots[i].io = p.io
        slots[i].request = p.request
        slots[i].sequence = p.sequence
        slots[i].sent = false
        slots[i].error = nil
        slots[i].baseExtent = nil
        slots[i].depthExtent = nil
        slots[i].flushAfter = false
        slots[i].coverage.reset()
        let r = p.request
        var flags = CommandFlags()
        var command: Command
        var length = r.length
        switch r.operation {
        case .read:
            command = .read
        case .write:
            command = .write
            if r.flags.contains(.fua) {
                if info.flags.contains(.sendFUA) { flags.insert(.fua) } else { slots[i].flushAfter = true }
            }
        case .writeZeroes:
            command = .writeZeroes
            if r.flags.contains(.fua) {
                if info.flags.contains(.sendFUA) { flags.insert(.fua) } else { slots[i].flushAfter = true }
            }
            if !r.flags.contains(.mayUnmap) { flags.insert(.noHole) }
            if r.flags.contains(.noFallback) { flags.insert(.fastZero) }
        case .discard:
            command = .trim
            if r.flags.contains(.fua) {
                if info.flags.contains(.sendFUA) { flags.insert(.fua) } else { slots[i].flushAfter = true }
            }
        case .flush:
            command = .flush
            length = 0
        case .blockStatus:
            command = .blockStatus
            flags.insert(.reqOne)
        }
        let wireOffset = r.operation == .flush ? 0 : r.offset
        slots[i].command = command
        slots[i].wireOffset = wireOffset
        slots[i].wireLength = length
        let cookie = UInt64(slots[i].generation) << 32 | UInt64(i)
        let header = headers + i * ClientConnection.headerStride
        let h = RequestHeader(flags: flags, type: command.rawValue, cookie: cookie, offset: wireOffset, length: length)
        let headerSize: Int
        if extended {
            Transmission.encodeExtendedRequest(h, into: header)
            headerSize = RequestHeader.extendedSize
        } else {
            // The driver splits requests so that compact headers' 32-bit lengths suffice.
            precondition(length <= UInt64(UInt32.max))
            Transmission.encodeRequest(h, into: header)
            headerSize = RequestHeader.size
        }
        if command == .write {
            output.append(OutItem(base: UnsafeRawPointer(header), count: headerSize, owned: nil, slot: -1))
            output.append(OutItem(base: UnsafeRawPointer(r.buffer!), count: Int(length), owned: nil, slot: Int32(i)))
        } else {
            output.append(OutItem(base: UnsafeRawPointer(header), count: headerSize, owned: nil, slot: Int32(i)))
        }
    }

    /// Re-sends a slot as a flush (FUA emulated after a write).
    private func reissueAsFlush(_ i: Int) {
        let io = slots[i].io!
        let seq = slots[i].sequence
        release(i)
        let j = freeSlots.popLast()!
        issue(j, Pending(io: io, request: BlockRequest(.flush), sequence: seq))
        scheduleFlush()
    }

    private func release(_ i: Int) {
        slots[i].io = nil
        slots[i].generation &+= 1
        slots[i].sent = false
        freeSlots.append(i)
        active -= 1
    }

    private func finish(_ i: Int, _ error: BlockError?) {
        if error == nil && slots[i].flushAfter && slots[i].command != .flush {
            reissueAsFlush(i)
            return
        }
        let io = slots[i].io!
        if error == nil && slots[i].command == .blockStatus {
            if let problem = setStatus(io, i) {
                release(i)
                finished.append((io, problem))
                return
            }
        }
        release(i)
        finished.append((io, error))
    }

    /// The block status answer from the chunks a request received.
    private func setStatus(_ io: BlockIO, _ i: Int) -> BlockError? {
        guard let base = slots[i].baseExtent else {
            return BlockError.io("NBD server '\(driver.options.server.description)' did not reply with any status extents")
        }
        var length = base.length
        if let d = slots[i].depthExtent { length = min(length, d.length) }
        length = min(length, slots[i].request.length)
        var flags: BlockStatus.Flags = [.allocated]
        if driver.options.dirtyBitmapContext != nil {
            // QEMU's x-dirty-bitmap hack: the context's bits read as base:allocation's, so a
            // set bit 0 (dirty, or depth 1) shows as "no data"; depths above 2 count as 2.
            let bits = base.flags > 2 && driver.options.dirtyBitmapContext == NBDDriver.allocationDepth ? 2 : base.flags
            if bits & AllocationFlags.hole == 0 { flags.insert(.data) }
            if bits & AllocationFlags.zero != 0 { flags.insert(.zero) }
        } else {
            if base.flags & AllocationFlags.hole == 0 { flags.insert(.data) }
            if base.flags & AllocationFlags.zero != 0 { flags.insert(.zero) }
            // Nothing in the remote chain has it: reads fall through to what is below this
            // node (nothing), so it reads as zeroes; said as "not allocated here".
            if let d = slots[i].depthExtent, d.flags == 0 { flags.remove(.allocated) }
        }
        let minimum = UInt64(max(1, expected?.minimumBlock ?? 1))
        if minimum > 1 && length % minimum != 0 {
            // An unaligned extent (QEMU's workaround for old servers): round down, or up to
            // one whole block reported as data (always safe).
            if length > minimum {
                length -= length % minimum
            } else {
                length = min(minimum, slots[i].request.length)
                flags = [.data, .allocated]
            }
        }
        io.status = BlockStatus(length: length, flags: flags)
        return nil
    }

    // MARK: events

    func handleEvents(_ events: UInt32) {
        assert(loop.inLoopThread, "nbd client connection used off its event loop")
        batching += 1
        defer {
            batching -= 1
            deliverFinished()
        }
        switch state {
        case .connecting:
            if events & (clinux_EPOLLOUT | clinux_EPOLLERR | clinux_EPOLLHUP) != 0 { connectFinished() }
            return
        case .handshaking, .ready:
            if events & clinux_EPOLLOUT != 0 {
                if tlsHandshaking { driveTLS() }
                flushOutput()
            }
            if state == .handshaking || state == .ready,
               events & (clinux_EPOLLIN | clinux_EPOLLHUP | clinux_EPOLLERR | clinux_EPOLLRDHUP) != 0 {
                readInput()
            }
            if state == .handshaking || state == .ready {
                flushOutput()
                updateInterest()
                if !rereadQueued, transport?.hasBufferedInput == true {
                    // Records already read from the socket (readInput stops after its rounds).
                    rereadQueued = true
                    let me = UnsafeTransfer(self)   // runs on this loop only
                    loop.execute {
                        me.value.rereadQueued = false
                        me.value.handleEvents(clinux_EPOLLIN)
                    }
                }
            }
        case .idle, .closed:
            return
        }
    }

    private func updateInterest() {
        guard registration != 0 else { return }
        var want: UInt32 = clinux_EPOLLIN | clinux_EPOLLRDHUP
        if outputHead < output.count || transport?.wantsWrite == true { want |= clinux_EPOLLOUT }
        if want != interest {
            interest = want
            loop.modify(fd: fd, id: registration, events: want)
        }
    }

    private var buffered: Int { inEnd - inStart }

    private func readInput() {
        var rounds = 0
        while (state == .handshaking || state == .ready) && rounds < 16 {
            rounds += 1
            if tlsHandshaking {
                driveTLS()
                if tlsHandshaking { return }
            }
            if let p = payload, buffered == 0, p.remaining >= ClientConnection.directReadThreshold, let t = transport {
                let n = t.receive(into: p.destination, count: p.remaining)
                if n <= 0 { if readEnded(n) { return } else { break } }
                payload!.destination += n
                payload!.remaining -= n
                if payload!.remaining == 0 {
                    payload = nil
                    chunkFinished(p.slot, done: p.done)
                }
                continue
            }
            if inStart == inEnd {
                inStart = 0
                inEnd = 0
            } else if inStart > 0 && inEnd > ClientConnection.readBufferSize / 2 {
                input.baseAddress!.copyMemory(from: input.baseAddress! + inStart, byteCount: inEnd - inStart)
                inEnd -= inStart
                inStart = 0
            }
            let space = ClientConnection.readBufferSize - inEnd
            if space == 0 {
                lost("protocol error: reply too large to parse")
                return
            }
            guard let t = transport else { return }
            let n = t.receive(into: input.baseAddress! + inEnd, count: space)
            if n <= 0 { if readEnded(n) { return } else { break } }
            inEnd += n
            if state == .handshaking {
                processHandshake()
            } else {
                parseReplies()
            }
            if n < space && !(transport?.hasBufferedInput ?? false) { break }
        }
    }

    /// recv returned 0 or -1: true when the connection is gone.
    private func readEnded(_ n: Int) -> Bool {
        if n == 0 {
            lost(state == .handshaking ? "the server closed the connection during the handshake" : "the server closed the connection")
            return true
        }
        let code = errno
        if code == EAGAIN || code == EWOULDBLOCK || code == EINTR { return false }
        lost("read error: \(transport?.failure ?? String(cString: strerror(code)))")
        return true
    }

    // MARK: replies

    private func parseReplies() {
        while state == .ready {
            if let p = payload {
                let n = min(buffered, p.remaining)
                if n == 0 { return }
                p.destination.copyMemory(from: input.baseAddress! + inStart, byteCount: n)
                inStart += n
                payload!.destination += n
                payload!.remaining -= n
                if payload!.remaining > 0 { return }
                payload = nil
                chunkFinished(p.slot, done: p.done)
                continue
            }
            let base = UnsafeRawPointer(input.baseAddress! + inStart)
            let header: ReplyHeader
            let size: Int
            do {
                guard let (h, s) = try ClientReplies.parseHeader(base, count: buffered, extended: extended) else { return }
                header = h
                size = s
            } catch {
                lost("protocol error: \(error.message)")
                return
            }
            let cookie = header.cookie
            let i = Int(cookie & 0xffff_ffff)
            guard i < slots.count, slots[i].io != nil, slots[i].sent, UInt32(cookie >> 32) == slots[i].generation else {
                lost("protocol error: reply for unknown cookie 0x\(String(cookie, radix: 16))")
                return
            }
            do {
                switch header {
                case .simple(let error, _):
                    if !(try simpleReply(i, error: error, headerSize: size)) { return }
                case .chunk(let chunk):
                    if !(try chunkReply(i, chunk, base: base)) { return }
                }
            } catch {
                lost("protocol error: \(error.message)")
                return
            }
        }
    }

    /// False when more bytes are needed.
    private func simpleReply(_ i: Int, error: UInt32, headerSize: Int) throws(ReplyViolation) -> Bool {
        let structured = negotiated?.structuredReplies ?? false
        let command = slots[i].command
        if command == .read && structured {
            throw ReplyViolation("simple reply when structured reply chunk was expected")
        }
        inStart += headerSize
        if error != 0 {
            let errno = ClientReplies.errnoFromWire(error)
            finish(i, BlockError(errno, "NBD server '\(driver.options.server.description)' failed the \(command) request: \(String(cString: strerror(errno)))"))
            return true
        }
        if command == .blockStatus {
            throw ReplyViolation("simple reply to a successful block status request")
        }
        if command == .read {
            let length = Int(slots[i].wireLength)
            if length == 0 {
                finish(i, nil)
            } else {
                payload = PayloadTarget(slot: i, destination: slots[i].request.buffer!, remaining: length, done: true)
                try slots[i].coverage.add(0..<length)
            }
            return true
        }
        finish(i, nil)
        return true
    }

    private func chunkReply(_ i: Int, _ chunk: ChunkHeader, base: UnsafeRawPointer) throws(ReplyViolation) -> Bool {
        guard negotiated?.structuredReplies == true else {
            throw ReplyViolation("structured reply chunk without structured replies negotiated")
        }
        let command = slots[i].command
        let plan = try ClientReplies.plan(for: chunk, command: command, requestLength: slots[i].wireLength,
                                          requestOffset: slots[i].wireOffset, extended: extended)
        let chunkSize = ClientReplies.chunkSize(extended: extended)
        switch plan {
        case .empty:
            inStart += chunkSize
            if chunk.isDone { chunkFinished(i, done: true) }
        case .data:
            guard buffered >= chunkSize + 8 else { return false }
            let offset: UInt64 = UInt64(bigEndian: base.loadUnaligned(fromByteOffset: chunkSize, as: UInt64.self))
            let range = try ClientReplies.dataRange(chunkLength: chunk.length, offset: offset,
                                                    requestOffset: slots[i].wireOffset, requestLength: slots[i].wireLength)
            try slots[i].coverage.add(range)
            inStart += chunkSize + 8
            payload = PayloadTarget(slot: i, destination: slots[i].request.buffer! + range.lowerBound,
                                    remaining: range.count, done: chunk.isDone)
        case .collect:
            let total = chunkSize + Int(chunk.length)
            guard buffered >= total else {
                if inStart > 0 && ClientConnection.readBufferSize - inStart < total {
                    // Make room for the whole payload (at most 64 KiB + header).
                    input.baseAddress!.copyMemory(from: input.baseAddress! + inStart, byteCount: buffered)
                    inEnd -= inStart
                    inStart = 0
                }
                return false
            }
            let body = UnsafeRawBufferPointer(start: base + chunkSize, count: Int(chunk.length))
            if chunk.isError {
                let e = try ClientReplies.parseError(body, type: chunk.type, requestOffset: slots[i].wireOffset,
                                                     requestLength: slots[i].wireLength)
                if slots[i].error == nil {
                    let said = e.message.isEmpty ? String(cString: strerror(e.errno)) : e.message
                    slots[i].error = BlockError(e.errno, "NBD server '\(driver.options.server.description)' failed the \(command) request: \(said)")
                }
            } else if chunk.type == ReplyType.offsetHole.rawValue {
                let range = try ClientReplies.holeRange(body, requestOffset: slots[i].wireOffset, requestLength: slots[i].wireLength)
                try slots[i].coverage.add(range)
                memset(slots[i].request.buffer! + range.lowerBound, 0, range.count)
            } else {
                let status = try ClientReplies.parseBlockStatus(body, extended: extended)
                if status.contextID == baseContextID && baseContextID != nil {
                    if slots[i].baseExtent != nil { throw ReplyViolation("Several BLOCK_STATUS chunks in reply") }
                    slots[i].baseExtent = status.first
                } else if status.contextID == depthContextID && depthContextID != nil {
                    if slots[i].depthExtent != nil { throw ReplyViolation("Several BLOCK_STATUS chunks in reply") }
                    slots[i].depthExtent = status.first
                } else {
                    throw ReplyViolation("unexpected context id \(status.contextID) for NBD_REPLY_TYPE_BLOCK_STATUS")
                }
            }
            inStart += total
            if chunk.isDone { chunkFinished(i, done: true) }
        }
        return true
    }

    /// A chunk (or a simple read's data) is in; with `done`, the request is answered.
    private func chunkFinished(_ i: Int, done: Bool) {
        guard done else { return }
        if let e = slots[i].error {
            finish(i, e)
            return
        }
        if slots[i].command == .read && !slots[i].coverage.isComplete(length: Int(slots[i].wireLength)) {
            finish(i, BlockError.io("NBD server '\(driver.options.server.description)' did not send all of the read data"))
            return
        }
        finish(i, nil)
    }

    /// Runs the completions collected while parsing, then refills free slots. Completions may
    /// submit new requests on this connection (same loop): they only append to the queues.
    private func deliverFinished() {
        if batching > 0 { return }
        batching += 1
        pump()
        while !finished.isEmpty {
            swap(&finished, &delivering)
            for (io, error) in delivering { io.complete(error: error) }
            delivering.removeAll(keepingCapacity: true)
            pump()
        }
        batching -= 1
        if state == .ready || state == .handshaking {
            flushOutput()
            updateInterest()
        }
    }

    // MARK: output

    private func enqueue(_ bytes: [UInt8]) {
        let base = bytes.withUnsafeBytes { $0.baseAddress! }
        output.append(OutItem(base: base, count: bytes.count, owned: bytes, slot: -1))
    }

    private func scheduleFlush() {
        if flushScheduled || batching > 0 { return }
        flushScheduled = true
        loop.deferToEndOfIteration(flushTask)
    }

    private func scheduledFlush() {
        flushScheduled = false
        guard state == .ready || state == .handshaking else { return }
        flushOutput()
        updateInterest()
        deliverFinished()
    }

    /// Writes queued requests in `sendmsg` batches; marks requests sent once all their bytes
    /// left (only then may their replies arrive).
    private func flushOutput() {
        guard let t = transport, state == .ready || state == .handshaking else { return }
        if t.wantsWrite { t.flush() }
        while outputHead < output.count {
            var n = 0
            var i = outputHead
            while i < output.count && n < maxIOV {
                let item = output[i]
                let skip = i == outputHead ? outputOffset : 0
                let base: UnsafeRawPointer = item.owned.map { $0.withUnsafeBytes { $0.baseAddress! } } ?? item.base
                iovecs[n] = iovec(iov_base: UnsafeMutableRawPointer(mutating: base + skip), iov_len: item.count - skip)
                n += 1
                i += 1
            }
            var written = t.send(iovecs: iovecs, count: n)
            if written < 0 {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK { return }
                if code == EINTR { continue }
                lost("write error: \(t.failure ?? String(cString: strerror(code)))")
                return
            }
            while written > 0 {
                let remaining = output[outputHead].count - outputOffset
                if written >= remaining {
                    written -= remaining
                    let slot = output[outputHead].slot
                    if slot >= 0 { slots[Int(slot)].sent = true }
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

/// Request encodings the client sends besides the data path.
enum NBDRequestEncoding {
    /// `NBD_CMD_DISC`, in the header format the connection negotiated.
    static func disconnect(extended: Bool) -> [UInt8] {
        let h = RequestHeader(flags: [], type: Command.disconnect.rawValue, cookie: 0, offset: 0, length: 0)
        var bytes = [UInt8](repeating: 0, count: extended ? RequestHeader.extendedSize : RequestHeader.size)
        bytes.withUnsafeMutableBytes {
            if extended {
                Transmission.encodeExtendedRequest(h, into: $0.baseAddress!)
            } else {
                Transmission.encodeRequest(h, into: $0.baseAddress!)
            }
        }
        return bytes
    }
}

extension String {
    /// One decimal, without Foundation.
    init(format1 value: Double) {
        let tenths = Int((value * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10)"
    }
}
