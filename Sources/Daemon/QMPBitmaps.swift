import BlockCore
import BlockDrivers
import BlockGraph
import EventLoop
import JSON
import NBDServer
import QMP

/// Dirty bitmap commands of qemu-storage-daemon's QMP schema (`block-dirty-bitmap-*`,
/// `transaction` with bitmap actions), with QEMU's error messages.
///
/// Every action is split in two (`GraphTransaction.Action`): `prepare` checks and changes the
/// in-memory state and returns how to undo it; `commit` does the part that cannot be undone
/// (on-disk changes of persistent bitmaps). A transaction prepares all actions, undoes them
/// all if one fails, else commits.
/// A bitmap an export offers (`block-export-add`'s `bitmaps`, QAPI `BlockDirtyBitmapOrStr`).
public enum ExportBitmapRef: Sendable {
    /// Looked up from the export's node down its children.
    case local(String)
    /// That node's bitmap.
    case external(node: String, name: String)
}

extension Daemon {
    typealias BitmapAction = GraphTransaction.Action

    func registerBitmapCommands(on server: QMPServer) {
        for type in Daemon.bitmapActionTypes {
            server.register(type) { [self] args, _ throws(QMPError) in
                let action = try prepareBitmapAction(type, &args)
                do throws(BlockError) { try action.commit() } catch { throw .generic(error.message) }
                return .object([:])
            }
        }
        // `transaction` lives with the backup commands (QMPBackupCommands.swift).
    }

