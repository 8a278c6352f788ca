import BlockCore
import EventLoop
import NBDProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The `nbd` protocol driver: a node whose data lives on another NBD server (blockd,
/// qemu-storage-daemon, qemu-nbd, nbdkit), as a remote backing file, a job target or a
/// re-export. QEMU's `BlockdevOptionsNbd`: `server`, `export`, `tls-creds`, `tls-hostname`,
/// `reconnect-delay`, `open-timeout`, `x-dirty-bitmap`.
///
/// Driven from the daemon's event loops: each connection (`ClientConnection`) lives on one
/// loop, with many requests in flight and no thread per request; there is no libnbd. The
/// driver is natively asynchronous (`AsyncBlockDriver`): a request submitted on an event
/// loop that has a connection is written and answered on that loop, without a worker
/// thread. The synchronous `BlockDriver` methods (qcow2 over an `nbd` node, jobs) submit and
/// wait; they refuse `.noWait` and event loop threads with `.wouldBlock`.
///
/// Multi-conn: when the server advertises `NBD_FLAG_CAN_MULTI_CONN` (its caches are
/// consistent across connections, and a flush on one covers all), the node opens one
/// connection per event loop (at most `maxConnections`). A request goes to the connection of
/// the loop it is submitted on; requests from other threads (workers, jobs) go round-robin.
/// Without multi-conn there is one connection; requests from other loops hop to its loop and
/// their completions hop back.
///
/// Thread safety: configuration and the negotiated export info are written only while the
/// node opens, before it is published to other threads; afterwards they are read-only. Each
/// connection is touched only on its own loop. That is the `@unchecked Sendable` invariant.
public final class NBDDriver: BlockDriver, AsyncBlockDriver, @unchecked Sendable {
    public var remoteDirtyBitmapContext: String? { options.dirtyBitmapContext }
    public let driverName = "nbd"
    public let role = DriverRole.protocol
    let config: NBDClientConfig
    public var options: NBDClientOptions { config.options }
    /// QEMU's pseudo file name (`nbd+unix:///EXPORT?socket=PATH`).
    public var uri: String { config.uri }
    let loops: EventLoopGroup
    /// What the server said when the node opened; reconnects must match it.
    public private(set) var info = ClientHandshake.ExportInfo()
    private var readOnly: Bool
    private var connections: [ClientConnection] = []
    private let nextConnection = Atomic<Int>(0)
    private let closed = Atomic<Bool>(false)
    private var maxPayload: UInt32 = 32 << 20

    public static let baseAllocation = "base:allocation"
    public static let allocationDepth = "qemu:allocation-depth"
    /// Time one connect plus handshake may take (QEMU has no limit; a server that accepts
    /// and never answers must not hold a `blockdev-add` forever).
    static let handshakeTimeout = 10.0
    /// Most connections one node opens with multi-conn.
    public static let maxConnections = 8
    /// Negotiate extended headers with servers that offer them (blockd, QEMU 8.2+): 64-bit
    /// lengths and offsets echoed in every reply. `BLOCKD_NBD_EXTENDED_HEADERS=0` asks for
    /// structured replies only, as QEMU 7.2's client does.
    static let offerExtendedHeaders = getenv("BLOCKD_NBD_EXTENDED_HEADERS").map { String(cString: $0) != "0" } ?? true

    init(options: NBDClientOptions, loops: EventLoopGroup, endpoints: [NBDSocket.Endpoint],
         tls: (any NBDClientTLSSessions)?, readOnly: Bool) {
        self.config = NBDClientConfig(options: options, endpoints: endpoints, tls: tls)
        self.loops = loops
        self.readOnly = readOnly
    }

    deinit {
        // A node always closes its driver; this covers a driver dropped before it became one.
        if !closed.load(ordering: .relaxed) { shut(connections) }
    }

    /// Opens a node: connects (retrying until `open-timeout`), negotiates, and with multi-conn
    /// opens the other connections. Blocks the calling (control) thread for a bounded time:
    /// at most `open-timeout` plus one handshake timeout.
    /// `tls` resolves `tls-creds` (the daemon's TLS objects).
    public static func open(_ options: NBDClientOptions, loops: EventLoopGroup, tls: (any NBDClientTLSProvider)? = nil,
                            readOnly: Bool, autoReadOnly: Bool) throws(BlockError) -> NBDDriver {
        var sessions: (any NBDClientTLSSessions)?
        if let creds = options.tlsCreds {
            guard let tls else { throw BlockError.notSupported("TLS is not available to this nbd node ('tls-creds': '\(creds)')") }
            sessions = try tls.clientSessions(credentials: creds)
        }
        return try open(options, loops: loops, sessions: sessions, readOnly: readOnly, autoReadOnly: autoReadOnly)
    }

    /// `open` with the TLS credentials already resolved (a reopen keeps the node's own).
    static func open(_ options: NBDClientOptions, loops: EventLoopGroup, sessions: (any NBDClientTLSSessions)?,
                     readOnly: Bool, autoReadOnly: Bool) throws(BlockError) -> NBDDriver {
        let endpoints = try NBDSocket.resolve(options.server)
        let driver = NBDDriver(options: options, loops: loops, endpoints: endpoints, tls: sessions, readOnly: readOnly)
        if EventLoop.current != nil {
            throw BlockError.invalid("an nbd node cannot be opened on an event loop thread")
        }
        let primaryLoop = loops.nextLoop()
        let primary = ClientConnection(loop: primaryLoop, config: driver.config, number: 0, expected: nil)
        driver.connections = [primary]
        let deadline = monotonicNanos() + UInt64(options.openTimeout) * 1_000_000_000
        if let failure = driver.connect([primary], deadline: deadline,
                                        wait: Double(options.openTimeout) + handshakeTimeout + 1).first! {
            try? driver.close()
            throw BlockError(failure.errno, failure.message)
        }
        guard let negotiated = driver.negotiatedInfo(primary) else {
            try? driver.close()
            throw BlockError.io("connection to '\(options.server.description)' closed while opening")
        }
        driver.info = negotiated
        do {
            try driver.checkOpened(autoReadOnly: autoReadOnly)
        } catch {
            try? driver.close()
            throw error
        }
        driver.maxPayload = min(negotiated.maximumBlock == 0 ? UInt32(32 << 20) : negotiated.maximumBlock, 32 << 20)
        if negotiated.flags.contains(.canMultiConn) && loops.loops.count > 1 {
            let others = loops.loops.filter { $0 !== primaryLoop }.prefix(maxConnections - 1)
            let extra = others.enumerated().map {
                ClientConnection(loop: $1, config: driver.config, number: $0 + 1, expected: negotiated)
            }
            let outcomes = driver.connect(extra, deadline: 0, wait: handshakeTimeout + 1)
            var failed: [ClientConnection] = []
            for (conn, failure) in zip(extra, outcomes) {
                if let failure {
                    Log.warning("\(driver.config.label(connection: conn.number)): extra multi-conn connection failed (\(failure.message)); using fewer connections")
                    failed.append(conn)
                } else {
                    driver.connections.append(conn)
                }
            }
            driver.shut(failed)
        }
        return driver
    }

    private struct OpenFailure: Sendable {
        var message: String
        var errno: Int32
    }

    /// Starts `connections` on their loops and waits for each outcome (nil: connected).
    private func connect(_ connections: [ClientConnection], deadline: UInt64, wait seconds: Double) -> [OpenFailure?] {
        let lock = ConditionLock()
        // Outcome per connection: nil = still opening, .some(nil) = connected.
        let results = Mutex<[OpenFailure??]>(Array(repeating: nil, count: connections.count))
        for (k, conn) in connections.enumerated() {
            let c = UnsafeTransfer(conn)
            conn.loop.execute {
                c.value.open(retryUntil: deadline) { failure, _ in
                    let outcome: OpenFailure? = failure.map { OpenFailure(message: $0, errno: EIO) }
                    results.withLock { $0[k] = .some(outcome) }
                    lock.withLock { lock.broadcast() }
                }
            }
        }
        let end = monotonicNanos() + UInt64(seconds * 1e9)
        lock.withLock {
            while results.withLock({ $0.contains { $0 == nil } }) && monotonicNanos() < end {
                _ = lock.wait(seconds: 0.1)
            }
        }
        let got = results.withLock { $0 }
        return got.map { outcome in
            if let outcome { return outcome }
            return OpenFailure(message: "Failed to connect to '\(options.server.description)': timed out after \(Int(seconds)) s", errno: ETIMEDOUT)
        }
    }

    /// The negotiated info of a connection, read on its loop.
    private func negotiatedInfo(_ conn: ClientConnection) -> ClientHandshake.ExportInfo? {
        onLoop(conn.loop) { conn.negotiated }
    }

    /// Runs `body` on `loop` and waits for it (control thread); runs it here when the loop
    /// has stopped (daemon shutdown) since nothing else touches its connections then.
    private func onLoop<T>(_ loop: EventLoop, _ body: @escaping () -> T) -> T {
        if loop.inLoopThread || loop.hasStopped { return body() }
        let lock = ConditionLock()
        let result = Mutex<UnsafeTransfer<T>?>(nil)
        let task = UnsafeTransfer(body)
        loop.execute {
            let value = task.value()
            result.withLock { $0 = UnsafeTransfer(value) }
            lock.withLock { lock.broadcast() }
        }
        while true {
            if let r = result.withLock({ $0 }) { return r.value }
            if loop.hasStopped { return body() }
            lock.withLock {
                if result.withLock({ $0 == nil }) { _ = lock.wait(seconds: 0.1) }
            }
        }
    }

    private func shut(_ list: [ClientConnection]) {
        for conn in list { onLoop(conn.loop) { conn.close() } }
    }

    /// Checks after the first negotiation (QEMU's `nbd_handle_updated_info`).
    private func checkOpened(autoReadOnly: Bool) throws(BlockError) {
        if let bitmap = options.dirtyBitmapContext, info.contexts[bitmap] == nil {
            throw BlockError.invalid("requested x-dirty-bitmap \(bitmap) not found (export '\(options.export)' on server '\(options.server.description)')")
        }
        if info.flags.contains(.readOnly) && !readOnly {
            if !autoReadOnly {
                throw BlockError(EACCES, "NBD export is read-only (export '\(options.export)' on server '\(options.server.description)'); open the node with read-only=on or auto-read-only=on")
            }
            readOnly = true
        }
    }

    /// Why a (re)negotiated export cannot serve a node that opened with `expected`.
    static func incompatibility(expected info: ClientHandshake.ExportInfo, other: ClientHandshake.ExportInfo,
                                options: NBDClientOptions) -> String? {
        if other.size != info.size { return "export size changed from \(info.size) to \(other.size) bytes" }
        if other.flags.contains(.readOnly) && !info.flags.contains(.readOnly) { return "export became read-only" }
        if other.structuredReplies != info.structuredReplies { return "server no longer offers the same reply format" }
        if let bitmap = options.dirtyBitmapContext, other.contexts[bitmap] == nil {
            return "requested x-dirty-bitmap \(bitmap) not found"
        }
        if other.minimumBlock > max(info.minimumBlock, 1) { return "minimum block size grew to \(other.minimumBlock)" }
        return nil
    }

    // MARK: BlockDriver

    public var length: UInt64 { info.size }
    public var isReadOnly: Bool { readOnly }
    public var filename: String? { uri }

    /// A new connection (or set, with multi-conn) to the same export with the same options
    /// and credentials: a commit's base reopened read-write (`BlockGraph.reopenReadWrite`).
    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        try NBDDriver.open(options, loops: loops, sessions: config.tls, readOnly: readOnly, autoReadOnly: false)
    }

    public var limits: BlockLimits {
        let minimum = max(1, info.minimumBlock)
        let preferred = max(minimum, info.preferredBlock == 0 ? 4096 : info.preferredBlock)
        return BlockLimits(minimum: minimum, preferred: preferred, maximum: max(minimum, maxPayload))
    }

    public var asyncInterface: (any AsyncBlockDriver)? { self }

    /// Connections in use (multi-conn), for tests and `query-named-block-nodes`.
    public var connectionCount: Int { connections.count }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(.read(at: offset, into: buffer, flags: flags))
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(.write(at: offset, from: buffer, flags: flags))
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(BlockRequest(.writeZeroes, offset: offset, length: length, flags: flags))
    }

    public func discard(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        _ = try performSynchronously(BlockRequest(.discard, offset: offset, length: length, flags: flags))
    }

    public func flush() throws(BlockError) {
        _ = try performSynchronously(BlockRequest(.flush))
    }

    /// Waits for the server's answer: with `.noWait` (an event loop asking) it throws
    /// `.wouldBlock` at once, as on every event loop thread.
    public func blockStatus(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) -> BlockStatus {
        try performSynchronously(BlockRequest(.blockStatus, offset: offset, length: length, flags: flags.intersection(.noWait)))
    }

    public func truncate(to length: UInt64) throws(BlockError) {
        if length != info.size { throw BlockError.notSupported("Cannot resize NBD nodes") }
    }

    public func close() throws(BlockError) {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        shut(connections)
    }

    // MARK: AsyncBlockDriver

    public func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        if closed.load(ordering: .relaxed) { throw BlockError.io("NBD node for '\(uri)' is closed") }
        var request = request
        request.flags.subtract([.noWait, .bufferedWriteMayBlock])
        let flags = info.flags
        switch request.operation {
        case .read, .write:
            if request.length == 0 { return completeLater(io, nil) }
            if request.length > UInt64(maxPayload) {
                return try split(io, request, chunk: UInt64(maxPayload))
            }
        case .writeZeroes:
            if request.length == 0 { return completeLater(io, nil) }
            if !flags.contains(.sendWriteZeroes) {
                if request.flags.contains(.noFallback) {
                    throw BlockError.notSupported("NBD server '\(options.server.description)' cannot write zeroes fast")
                }
                // Zero bytes, written from one shared zero buffer.
                return try splitAsZeroWrites(io, request)
            }
            if request.flags.contains(.noFallback) && !flags.contains(.sendFastZero) {
                throw BlockError.notSupported("NBD server '\(options.server.description)' cannot write zeroes fast")
            }
            if request.length > UInt64(maxPayload) {
                return try split(io, request, chunk: UInt64(maxPayload))
            }
        case .discard:
            // Advisory: a server without trim keeps the data, which is allowed.
            if request.length == 0 || !flags.contains(.sendTrim) { return completeLater(io, nil) }
            let chunk = UInt64(Int32.max) - UInt64(Int32.max) % UInt64(max(1, info.minimumBlock))
            if request.length > chunk { return try split(io, request, chunk: chunk) }
        case .flush:
            if !flags.contains(.sendFlush) { return completeLater(io, nil) }
        case .blockStatus:
            if info.contexts.isEmpty || !info.structuredReplies {
                // No block status from this server: everything is data, as QEMU says.
                io.status = BlockStatus(length: request.length, flags: [.data, .allocated])
                return completeLater(io, nil)
            }
            let cap = UInt64(UInt32.max) - UInt64(UInt32.max) % UInt64(max(1, info.minimumBlock))
            request.length = min(request.length, cap)
        }
        try route(io, request)
    }

    /// Sends `request` on the connection that serves the calling thread.
    private func route(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        let current = EventLoop.current
        var conn = connections[0]
        if let current {
            if let own = connections.first(where: { $0.loop === current }) { conn = own }
        } else if connections.count > 1 {
            conn = connections[nextConnection.wrappingAdd(1, ordering: .relaxed).oldValue % connections.count]
        }
        if conn.loop === current {
            try conn.start(io, request)
        } else {
            let handed = UnsafeTransfer((conn, io, request))
            conn.loop.execute { handed.value.0.startHandedOver(handed.value.1, handed.value.2) }
        }
    }

    /// Completes `io` soon, never inside `submit` (`AsyncBlockDriver`'s contract).
    private func completeLater(_ io: BlockIO, _ error: BlockError?) {
        let loop = io.loop ?? EventLoop.current ?? connections[0].loop
        loop.execute { io.complete(error: error) }
    }

    /// A request larger than one NBD request may be: sent as parts, completed when all are.
    private func split(_ io: BlockIO, _ request: BlockRequest, chunk: UInt64) throws(BlockError) {
        var parts: [BlockRequest] = []
        var at: UInt64 = 0
        while at < request.length {
            var part = request
            part.offset = request.offset + at
            part.length = min(chunk, request.length - at)
            if let buffer = request.buffer { part.buffer = buffer + Int(at) }
            parts.append(part)
            at += part.length
        }
        try submitParts(io, parts)
    }

    private func splitAsZeroWrites(_ io: BlockIO, _ request: BlockRequest) throws(BlockError) {
        let chunk = UInt64(min(maxPayload, UInt32(ZeroBuffer.size)))
        var parts: [BlockRequest] = []
        var at: UInt64 = 0
        while at < request.length {
            let n = min(chunk, request.length - at)
            var flags = request.flags
            flags.subtract([.mayUnmap, .noFallback])
            parts.append(BlockRequest(.write, offset: request.offset + at, length: n, buffer: ZeroBuffer.shared.pointer, flags: flags))
            at += n
        }
        try submitParts(io, parts)
    }

    private func submitParts(_ io: BlockIO, _ parts: [BlockRequest]) throws(BlockError) {
        let group = PartGroup(outer: io, count: parts.count + 1)
        var started = 0
        var firstError: BlockError?
        for part in parts {
            let sub = BlockIO(loop: nil) { done in group.partDone(done.error) }
            sub.begin()
            do {
                try route(sub, part)
                started += 1
            } catch {
                firstError = firstError ?? error
                group.partDone(error)
            }
        }
        if started == 0 {
            // Nothing is under way; the outer request fails here (its completion never runs).
            throw firstError ?? BlockError.io("empty request")
        }
        // Drop the submitter's guard count; if every part has already finished (on other
        // loops), complete through a loop rather than inside `submit`.
        if group.partDone(nil, guardCount: true) {
            completeLater(io, group.error)
        }
    }
}

