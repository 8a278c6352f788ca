import BlockCore
import CLinux
import CRBD
import EventLoop
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// librbd and librados, loaded the first time an rbd node opens (`CRBD`).
enum RBDLibrary {
    private struct Loaded: Sendable {
        let api: blockd_rbd_api?
        let error: String
    }

    private static let loaded: Loaded = {
        var why: UnsafePointer<CChar>?
        guard let p = blockd_rbd_load(&why) else {
            return Loaded(api: nil, error: why.map { String(cString: $0) } ?? "unknown error")
        }
        return Loaded(api: p.pointee, error: "")
    }()

    static func api() throws(BlockError) -> blockd_rbd_api {
        guard let api = loaded.api else {
            throw BlockError.notSupported("the rbd driver needs librbd and librados (Debian packages librbd1, librados2): \(loaded.error)")
        }
        return api
    }

    /// librbd before 1.17 reports wrong offsets from a fast-diff object map for a start that
    /// is not object-aligned (Ceph tracker 53784): the version loaded, not the one built with.
    static let needsDiffOffsetWorkaround: Bool = {
        guard let api = loaded.api else { return true }
        var major: Int32 = 0, minor: Int32 = 0, extra: Int32 = 0
        api.rbd_version(&major, &minor, &extra)
        return (major, minor) < (1, 17)
    }()
}

/// What an `rbd` node opens: the options plus what the block layer decides.
struct RBDOpenConfig: Sendable, Equatable {
    var options: RBDOptions
    var readOnly: Bool
    /// librbd's cache (`rbd_cache`): on unless `cache.direct=on`, as in QEMU.
    var cache: Bool
    /// The key of `key-secret`, as base64 text (Ceph's `key` option).
    var key: String?
}

/// Writable images open in this process, by identity (`RBDImageHandle.identity`): a second
/// writable node of one image is refused even when the image lacks the exclusive-lock
/// feature (librbd's lock then covers other processes too).
enum RBDWritableImages {
    private static let open = Mutex<Set<String>>([])

    static func claim(_ identity: String) -> Bool {
        open.withLock { $0.insert(identity).inserted }
    }

    static func release(_ identity: String) {
        _ = open.withLock { $0.remove(identity) }
    }
}

/// What the users of each RBD image in this daemon take and share: the graph's permissions
/// on every `rbd` node of the image (`RBDDriver.setPermissions`), by image identity. It does
/// between the nodes of one image what the file driver's OFD lock bytes do between the nodes
/// (and processes) of one file (QEMU's `raw_check_perm`): a node whose users would take what
/// the users of another node of the same image do not share is refused, and so is one that
/// would stop sharing what another node's users take. Nodes of a snapshot are an image of
/// their own (its data never changes). Other processes are kept off by librbd's exclusive lock.
enum RBDImageUsers {
    private static let table = Mutex<[String: [ObjectIdentifier: PermissionPair]]>([:])

    /// Records `owner`'s users' permissions on `identity`, after checking them against the
    /// other nodes' (only a tightening is checked: loosening never fails). On a conflict
    /// nothing changes and the error names the first permission in QEMU's order, in the
    /// words of QEMU's image locks.
    static func claim(_ identity: String, _ owner: ObjectIdentifier, _ p: PermissionPair, spec: String) throws(BlockError) {
        try table.withLock { (t) throws(BlockError) in
            var users = t[identity] ?? [:]
            let old = users[owner] ?? .none
            if !old.perm.isSuperset(of: p.perm) || !p.shared.isSuperset(of: old.shared) {
                var othersPerm: BlockPermissions = []
                var othersShared: BlockPermissions = .all
                for (o, q) in users where o != owner {
                    othersPerm.formUnion(q.perm)
                    othersShared.formIntersection(q.shared)
                }
                let bits: [BlockPermissions] = [.consistentRead, .write, .writeUnchanged, .resize]
                if let bit = bits.first(where: { p.perm.contains($0) && !othersShared.contains($0) }) {
                    throw BlockError(EBUSY, "Failed to get \"\(bit.names)\" lock on RBD image '\(spec)': another node of this daemon on the image does not share it")
                }
                if let bit = bits.first(where: { othersPerm.contains($0) && !p.shared.contains($0) }) {
                    throw BlockError(EBUSY, "Failed to get shared \"\(bit.names)\" lock on RBD image '\(spec)': another node of this daemon on the image takes it")
                }
            }
            users[owner] = p == .none ? nil : p
            t[identity] = users.isEmpty ? nil : users
        }
    }

