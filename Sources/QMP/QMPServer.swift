#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import JSON
import Synchronization

/// The QMP monitor server: unix socket monitors, sessions, built-in commands, events.
///
/// Control plane, low rate: each monitor has an accept thread and each client a reader thread
/// (parse, dispatch, reply) and a writer thread (drains a bounded queue of replies and events),
/// all with blocking I/O. Every handler runs under one server-wide control lock
/// (`withControlLock`), which the Daemon also takes for its own graph changes.
///
/// Built-in commands: `qmp_capabilities`, `query-version`, `query-commands`, and `quit` when an
/// `onQuit` callback is given (it runs after the `{"return": {}}` reply has been written).
public final class QMPServer: Sendable {
    /// What the greeting and `query-version` report.
    public struct Version: Sendable, Equatable {
        public var major: Int64
        public var minor: Int64
        public var micro: Int64
        public var package: String

        public init(major: Int64 = 7, minor: Int64 = 2, micro: Int64 = 0, package: String) {
            self.major = major
            self.minor = minor
            self.micro = micro
            self.package = package
        }

        public static let blockdVersion = "0.1.0"
        public static let `default` = Version(package: "blockd \(blockdVersion)")

        /// `{"qemu": {"micro": …, "minor": …, "major": …}, "package": …}`.
        public var json: JSONValue {
            .object(JSONObject([
                ("qemu", .object(JSONObject([("micro", .int(micro)), ("minor", .int(minor)), ("major", .int(major))]))),
                ("package", .string(package)),
            ]))
        }
    }

    public let version: Version
    public let commands: QMPCommandTable
    /// A client whose unsent replies and events exceed this is disconnected.
    public let maxQueuedBytes: Int
    /// Largest JSON message accepted from a client (QEMU: 64 MiB).
    public let maxMessageBytes: Int

    private struct Monitor {
        var path: String
        var fd: Int32
    }
    private struct State {
        var monitors: [Monitor] = []
        var sessions: [Int: QMPSession] = [:]
        var nextSessionID = 1
        var stopped = false
    }
    private let state = Mutex(State())
    private let controlLock = QMPRecursiveLock()
    /// Written once by `stop()` so every accept loop wakes up; never read.
    private let wakePipe: (read: Int32, write: Int32)

    /// - Parameter onQuit: registers `quit`; called on a server thread after the reply is sent.
    public init(version: Version = .default, onQuit: (@Sendable () -> Void)? = nil,
                maxQueuedBytes: Int = 16 << 20, maxMessageBytes: Int = QMPStreamParser.defaultMaxMessageBytes) {
        self.version = version
        self.commands = QMPCommandTable()
        self.maxQueuedBytes = maxQueuedBytes
        self.maxMessageBytes = maxMessageBytes
        var fds: [Int32] = [-1, -1]
        let rc = pipe(&fds)
        precondition(rc == 0, "pipe failed")
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        wakePipe = (fds[0], fds[1])
        registerBuiltins(onQuit: onQuit)
    }

    deinit {
        close(wakePipe.read)
        close(wakePipe.write)
    }

    // MARK: Public API

    /// Registers (or replaces) a command; see `QMPHandler`.
    public func register(_ name: String, handler: @escaping QMPHandler) {
        commands.register(name, handler: handler)
    }

    /// Registers a command whose `prepare` runs before the control lock is taken (see
    /// `QMPPreparer`); the handler finds its result in `QMPContext.prepared`.
    public func register(_ name: String, prepare: @escaping QMPPreparer, handler: @escaping QMPHandler) {
        commands.register(name, handler: handler)
        commands.setPreparer(name, prepare)
    }

    /// Starts a monitor listening on a unix socket (`--chardev socket,path=P,server=on,wait=off
    /// --monitor chardev=ID`, or `--qmp P`). A stale socket file at `path` is replaced.
    public func addMonitor(path: String) throws(QMPError) {
        let fd: Int32
        do {
            fd = try QMPSystem.listenUnix(path: path)
        } catch {
            throw QMPError.generic(error.description)
        }
        let accepted = state.withLock { s -> Bool in
            if s.stopped { return false }
            s.monitors.append(Monitor(path: path, fd: fd))
            return true
        }
        guard accepted else {
            close(fd)
            unlink(path)
            throw QMPError.generic("QMP server is stopped")
        }
        QMPSystem.spawn { [self] in acceptLoop(fd: fd, path: path) }
    }

