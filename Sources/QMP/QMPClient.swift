#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import JSON

/// A blocking QMP client over a unix socket, for blockctl and tests. Not thread-safe: use one
/// client from one thread. Events that arrive while waiting for a reply are kept for `nextEvent`.
public final class QMPClient {
    /// The greeting's `QMP` member (`version`, `capabilities`).
    public private(set) var greeting = JSONObject()
    /// Events received but not yet returned by `nextEvent`.
    public private(set) var pendingEvents: [JSONObject] = []
    /// Milliseconds to wait for any reply; negative waits forever.
    public var timeoutMS: Int32

    private var fd: Int32
    private var parser = QMPStreamParser()
    private var received: [JSONValue] = []
    private var nextID: Int64 = 1

    /// Connects, reads the greeting and (by default) negotiates capabilities.
    public init(path: String, negotiate: Bool = true, timeoutMS: Int32 = 60_000) throws(QMPError) {
        self.timeoutMS = timeoutMS
        do {
            fd = try QMPSystem.connectUnix(path: path)
        } catch {
            throw QMPError.generic(error.description)
        }
        guard let first = try receive(), let qmp = first["QMP"]?.objectValue else {
            Glibc.close(fd)
            throw QMPError.generic("No QMP greeting from '\(path)'")
        }
        greeting = qmp
        if negotiate {
            _ = try execute("qmp_capabilities")
        }
    }

    deinit {
        if fd >= 0 { Glibc.close(fd) }
    }

    public func close() {
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
    }

    /// Sends a command and waits for its reply; an error reply throws.
    @discardableResult
    public func execute(_ command: String, arguments: JSONObject? = nil) throws(QMPError) -> JSONValue {
        let id = JSONValue.string("blockctl-\(nextID)")
        nextID += 1
        var request = JSONObject()
        request["execute"] = .string(command)
        if let arguments { request["arguments"] = .object(arguments) }
        request["id"] = id
        try send(.object(request))
        while true {
            guard let message = try receive() else {
                throw QMPError.generic("Connection closed while waiting for the reply to '\(command)'")
            }
            if message["event"] != nil, let event = message.objectValue {
                pendingEvents.append(event)
                continue
            }
            guard message["id"] == id else { continue }
            if let error = message["error"] {
                throw QMPError(json: error) ?? .generic("Malformed error reply: \(message.serialized)")
            }
            return message["return"] ?? .object(JSONObject())
        }
    }

    /// The next event (`{"event", "data", "timestamp"}`); nil on timeout or end of stream.
    public func nextEvent(timeoutMS: Int32? = nil) throws(QMPError) -> JSONObject? {
        if !pendingEvents.isEmpty { return pendingEvents.removeFirst() }
        let saved = self.timeoutMS
        if let timeoutMS { self.timeoutMS = timeoutMS }
        defer { self.timeoutMS = saved }
        while true {
            guard let message = try receive() else { return nil }
            if message["event"] != nil, let event = message.objectValue { return event }
        }
    }

    /// Sends one JSON value.
    public func send(_ value: JSONValue) throws(QMPError) {
        try sendRaw(Array((value.serialized + "\r\n").utf8))
    }

    /// Sends raw bytes (tests use it for malformed input).
    public func sendRaw(_ bytes: [UInt8]) throws(QMPError) {
        guard fd >= 0, QMPSystem.writeAll(fd, bytes) else { throw QMPError.generic("Connection to the QMP server lost") }
    }

    /// The next message of any kind (reply, error or event), bypassing `pendingEvents`; nil on
    /// timeout or end of stream. Parse errors in the server's output throw.
    public func receive() throws(QMPError) -> JSONValue? {
        while true {
            if !received.isEmpty { return received.removeFirst() }
            guard fd >= 0, QMPSystem.waitReadable(fd, timeoutMS: timeoutMS) else { return nil }
            var buffer = [UInt8](repeating: 0, count: 64 << 10)
            let n = buffer.withUnsafeMutableBytes { QMPSystem.readSome(fd, into: $0) }
            if n <= 0 { return nil }
            for item in parser.feed(buffer[0..<n]) {
                switch item {
                case .value(let v): received.append(v)
                case .error(let e): throw QMPError.generic("Bad data from the QMP server: \(e)")
                }
            }
        }
    }
}