    /// Ends `owner`'s use of `identity` (its node closed).
    static func release(_ identity: String, _ owner: ObjectIdentifier) {
        table.withLock { t in
            t[identity]?[owner] = nil
            if t[identity]?.isEmpty == true { t[identity] = nil }
        }
    }
}

/// One opened image with the cluster connection it lives on (`rados_t`, pool context, image
/// handle). Owned by an `RBDDriver` (or a preparation not yet taken) and closed once.
///
/// Thread safety: every field is written while opening, before the handle is shared, and read
/// only afterwards; librbd's calls are thread-safe. `close` runs once (`closed`).
final class RBDImageHandle: @unchecked Sendable {
    let api: blockd_rbd_api
    let config: RBDOpenConfig
    private(set) var cluster: rados_t?
    private(set) var ioctx: rados_ioctx_t?
    private(set) var image: rbd_image_t?
    /// The size when the image opened (the driver tracks it afterwards).
    private(set) var size: UInt64 = 0
    private(set) var objectSize: UInt64 = 4 << 20
    private(set) var features: UInt64 = 0
    private(set) var hasParent = false
    /// `mon_host` as the configuration resolved it, for messages.
    private(set) var monitors = ""
    /// `fsid/pool-id/namespace/image-id[@snapshot]`: which image this is, whatever name or
    /// monitors it was opened with (`RBDWritableImages`, `RBDImageUsers`).
    private(set) var identity = ""
    /// True while this handle holds the in-process write claim on `identity`.
    private var writeClaim = false
    private(set) var holdsExclusiveLock = false
    /// The eventfd librbd signals completions on (`rbd_set_image_notification`).
    private(set) var eventFD: Int32 = -1
    private let closed = Atomic<Bool>(false)

    var spec: String { config.options.spec }

    /// Highest `client_mount_timeout` an open waits for the monitors (Ceph's default is 300 s);
    /// a lower configured value is kept. The OSD part of the open (pool, header, lock) gets as
    /// long again.
    static let maxMountTimeout = 30.0

    private init(api: blockd_rbd_api, config: RBDOpenConfig) {
        self.api = api
        self.config = config
    }

    deinit { close() }

    // MARK: opening

    /// How far an open got, for the message of one that did not finish in time.
    private enum Phase: Int {
        case configuring, connecting, opening
    }

    /// The state shared by an open's thread and the caller waiting for it.
    private final class Attempt: Sendable {
        struct State {
            var result: Result<RBDImageHandle, BlockError>?
            var phase = Phase.configuring
            var deadline: UInt64
            var abandoned = false
            var monitors = ""
        }
        let state: Mutex<State>
        /// Wakes the waiter; `state` changes before a broadcast under it, so none is lost.
        let signal = ConditionLock()

        init(deadline: UInt64) { state = Mutex(State(deadline: deadline)) }

        func update(_ body: (inout State) -> Void) {
            state.withLock { body(&$0) }
        }
    }

