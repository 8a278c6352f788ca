import JSON
import Synchronization

/// A command handler: reads its arguments (calling `arguments.finish()` before acting), does the
/// work and returns the `return` value (`.object(JSONObject())` for `{}`). It runs on the
/// session's thread while the server-wide control lock is held, so handlers never overlap.
public typealias QMPHandler = @Sendable (inout QMPArguments, QMPContext) throws(QMPError) -> JSONValue

/// Work a command does before the control lock is taken (`blockdev-add` connecting to a
/// remote store that may not answer for seconds): it sees the raw arguments, must not touch
/// shared state, and its result reaches the handler as `QMPContext.prepared`.
public typealias QMPPreparer = @Sendable (JSONObject) -> (any Sendable)?

/// The commands a server knows, in registration order (the order `query-commands` lists).
public final class QMPCommandTable: Sendable {
    private struct State {
        var handlers: [String: QMPHandler] = [:]
        var preparers: [String: QMPPreparer] = [:]
        var order: [String] = []
    }
    private let state = Mutex(State())

    public init() {}

    /// Adds or replaces a command.
    public func register(_ name: String, handler: @escaping QMPHandler) {
        state.withLock { s in
            if s.handlers.updateValue(handler, forKey: name) == nil { s.order.append(name) }
        }
    }

    /// Sets the preparation of a registered command.
    public func setPreparer(_ name: String, _ preparer: @escaping QMPPreparer) {
        state.withLock { $0.preparers[name] = preparer }
    }

    public func preparer(for name: String) -> QMPPreparer? {
        state.withLock { $0.preparers[name] }
    }

    public func unregister(_ name: String) {
        state.withLock { s in
            if s.handlers.removeValue(forKey: name) != nil { s.order.removeAll { $0 == name } }
            s.preparers[name] = nil
        }
    }

    public func handler(for name: String) -> QMPHandler? {
        state.withLock { $0.handlers[name] }
    }

    public func contains(_ name: String) -> Bool { handler(for: name) != nil }

    /// Command names in registration order.
    public var names: [String] { state.withLock { $0.order } }
}

/// What a handler knows about the request it serves.
public final class QMPContext {
    /// The server; handlers may `emit` events through it.
    public let server: QMPServer
    /// The command being executed.
    public let command: String
    /// A number identifying the client session (unique per server).
    public let sessionID: Int
    /// The socket path of the monitor the client connected to.
    public let monitorPath: String

    /// What the command's preparer returned (run before the control lock was taken), if any.
    public internal(set) var prepared: (any Sendable)?

    let session: QMPSession
    var afterReplyActions: [@Sendable () -> Void] = []

    init(server: QMPServer, session: QMPSession, command: String) {
        self.server = server
        self.session = session
        self.command = command
        self.sessionID = session.id
        self.monitorPath = session.monitorPath
    }

    /// Broadcasts an event to every negotiated session of every monitor.
    public func emit(event: String, data: JSONObject?) {
        server.emit(event: event, data: data)
    }

    /// Runs `action` once the reply to this command has been written to the client (or the
    /// client is gone), outside the control lock. `quit` uses it to exit after `{"return": {}}`.
    public func afterReply(_ action: @escaping @Sendable () -> Void) {
        afterReplyActions.append(action)
    }
}
