#if canImport(Glibc)
import Glibc
#endif
import JSON
import QMP
import Synchronization
import Testing
import TestSupport

/// A server on a temporary socket with a couple of test commands.
final class TestServer {
    let server: QMPServer
    let dir: String
    let path: String
    let quitCalled = Locked(0)

    init(maxQueuedBytes: Int = 16 << 20) throws {
        var template = Array("/tmp/qmptest-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        #expect(made != nil)
        dir = String(cString: template)
        path = dir + "/qmp.sock"
        let counter = quitCalled
        server = QMPServer(onQuit: { counter.withLock { $0 += 1 } }, maxQueuedBytes: maxQueuedBytes)
        server.register("echo") { (args: inout QMPArguments, _: QMPContext) throws(QMPError) -> JSONValue in
            let value = try args.requiredValue("value")
            try args.finish()
            return value
        }
        server.register("fire") { (args: inout QMPArguments, ctx: QMPContext) throws(QMPError) -> JSONValue in
            let name = try args.requiredString("name")
            let count = try args.int("count") ?? 1
            try args.finish()
            for n in 0..<count { ctx.emit(event: name, data: JSONObject([("n", .int(n))])) }
            return .object(JSONObject())
        }
        server.register("fail") { (args: inout QMPArguments, _: QMPContext) throws(QMPError) -> JSONValue in
            try args.finish()
            throw QMPError.deviceNotActive("Block job 'j' not found")
        }
        try server.addMonitor(path: path)
    }

    deinit {
        server.stop()
        rmdir(dir)
    }

    /// A raw connection: send bytes, read values.
    func raw() throws -> QMPClient { try QMPClient(path: path, negotiate: false, timeoutMS: 5000) }
}

extension QMPClient {
    /// Sends text and returns the next message.
    func roundTrip(_ text: String) throws -> JSONValue? {
        try sendRaw(Array(text.utf8))
        return try receive()
    }
}

func errorOf(_ v: JSONValue?) -> (String, String)? {
    guard let e = v?["error"], let c = e["class"]?.stringValue, let d = e["desc"]?.stringValue else { return nil }
    return (c, d)
}

@Suite(.serialized) struct QMPServerTests {
    @Test func greetingAndNegotiation() throws {
        let t = try TestServer()
        let c = try t.raw()
        #expect(c.greeting["capabilities"] == ["oob"])
        #expect(c.greeting["version"]?["qemu"]?["major"] == 7)
        #expect(c.greeting["version"]?["package"]?.stringValue?.hasPrefix("blockd") == true)

        var r = try c.roundTrip(#"{"execute": "query-version", "id": 5}"#)
        #expect(r?["id"] == 5)
        #expect(errorOf(r)?.0 == "CommandNotFound")
        #expect(errorOf(r)?.1 == "Expecting capabilities negotiation with 'qmp_capabilities'")
        r = try c.roundTrip(#"{"execute": "nonexistent"}"#)
        #expect(errorOf(r)?.1 == "Expecting capabilities negotiation with 'qmp_capabilities'")
        r = try c.roundTrip(#"{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}, "id": 1}"#)
        #expect(errorOf(r)?.0 == "GenericError")
        r = try c.roundTrip(#"{"execute": "qmp_capabilities", "id": "x"}"#)
        #expect(r == ["return": [:], "id": "x"])
        r = try c.roundTrip(#"{"execute": "qmp_capabilities"}"#)
        #expect(errorOf(r)?.0 == "CommandNotFound")
        #expect(errorOf(r)?.1 == "Capabilities negotiation is already complete, command ignored")
        r = try c.roundTrip(#"{"execute": "query-version", "id": {"a": [1]}}"#)
        #expect(r?["return"]?["qemu"]?["minor"] == 2)
        #expect(r?["id"] == ["a": [1]])
        r = try c.roundTrip(#"{"execute": "nope", "id": 9}"#)
        #expect(errorOf(r)?.0 == "CommandNotFound")
        #expect(errorOf(r)?.1 == "The command nope has not been found")
        #expect(r?["id"] == 9)
        let names = try QMPClient(path: t.path).execute("query-commands").arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
        #expect(Set(names).isSuperset(of: ["qmp_capabilities", "query-version", "query-commands", "quit", "echo"]))
    }

    @Test func badInputsKeepTheSessionUsable() throws {
        let t = try TestServer()
        let c = try t.raw()
        _ = try c.roundTrip(#"{"execute": "qmp_capabilities"}"#)
        let cases: [(String, String)] = [
            ("[1, 2]", "QMP input must be a JSON object"),
            ("3\n", "QMP input must be a JSON object"),
            (#"{"id": 7}"#, "QMP input lacks member 'execute'"),
            (#"{"execute": 5}"#, "QMP input member 'execute' must be a string"),
            (#"{"execute": "echo", "foo": 1}"#, "QMP input member 'foo' is unexpected"),
            (#"{"execute": "echo", "arguments": []}"#, "QMP input member 'arguments' must be an object"),
            (#"{"exec-oob": "echo"}"#, "QMP input member 'exec-oob' is unexpected"),
            (#"{"execute": "echo"}"#, "Parameter 'value' is missing"),
            (#"{"execute": "echo", "arguments": {"value": 1, "x": 2}}"#, "Parameter 'x' is unexpected"),
            (#"{"execute": "query-version", "arguments": {"a": 1}}"#, "Parameter 'a' is unexpected"),
            ("garbage ", "JSON parse error, invalid keyword 'garbage'"),
            ("{\"a\":}", "JSON parse error, expecting value"),
            ("@", "JSON parse error, stray '@'"),
        ]
        for (input, desc) in cases {
            let r = try c.roundTrip(input)
            #expect(errorOf(r)?.0 == "GenericError", "\(input)")
            #expect(errorOf(r)?.1 == desc, "\(input)")
            #expect(try c.roundTrip(#"{"execute": "echo", "arguments": {"value": "ok"}}"#) == ["return": "ok"])
        }
        let r = try c.roundTrip(#"{"execute": "fail", "id": 1}"#)
        #expect(r == ["id": 1, "error": ["class": "DeviceNotActive", "desc": "Block job 'j' not found"]])
        // Several requests in one write, one request in many writes.
        try c.sendRaw(Array(#"{"execute":"echo","arguments":{"value":1}}{"execute":"echo","arguments":{"value":2}}"#.utf8))
        #expect(try c.receive() == ["return": 1])
        #expect(try c.receive() == ["return": 2])
        for piece in [#"{"execute""#, ":\n\"echo\",", #""arguments": {"value""#, ": 3}}"] {
            try c.sendRaw(Array(piece.utf8))
        }
        #expect(try c.receive() == ["return": 3])
    }

    @Test func oobNegotiation() throws {
        let t = try TestServer()
        let c = try t.raw()
        #expect(try c.roundTrip(#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#) == ["return": [:]])
        var r = try c.roundTrip(#"{"exec-oob": "echo", "id": 3}"#)
        #expect(errorOf(r)?.1 == "The command echo does not support OOB")
        r = try c.roundTrip(#"{"exec-oob": "nope"}"#)
        #expect(errorOf(r)?.0 == "CommandNotFound")
        r = try c.roundTrip(#"{"execute": "echo", "exec-oob": "echo"}"#)
        #expect(errorOf(r)?.1.contains("clashes") == true)
    }

    @Test func tenMiBRequest() throws {
        let t = try TestServer()
        let c = try QMPClient(path: t.path, timeoutMS: 20_000)
        let big = String(repeating: "a", count: 10 << 20)
        let r = try c.roundTrip(#"{"execute": "echo", "arguments": {"value": ""# + big + #""}, "id": 1}"#)
        #expect(r?["return"]?.stringValue?.count == 10 << 20)
        #expect(try c.execute("echo", arguments: JSONObject([("value", "after")])) == "after")
    }

    @Test func eventsReachEveryNegotiatedClient() throws {
        let t = try TestServer()
        let path2 = t.dir + "/second.sock"
        try t.server.addMonitor(path: path2)
        let a = try QMPClient(path: t.path, timeoutMS: 5000)
        let b = try QMPClient(path: path2, timeoutMS: 5000)
        let unnegotiated = try t.raw()
        try a.execute("fire", arguments: JSONObject([("name", "TEST_EVENT"), ("count", 3)]))
        for client in [a, b] {
            for n in 0..<3 {
                let e = try #require(try client.nextEvent())
                #expect(e["event"] == "TEST_EVENT")
                #expect(e["data"] == ["n": .int(Int64(n))])
                #expect(e["timestamp"]?["seconds"]?.intValue ?? 0 > 1_600_000_000)
            }
        }
        #expect(try unnegotiated.nextEvent(timeoutMS: 200) == nil)
        t.server.emit(event: "NO_DATA", data: nil)
        let e = try #require(try b.nextEvent())
        #expect(e["event"] == "NO_DATA" && e["data"] == nil)
    }

    @Test func concurrentClientsAndDisconnects() throws {
        let t = try TestServer()
        let errors = Locked(0)
        let done = Locked(0)
        for worker in 0..<8 {
            let path = t.path
            Thread.spawn {
                do {
                    let c = try QMPClient(path: path, timeoutMS: 10_000)
                    for n in 0..<50 {
                        let v = try c.execute("echo", arguments: JSONObject([("value", .int(Int64(worker * 1000 + n)))]))
                        if v != .int(Int64(worker * 1000 + n)) { errors.withLock { $0 += 1 } }
                        if worker % 2 == 1 && n == 25 {
                            // Vanish mid-stream with a request in flight.
                            try c.sendRaw(Array(#"{"execute": "echo", "arguments": {"value": 1}}"#.utf8))
                            c.close()
                            break
                        }
                    }
                } catch {
                    errors.withLock { $0 += 1 }
                }
                done.withLock { $0 += 1 }
            }
        }
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(20)
        while done.withLock({ $0 }) < 8 && clock.now < deadline { usleep(10_000) }
        #expect(done.withLock { $0 } == 8)
        #expect(errors.withLock { $0 } == 0)
        let c = try QMPClient(path: t.path)
        #expect(try c.execute("echo", arguments: JSONObject([("value", "still here")])) == "still here")
    }

    @Test func slowClientIsDroppedOthersContinue() throws {
        let t = try TestServer(maxQueuedBytes: 64 << 10)
        let slow = try QMPClient(path: t.path, timeoutMS: 5000)
        _ = slow
        let fast = try QMPClient(path: t.path, timeoutMS: 5000)
        // The slow client never reads: its socket buffer and then its queue fill up.
        for _ in 0..<40 {
            try fast.execute("fire", arguments: JSONObject([("name", "FLOOD"), ("count", 500)]))
            while try fast.nextEvent(timeoutMS: 0) != nil {}
        }
        #expect(try fast.execute("echo", arguments: JSONObject([("value", 1)])) == 1)
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while t.server.sessionCount > 1 && clock.now < deadline { usleep(10_000) }
        #expect(t.server.sessionCount == 1)
    }

    /// `quit` replies, then calls back; a command after it is not answered (as in QEMU).
    @Test func quitRepliesThenCallsBack() throws {
        let t = try TestServer()
        let c = try QMPClient(path: t.path)
        try c.send(.object(JSONObject([("execute", .string("quit"))])))
        try c.send(.object(JSONObject([("execute", .string("query-version")), ("id", .int(2))])))
        let reply = try c.receive()
        #expect(reply?.objectValue?["return"] == .object([:]), "\(String(describing: reply))")
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while t.quitCalled.withLock({ $0 }) == 0 && clock.now < deadline { usleep(1000) }
        #expect(t.quitCalled.withLock { $0 } == 1)
        t.server.stop()
        // query-version was never answered: the connection closes next.
        #expect(try c.receive() == nil)
    }

    @Test func controlLockSerialisesHandlers() throws {
        let t = try TestServer()
        let inside = Locked(0)
        let overlap = Locked(false)
        t.server.register("slow") { (args: inout QMPArguments, _: QMPContext) throws(QMPError) -> JSONValue in
            try args.finish()
            if inside.withLock({ $0 += 1; return $0 }) > 1 { overlap.withLock { $0 = true } }
            usleep(20_000)  // widens the window an overlap would show in; not synchronisation
            inside.withLock { $0 -= 1 }
            return .object(JSONObject())
        }
        let done = Locked(0)
        for _ in 0..<4 {
            let path = t.path
            Thread.spawn {
                if let c = try? QMPClient(path: path) { for _ in 0..<5 { _ = try? c.execute("slow") } }
                done.withLock { $0 += 1 }
            }
        }
        // The Daemon's own critical sections exclude handlers too (and the lock is recursive).
        for _ in 0..<5 {
            t.server.withControlLock {
                t.server.withControlLock {
                    if inside.withLock({ $0 }) != 0 { overlap.withLock { $0 = true } }
                }
                usleep(5_000)
            }
        }
        #expect(waitUntil(timeout: 30) { done.withLock { $0 } == 4 }, "clients did not finish")
        #expect(overlap.withLock { $0 } == false)
    }

    @Test func stopRemovesSocketsAndDisconnects() throws {
        let t = try TestServer()
        let c = try QMPClient(path: t.path)
        t.server.stop()
        #expect(access(t.path, F_OK) != 0)
        #expect(try c.receive() == nil)
        #expect(throws: QMPError.self) { try QMPClient(path: t.path) }
    }

    /// A monitor started on the same path while the old server still runs (a script that stops
    /// one daemon and starts the next at once) keeps its socket when the old one stops.
    @Test func stopLeavesANewServersSocketFile() throws {
        let t = try TestServer()
        let next = QMPServer(onQuit: {})
        defer { next.stop() }
        try next.addMonitor(path: t.path)
        t.server.stop()
        #expect(access(t.path, F_OK) == 0)
        // The new server answers there (the client reads its greeting and negotiates).
        let c = try QMPClient(path: t.path)
        c.close()
    }
}

/// A Sendable box around a Mutex, so closures can share it.
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R: Sendable>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}

/// A detached pthread for tests.
enum Thread {
    static func spawn(_ body: @escaping @Sendable () -> Void) {
        final class Box { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var tid = pthread_t()
        pthread_create(&tid, nil, { raw in
            Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, box)
        pthread_detach(tid)
    }
}
