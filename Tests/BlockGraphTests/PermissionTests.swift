import BlockCore
import BlockDrivers
import BlockGraph
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// QEMU's permission rules, checked in one place: each case below is a scenario run against
/// qemu-storage-daemon 7.2 (the expected messages are its answers, word for word), and a
/// refused change must leave the graph exactly as it was.
@Suite struct PermissionTests {
    @Test func defaultChildPermissionsFollowQEMU() {
        let all = BlockPermissions.all
        // Filter: passes its users' permissions through.
        var p = BlockPermissions.defaultChildPermissions(role: .filteredPrimary,
                                                         parent: PermissionPair(perm: [.consistentRead, .write], shared: [.consistentRead]),
                                                         writable: true)
        #expect(p == PermissionPair(perm: [.consistentRead, .write], shared: [.consistentRead]))
        // Backing: consistent read if the users need it; write and resize shared only when
        // the users share write.
        p = BlockPermissions.defaultChildPermissions(role: .backing, parent: PermissionPair(perm: [.consistentRead, .write], shared: all),
                                                     writable: true)
        #expect(p == PermissionPair(perm: .consistentRead, shared: all))
        p = BlockPermissions.defaultChildPermissions(role: .backing, parent: PermissionPair(perm: [], shared: [.consistentRead]),
                                                     writable: true)
        #expect(p == PermissionPair(perm: [], shared: [.consistentRead, .writeUnchanged]))
        // Image file of a writable format node: metadata writes whatever the users do; never
        // shares write or resize.
        p = BlockPermissions.defaultChildPermissions(role: .image, parent: .none, writable: true)
        #expect(p == PermissionPair(perm: [.consistentRead, .write, .resize], shared: [.consistentRead, .writeUnchanged]))
        p = BlockPermissions.defaultChildPermissions(role: .image, parent: .none, writable: false)
        #expect(p == PermissionPair(perm: .consistentRead, shared: [.consistentRead, .writeUnchanged]))
        // Unchanged writes become writes on a data child, and writes imply resize.
        p = BlockPermissions.defaultChildPermissions(role: [.data, .primary], parent: PermissionPair(perm: .writeUnchanged, shared: all),
                                                     writable: true)
        #expect(p == PermissionPair(perm: [.write, .writeUnchanged, .resize], shared: [.consistentRead, .write, .writeUnchanged]))
        #expect(BlockPermissions([.write, .resize]).names == "write, resize")
    }