    /// Socket paths of the monitors.
    public var monitorPaths: [String] { state.withLock { $0.monitors.map(\.path) } }

    /// Number of connected clients (negotiated or not).
    public var sessionCount: Int { state.withLock { $0.sessions.count } }

    /// Broadcasts `{"timestamp": {"seconds", "microseconds"}, "event": NAME, "data": {…}}` to
    /// every negotiated session of every monitor. Never blocks on a client: a client whose queue
    /// is full is disconnected.
    public func emit(event: String, data: JSONObject?) {
        let (seconds, micros) = QMPSystem.now()
        var message = JSONObject()
        message["timestamp"] = .object(JSONObject([("seconds", .int(seconds)), ("microseconds", .int(micros))]))
        message["event"] = .string(event)
        if let data { message["data"] = .object(data) }
        let bytes = Array((JSONValue.object(message).serialized + "\r\n").utf8)
        let sessions = state.withLock { Array($0.sessions.values) }
        for session in sessions where session.isNegotiated {
            session.enqueue(bytes)
        }
    }

    /// Runs `body` holding the server-wide control lock, the one every QMP handler runs under.
    /// The lock is recursive, so it may be taken again from inside a handler.
    public func withControlLock<T>(_ body: () throws -> T) rethrows -> T {
        try controlLock.withLock(body)
    }

    /// Closes every monitor (removing its socket file) and disconnects every client. Returns
    /// without waiting for the session threads; safe to call from a handler or `onQuit`.
    public func stop() {
        let (monitors, sessions) = state.withLock { s -> ([Monitor], [QMPSession]) in
            if s.stopped { return ([], []) }
            s.stopped = true
            let m = s.monitors
            s.monitors.removeAll()
            return (m, Array(s.sessions.values))
        }
        if !monitors.isEmpty || !sessions.isEmpty {
            var byte: UInt8 = 1
            _ = write(wakePipe.write, &byte, 1)
        }
        for monitor in monitors { unlink(monitor.path) }
        for session in sessions { session.kill() }
    }

    // MARK: Accepting

