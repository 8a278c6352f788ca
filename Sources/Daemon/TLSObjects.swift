import BlockCore
import BlockDrivers
import EventLoop
import Glibc
import JSON
import NBDServer
import Synchronization
import TLS

/// QEMU's user-creatable objects for TLS: `tls-creds-x509`, `tls-creds-psk` and
/// `authz-simple` (`--object`, `object-add`, `object-del`). Throttle groups live in
/// `ThrottleGroups` and secrets in `SecretStore`; all share one id namespace, as QEMU's
/// `/objects` container does.
/// Changed only by control-plane calls (start-up, QMP under its control lock); read also
/// while an `nbd` node opens. The table sits behind a mutex, so any thread may ask.
final class TLSObjects: Sendable {
    enum Object: Sendable {
        case credentials(qomType: String, TLSCredentials)
        case authz(TLSAuthorization)
    }

    static let types: Set<String> = ["tls-creds-x509", "tls-creds-psk", "authz-simple"]

    private struct Table {
        var objects: [String: Object] = [:]
        /// Ids the running NBD server uses (object-del refuses them).
        var inUse: Set<String> = []
    }
    private let table = Mutex(Table())

    private var objects: [String: Object] { table.withLock { $0.objects } }

    /// Ids the running NBD server uses (object-del refuses them).
    var inUse: Set<String> {
        get { table.withLock { $0.inUse } }
        set { table.withLock { $0.inUse = newValue } }
    }

    func contains(_ id: String) -> Bool { objects[id] != nil }

    /// Whether a throttle group or a secret has `id` (the namespace TLS objects share).
    static func otherObjectExists(_ id: String) -> Bool {
        ThrottleGroups.shared.group(id) != nil || SecretStore.shared.contains(id)
    }

    func add(type: String, options: JSONObject) throws(BlockError) {
        guard let id = options["id"]?.stringValue else { throw BlockError.invalid("Parameter 'id' is missing") }
        if objects[id] != nil || TLSObjects.otherObjectExists(id) {
            throw BlockError.invalid("attempt to add duplicate property '\(id)' to object (type 'container')")
        }
        let object: Object
        do throws(TLSError) {
            object = try TLSObjects.make(type: type, options: options)
        } catch {
            throw BlockError.invalid(error.message)
        }
        let added = table.withLock { t -> Bool in
            if t.objects[id] != nil { return false }
            t.objects[id] = object
            return true
        }
        if !added { throw BlockError.invalid("attempt to add duplicate property '\(id)' to object (type 'container')") }
    }

    /// Removes `id`; false if no TLS object has it. In use: QEMU's refusal.
    func remove(_ id: String) throws(BlockError) -> Bool {
        let outcome = table.withLock { t -> Bool? in
            guard t.objects[id] != nil else { return false }
            if t.inUse.contains(id) { return nil }
            t.objects[id] = nil
            return true
        }
        guard let outcome else { throw BlockError(EBUSY, "object '\(id)' is in use, can not be deleted") }
        return outcome
    }

    /// The server side of `tls-creds` / `tls-authz`, with QEMU's messages.
    func serverPolicy(creds: String?, authz: String?) throws(DaemonError) -> TLSServerPolicy? {
        guard let creds else {
            if authz != nil { throw DaemonError("tls-authz is not permitted without tls-creds") }
            return nil
        }
        guard let object = objects[creds] else {
            if TLSObjects.otherObjectExists(creds) { throw DaemonError("Object with id '\(creds)' is not TLS credentials") }
            throw DaemonError("No TLS credentials with id '\(creds)'")
        }
        guard case .credentials(_, let credentials) = object else {
            throw DaemonError("Object with id '\(creds)' is not TLS credentials")
        }
        guard credentials.endpoint == .server else { throw DaemonError("Expected TLS credentials for a server endpoint") }
        var authorization: TLSAuthorization?
        if let authz {
            guard let a = objects[authz] else { throw DaemonError("Cannot find QAuthZ object ID \(authz)") }
            guard case .authz(let rule) = a else { throw DaemonError("Object '\(authz)' is not a QAuthZ subclass") }
            // QEMU checks no identity when the certificate is not verified, and lets every
            // client in; refusing the combination is safer.
            if credentials.kind == .x509 && !credentials.verifyPeer {
                throw DaemonError("tls-authz '\(authz)' needs tls-creds '\(creds)' with verify-peer=on: without it no client identity is checked")
            }
            authorization = rule
        }
        return TLSServerPolicy(credentials: credentials, authorization: authorization)
    }

    /// Client credentials for an outgoing connection (the `nbd` block driver's `tls-creds`),
    /// with QEMU's messages.
    func clientCredentials(_ id: String) throws(DaemonError) -> TLSCredentials {
        guard case .credentials(_, let credentials)? = objects[id] else {
            let exists = objects[id] != nil || TLSObjects.otherObjectExists(id)
            throw DaemonError(exists ? "Object with id '\(id)' is not TLS credentials" : "No TLS credentials with id '\(id)'")
        }
        guard credentials.endpoint == .client else { throw DaemonError("Expected TLS credentials for a client endpoint") }
        return credentials
    }

