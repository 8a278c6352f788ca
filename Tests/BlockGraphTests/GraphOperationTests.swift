import BlockCore
import BlockGraph
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Graph operations of `BlockGraph`, each checked before it changes anything.
@Suite struct GraphOperationTests {
    @Test func deleteFollowsQEMUOrderAndTakesInlineChildren() throws {
        let g = G()
        // blockdev-add top with file and backing defined inline: only top is the monitor's.
        let tf = BlockNode(name: "tf", driver: MemFile("tf"))
        try g.graph.register(tf)
        let bf = BlockNode(name: "#block029", driver: MemFile("bf"), autoNamed: true)
        try g.graph.register(bf)
        let base = try g.format("base", file: bf, owned: false)
        let top = try g.format("top", file: tf, backing: base)
        #expect(message { () throws(BlockError) in try g.graph.delete(tf) } == "Node tf is not owned by the monitor")
        #expect(message { () throws(BlockError) in try g.graph.delete(base) } == "Node 'base' is busy: node is used as backing hd of 'top'")
        let export = try g.export(base, writable: false)
        #expect(message { () throws(BlockError) in try g.graph.delete(base) } == "Node base is in use")
        try g.graph.delete(top)
        // The export keeps base (and its file); top's file went with top.
        #expect(g.graph.all.map(\.nodeName) == ["#block029", "base"])
        #expect((top.driver as! MemFormat).closes.load(ordering: .relaxed) == 1)
        g.graph.detach([export])
        #expect(g.graph.all.isEmpty)
        #expect(message { () throws(BlockError) in try g.graph.delete(top) } == "Node top is not owned by the monitor")
    }

    @Test func aChildUsedElsewhereStays() throws {
        let g = G()
        let tf = BlockNode(name: "tf", driver: MemFile("tf"))
        try g.graph.register(tf)
        let top = try g.format("top", file: tf, readOnly: true)
        let r = try g.filter("r", over: tf)
        #expect(message { () throws(BlockError) in try g.graph.delete(tf) } == "Node tf is not owned by the monitor")
        try g.graph.delete(top)
        #expect(g.graph.all.map(\.nodeName) == ["tf", "r"])
        #expect(message { () throws(BlockError) in try g.graph.delete(r) } == nil)
        #expect(g.graph.all.isEmpty)
    }

    @Test func frozenLinksAndCyclesAreRefusedUnchanged() throws {
        let g = G()
        let base = try g.format("base", file: try g.file("bf"))
        let mid = try g.format("mid", file: try g.file("mf"), backing: base)
        let top = try g.format("top", file: try g.file("tf"), backing: mid)
        let frozen = try FrozenChain.freeze(from: top, through: mid, owner: "j0")
        let flt = try g.filter("flt", over: mid)
        let before = g.state
        #expect(message { () throws(BlockError) in try g.graph.change([.backing(of: top, to: flt)]) }
            == "Cannot change frozen 'backing' link from 'top' to 'mid'")
        #expect(message { () throws(BlockError) in try g.graph.change([.backing(of: base, to: top)]) }
            == "Making 'top' a backing child of 'base' would create a cycle")
        #expect(g.state == before)
        // Below the frozen link the user may still insert a filter.
        let below = try g.filter("below", over: base)
        try g.graph.change([.backing(of: mid, to: below)])
        #expect(mid.backing === below)
        #expect(mid.driver.backingChild?.permissions.perm == [])
        frozen.unfreeze()
        try g.graph.change([.backing(of: top, to: flt)])
        #expect(top.backing === flt)
    }

    @Test func filterInsertedAboveAnExportedNodeAndDropped() throws {
        let g = G()
        let f = try g.file("f")
        let disk = try g.format("disk", file: f)
        let export = try g.export(disk, writable: true)
        let flt = try g.filter("flt", over: disk)
        try g.graph.insertFilter(flt, above: disk)
        #expect(export.node === flt)
        #expect(flt.chainChild?.node === disk)  // the filter keeps its own child
        #expect(disk.granted == [.consistentRead, .write])
        try writeBytes(flt, 3, via: export)
        try g.graph.dropFilter(flt)
        #expect(export.node === disk)
        #expect(g.graph.contains(flt))  // the monitor owns it
        #expect(flt.granted.isEmpty)
        #expect(try readByte(disk) == 3)
    }

    @Test func replaceRefusesAConflictUnchanged() throws {
        let g = G()
        let f = try g.file("f")
        let a = try g.format("a", file: f)
        let export = try g.export(a, writable: true)
        // b is read-only: the export's write cannot move onto it.
        let b = try g.format("b", file: try g.file("g", readOnly: true), readOnly: true)
        let before = g.state
        #expect(message { () throws(BlockError) in try g.graph.replace(a, with: b) } == "Block node is read-only")
        #expect(g.state == before)
        #expect(export.node === a)
    }

    @Test func reopenReadWriteSwitchesUsers() throws {
        let g = G()
        let bf = try g.file("bf", readOnly: true)
        let base = try g.format("base", file: bf, readOnly: true)
        let top = try g.format("top", file: try g.file("tf"), backing: base)
        let export = try g.export(base, writable: false)
        #expect(message { () throws(BlockError) in try writeBytes(base, 1) } != nil)
        let fresh = try g.graph.reopenReadWrite(base)
        #expect(fresh !== base && fresh.nodeName == "base" && !fresh.isReadOnly)
        #expect(g.graph.node(named: "base") === fresh)
        #expect(g.graph.node(named: "bf") === fresh.file && fresh.file !== bf)
        #expect(top.backing === fresh)
        #expect(export.node === fresh)
        #expect(g.graph.isMonitorOwned(fresh))
        #expect(fresh.file?.granted == [.consistentRead, .write, .resize])
        // Writable now, and nobody's write permission is needed for the old instance.
        let writer = try g.export(fresh, writable: true)
        try writeBytes(fresh, 9, via: writer)
        #expect(try readByte(fresh) == 9)
    }
}