    /// Connects and opens the image on a thread of its own and waits at most a bounded time
    /// (`client_mount_timeout` for the monitors, as long again for the OSDs). An open that
    /// runs out of time is abandoned: its thread releases whatever it got when librados returns.
    /// Blocks the calling (control) thread; never called on an event loop.
    static func open(_ config: RBDOpenConfig) throws(BlockError) -> RBDImageHandle {
        let api = try RBDLibrary.api()
        let start = monotonicNanos()
        let attempt = Attempt(deadline: start + UInt64(2 * maxMountTimeout * 1e9) + 5_000_000_000)
        OSThread.start(name: "rbd-open") {
            let handle = RBDImageHandle(api: api, config: config)
            let outcome: Result<RBDImageHandle, BlockError>
            do throws(BlockError) {
                try handle.connect(attempt)
                outcome = .success(handle)
            } catch {
                outcome = .failure(error)
            }
            let keep = attempt.state.withLock { s -> Bool in
                if s.abandoned { return false }
                s.result = outcome
                return true
            }
            attempt.signal.withLock { attempt.signal.broadcast() }
            // A failed attempt is answered first and cleaned up after: shutting down a client
            // whose monitors never answered can itself take seconds.
            if case .failure = outcome {
                handle.close()
            } else if !keep {
                Log.warning("rbd: an open of '\(config.options.spec)' finished after blockd gave up on it; closing it")
                handle.close()
            }
        }
        attempt.signal.withLock {
            while true {
                let (done, deadline) = attempt.state.withLock { ($0.result != nil, $0.deadline) }
                let now = monotonicNanos()
                if done || now >= deadline { break }
                _ = attempt.signal.wait(seconds: min(0.5, Double(deadline - now) / 1e9))
            }
        }
        let outcome = attempt.state.withLock { s -> Result<RBDImageHandle, BlockError> in
            if let result = s.result { return result }
            s.abandoned = true
            let waited = Int(Double(monotonicNanos() - start) / 1e9)
            switch s.phase {
            case .configuring, .connecting:
                let at = s.monitors.isEmpty ? "" : " at \(s.monitors)"
                return .failure(BlockError(ETIMEDOUT, "error connecting to the Ceph monitors\(at): no answer within \(waited) s"))
            case .opening:
                return .failure(BlockError(ETIMEDOUT, "error opening RBD image '\(config.options.spec)': the cluster did not answer within \(waited) s (are its OSDs up?)"))
            }
        }
        return try outcome.get()
    }

    private func fail(_ r: Int32, _ what: String) -> BlockError {
        BlockError(-r, "\(what): \(String(cString: strerror(-r)))")
    }

    private func confGet(_ key: String) -> String? {
        guard let cluster else { return nil }
        var buffer = [CChar](repeating: 0, count: 4096)
        guard api.rados_conf_get(cluster, key, &buffer, buffer.count) == 0 else { return nil }
        return cString(buffer)
    }

