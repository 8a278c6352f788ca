import BlockCore
import CLinux
import EventLoop
import Glibc
import NBDProtocol
import Synchronization

/// Where the server listens (QAPI `SocketAddress`: unix, inet, or an inherited socket).
public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case inet(host: String, port: String)
    /// A socket the daemon was given: a descriptor number, or the name of a socket-activated
    /// one (`LISTEN_FDNAMES`); see `SocketActivation`.
    case fd(String)

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .inet(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .fd(let name): return "fd:\(name)"
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
    /// Most clients at once (`max-connections`; 0 = no limit). At the limit the server
    /// stops accepting (its listeners leave epoll) until a client leaves; clients that
    /// connect meanwhile wait in the kernel's backlog and are greeted then, as QEMU does.
    /// With a limit of 1, exports do not advertise multi-conn. Set before `listen`.
    public var maxConnections = 0
    /// TLS required of every client (`tls-creds`); set before listening.
    public var tls: TLSServerPolicy?
    /// Seconds a client may take from connecting to entering transmission, the TLS handshake
    /// included (QEMU 9.1's `handshake-max-seconds`, default 10; 0 = no limit). Set before
    /// `listen`.
    public var handshakeMaxSeconds = NBDServer.defaultHandshakeMaxSeconds
    public static let defaultHandshakeMaxSeconds = 10
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
        case .fd(let name):
            let fd = try Sockets.adoptListener(try SocketActivation.descriptor(named: name))
            fds = [fd]
            if case .inet(_, let p)? = Sockets.localAddress(fd) { port = p }
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

    /// True while a new client may be accepted.
    var acceptsMore: Bool {
        maxConnections == 0 || connectionCount.load(ordering: .relaxed) < maxConnections
    }

    func accepted(fd: Int32, peer: String) {
        connectionCount.wrappingAdd(1, ordering: .relaxed)
        let loop = loops.nextLoop()
        loop.execute { [self] in
            let connection = Connection(fd: fd, loop: loop, server: self, peer: peer)
            state.withLock { $0.connections[ObjectIdentifier(connection)] = UnsafeTransfer(connection) }
            connection.start()
        }
    }

    func connectionClosed(_ connection: Connection) {
        let before = connectionCount.wrappingSubtract(1, ordering: .relaxed).oldValue
        _ = state.withLock { $0.connections.removeValue(forKey: ObjectIdentifier(connection)) }
        if maxConnections > 0 && before >= maxConnections {
            // A slot is free: listeners paused at the limit resume (on their loop).
            let listeners = state.withLock { $0.listeners }
            for l in listeners {
                let box = UnsafeTransfer(l)
                l.loop.execute { box.value.resumeIfPaused() }
            }
        }
        onClientClosed?(connection.exportIdentity != nil, before - 1)
    }

    /// Called on a loop thread after each client is gone, with whether it had reached the
    /// transmission phase and how many clients remain (qemu-nbd without `-t` exits after its
    /// last client that got that far). Set before listening.
    public var onClientClosed: (@Sendable (_ negotiated: Bool, _ remaining: Int) -> Void)?

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
///
/// It leaves epoll while the server is at `max-connections` (the waiting clients stay in the
/// kernel's backlog and are greeted once a slot frees) and, for a while, when accept fails
/// for lack of file descriptors or memory (`EMFILE`, `ENFILE`, …): the pending client cannot
/// be taken, and a level-triggered listener would otherwise wake the loop in a tight spin.
final class Listener: EventHandler, @unchecked Sendable {
    // Mutable state is touched on `loop`'s thread only (start/stop/handleEvents/resume are
    // all called there).
    let fd: Int32
    let loop: EventLoop
    let address: ListenAddress
    unowned let server: NBDServer
    private var registration: UInt64 = 0
    private var stopped = false
    private var backoffTimer: UInt64 = 0
    /// Back-off after an exhausted accept: doubles up to one second, reset by a success.
    private var backoff = Listener.minBackoff
    static let minBackoff = 0.05
    static let maxBackoff = 1.0
    private var logLimiter = LogRateLimiter(burst: 3, perSecond: 0.2)

    init(fd: Int32, server: NBDServer, loop: EventLoop, address: ListenAddress) {
        self.fd = fd
        self.server = server
        self.loop = loop
        self.address = address
    }

    func start() {
        assert(loop.inLoopThread, "Listener used off its event loop")
        if stopped { return }
        registration = loop.register(fd: fd, events: clinux_EPOLLIN, handler: self)
    }

    func stop() {
        stopped = true
        pause()
        if backoffTimer != 0 {
            loop.cancelTimer(backoffTimer)
            backoffTimer = 0
        }
        Glibc.close(fd)
        if case .unix(let path) = address { unlink(path) }
    }

    private var isRegistered: Bool { registration != 0 }

    private func pause() {
        if isRegistered {
            loop.unregister(fd: fd, id: registration)
            registration = 0
        }
    }

    /// Re-enters epoll if paused at max-connections and a slot is free now.
    func resumeIfPaused() {
        assert(loop.inLoopThread, "Listener used off its event loop")
        if stopped || isRegistered || backoffTimer != 0 || !server.acceptsMore { return }
        start()
    }

    func handleEvents(_ events: UInt32) {
        assert(loop.inLoopThread, "Listener used off its event loop")
        var n = 0
        while n < 64 && !stopped {
            if !server.acceptsMore {
                pause()
                return
            }
            switch Sockets.acceptClient(fd) {
            case .client(let client):
                n += 1
                backoff = Listener.minBackoff
                server.accepted(fd: client, peer: "\(address)#\(client)")
            case .wouldBlock:
                return
            case .lost:
                continue
            case .exhausted(let code):
                pause()
                let delay = backoff
                backoff = min(Listener.maxBackoff, backoff * 2)
                if logLimiter.allow() {
                    let suppressed = logLimiter.takeSuppressed()
                    Log.warning("accepting on \(address): \(String(cString: strerror(code))); pausing accepts for \(Int(delay * 1000)) ms"
                                + (suppressed > 0 ? " (\(suppressed) similar messages suppressed)" : ""))
                }
                backoffTimer = loop.schedule(after: delay) { [self] in
                    backoffTimer = 0
                    resumeIfPaused()
                }
                return
            }
        }
    }
}