    static let bitmapActionTypes = [
        "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    ]

    func bitmapNode(_ name: String) throws(QMPError) -> BlockNode {
        guard let node = graph.node(named: name) else {
            throw .generic("Cannot find device='\(name)' nor node-name='\(name)'")
        }
        return node
    }

    func findBitmap(node: String, name: String) throws(QMPError) -> (BlockNode, DirtyBitmap) {
        let n = try bitmapNode(node)
        guard let b = n.dirtyBitmap(named: name) else { throw .generic("Dirty bitmap '\(name)' not found") }
        return (n, b)
    }

    /// QEMU's `bdrv_dirty_bitmap_check`: busy, read-only (unless `allowReadOnly`), inconsistent.
    static func checkUsable(_ b: DirtyBitmap, node: BlockNode, allowReadOnly: Bool) throws(QMPError) {
        if b.isBusy {
            throw .generic("Bitmap '\(b.name)' is currently in use by another operation and cannot be used")
        }
        if !allowReadOnly && node.isReadOnly {
            throw .generic("Bitmap '\(b.name)' is readonly and cannot be modified")
        }
        if b.inconsistent {
            throw .generic("Bitmap '\(b.name)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
        }
    }

    /// QEMU's default: the node's cluster size, clamped to 4 KiB…64 KiB.
    static func defaultGranularity(_ node: BlockNode) -> UInt64 {
        if let cluster = node.skippingFilters().driver.clusterSizeInfo {
            return min(65536, max(4096, cluster))
        }
        return 65536
    }

    func prepareBitmapAction(_ type: String, _ args: inout QMPArguments) throws(QMPError) -> BitmapAction {
        switch type {
        case "block-dirty-bitmap-add":
            let nodeName = try args.requiredString("node")
            let name = try args.requiredString("name")
            let granularity = try args.uint32("granularity")
            let persistent = try args.bool("persistent") ?? false
            let disabled = try args.bool("disabled") ?? false
            try args.finish()
            let node = try bitmapNode(nodeName)
            if name.isEmpty { throw .generic("Bitmap name cannot be empty") }
            let g = granularity.map(UInt64.init) ?? Daemon.defaultGranularity(node)
            do throws(BlockError) { try DirtyBitmap.checkGranularity(g) } catch { throw .generic(error.message) }
            if node.dirtyBitmap(named: name) != nil { throw .generic("Bitmap already exists: \(name)") }
            if name.utf8.count > DirtyBitmap.maxNameBytes { throw .generic("Bitmap name too long: \(name)") }
            var storage: (any PersistentBitmapStorage)?
            if persistent {
                guard let s = node.driver.bitmapStorage else {
                    throw .generic("Can't store persistent bitmaps to \(nodeName): Operation not supported")
                }
                if node.isReadOnly {
                    throw .generic("Can't store persistent bitmaps to \(nodeName): Image is read-only")
                }
                do throws(BlockError) { try s.checkCanStore(name: name, granularity: g) } catch {
                    throw .generic("Can't make bitmap '\(name)' persistent in '\(nodeName)': \(error.message)")
                }
                storage = s
            }
            let bitmap = DirtyBitmap(name: name, granularity: g, length: node.length, enabled: !disabled,
                                     persistent: persistent)
            node.addObserver(bitmap)
            return BitmapAction(undo: { node.removeObserver(bitmap) }, commit: { () throws(BlockError) in
                if let storage {
                    do throws(BlockError) { try storage.add(bitmap) } catch {
                        node.removeObserver(bitmap)
                        throw error
                    }
                }
            })
        case "block-dirty-bitmap-remove":
            let nodeName = try args.requiredString("node")
            let name = try args.requiredString("name")
            try args.finish()
            let (node, b) = try findBitmap(node: nodeName, name: name)
            if b.isBusy {
                throw .generic("Bitmap '\(b.name)' is currently in use by another operation and cannot be used")
            }
            if b.persistent && node.isReadOnly {
                throw .generic("Bitmap '\(b.name)' is readonly and cannot be modified")
            }
            node.removeObserver(b)
            return BitmapAction(undo: { node.addObserver(b) }, commit: { () throws(BlockError) in
                if b.persistent, let s = node.driver.bitmapStorage { try s.remove(b) }
            })
        case "block-dirty-bitmap-clear":
            let (node, b) = try nodeAndName(&args)
            try Daemon.checkUsable(b, node: node, allowReadOnly: false)
            let saved = b.snapshot()
            b.clearAll()
            return BitmapAction(undo: { b.withBits { $0.clearAll(); $0.formUnion(saved) } },
                                commit: { () throws(BlockError) in
                // Resetting the on-disk write intent must not overlap a write that already
                // passed its intent: drained, every such write has marked memory first.
                if b.persistent, let s = node.driver.bitmapStorage {
                    try BlockNode.withDrained([node]) { () throws(BlockError) in try s.changed(b, cleared: true) }
                }
            })
        case "block-dirty-bitmap-enable", "block-dirty-bitmap-disable":
            let (node, b) = try nodeAndName(&args)
            try Daemon.checkUsable(b, node: node, allowReadOnly: true)
            let was = b.isEnabled
            b.setEnabled(type == "block-dirty-bitmap-enable")
            return BitmapAction(undo: { b.setEnabled(was) }, commit: { () throws(BlockError) in
                if b.persistent, was != b.isEnabled, let s = node.driver.bitmapStorage { try s.changed(b, cleared: false) }
            })
        case "block-dirty-bitmap-merge":
            let nodeName = try args.requiredString("node")
            let target = try args.requiredString("target")
            let sources = try args.requiredArray("bitmaps")
            try args.finish()
            let (node, t) = try findBitmap(node: nodeName, name: target)
            try Daemon.checkUsable(t, node: node, allowReadOnly: false)
            var from: [DirtyBitmap] = []
            for (i, s) in sources.enumerated() {
                let b: DirtyBitmap
                switch s {
                case .string(let name):
                    guard let found = node.dirtyBitmap(named: name) else { throw .generic("Dirty bitmap '\(name)' not found") }
                    b = found
                case .object(let o):
                    var a = QMPArguments(o, path: "bitmaps[\(i)].")
                    let n = try a.requiredString("node")
                    let name = try a.requiredString("name")
                    try a.finish()
                    let src = try bitmapNode(n)
                    if src.dirtyBitmap(named: name) == nil, let remote = try remoteBitmap(src, name: name, like: t) {
                        b = remote
                        break
                    }
                    guard let found = src.dirtyBitmap(named: name) else { throw .generic("Dirty bitmap '\(name)' not found") }
                    try Daemon.checkUsable(found, node: src, allowReadOnly: true)
                    b = found
                default:
                    throw .generic("Invalid parameter type for 'bitmaps[\(i)]', expected: BlockDirtyBitmapOrStr")
                }
                try Daemon.checkUsable(b, node: node, allowReadOnly: true)
                if b.length != t.length { throw .generic("Bitmaps are incompatible and can't be merged") }
                from.append(b)
            }
            let saved = t.snapshot()
            for b in from { t.merge(from: b) }
            return BitmapAction(undo: { t.withBits { $0.clearAll(); $0.formUnion(saved) } },
                                commit: { () throws(BlockError) in
                if t.persistent, let s = node.driver.bitmapStorage { try s.changed(t, cleared: false) }
            })
        default:
            throw .generic("The command \(type) has not been found")
        }
    }

    /// blockd's extension of `block-dirty-bitmap-merge` (live migration, `docs/migration.md`):
    /// a source `{node, name}` whose node is an `nbd` node opened with
    /// `x-dirty-bitmap=qemu:dirty-bitmap:NAME` stands for that bitmap on the NBD server. Its
    /// dirty extents (which QEMU's `x-dirty-bitmap` reports as "no data") are read with NBD
    /// block status into a bitmap shaped like `target`. Nil when the node is no such node.
    private func remoteBitmap(_ node: BlockNode, name: String, like target: DirtyBitmap) throws(QMPError) -> DirtyBitmap? {
        guard node.driver.remoteDirtyBitmapContext == "qemu:dirty-bitmap:\(name)" else {
            return nil
        }
        let bitmap = DirtyBitmap(name: name, granularity: target.granularity, length: node.length, enabled: false)
        var offset: UInt64 = 0
        do throws(BlockError) {
            while offset < node.length {
                let status = try node.blockStatus(at: offset, length: min(1 << 30, node.length - offset))
                if !status.isData { bitmap.mark(offset: offset, length: status.length) }
                offset += status.length
            }
        } catch {
            throw .generic("Cannot read dirty bitmap '\(name)' from '\(node.nodeName)': \(error.message)")
        }
        return bitmap
    }

    private func nodeAndName(_ args: inout QMPArguments) throws(QMPError) -> (BlockNode, DirtyBitmap) {
        let nodeName = try args.requiredString("node")
        let name = try args.requiredString("name")
        try args.finish()
        return try findBitmap(node: nodeName, name: name)
    }

    /// `dirty-bitmaps` of `query-named-block-nodes` / `query-block`, QSD 7.2's shape.
    static func bitmapInfo(_ node: BlockNode) -> [JSONValue] {
        node.dirtyBitmaps.map { b in
            var o = JSONObject()
            o["name"] = .string(b.name)
            o["recording"] = .bool(b.isRecording)
            o["persistent"] = .bool(b.persistent)
            o["busy"] = .bool(b.isBusy)
            o["granularity"] = .int(Int64(b.granularity))
            o["count"] = .int(Int64(b.dirtyBytes))
            if b.inconsistent { o["inconsistent"] = true }
            return .object(o)
        }
    }

    /// Looks a bitmap up for an export: on the node, else down its filtered, file and backing
    /// children (as QEMU searches), and checks it can be exported.
    func exportBitmap(_ ref: ExportBitmapRef, node: BlockNode, writable: Bool) throws(DaemonError) -> DirtyBitmap {
        let name: String
        switch ref {
        case .external(let nodeName, let bitmapName):
            // QEMU's block_dirty_bitmap_lookup: that node's bitmap, busy/inconsistent checked only.
            guard let owner = graph.node(named: nodeName) else {
                throw DaemonError("Cannot find device='\(nodeName)' nor node-name='\(nodeName)'")
            }
            guard let b = owner.dirtyBitmap(named: bitmapName) else { throw DaemonError("Dirty bitmap '\(bitmapName)' not found") }
            do throws(QMPError) { try Daemon.checkUsable(b, node: owner, allowReadOnly: true) } catch {
                throw DaemonError(error.desc)
            }
            return b
        case .local(let n):
            name = n
        }
        var queue = [node]
        var found: DirtyBitmap?
        var owner = node
        while !queue.isEmpty, found == nil {
            let n = queue.removeFirst()
            if let b = n.dirtyBitmap(named: name) { found = b; owner = n }
            queue += n.children.map(\.node)
        }
        guard let b = found else { throw DaemonError("Bitmap '\(name)' is not found") }
        do throws(QMPError) { try Daemon.checkUsable(b, node: owner, allowReadOnly: true) } catch {
            throw DaemonError(error.desc)
        }
        if !writable && !owner.isReadOnly && b.isEnabled {
            throw DaemonError("Enabled bitmap '\(name)' incompatible with readonly export")
        }
        return b
    }
}