/// Counts the parts of a split request; the last one completes the outer request.
final class PartGroup: Sendable {
    private let outer: BlockIO
    private let state: Mutex<(remaining: Int, error: BlockError?)>

    init(outer: BlockIO, count: Int) {
        self.outer = outer
        state = Mutex((count, nil))
    }

    var error: BlockError? { state.withLock { $0.error } }

    /// Records one part's outcome. With `guardCount` (the submitter's own count) the outer
    /// request is not completed here: true is returned when the caller must complete it.
    @discardableResult
    func partDone(_ error: BlockError?, guardCount: Bool = false) -> Bool {
        let (last, firstError) = state.withLock { s -> (Bool, BlockError?) in
            if s.error == nil, let error { s.error = error }
            s.remaining -= 1
            return (s.remaining == 0, s.error)
        }
        if last && !guardCount { outer.complete(error: firstError) }
        return last && guardCount
    }
}

/// 1 MiB of zeroes, written for zero requests to servers without `NBD_CMD_WRITE_ZEROES`.
/// Allocated once and never written after, so sharing it between threads is safe.
struct ZeroBuffer: @unchecked Sendable {
    static let size = 1 << 20
    static let shared = ZeroBuffer()
    let pointer: UnsafeMutableRawPointer

    private init() {
        pointer = .allocate(byteCount: ZeroBuffer.size, alignment: 4096)
        pointer.initializeMemory(as: UInt8.self, repeating: 0, count: ZeroBuffer.size)
    }
}

/// What every connection of one node needs, fixed when the node opens.
final class NBDClientConfig: Sendable {
    let options: NBDClientOptions
    /// QEMU's pseudo file name (`nbd+unix:///EXPORT?socket=PATH`).
    let uri: String
    /// Resolved once at open; reconnects reuse them (no DNS on an event loop).
    let endpoints: [NBDSocket.Endpoint]
    /// `tls-creds`, resolved at open: each connection's TLS session comes from them.
    let tls: (any NBDClientTLSSessions)?

    init(options: NBDClientOptions, endpoints: [NBDSocket.Endpoint], tls: (any NBDClientTLSSessions)?) {
        self.options = options
        self.uri = options.uri
        self.endpoints = endpoints
        self.tls = tls
    }

    func label(connection: Int) -> String {
        connection == 0 ? "nbd '\(uri)'" : "nbd '\(uri)' (connection \(connection + 1))"
    }
}