@Suite struct GraphTransactionTests {
    @Test func failureUndoesPreparedActionsNewestFirst() {
        var log: [String] = []
        var t = GraphTransaction()
        let refused = message { () throws(BlockError) in
            for name in ["a", "b", "c"] {
                try t.prepare { () throws(BlockError) -> GraphTransaction.Action in
                    if name == "c" { throw BlockError.invalid("c refused") }
                    log.append("prepare \(name)")
                    return GraphTransaction.Action(undo: { log.append("undo \(name)") }, commit: { log.append("commit \(name)") })
                }
            }
        }
        #expect(refused == "c refused")
        #expect(log == ["prepare a", "prepare b", "undo b", "undo a"])
        #expect(t.count == 0)
    }

    /// Every prepared action commits, in order, even after one failed (a backup job made in
    /// prepare must still start, or it would stay `created`); the first failure is thrown.
    @Test func commitRunsEveryActionInOrderAndThrowsTheFirstFailure() {
        var log: [String] = []
        var t = GraphTransaction()
        for name in ["a", "b", "c"] {
            t.prepare { () -> GraphTransaction.Action in
                GraphTransaction.Action(commit: { () throws(BlockError) in
                    if name == "b" { throw BlockError.io("disk full") }
                    log.append("commit \(name)")
                })
            }
        }
        #expect(message { () throws(BlockError) in try t.commit() } == "disk full")
        #expect(log == ["commit a", "commit c"])
    }

    /// The graph tells each driver what its users take and share (QEMU's `.bdrv_set_perm`):
    /// the file below a format node and an export, with what grows told before the change
    /// and what shrinks after. A driver's refusal (another process's lock) refuses the whole
    /// change, the graph unchanged and the drivers told their previous permissions again.
    @Test func driversFollowTheGraphAndCanRefuse() throws {
        let g = G()
        let f0 = try g.file("f0")
        let file = f0.driver as! MemFile
        #expect(file.current == PermissionPair.none)
        let q0 = try g.format("q0", file: f0)
        #expect(file.current == PermissionPair(perm: [.consistentRead, .write, .resize], shared: [.consistentRead, .writeUnchanged]))
        // Another process holds "write": a writable format node is refused, nothing changes.
        let f1 = try g.file("f1")
        let other = f1.driver as! MemFile
        other.lockedByOthers.withLock { $0 = .write }
        #expect(message { () throws(BlockError) in _ = try g.format("q1", file: f1) } == "Failed to get \"write\" lock")
        #expect(other.current == PermissionPair.none)
        #expect(g.graph.node(named: "q1") == nil)
        // A read-only one is fine.
        try g.format("q1", file: f1, readOnly: true)
        #expect(other.current?.perm == .consistentRead)
        // An export of q0 adds nothing below (the format node takes its own on the file).
        let root = try g.export(q0, writable: true)
        #expect(file.current == PermissionPair(perm: [.consistentRead, .write, .resize], shared: [.consistentRead, .writeUnchanged]))
        g.graph.detach([root])
        try g.graph.delete(q0)
        // Once the format node goes, the file's users take nothing any more.
        #expect(file.current == PermissionPair.none)
    }
}
