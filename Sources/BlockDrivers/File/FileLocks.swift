import BlockCore
import CLinux
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension FileDriver {
    /// The graph's permissions: their bits are QEMU's `BLK_PERM_*`, which the lock bytes count.
    public typealias Permissions = BlockPermissions

    /// Adds (or replaces) `owner`'s use of this file (the graph is the one owner:
    /// `setPermissions`) and takes the OFD locks of the union of all uses, as QEMU's `raw_check_perm`/`raw_set_perm`: lock bytes 100+i for permissions
    /// held and 200+i for permissions not shared, after checking that no other open file
    /// description holds a conflicting byte. On a conflict nothing changes and the error is
    /// QEMU's (`Failed to get "write" lock`, with its hint).
    public func claim(_ owner: ObjectIdentifier, perm: Permissions, shared: Permissions) throws(BlockError) {
        let shared = options.forceShare ? Permissions.all : shared
        try locks.withLock { (l) throws(BlockError) in
            let old = l.claims[owner]
            l.claims[owner] = (perm, shared)
            do throws(BlockError) { try l.apply(fd: fd, path: path) } catch {
                l.claims[owner] = old
                throw error
            }
        }
    }

    /// Ends `owner`'s use; locks nobody needs any more are released.
    public func release(_ owner: ObjectIdentifier) {
        locks.withLock { l in
            guard l.claims.removeValue(forKey: owner) != nil else { return }
            try? l.apply(fd: fd, path: path)
        }
    }

    /// The permissions held and shared by this node's users, as the locks show them.
    public var lockedPermissions: (perm: Permissions, shared: Permissions) {
        locks.withLock { ($0.perm, $0.shared) }
    }
}

/// The OFD lock state of one file descriptor (QEMU's `BDRVRawState` perm/locked fields).
struct FileLocks {
    typealias Permissions = FileDriver.Permissions
    let enabled: Bool
    var claims: [ObjectIdentifier: (perm: Permissions, shared: Permissions)] = [:]
    /// Permissions in effect (their bytes locked, if enabled).
    var perm: Permissions = []
    var shared: Permissions = .all
    /// Bytes 100+i locked on the descriptor.
    var lockedPerm: Permissions = []
    /// Bytes 200+i locked on the descriptor (the permission is not shared).
    var lockedUnshared: Permissions = []

    static let permBase: Int64 = 100
    static let sharedBase: Int64 = 200

    init(enabled: Bool) { self.enabled = enabled }

    /// Brings the locks in line with the union of the claims (QEMU's `raw_handle_perm_lock`:
    /// prepare, check, commit; abort on a conflict).
    mutating func apply(fd: Int32, path: String) throws(BlockError) {
        var newPerm: Permissions = []
        var newShared: Permissions = .all
        for c in claims.values {
            newPerm.formUnion(c.perm)
            newShared.formIntersection(c.shared)
        }
        if !enabled {
            perm = newPerm
            shared = newShared
            return
        }
        if perm.union(newPerm) != perm || shared.intersection(newShared) != shared {
            do throws(BlockError) {
                try lockBytes(fd: fd, perm: perm.union(newPerm), unshared: Permissions.all.subtracting(shared.intersection(newShared)),
                              unlock: false)
                try check(fd: fd, perm: newPerm, shared: newShared, path: path)
            } catch {
                try? lockBytes(fd: fd, perm: perm, unshared: Permissions.all.subtracting(shared), unlock: true)
                throw error
            }
        }
        try? lockBytes(fd: fd, perm: newPerm, unshared: Permissions.all.subtracting(newShared), unlock: true)
        perm = newPerm
        shared = newShared
    }

    private static func bits() -> [Permissions] {
        [.consistentRead, .write, .writeUnchanged, .resize]
    }

    /// QEMU's `raw_apply_lock_bytes`: shared OFD locks on the bytes of `perm` (100+i) and of
    /// `unshared` (200+i); with `unlock`, releases the bytes no longer wanted.
    private mutating func lockBytes(fd: Int32, perm: Permissions, unshared: Permissions, unlock: Bool) throws(BlockError) {
        try FileLocks.lockBytes(fd: fd, base: FileLocks.permBase, want: perm, locked: &lockedPerm, unlock: unlock)
        try FileLocks.lockBytes(fd: fd, base: FileLocks.sharedBase, want: unshared, locked: &lockedUnshared, unlock: unlock)
    }

    /// One range of lock bytes (base+i for permission bit i): locks the bits of `want` not yet
    /// in `locked` and, with `unlock`, releases those of `locked` no longer in `want`.
    private static func lockBytes(fd: Int32, base: Int64, want: Permissions, locked: inout Permissions,
                                  unlock: Bool) throws(BlockError) {
        for (i, bit) in FileLocks.bits().enumerated() {
            let off = base + Int64(i)
            if want.contains(bit) && !locked.contains(bit) {
                let r = clinux_ofd_lock(fd, off, 0)
                if r != 0 { throw FileLocks.lockError("Failed to lock byte \(off)", -r) }
                locked.insert(bit)
            } else if unlock && locked.contains(bit) && !want.contains(bit) {
                let r = clinux_ofd_unlock(fd, off)
                if r != 0 { throw BlockError(-r, "Failed to unlock byte \(off)") }
                locked.remove(bit)
            }
        }
    }

    /// QEMU's `raw_check_lock_bytes`: nobody else may have locked "not shared" for what we
    /// take (200+i), nor hold what we do not share (100+i).
    private func check(fd: Int32, perm: Permissions, shared: Permissions, path: String) throws(BlockError) {
        let hint = "Is another process using the image [\(path)]?"
        for (i, bit) in FileLocks.bits().enumerated() where perm.contains(bit) {
            let r = clinux_ofd_test(fd, FileLocks.sharedBase + Int64(i), 1)
            if r != 0 {
                var e = FileLocks.lockError("Failed to get \"\(bit.names)\" lock", -r)
                e.hint = hint
                throw e
            }
        }
        for (i, bit) in FileLocks.bits().enumerated() where !shared.contains(bit) {
            let r = clinux_ofd_test(fd, FileLocks.permBase + Int64(i), 1)
            if r != 0 {
                var e = FileLocks.lockError("Failed to get shared \"\(bit.names)\" lock", -r)
                e.hint = hint
                throw e
            }
        }
    }

    /// QEMU's `raw_lock_error_setg_errno`: EAGAIN and EACCES (someone holds the byte) are not
    /// spelled out; other errors are.
    private static func lockError(_ message: String, _ code: Int32) -> BlockError {
        if code == EAGAIN || code == EACCES { return BlockError(EBUSY, message) }
        return BlockError(code, "\(message): \(String(cString: strerror(code)))")
    }
}
