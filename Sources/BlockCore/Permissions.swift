/// What a user of a node (a parent node's edge, an export, a job) does with it, and what it
/// lets other users do: QEMU's `BLK_PERM_*` (`include/block/block-common.h`).
///
/// Every edge into a node takes some permissions (`perm`) and shares some (`shared`); two
/// users of one node conflict when one takes what the other does not share. `BlockGraph`
/// checks that in one place whenever an edge is made or changed. QEMU 7.2 has no `graph-mod`
/// permission any more (it was replaced by frozen links, `BlockChild.frozenBy`); blockd
/// follows 7.2.
public struct BlockPermissions: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// The data read is the data written: nobody below changes it behind the reader's back.
    public static let consistentRead = BlockPermissions(rawValue: 0x01)
    /// Guest-visible writes.
    public static let write = BlockPermissions(rawValue: 0x02)
    /// Writes that leave the visible content as it was (copy-on-read, stream copies);
    /// implied by `write`.
    public static let writeUnchanged = BlockPermissions(rawValue: 0x04)
    /// Changing the size.
    public static let resize = BlockPermissions(rawValue: 0x08)

    public static let all: BlockPermissions = [.consistentRead, .write, .writeUnchanged, .resize]
    /// What a filter passes down from its parents (QEMU's `DEFAULT_PERM_PASSTHROUGH`).
    public static let passthrough: BlockPermissions = [.consistentRead, .write, .writeUnchanged, .resize]
    /// What a filter always shares (QEMU's `DEFAULT_PERM_UNCHANGED`: nothing left in 7.2).
    public static let unchanged: BlockPermissions = BlockPermissions.all.subtracting(.passthrough)

    /// QEMU's `bdrv_perm_names`: `"write, resize"`.
    public var names: String {
        var out: [String] = []
        if contains(.consistentRead) { out.append("consistent read") }
        if contains(.write) { out.append("write") }
        if contains(.writeUnchanged) { out.append("write unchanged") }
        if contains(.resize) { out.append("resize") }
        return out.joined(separator: ", ")
    }

    public var description: String { names.isEmpty ? "none" : names }
}

/// A pair of masks: what a user takes and what it lets others take.
public struct PermissionPair: Sendable, Hashable {
    public var perm: BlockPermissions
    public var shared: BlockPermissions
    public init(perm: BlockPermissions, shared: BlockPermissions) {
        self.perm = perm
        self.shared = shared
    }
    /// Takes nothing, shares everything: what a node with no users asks of its children.
    public static let none = PermissionPair(perm: [], shared: .all)
}

/// What an edge is for: QEMU's `BdrvChildRole`. Decides the permissions a parent takes on the
/// child (`BlockPermissions.defaultChildPermissions`).
public struct ChildRole: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// Guest data lives in the child (a format's data, raw with `offset`/`size`).
    public static let data = ChildRole(rawValue: 1 << 0)
    /// The parent's own metadata lives in the child (a format driver's image file).
    public static let metadata = ChildRole(rawValue: 1 << 1)
    /// The child is what a filter filters: the parent passes requests through unchanged.
    public static let filtered = ChildRole(rawValue: 1 << 2)
    /// Copy-on-write backing: read where the parent has no data of its own.
    public static let cow = ChildRole(rawValue: 1 << 3)
    /// The child the parent mostly works on (its `file`).
    public static let primary = ChildRole(rawValue: 1 << 4)

    /// A format driver's image file (qcow2 without an external data file): QEMU's
    /// `BDRV_CHILD_IMAGE`.
    public static let image: ChildRole = [.data, .metadata, .primary]
    /// A filter's child, and raw's file when it covers the whole file.
    public static let filteredPrimary: ChildRole = [.filtered, .primary]
    /// A backing file.
    public static let backing: ChildRole = [.cow]
}

extension BlockPermissions {
    /// QEMU's `bdrv_default_perms`: what a parent whose users take `parent.perm` and share
    /// `parent.shared` takes on a child with `role`. `writable`: the parent node is writable
    /// (format drivers then write their metadata whatever their users do).
    public static func defaultChildPermissions(role: ChildRole, parent: PermissionPair,
                                               writable: Bool) -> PermissionPair {
        if role.contains(.filtered) {
            // bdrv_filter_default_perms: pass the users' permissions through.
            return PermissionPair(perm: parent.perm.intersection(.passthrough),
                                  shared: parent.shared.intersection(.passthrough).union(.unchanged))
        }
        if role.contains(.cow) {
            // bdrv_default_perms_for_cow: consistent read if the users need it, nothing else;
            // a writable, resizable backing file only when the users can live with changing data.
            let perm = parent.perm.intersection(.consistentRead)
            var shared: BlockPermissions = parent.shared.contains(.write) ? [.write, .resize] : []
            shared.formUnion([.consistentRead, .writeUnchanged])
            return PermissionPair(perm: perm, shared: shared)
        }
        // bdrv_default_perms_for_storage: as a filter, plus what the format itself needs.
        var perm = parent.perm.intersection(.passthrough)
        var shared = parent.shared.intersection(.passthrough).union(.unchanged)
        if role.contains(.metadata) {
            if writable { perm.formUnion([.write, .resize]) }
            perm.insert(.consistentRead)
            shared.subtract([.write, .resize])
        }
        if role.contains(.data) {
            shared.remove(.resize)
            if perm.contains(.writeUnchanged) { perm.insert(.write) }
            if perm.contains(.write) { perm.insert(.resize) }
        }
        return PermissionPair(perm: perm, shared: shared)
    }
}

/// How the permissions of some users of a node look from below while a job runs: QEMU puts
/// an implicit filter node above the node (stream's `copy-on-read`, commit's `commit_top`,
/// active commit's `mirror_top`) and moves the node's existing users onto it; that filter
/// passes their permissions on changed. blockd inserts no such node: the job installs the
/// same transformation on the edges QEMU would have moved, so the graph answers permission
/// questions as QEMU does.
public enum PermissionFilter: Sendable, Hashable {
    /// `copy-on-read` (stream): passes consistent read, write and resize, adds write-unchanged.
    case copyOnRead
    /// `commit_top` (intermediate commit): hides its users entirely (takes nothing, shares all).
    case commitTop
    /// `mirror_top` of an active commit: passes through, minus consistent read, sharing write.
    case commitMirrorTop
    /// `mirror_top` of `blockdev-mirror`: a plain filter (QEMU's `bdrv_default_perms`).
    case mirrorTop

    public func apply(_ p: PermissionPair) -> PermissionPair {
        switch self {
        case .copyOnRead:
            return PermissionPair(perm: p.perm.intersection([.consistentRead, .write, .resize]).union(.writeUnchanged),
                                  shared: p.shared.intersection(.passthrough).union(.unchanged))
        case .commitTop:
            return .none
        case .commitMirrorTop:
            var q = BlockPermissions.defaultChildPermissions(role: .filteredPrimary, parent: p, writable: true)
            q.perm.remove(.consistentRead)
            q.shared.insert(.write)
            return q
        case .mirrorTop:
            return BlockPermissions.defaultChildPermissions(role: .filteredPrimary, parent: p, writable: true)
        }
    }
}