    // MARK: properties

    static func make(type: String, options: JSONObject) throws(TLSError) -> Object {
        var props = options
        props["qom-type"] = nil
        props["id"] = nil
        func take(_ key: String) -> JSONValue? {
            defer { props[key] = nil }
            return props[key]
        }
        func string(_ key: String) throws(TLSError) -> String? {
            guard let v = take(key) else { return nil }
            if case .string(let s) = v { return s }
            throw TLSError("Invalid parameter type for '\(key)', expected: string")
        }
        func bool(_ key: String) throws(TLSError) -> Bool? {
            guard let v = take(key) else { return nil }
            switch v {
            case .bool(let b): return b
            case .string("on"), .string("yes"), .string("true"): return true
            case .string("off"), .string("no"), .string("false"): return false
            default: throw TLSError("Parameter '\(key)' expects 'on' or 'off'")
            }
        }
        func finish() throws(TLSError) {
            if let key = props.keys.sorted().first { throw TLSError("Property '\(type).\(key)' not found") }
        }

        if type == "authz-simple" {
            guard let identity = try string("identity") else { throw TLSError("Parameter 'identity' is missing") }
            try finish()
            return .authz(TLSAuthorization(id: options["id"]?.stringValue ?? "", identity: identity))
        }
        let endpointText = try string("endpoint") ?? "client"
        guard let endpoint = TLSEndpoint(rawValue: endpointText) else {
            throw TLSError("Parameter 'endpoint' does not accept value '\(endpointText)'")
        }
        let dir = try string("dir")
        let priority = try string("priority")
        let verifyPeer = try bool("verify-peer") ?? true
        _ = try bool("loaded")   // deprecated in QEMU; credentials are always loaded at creation
        let credentials: TLSCredentials
        if type == "tls-creds-x509" {
            let sanityCheck = try bool("sanity-check") ?? true
            if take("passwordid") != nil {
                throw TLSError("blockd does not support passwordid (encrypted private keys): decrypt the key file instead")
            }
            try finish()
            guard let dir else { throw TLSError("Missing 'dir' property value") }
            credentials = try TLSCredentials.x509(directory: dir, endpoint: endpoint, verifyPeer: verifyPeer,
                                                  priority: priority, sanityCheck: sanityCheck)
        } else {
            let username = try string("username")
            try finish()
            guard let dir else { throw TLSError("Missing 'dir' property value") }
            credentials = try TLSCredentials.psk(keyFile: dir + "/keys.psk", endpoint: endpoint, username: username,
                                                 priority: priority)
        }
        return .credentials(qomType: type, credentials)
    }
}

/// `tls-creds` of the `nbd` block driver: client credentials from the daemon's `TLSObjects`,
/// sessions from the TLS module.
///
/// Read only while a node opens, which happens on the control thread; `clientSessions`
/// checks that it is not on an event loop.
final class NBDClientTLSObjects: NBDClientTLSProvider {
    private let objects: TLSObjects

    init(_ objects: TLSObjects) { self.objects = objects }

    func clientSessions(credentials id: String) throws(BlockError) -> any NBDClientTLSSessions {
        precondition(EventLoop.current == nil, "nbd nodes open on the control thread")
        do throws(DaemonError) {
            return NBDClientCredentials(credentials: try objects.clientCredentials(id))
        } catch {
            throw BlockError.invalid(error.message)
        }
    }
}

/// Client credentials an `nbd` node holds (immutable, so any loop may make sessions from them).
struct NBDClientCredentials: NBDClientTLSSessions {
    let credentials: TLSCredentials

    func session(fd: Int32, hostname: String?) throws(BlockError) -> any NBDTransport {
        do throws(TLSError) {
            return TLSClientTransport(try TLSSession(fd: fd, credentials: credentials, hostname: hostname))
        } catch {
            throw BlockError(EPROTO, error.message)
        }
    }
}

/// The TLS module's session as the `nbd` driver's transport: the session never touches the
/// socket except through its buffers, so the driver's event loop drives it like a socket.
/// Used by one loop thread at a time, as `TLSSession` requires.
final class TLSClientTransport: NBDTransport {
    let session: TLSSession

    init(_ session: TLSSession) { self.session = session }

    func receive(into buffer: UnsafeMutableRawPointer, count: Int) -> Int {
        session.receive(into: buffer, count: count)
    }

    func send(iovecs: UnsafePointer<iovec>, count: Int) -> Int {
        session.send(iovecs: iovecs, count: count)
    }

    func handshake() -> NBDTransportProgress {
        switch session.handshake() {
        case .done: return .done
        case .wouldBlock: return .wouldBlock
        case .failed: return .failed
        }
    }

    var wantsWrite: Bool { session.wantsWrite }
    func flush() { session.flush() }
    var hasBufferedInput: Bool { session.hasBufferedInput }
    func shutdown() { session.bye() }
    var failure: String? { session.failure }
}