    /// The open itself, on the open's thread (QEMU's `qemu_rbd_connect` and `qemu_rbd_open`).
    private func connect(_ attempt: Attempt) throws(BlockError) {
        let o = config.options
        var c: rados_t?
        var r = api.rados_create(&c, o.user)
        if r < 0 { throw fail(r, "error initializing") }
        cluster = c
        // blockd reports failures itself, with context: librados' own lines on stderr would
        // only repeat them (a configuration file may turn them back on).
        _ = api.rados_conf_set(c, "err_to_stderr", "false")
        _ = api.rados_conf_set(c, "log_to_stderr", "false")
        // No conf: try the default locations, and ignore a failure (as QEMU).
        r = api.rados_conf_read_file(c, o.conf)
        if o.conf != nil && r < 0 { throw fail(r, "error reading conf file \(o.conf!)") }
        for pair in o.confPairs {
            r = api.rados_conf_set(c, pair.key, pair.value)
            if r < 0 { throw BlockError.invalid("invalid conf option \(pair.key): \(String(cString: strerror(-r)))") }
        }
        if !o.servers.isEmpty {
            r = api.rados_conf_set(c, "mon_host", o.servers.map(\.monHost).joined(separator: ";"))
            if r < 0 { throw fail(r, "error setting the monitor addresses") }
        }
        if let key = config.key {
            r = api.rados_conf_set(c, "key", key)
            if r < 0 { throw fail(r, "Could not set 'key'") }
        }
        if let modes = o.authClientRequired {
            r = api.rados_conf_set(c, "auth_client_required", modes.joined(separator: ";"))
            if r < 0 { throw fail(r, "Could not set 'auth_client_required'") }
        }
        _ = api.rados_conf_set(c, "rbd_cache", config.cache ? "true" : "false")
        // A monitor that does not answer must not hold an open for Ceph's 300 s.
        var mount = RBDImageHandle.maxMountTimeout
        if let text = confGet("client_mount_timeout"), let configured = Double(text), configured > 0 {
            mount = min(configured, mount)
        }
        mount = max(1, mount.rounded(.up))
        // A `secs` option: whole seconds only ("30.0" is refused).
        r = api.rados_conf_set(c, "client_mount_timeout", String(Int(mount)))
        if r < 0 { throw fail(r, "Could not set 'client_mount_timeout'") }
        monitors = confGet("mon_host") ?? ""
        let user = confGet("name") ?? "client.\(o.user ?? "admin")"
        let monitorList = monitors
        attempt.update {
            $0.phase = .connecting
            $0.monitors = monitorList
            $0.deadline = monotonicNanos() + UInt64(2 * mount * 1e9) + 2_000_000_000
        }
        r = api.rados_connect(c)
        if r < 0 {
            let where_ = monitors.isEmpty ? "" : " (monitors \(monitors))"
            switch -r {
            case ENOENT where monitors.isEmpty:
                throw BlockError(ENOENT, "error connecting: no Ceph monitors configured (give 'server', or 'conf' with 'mon host')")
            case ETIMEDOUT:
                throw BlockError(ETIMEDOUT, "error connecting to the Ceph monitors\(monitors.isEmpty ? "" : " at \(monitors)"): no answer within \(Int(mount)) s")
            case EACCES, EPERM:
                throw BlockError(EACCES, "error connecting\(where_) as \(user): \(String(cString: strerror(-r))) (wrong user or key?)")
            default:
                throw fail(r, "error connecting\(where_) as \(user)")
            }
        }
        attempt.update { $0.phase = .opening }
        var io: rados_ioctx_t?
        r = api.rados_ioctx_create(c, o.pool, &io)
        if r < 0 { throw fail(r, "error opening pool \(o.pool)") }
        ioctx = io
        if let ns = o.namespace, !ns.isEmpty {
            var exists = false
            r = api.rbd_namespace_exists(io, ns, &exists)
            if r < 0 { throw fail(r, "error checking namespace") }
            if !exists { throw BlockError(ENOENT, "namespace '\(ns)' does not exist") }
        }
        api.rados_ioctx_set_namespace(io, o.namespace)
        var img: rbd_image_t?
        r = config.readOnly ? api.rbd_open_read_only(io, o.image, &img, o.snapshot) : api.rbd_open(io, o.image, &img, o.snapshot)
        if r < 0 {
            if -r == ENOENT, let snap = o.snapshot {
                // Tell a missing snapshot from a missing image.
                var probe: rbd_image_t?
                if api.rbd_open_read_only(io, o.image, &probe, nil) == 0 {
                    _ = api.rbd_close(probe)
                    throw BlockError(ENOENT, "error reading header from \(o.image): snapshot '\(snap)' does not exist")
                }
            }
            throw fail(r, "error reading header from \(o.image)")
        }
        image = img
        var info = rbd_image_info_t()
        r = api.rbd_stat(img, &info, MemoryLayout<rbd_image_info_t>.size)
        if r < 0 { throw fail(r, "error getting image info from \(o.image)") }
        size = info.size
        objectSize = max(info.obj_size, 4096)
        _ = api.rbd_get_features(img, &features)
        var parent = rbd_linked_image_spec_t()
        var parentSnap = rbd_snap_spec_t()
        if api.rbd_get_parent(img, &parent, &parentSnap) == 0 {
            hasParent = true
            api.rbd_linked_image_spec_cleanup(&parent)
            api.rbd_snap_spec_cleanup(&parentSnap)
        }
        var fsid = [CChar](repeating: 0, count: 64)
        _ = api.rados_cluster_fsid(c, &fsid, fsid.count)
        var id = [CChar](repeating: 0, count: 64)
        _ = api.rbd_get_id(img, &id, id.count)
        identity = "\(cString(fsid))/\(api.rados_ioctx_get_id(io))/\(o.namespace ?? "")/\(cString(id))"
        if let snap = o.snapshot { identity += "@" + snap }
        if !config.readOnly { try claimWriter() }
        let fd = eventfd(0, clinux_EFD_NONBLOCK | clinux_EFD_CLOEXEC)
        if fd < 0 { throw BlockError.system("eventfd for rbd completions") }
        eventFD = fd
        r = api.rbd_set_image_notification(img, fd, blockd_EVENT_TYPE_EVENTFD)
        if r < 0 { throw fail(r, "error setting up completion notification for \(o.image)") }
    }