    @Test func secondFormatNodeOverAWrittenFileIsRefused() throws {
        let g = G()
        let f0 = try g.file("f0")
        try g.format("q0", file: f0)
        let before = g.state
        #expect(message { () throws(BlockError) in _ = try g.format("q1", file: f0) }
            == "Permission conflict on node 'f0': permissions 'write, resize' are both required by node 'q0' (uses node 'f0' as 'file' child) and unshared by node 'q1' (uses node 'f0' as 'file' child).")
        // Read-only, it still refuses to let q0 write under it.
        #expect(message { () throws(BlockError) in _ = try g.format("q2", file: f0, readOnly: true) }
            == "Permission conflict on node 'f0': permissions 'write, resize' are both required by node 'q0' (uses node 'f0' as 'file' child) and unshared by node 'q2' (uses node 'f0' as 'file' child).")
        #expect(g.state == before)
        #expect(g.graph.node(named: "q1") == nil && g.graph.node(named: "q2") == nil)
    }

    @Test func rawNodeOverAWrittenFileCannotBeExported() throws {
        let g = G()
        let f0 = try g.file("f0")
        try g.format("q0", file: f0)
        // A raw node takes nothing until someone uses it (QEMU accepts it too)...
        let r0 = BlockNode(name: "r0", driver: try RawDriver(file: f0))
        try g.graph.register(r0)
        g.graph.setMonitorOwned(r0)
        let before = g.state
        // ...but exported, it passes the export's permissions to the file.
        #expect(message { () throws(BlockError) in try g.export(r0, writable: true) }
            == "Permission conflict on node 'f0': permissions 'write' are both required by node 'r0' (uses node 'f0' as 'file' child) and unshared by node 'q0' (uses node 'f0' as 'file' child).")
        #expect(message { () throws(BlockError) in try g.export(r0, writable: false) }
            == "Permission conflict on node 'f0': permissions 'resize' are both required by node 'q0' (uses node 'f0' as 'file' child) and unshared by node 'r0' (uses node 'f0' as 'file' child).")
        #expect(message { () throws(BlockError) in try g.export(f0, writable: true) }
            == "Permission conflict on node 'f0': permissions 'write' are both required by an unnamed block device (uses node 'f0' as 'root' child) and unshared by node 'q0' (uses node 'f0' as 'file' child).")
        #expect(message { () throws(BlockError) in try g.export(f0, writable: false) }
            == "Permission conflict on node 'f0': permissions 'resize' are both required by node 'q0' (uses node 'f0' as 'file' child) and unshared by an unnamed block device (uses node 'f0' as 'root' child).")
        #expect(g.state == before)
        #expect(g.graph.roots.isEmpty)
    }

    @Test func writersOfReadOnlyNodesAreRefused() throws {
        let g = G()
        let f0 = try g.file("f0", readOnly: true)
        #expect(message { () throws(BlockError) in _ = try g.format("q0", file: f0) } == "Block node is read-only")
        try g.format("q1", file: f0, readOnly: true)
        let f1 = try g.file("f1", readOnly: true)
        let r1 = BlockNode(name: "r1", driver: try RawDriver(file: f1))
        try g.graph.register(r1)
        #expect(!r1.isReadOnly)  // its own option, as in QEMU
        #expect(message { () throws(BlockError) in try g.export(r1, writable: true) } == "Block node is read-only")
        try g.export(r1, writable: false)
    }

    @Test func writesNeedTheWritePermission() throws {
        let g = G()
        let f0 = try g.file("f0")
        let q0 = try g.format("q0", file: f0)
        // q0 has no user that writes: a write to it is refused, though its file is writable.
        #expect(q0.granted.isEmpty)
        let refused = message { () throws(BlockError) in try writeBytes(q0, 7) }
        #expect(refused?.contains("'write' permission") == true)
        let root = try g.export(q0, writable: true)
        #expect(q0.granted == [.consistentRead, .write])
        try writeBytes(q0, 7, via: root)
        g.graph.detach([root])
        #expect(q0.granted.isEmpty)
        #expect(f0.granted == [.consistentRead, .write, .resize])  // q0's metadata writes
    }

    /// A chain base ← mid ← top (all writable, explicit) with a stream job from top to base
    /// holding its nodes as `StreamJob` does.
    func streamingChain() throws -> (G, [String: BlockNode]) {
        let g = G()
        var n: [String: BlockNode] = [:]
        for name in ["base", "mid", "top"] { n[name + "-f"] = try g.file(name + "-f") }
        n["base"] = try g.format("base", file: n["base-f"]!)
        n["mid"] = try g.format("mid", file: n["mid-f"]!, backing: n["base"]!)
        n["top"] = try g.format("top", file: n["top-f"]!, backing: n["mid"]!)
        let basic: BlockPermissions = [.consistentRead, .writeUnchanged]
        let io = BlockRoot(name: "root", kind: .backend(name: nil), node: n["top"]!,
                           permissions: PermissionPair(perm: .consistentRead, shared: basic.union(.write)))
        io.permissionFilter = .copyOnRead
        _ = try g.graph.installFilter(.copyOnRead, onUsersOf: n["top"]!)
        try g.graph.attach([
            io,
            BlockRoot(name: "active node", kind: .job(type: "stream", id: "j0"), node: n["top"]!,
                      permissions: PermissionPair(perm: [], shared: basic.union(.write))),
            BlockRoot(name: "intermediate node", kind: .job(type: "stream", id: "j0"), node: n["mid"]!,
                      permissions: PermissionPair(perm: [], shared: basic)),
        ])
        return (g, n)
    }

    @Test func jobOwnedNodesRefuseSecondWriters() throws {
        let (g, n) = try streamingChain()
        let before = g.state
        #expect(message { () throws(BlockError) in try g.export(n["mid"]!, writable: true) }
            == "Permission conflict on node 'mid': permissions 'write' are both required by an unnamed block device (uses node 'mid' as 'root' child) and unshared by stream job 'j0' (uses node 'mid' as 'intermediate node' child).")
        // The backing node below the job's nodes: mid's users share no write, so mid does not
        // let anyone write its backing.
        #expect(message { () throws(BlockError) in try g.export(n["base"]!, writable: true) }
            == "Permission conflict on node 'base': permissions 'write' are both required by an unnamed block device (uses node 'base' as 'root' child) and unshared by node 'mid' (uses node 'base' as 'backing' child).")
        #expect(message { () throws(BlockError) in try g.export(n["mid-f"]!, writable: true) }
            == "Permission conflict on node 'mid-f': permissions 'write' are both required by an unnamed block device (uses node 'mid-f' as 'root' child) and unshared by node 'mid' (uses node 'mid-f' as 'file' child).")
        #expect(g.state == before)
        // Readers are fine, and so is a writer of top (the job shares write there).
        try g.export(n["mid"]!, writable: false)
        try g.export(n["base"]!, writable: false)
        try g.export(n["top"]!, writable: true)
    }

    @Test func backingOfAnIdleOverlayMayBeWritten() throws {
        // QEMU lets anyone write a backing node whose overlay's users share write (nothing
        // uses top here): no permission conflict, as qemu-storage-daemon answers.
        let g = G()
        let bf = try g.file("bf")
        let base = try g.format("base", file: bf)
        let tf = try g.file("tf")
        let top = try g.format("top", file: tf, backing: base)
        try g.export(top, writable: true)
        try g.export(base, writable: true)
    }
}