    private func acceptLoop(fd: Int32, path: String) {
        defer { close(fd) }
        while true {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: wakePipe.read, events: Int16(POLLIN), revents: 0)]
            let rc = poll(&fds, 2, -1)
            if rc < 0 { if errno == EINTR { continue }; return }
            if fds[1].revents != 0 { return }
            if fds[0].revents & Int16(POLLIN) == 0 { continue }
            let client = accept(fd, nil, nil)
            if client < 0 {
                if errno == EINTR || errno == ECONNABORTED || errno == EAGAIN { continue }
                if errno == EMFILE || errno == ENFILE { usleep(100_000); continue }
                return
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            startSession(fd: client, monitorPath: path)
        }
    }

    private func startSession(fd: Int32, monitorPath: String) {
        let session: QMPSession? = state.withLock { s in
            if s.stopped { return nil }
            let session = QMPSession(id: s.nextSessionID, fd: fd, monitorPath: monitorPath, server: self)
            s.nextSessionID += 1
            s.sessions[session.id] = session
            return session
        }
        guard let session else { close(fd); return }
        session.enqueue(Array((JSONValue.object(greeting).serialized + "\r\n").utf8))
        QMPSystem.spawn { session.writerLoop() }
        QMPSystem.spawn { session.readerLoop() }
    }

    func sessionEnded(_ session: QMPSession) {
        state.withLock { s in _ = s.sessions.removeValue(forKey: session.id) }
    }

    /// `{"QMP": {"version": …, "capabilities": ["oob"]}}`.
    public var greeting: JSONObject {
        JSONObject([("QMP", .object(JSONObject([
            ("version", version.json),
            ("capabilities", .array([.string("oob")])),
        ])))])
    }

    // MARK: Dispatch

    static let negotiationMessage = "Expecting capabilities negotiation with 'qmp_capabilities'"

    /// Executes one request and returns the reply to send (QEMU's `qmp_dispatch`).
    func dispatch(_ request: JSONValue, session: QMPSession) -> (reply: JSONObject, after: [@Sendable () -> Void]) {
        guard case .object(let dict) = request else {
            return (Self.errorReply(.generic("QMP input must be a JSON object"), id: nil), [])
        }
        let id = dict["id"]
        let negotiated = session.isNegotiated
        let oob = session.oobEnabled
        var execKey: String?
        if oob, dict["execute"] != nil, dict["exec-oob"] != nil,
           dict["execute"]?.stringValue != nil, dict["exec-oob"]?.stringValue != nil {
            // QEMU's message names them in its hash order; keep its wording stable.
            return (Self.errorReply(.generic("QMP input member 'execute' clashes with 'exec-oob'"), id: id), [])
        }
        for (key, value) in dict {
            if key == "execute" || (key == "exec-oob" && oob) {
                guard case .string = value else {
                    return (Self.errorReply(.generic("QMP input member '\(key)' must be a string"), id: id), [])
                }
                if let execKey {
                    return (Self.errorReply(.generic("QMP input member '\(key)' clashes with '\(execKey)'"), id: id), [])
                }
                execKey = key
            } else if key == "arguments" {
                guard case .object = value else {
                    return (Self.errorReply(.generic("QMP input member 'arguments' must be an object"), id: id), [])
                }
            } else if key != "id" {
                return (Self.errorReply(.generic("QMP input member '\(key)' is unexpected"), id: id), [])
            }
        }
        guard let execKey, let name = dict[execKey]?.stringValue else {
            return (Self.errorReply(.generic("QMP input lacks member 'execute'"), id: id), [])
        }
        guard let handler = commands.handler(for: name), negotiated || name == "qmp_capabilities" else {
            let desc = negotiated ? "The command \(name) has not been found" : Self.negotiationMessage
            return (Self.errorReply(.commandNotFound(desc), id: id), [])
        }
        if execKey == "exec-oob" {
            // No command of ours is allowed out of band (none in qemu-storage-daemon either).
            return (Self.errorReply(.generic("The command \(name) does not support OOB"), id: id), [])
        }
        var arguments = QMPArguments(dict["arguments"]?.objectValue ?? JSONObject())
        let context = QMPContext(server: self, session: session, command: name)
        if let prepare = commands.preparer(for: name) {
            context.prepared = prepare(arguments.object)
        }
        let result: Result<JSONValue, QMPError> = controlLock.withLock {
            do throws(QMPError) {
                let value = try handler(&arguments, context)
                try arguments.finish()
                return .success(value)
            } catch {
                return .failure(error)
            }
        }
        switch result {
        case .success(let value):
            var reply = JSONObject()
            reply["return"] = value
            if let id { reply["id"] = id }
            return (reply, context.afterReplyActions)
        case .failure(let error):
            return (Self.errorReply(error, id: id), context.afterReplyActions)
        }
    }

    static func errorReply(_ error: QMPError, id: JSONValue?) -> JSONObject {
        var reply = JSONObject()
        if let id { reply["id"] = id }
        reply["error"] = .object(error.json)
        return reply
    }

    // MARK: Built-ins

    private func registerBuiltins(onQuit: (@Sendable () -> Void)?) {
        register("qmp_capabilities") { (args: inout QMPArguments, ctx: QMPContext) throws(QMPError) -> JSONValue in
            let enable = try args.stringArray("enable") ?? []
            for (n, capability) in enable.enumerated() where capability != "oob" {
                throw QMPError.generic("Parameter 'enable[\(n)]' does not accept value '\(capability)'")
            }
            try args.finish()
            guard !ctx.session.isNegotiated else {
                throw QMPError.commandNotFound("Capabilities negotiation is already complete, command ignored")
            }
            ctx.session.negotiate(oob: enable.contains("oob"))
            return .object(JSONObject())
        }
        register("query-version") { [version] (args: inout QMPArguments, _: QMPContext) throws(QMPError) -> JSONValue in
            try args.finish()
            return version.json
        }
        register("query-commands") { (args: inout QMPArguments, ctx: QMPContext) throws(QMPError) -> JSONValue in
            try args.finish()
            return .array(ctx.server.commands.names.map { .object(JSONObject([("name", .string($0))])) })
        }
        if let onQuit {
            register("quit") { (args: inout QMPArguments, ctx: QMPContext) throws(QMPError) -> JSONValue in
                try args.finish()
                ctx.afterReply(onQuit)
                return .object(JSONObject())
            }
        }
    }
}

