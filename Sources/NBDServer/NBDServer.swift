import BlockCore
import CLinux
import EventLoop
import Glibc
import NBDProtocol
import Synchronization

/// Where the server listens (QAPI `SocketAddress`: unix or inet).
public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case inet(host: String, port: String)

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .inet(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }
}

/// The NBD server: listeners, connections spread over the event loops, the export table.
public final class NBDServer: @unchecked Sendable {
    public let exports = ExportTable()
    let loops: EventLoopGroup
    let workers: WorkerPool
    private var pools: [BufferPool]
    private let state = Mutex<(listeners: [Listener], connections: [ObjectIdentifier: UnsafeTransfer<Connection>])>(([], [:]))
    public private(set) var addresses: [ListenAddress] = []
    /// Most clients at once (`max-connections`; 0 = no limit).
    public var maxConnections = 0
    private let connectionCount = Atomic<Int>(0)

    public init(loops: EventLoopGroup, workers: WorkerPool) {
        self.loops = loops
        self.workers = workers
        self.pools = loops.loops.map { _ in BufferPool() }
    }

    func pool(for loop: EventLoop) -> BufferPool { pools[loop.index] }

    /// Starts listening; returns the bound TCP port for `inet` (useful with port 0).
    @discardableResult
    public func listen(on address: ListenAddress) throws(SocketError) -> Int? {
        let fds: [Int32]
        var port: Int?
        switch address {
        case .unix(let path):
            fds = [try Sockets.listenUnix(path: path)]
        case .inet(let host, let p):
            fds = try Sockets.listenTCP(host: host, port: p)
            port = Sockets.boundPort(fds[0])
        }
        let loop = loops.loops[0]
        for fd in fds {
            let listener = Listener(fd: fd, server: self, loop: loop, address: address)
            state.withLock { $0.listeners.append(listener) }
            loop.execute { listener.start() }
        }
        addresses.append(address)
        return port
    }

    func accepted(fd: Int32, peer: String) {
        if maxConnections > 0 && connectionCount.load(ordering: .relaxed) >= maxConnections {
            Log.warning("refusing client \(peer): max-connections (\(maxConnections)) reached")
            Glibc.close(fd)
            return
        }
        connectionCount.wrappingAdd(1, ordering: .relaxed)
        let loop = loops.nextLoop()
        loop.execute { [self] in
            let connection = Connection(fd: fd, loop: loop, server: self, peer: peer)
            state.withLock { $0.connections[ObjectIdentifier(connection)] = UnsafeTransfer(connection) }
            connection.start()
        }
    }

    func connectionClosed(_ connection: Connection) {
        connectionCount.wrappingSubtract(1, ordering: .relaxed)
        _ = state.withLock { $0.connections.removeValue(forKey: ObjectIdentifier(connection)) }
    }

    public var connectionTotal: Int { connectionCount.load(ordering: .relaxed) }

    /// Closes every connection to `export` (block-export-del mode=hard, export removal).
    public func disconnectClients(of export: Export, reason: String) {
        let all = state.withLock { Array($0.connections.values) }
        for c in all {
            let conn = c
            conn.value.loop.execute {
                if conn.value.servesExport(export) { conn.value.close(reason: reason) }
            }
        }
    }

    /// Stops listening (existing clients stay connected).
    public func stopListening() {
        let listeners = state.withLock { s -> [Listener] in
            defer { s.listeners.removeAll() }
            return s.listeners
        }
        for l in listeners {
            let box = UnsafeTransfer(l)
            l.loop.execute { box.value.stop() }
        }
        addresses.removeAll()
    }

    /// Stops listening and closes every client.
    public func shutdown() {
        stopListening()
        let all = state.withLock { Array($0.connections.values) }
        for c in all {
            let conn = c
            conn.value.loop.execute { conn.value.close(reason: nil) }
        }
    }
}

extension Connection {
    func servesExport(_ e: Export) -> Bool { exportIdentity == ObjectIdentifier(e) }
}

/// A listening socket on loop 0; hands accepted clients to the server.
final class Listener: EventHandler, @unchecked Sendable {
    let fd: Int32
    let loop: EventLoop
    let address: ListenAddress
    unowned let server: NBDServer
    private var registration: UInt64 = 0

    init(fd: Int32, server: NBDServer, loop: EventLoop, address: ListenAddress) {
        self.fd = fd
        self.server = server
        self.loop = loop
        self.address = address
    }

    func start() {
        assert(loop.inLoopThread, "Listener used off its event loop")
        registration = loop.register(fd: fd, events: clinux_EPOLLIN, handler: self)
    }

    func stop() {
        loop.unregister(fd: fd, id: registration)
        Glibc.close(fd)
        if case .unix(let path) = address { unlink(path) }
    }

    func handleEvents(_ events: UInt32) {
        assert(loop.inLoopThread, "Listener used off its event loop")
        var n = 0
        while n < 64, let client = Sockets.accept(fd) {
            n += 1
            server.accepted(fd: client, peer: "\(address)#\(client)")
        }
    }
}
