#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import EventLoop
import JSON
import Synchronization

/// The QMP monitor server: unix socket monitors, sessions, built-in commands, events.
///
/// Control plane, low rate: each monitor has an accept thread and each client a reader thread
/// (parse, dispatch, reply) and a writer thread (drains a bounded queue of replies and events),
/// all with blocking I/O. A monitor serves at most `maxClientsPerMonitor` clients at once; one
/// more gets an error object and is closed. When the system refuses a thread, the client (or
/// the `addMonitor` caller) gets an error; the daemon goes on. Every handler runs under one server-wide control lock
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
    /// Most clients one monitor serves at once (each costs two threads).
    public let maxClientsPerMonitor: Int
    public static let defaultMaxClientsPerMonitor = 32
    private let spawn: QMPSystem.Spawner

    private struct Monitor {
        /// Socket file to remove on stop (unix listeners); empty otherwise.
        var path: String
        /// Listening socket, or -1 for a monitor on an already connected stream (stdio).
        var fd: Int32
        /// The file `path` named when it was bound (removed only while it still does).
        var socketFile: QMPSystem.FileIdentity? = nil
    }
    private struct State {
        var monitors: [Monitor] = []
        var sessions: [Int: QMPSession] = [:]
        var nextSessionID = 1
        var stopped = false
        /// `quit` was answered: no further command is (QEMU leaves them unanswered too, as
        /// its monitors are cleaned up once the main loop ends).
        var quitting = false
    }
    private let state = Mutex(State())
    private let controlLock = QMPRecursiveLock()
    /// Written once by `stop()` so every accept loop wakes up; never read.
    private let wakePipe: (read: Int32, write: Int32)

    /// - Parameter onQuit: registers `quit`; called on a server thread after the reply is sent.
    /// - Parameter beforeQuitReply: runs in the `quit` handler, under the control lock, before
    ///   the reply: what must happen (and emit its events) before the client hears `return`
    ///   (qemu-storage-daemon closes its exports and cancels its jobs first).
    public convenience init(version: Version = .default, onQuit: (@Sendable () -> Void)? = nil,
                            beforeQuitReply: (@Sendable () -> Void)? = nil,
                            maxQueuedBytes: Int = 16 << 20, maxMessageBytes: Int = QMPStreamParser.defaultMaxMessageBytes,
                            maxClientsPerMonitor: Int = QMPServer.defaultMaxClientsPerMonitor) {
        self.init(version: version, onQuit: onQuit, beforeQuitReply: beforeQuitReply, maxQueuedBytes: maxQueuedBytes,
                  maxMessageBytes: maxMessageBytes, maxClientsPerMonitor: maxClientsPerMonitor, spawn: { QMPSystem.spawn($0) })
    }

    /// `spawn` starts threads (tests pass one that fails).
    init(version: Version = .default, onQuit: (@Sendable () -> Void)? = nil,
         beforeQuitReply: (@Sendable () -> Void)? = nil, maxQueuedBytes: Int = 16 << 20, maxMessageBytes: Int = QMPStreamParser.defaultMaxMessageBytes,
         maxClientsPerMonitor: Int = QMPServer.defaultMaxClientsPerMonitor, spawn: @escaping QMPSystem.Spawner) {
        self.version = version
        self.commands = QMPCommandTable()
        self.maxQueuedBytes = maxQueuedBytes
        self.maxMessageBytes = maxMessageBytes
        self.maxClientsPerMonitor = max(1, maxClientsPerMonitor)
        self.spawn = spawn
        var fds: [Int32] = [-1, -1]
        let rc = pipe(&fds)
        precondition(rc == 0, "pipe failed")
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        wakePipe = (fds[0], fds[1])
        registerBuiltins(onQuit: onQuit, beforeQuitReply: beforeQuitReply)
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

    /// Listening sockets for a monitor (QEMU's `--chardev socket,…,server=on`), made before
    /// the monitor so that `wait=on` can take its first client early.
    public struct Listener: Sendable {
        public let fds: [Int32]
        /// The unix socket file (removed when the server stops), or nil for TCP.
        public let path: String?
        /// That file as bound (device, inode): it is removed only while the path still names it,
        /// so a server started on the same path after this one was told to stop keeps its socket.
        let socketFile: QMPSystem.FileIdentity?

        init(fds: [Int32], path: String?) {
            self.fds = fds
            self.path = path
            self.socketFile = path.flatMap(QMPSystem.FileIdentity.init(path:))
        }

        func removeSocketFile() {
            if let path { QMPSystem.unlink(path, ifStill: socketFile) }
        }
    }

    /// Binds and listens on a unix socket (a stale socket file is replaced, as QEMU does).
    public static func listen(unixPath path: String) throws(QMPError) -> Listener {
        do {
            return Listener(fds: [try QMPSystem.listenUnix(path: path)], path: path)
        } catch {
            throw QMPError.generic(error.description)
        }
    }

    /// Binds and listens on every address `host` resolves to; `ipv4`/`ipv6` off drop a family.
    public static func listen(host: String, port: String, ipv4: Bool? = nil, ipv6: Bool? = nil) throws(QMPError) -> Listener {
        do {
            return Listener(fds: try QMPSystem.listenTCP(host: host, port: port, ipv4: ipv4, ipv6: ipv6), path: nil)
        } catch {
            throw QMPError.generic(error.description)
        }
    }

    /// Blocks until a client connects to `listener` (QEMU's `wait=on`); returns its socket.
    /// Signals are let through while waiting (a daemon that masks them for `sigwait` can still
    /// be stopped with Ctrl-C or SIGTERM here, where QEMU cannot).
    public static func acceptOne(_ listener: Listener) -> Int32? {
        var pfds = listener.fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        var unblocked = sigset_t()
        sigemptyset(&unblocked)
        var saved = sigset_t()
        pthread_sigmask(SIG_SETMASK, &unblocked, &saved)
        defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
        while true {
            let rc = poll(&pfds, nfds_t(pfds.count), -1)
            if rc < 0 && errno == EINTR { continue }
            if rc < 0 { return nil }
            for p in pfds where p.revents != 0 {
                let client = accept(p.fd, nil, nil)
                if client >= 0 {
                    _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                    return client
                }
            }
        }
    }

    /// A socket connected to a unix socket or TCP address (`--chardev socket,…,server=off`).
    public static func connect(unixPath path: String) throws(QMPError) -> Int32 {
        do { return try QMPSystem.connectUnix(path: path) } catch { throw QMPError.generic(error.description) }
    }

    public static func connect(host: String, port: String) throws(QMPError) -> Int32 {
        do { return try QMPSystem.connectTCP(host: host, port: port) } catch { throw QMPError.generic(error.description) }
    }

    /// Closes a listener that never became a monitor.
    public static func closeListener(_ listener: Listener) {
        for fd in listener.fds { Glibc.close(fd) }
        listener.removeSocketFile()
    }

    /// Starts a monitor listening on a unix socket (`--chardev socket,path=P,server=on,wait=off
    /// --monitor chardev=ID`, or `--qmp P`). A stale socket file at `path` is replaced.
    public func addMonitor(path: String) throws(QMPError) {
        try addMonitor(QMPServer.listen(unixPath: path))
    }

    /// Serves clients of `listener`, starting with `firstClient` if one connected already.
    /// `pretty` prints replies and events as QEMU's `pretty=on` does.
    public func addMonitor(_ listener: Listener, pretty: Bool = false, firstClient: Int32? = nil) throws(QMPError) {
        let accepted = state.withLock { s -> Bool in
            if s.stopped { return false }
            for (n, fd) in listener.fds.enumerated() { s.monitors.append(Monitor(path: n == 0 ? listener.path ?? "" : "", fd: fd,
                                                                               socketFile: n == 0 ? listener.socketFile : nil)) }
            return true
        }
        guard accepted else {
            QMPServer.closeListener(listener)
            if let firstClient { Glibc.close(firstClient) }
            throw QMPError.generic("QMP server is stopped")
        }
        let path = listener.path ?? ""
        let key = monitorKey(listener)
        for (n, fd) in listener.fds.enumerated() {
            if spawn({ [self] in acceptLoop(fd: fd, path: path, key: key, pretty: pretty) }) { continue }
            // No thread for this socket: it and the ones after it are not served.
            let lost = Array(listener.fds[n...])
            state.withLock { s in s.monitors.removeAll { lost.contains($0.fd) } }
            for fd in lost { Glibc.close(fd) }
            let reason = "Could not start a thread for monitor \(key): \(QMPSystem.errnoString(EAGAIN))"
            guard n == 0 else {
                Log.warning("\(reason); \(lost.count) of its sockets are not served")
                break
            }
            listener.removeSocketFile()
            if let firstClient { Glibc.close(firstClient) }
            throw QMPError.generic(reason)
        }
        if let firstClient {
            startSession(readFD: firstClient, writeFD: firstClient, monitorPath: path, monitorKey: key, pretty: pretty,
                         isStdio: false)
        }
    }

    /// A monitor with one client on an open stream: stdio (read 0, write 1), or a socket this
    /// process connected. It ends with the stream; stdio descriptors are never closed.
    public func addMonitor(readFD: Int32, writeFD: Int32, isStdio: Bool, pretty: Bool = false) throws(QMPError) {
        let running = state.withLock { !$0.stopped }
        guard running else { throw QMPError.generic("QMP server is stopped") }
        let path = isStdio ? "stdio" : ""
        startSession(readFD: readFD, writeFD: writeFD, monitorPath: path, monitorKey: isStdio ? path : "fd#\(readFD)",
                     pretty: pretty, isStdio: isStdio)
    }

    /// Socket paths of the unix-socket monitors.
    public var monitorPaths: [String] { state.withLock { $0.monitors.map(\.path).filter { !$0.isEmpty } } }

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
        let sessions = state.withLock { Array($0.sessions.values) }
        var compact: [UInt8]?
        var pretty: [UInt8]?
        for session in sessions where session.isNegotiated {
            if session.pretty {
                if pretty == nil { pretty = QMPServer.wireBytes(message, pretty: true) }
                session.enqueue(pretty!)
            } else {
                if compact == nil { compact = QMPServer.wireBytes(message, pretty: false) }
                session.enqueue(compact!)
            }
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
        for monitor in monitors where !monitor.path.isEmpty { QMPSystem.unlink(monitor.path, ifStill: monitor.socketFile) }
        for session in sessions { session.kill() }
    }

    // MARK: Accepting

    private func acceptLoop(fd: Int32, path: String, key: String, pretty: Bool) {
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
            startSession(readFD: client, writeFD: client, monitorPath: path, monitorKey: key, pretty: pretty, isStdio: false)
        }
    }

    /// Which monitor a client belongs to, for `maxClientsPerMonitor`: its socket file, or
    /// its first listening descriptor (TCP).
    private func monitorKey(_ listener: Listener) -> String {
        listener.path ?? "tcp#\(listener.fds.first ?? -1)"
    }

    private func startSession(readFD: Int32, writeFD: Int32, monitorPath: String, monitorKey: String, pretty: Bool,
                              isStdio: Bool) {
        enum Admission { case stopped, full, session(QMPSession) }
        let admission: Admission = state.withLock { s in
            if s.stopped { return .stopped }
            let here = s.sessions.values.reduce(0) { $0 + ($1.monitorKey == monitorKey ? 1 : 0) }
            if here >= maxClientsPerMonitor { return .full }
            let session = QMPSession(id: s.nextSessionID, readFD: readFD, writeFD: writeFD, monitorPath: monitorPath,
                                     monitorKey: monitorKey, pretty: pretty, isStdio: isStdio, server: self)
            s.nextSessionID += 1
            s.sessions[session.id] = session
            return .session(session)
        }
        switch admission {
        case .stopped:
            if !isStdio { close(readFD) }
        case .full:
            // A clear refusal instead of a greeting; never blocks this accept thread.
            let desc = "Too many QMP clients on monitor \(monitorKey) (at most \(maxClientsPerMonitor)); try again later"
            QMPServer.refuse(readFD, desc, pretty: pretty, close: !isStdio)
            Log.warning("QMP monitor \(monitorKey): refused a client, \(maxClientsPerMonitor) already connected")
        case .session(let session):
            session.enqueue(QMPServer.wireBytes(greeting, pretty: pretty))
            // Both threads are counted before either starts: the one that exits last closes
            // the socket, so a writer that finishes before the reader is even spawned (a client
            // that connected and left at once) must not close it under the reader, whose
            // descriptor number may by then belong to the next client.
            session.threadsStarting(2)
            guard spawn({ session.writerLoop() }) else {
                // No thread to talk to this client: tell it directly and drop it.
                sessionEnded(session)
                QMPServer.refuse(writeFD, "Could not start a thread for this QMP client (\(QMPSystem.errnoString(EAGAIN)))",
                                 pretty: pretty, close: !isStdio)
                Log.error("QMP monitor \(monitorKey): could not start a thread for a client; closed it")
                return
            }
            guard spawn({ session.readerLoop() }) else {
                // The writer runs: it sends the error, then the session closes.
                session.threadExited()
                session.send(QMPServer.errorReply(.generic("Could not start a thread for this QMP client (\(QMPSystem.errnoString(EAGAIN)))"), id: nil))
                session.enqueueAction { session.kill() }
                Log.error("QMP monitor \(monitorKey): could not start a thread for a client; closing it")
                return
            }
        }
    }

    /// Writes an error object (`{"error": {"class": "GenericError", "desc": …}}`) without
    /// blocking, then closes `fd` (a socket; stdio is only written to).
    private static func refuse(_ fd: Int32, _ desc: String, pretty: Bool, close closeIt: Bool) {
        let bytes = wireBytes(errorReply(.generic(desc), id: nil), pretty: pretty)
        if closeIt {
            _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
            shutdown(fd, Int32(SHUT_RDWR))
            close(fd)
        } else {
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        }
    }

    /// A message as the monitor writes it: compact JSON, or QEMU's pretty form, where every
    /// line break goes out as CR LF (QEMU's monitor turns each `\n` into `\r\n`).
    static func wireBytes(_ message: JSONObject, pretty: Bool) -> [UInt8] {
        if !pretty { return Array((JSONValue.object(message).serialized + "\r\n").utf8) }
        var out: [UInt8] = []
        for byte in (JSONValue.object(message).prettySerialized + "\n").utf8 {
            if byte == UInt8(ascii: "\n") { out.append(UInt8(ascii: "\r")) }
            out.append(byte)
        }
        return out
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

    /// Executes one request and returns the reply to send (QEMU's `qmp_dispatch`); none once
    /// `quit` has been answered.
    func dispatch(_ request: JSONValue, session: QMPSession) -> (reply: JSONObject?, after: [@Sendable () -> Void]) {
        if state.withLock({ $0.quitting }) { return (nil, []) }
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

    private func registerBuiltins(onQuit: (@Sendable () -> Void)?, beforeQuitReply: (@Sendable () -> Void)?) {
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
                beforeQuitReply?()
                ctx.server.state.withLock { $0.quitting = true }
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
    /// Where requests come from and replies go: the same socket, or stdin and stdout.
    let readFD: Int32
    let writeFD: Int32
    let monitorPath: String
    /// The monitor it came through (counted against `maxClientsPerMonitor`).
    let monitorKey: String
    /// Replies and events in QEMU's `pretty=on` form.
    let pretty: Bool
    /// The monitor is on stdio: the descriptors are never closed, only pointed at /dev/null.
    let isStdio: Bool
    let server: QMPServer   // strong: a server lives until stop() and its sessions end

    private let cond = QMPCondition()
    // Protected by `cond`:
    private var queue: [Outgoing] = []
    private var queueHead = 0
    private var queuedBytes = 0
    private var closed = false
    private var fdClosed = false
    private var threadsRunning = 0
    private var negotiated = false
    private var oob = false
    /// The client stopped sending (end of file): replies already queued are still written,
    /// as QEMU does for a script piped into a stdio monitor, then the session ends.
    private var inputEnded = false

    init(id: Int, readFD: Int32, writeFD: Int32, monitorPath: String, monitorKey: String, pretty: Bool, isStdio: Bool,
         server: QMPServer) {
        self.id = id
        self.readFD = readFD
        self.writeFD = writeFD
        self.monitorPath = monitorPath
        self.monitorKey = monitorKey
        self.pretty = pretty
        self.isStdio = isStdio
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
        if !fdClosed && !isStdio { shutdown(readFD, Int32(SHUT_RDWR)) }
    }

    /// Counts threads about to start (`threadExited` undoes one that never ran).
    func threadsStarting(_ n: Int) {
        cond.withLock { threadsRunning += n }
    }

    func threadExited() {
        let last = cond.withLock { () -> Bool in
            threadsRunning -= 1
            guard threadsRunning == 0 else { return false }
            fdClosed = true
            return true
        }
        if last {
            server.sessionEnded(self)
            if isStdio {
                // Keep 0 and 1 taken, so nothing opened later lands on them.
                let null = open("/dev/null", O_RDWR | O_CLOEXEC)
                if null >= 0 {
                    dup2(null, readFD)
                    dup2(null, writeFD)
                    close(null)
                }
            } else {
                close(readFD)
                if writeFD != readFD { close(writeFD) }
            }
        }
    }

    func writerLoop() {
        defer { threadExited() }
        while true {
            cond.lock()
            while queueHead == queue.count && !closed && !inputEnded { cond.wait() }
            if queueHead == queue.count {
                // Closed (or input ended) and drained. Pending actions were run below or will never be queued.
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
                if !QMPSystem.writeAll(writeFD, bytes) { kill() }
            }
        }
    }

    func readerLoop() {
        defer {
            cond.withLock {
                inputEnded = true
                cond.broadcast()
            }
            threadExited()
        }
        var parser = QMPStreamParser(maxMessageBytes: server.maxMessageBytes)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let n = QMPSystem.readSome(readFD, into: buffer)
            if n <= 0 { return }
            for item in parser.feed(UnsafeRawBufferPointer(rebasing: buffer[0..<n])) {
                if cond.withLock({ closed }) { return }
                switch item {
                case .error(let desc):
                    send(QMPServer.errorReply(.generic(desc), id: nil))
                case .value(let request):
                    let (reply, after) = server.dispatch(request, session: self)
                    if let reply { send(reply) }
                    for action in after { enqueueAction(action) }
                }
            }
        }
    }

    func send(_ reply: JSONObject) {
        enqueue(QMPServer.wireBytes(reply, pretty: pretty))
    }
}