/// One client connection. State shared between its reader, its writer and event emitters lives
/// behind `cond`; `fd` is closed by whichever of the two threads exits last.
final class QMPSession: @unchecked Sendable {
    enum Outgoing {
        case bytes([UInt8])
        case action(@Sendable () -> Void)
    }

    let id: Int
    let fd: Int32
    let monitorPath: String
    let server: QMPServer   // strong: a server lives until stop() and its sessions end

    private let cond = QMPCondition()
    // Protected by `cond`:
    private var queue: [Outgoing] = []
    private var queueHead = 0
    private var queuedBytes = 0
    private var closed = false
    private var fdClosed = false
    private var threadsRunning = 2
    private var negotiated = false
    private var oob = false

    init(id: Int, fd: Int32, monitorPath: String, server: QMPServer) {
        self.id = id
        self.fd = fd
        self.monitorPath = monitorPath
        self.server = server
    }

    var isNegotiated: Bool { cond.withLock { negotiated } }
    var oobEnabled: Bool { cond.withLock { oob } }

    func negotiate(oob: Bool) {
        cond.withLock {
            negotiated = true
            self.oob = oob
        }
    }

    /// Queues bytes for the writer; a client that lets its queue overflow is disconnected.
    func enqueue(_ bytes: [UInt8]) {
        cond.lock()
        defer { cond.unlock() }
        if closed { return }
        if queuedBytes + bytes.count > server.maxQueuedBytes {
            killLocked()
            return
        }
        queue.append(.bytes(bytes))
        queuedBytes += bytes.count
        cond.broadcast()
    }

    /// Queues an action to run after everything queued before it was written.
    func enqueueAction(_ action: @escaping @Sendable () -> Void) {
        cond.lock()
        let run = closed
        if !closed {
            queue.append(.action(action))
            cond.broadcast()
        }
        cond.unlock()
        if run { action() }
    }

    /// Disconnects the client; both threads wind down.
    func kill() {
        cond.withLock { killLocked() }
    }

    private func killLocked() {
        if !closed {
            closed = true
            cond.broadcast()
        }
        if !fdClosed { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private func threadExited() {
        let last = cond.withLock { () -> Bool in
            threadsRunning -= 1
            guard threadsRunning == 0 else { return false }
            fdClosed = true
            return true
        }
        if last {
            server.sessionEnded(self)
            close(fd)
        }
    }

    func writerLoop() {
        defer { threadExited() }
        while true {
            cond.lock()
            while queueHead == queue.count && !closed { cond.wait() }
            if queueHead == queue.count {
                // Closed and drained. Pending actions were run below or will never be queued.
                cond.unlock()
                return
            }
            let item = queue[queueHead]
            queueHead += 1
            if queueHead > 64 && queueHead * 2 > queue.count {
                queue.removeFirst(queueHead)
                queueHead = 0
            }
            if case .bytes(let b) = item { queuedBytes -= b.count }
            let dead = closed
            cond.unlock()
            switch item {
            case .action(let action):
                action()
            case .bytes(let bytes):
                if dead { continue }   // still run queued actions, skip writes
                if !QMPSystem.writeAll(fd, bytes) { kill() }
            }
        }
    }

    func readerLoop() {
        defer {
            kill()
            threadExited()
        }
        var parser = QMPStreamParser(maxMessageBytes: server.maxMessageBytes)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let n = QMPSystem.readSome(fd, into: buffer)
            if n <= 0 { return }
            for item in parser.feed(UnsafeRawBufferPointer(rebasing: buffer[0..<n])) {
                if cond.withLock({ closed }) { return }
                switch item {
                case .error(let desc):
                    send(QMPServer.errorReply(.generic(desc), id: nil))
                case .value(let request):
                    let (reply, after) = server.dispatch(request, session: self)
                    send(reply)
                    for action in after { enqueueAction(action) }
                }
            }
        }
    }

    private func send(_ reply: JSONObject) {
        enqueue(Array((JSONValue.object(reply).serialized + "\r\n").utf8))
    }
}