    /// Refuses a second writer: in this process by identity, elsewhere by librbd's exclusive
    /// lock (held for as long as the node is open; other clients' writes then fail).
    private func claimWriter() throws(BlockError) {
        guard let image else { return }
        guard RBDWritableImages.claim(identity) else {
            throw BlockError(EBUSY, "RBD image '\(spec)' is already open writable in this daemon; a second writable node is refused (open it read-only)")
        }
        writeClaim = true
        guard features & blockd_RBD_FEATURE_EXCLUSIVE_LOCK != 0 else { return }
        let r = api.rbd_lock_acquire(image, rbd_lock_mode_t(UInt32(blockd_RBD_LOCK_MODE_EXCLUSIVE)))
        if r < 0 {
            var owners = ""
            var mode = rbd_lock_mode_t(0)
            var names = [UnsafeMutablePointer<CChar>?](repeating: nil, count: 8)
            var count = names.count
            if api.rbd_lock_get_owners(image, &mode, &names, &count) == 0 {
                owners = names.prefix(count).compactMap { $0.map { String(cString: $0) } }.joined(separator: ", ")
                api.rbd_lock_get_owners_cleanup(&names, count)
            }
            if -r == EROFS || -r == EBUSY {
                throw BlockError(EBUSY, "RBD image '\(spec)' is in use: another client\(owners.isEmpty ? "" : " (\(owners))") holds its exclusive lock; a second writer is refused (open it read-only)")
            }
            throw fail(r, "error acquiring the exclusive lock of RBD image '\(spec)'")
        }
        holdsExclusiveLock = true
    }

    // MARK: closing

    /// Releases the lock, the image, the pool context and the cluster connection. Blocks
    /// until librbd has finished (control or open thread only).
    func close() {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        if let image {
            if holdsExclusiveLock { _ = api.rbd_lock_release(image) }
            _ = api.rbd_close(image)
        }
        if let ioctx { api.rados_ioctx_destroy(ioctx) }
        if let cluster { api.rados_shutdown(cluster) }
        if writeClaim { RBDWritableImages.release(identity) }
        if eventFD >= 0 { Glibc.close(eventFD) }
        image = nil
        ioctx = nil
        cluster = nil
        writeClaim = false
        eventFD = -1
    }

    // MARK: while open

    /// Changes the image's size (`rbd_resize`); blocks on the cluster.
    func resize(to newSize: UInt64) throws(BlockError) {
        let r = api.rbd_resize(image, newSize)
        if r < 0 { throw fail(r, "Failed to resize RBD image '\(spec)'") }
    }
}

/// The text of a NUL-terminated C string in `buffer`.
func cString(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A preparation of an `rbd` open (`BlockdevFactory.prepare`): the handle, or why it failed.
final class RBDPrepared: PreparedResource {
    /// What the open was for; an opener that decides otherwise discards it and opens itself.
    let config: RBDOpenConfig
    /// Handed out once: to the opener that takes it, or to `discard`.
    let result: Result<RBDImageHandle, BlockError>

    init(_ config: RBDOpenConfig, _ result: Result<RBDImageHandle, BlockError>) {
        self.config = config
        self.result = result
    }

    func discard() {
        if case .success(let handle) = result { handle.close() }
    }
}
