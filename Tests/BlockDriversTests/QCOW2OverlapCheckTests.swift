import Foundation
import Synchronization
import Testing
import TestSupport
import JSON
@testable import BlockCore
@testable import BlockDrivers

/// `overlap-check`: images whose refcounts or tables point at their own metadata. A write that
/// would land on metadata fails with EIO, the image is marked corrupt (QEMU's words, QEMU's
/// corrupt bit) and read-only for the rest of the open; nothing is written over the metadata.
@Suite("qcow2 metadata overlap check", .needsQemu)
struct QCOW2OverlapCheckTests {
    /// Header fields of an image file, big-endian as on disk.
    struct Layout {
        let bytes: [UInt8]
        func be32(_ at: Int) -> UInt64 { (0..<4).reduce(UInt64(0)) { $0 << 8 | UInt64(bytes[at + $1]) } }
        func be64(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(bytes[at + $1]) } }
        var clusterBits: UInt64 { be32(20) }
        var l1Offset: UInt64 { be64(40) }
        var refcountTableOffset: UInt64 { be64(48) }
        var refcountOrder: UInt64 { be32(96) }
        init(_ path: String) throws { bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }
    }

    static func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: offset)
        try h.write(contentsOf: Data(bytes))
    }

    static func bigEndian(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * $0)) } }

    /// Sets the 16-bit refcount of host cluster `cluster` (refcount block 0) to `value`.
    static func setRefcount(_ path: String, cluster: UInt64, _ value: UInt16) throws {
        let l = try Layout(path)
        #expect(l.refcountOrder == 4)
        let block = l.be64(Int(l.refcountTableOffset)) & ~UInt64(511)
        try patch(path, at: block + cluster * 2, [UInt8(value >> 8), UInt8(value & 0xff)])
    }

    /// A 1 MiB image (64 KiB clusters: header, refcount table, refcount block, L1 table in
    /// clusters 0-3) whose L1 table has refcount 0: the first new cluster is the L1 table's.
    static func imageWithFreeL1(_ dir: QCOW2TempDir, name: String = "free-l1.qcow2") throws -> String {
        let img = dir.file(name)
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        let l = try Layout(img)
        try setRefcount(img, cluster: l.l1Offset >> l.clusterBits, 0)
        return img
    }

    /// What QEMU prints for a write into a copy of `image` (its "Marking image as corrupt" line).
    static func qemuCorruptionLine(_ image: String, _ dir: QCOW2TempDir, write: String = "write -P 0x11 0 4k") throws -> String {
        let copy = dir.file("qemu-\(UUID().uuidString).qcow2")
        try FileManager.default.copyItem(atPath: image, toPath: copy)
        let r = try QCOW2Tools.run("qemu-io", ["-f", "qcow2", "-c", write, copy], allowFailure: true)
        #expect(r.output.contains("write failed: Input/output error"), "\(r.output)")
        return r.output.split(separator: "\n").first { $0.hasPrefix("qcow2: Marking image as corrupt: ") }.map(String.init) ?? "none"
    }

    final class Events: @unchecked Sendable {
        let list = Mutex<[QCOW2CorruptionEvent]>([])
        var all: [QCOW2CorruptionEvent] { list.withLock { $0 } }
    }

    static func watch(_ node: BlockNode) -> Events {
        let events = Events()
        (node.driver as! QCOW2Driver).onCorruption { e in events.list.withLock { $0.append(e) } }
        return events
    }

    @Test("a cluster allocated over the active L1 table: EIO, marked corrupt as QEMU, the L1 table untouched")
    func allocationOverTheL1TableIsRefused() throws {
        let dir = QCOW2TempDir()
        let img = try Self.imageWithFreeL1(dir)
        let qemuLine = try Self.qemuCorruptionLine(img, dir)
        #expect(qemuLine == "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with active L1 table); further corruption events will be suppressed")
        let before = try Layout(img).bytes
        let checkBefore = try QCOW2Tools.run("qemu-img", ["check", img], allowFailure: true)

        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        let events = Self.watch(node)
        do {
            try QCOW2Test.write(node, 0, QCOW2Test.pattern(0x11, 4096))
            Issue.record("a write over the L1 table succeeded")
        } catch let e as BlockError {
            #expect(e.errno == EIO)
            #expect(e.message.contains("Preventing invalid write on metadata (overlaps with active L1 table)"), "\(e.message)")
        }
        // The same event QEMU signals, once; the image is read-only from now on.
        #expect(events.all.map(\.message) == ["Preventing invalid write on metadata (overlaps with active L1 table)"])
        #expect(events.all.first.map { "qcow2: Marking image as corrupt: \($0.message); further corruption events will be suppressed" } == qemuLine)
        #expect(try events.all.first?.offset == Layout(img).l1Offset && events.all.first?.size == 65536)
        #expect(events.all.first?.fatal == true)
        #expect((node.driver as! QCOW2Driver).isMarkedCorrupt)
        #expect(throws: BlockError.self) { try QCOW2Test.write(node, 512 << 10, QCOW2Test.pattern(0x22, 4096)) }
        #expect(throws: BlockError.self) { try node.writeZeroes(at: 0, length: 65536) }
        #expect(throws: BlockError.self) { try node.flush() }
        #expect(events.all.count == 1, "further corruption events are suppressed")
        // Reads still work.
        #expect(try QCOW2Test.readAll(node) == [UInt8](repeating: 0, count: 1 << 20))
        try registry.closeAll()

        // On disk: only the corrupt bit changed (incompatible features, byte 79); qemu-img
        // sees the same errors as before, and the corrupt flag.
        var after = try Layout(img).bytes
        #expect(after[79] == before[79] | 2)
        after[79] = before[79]
        #expect(after == before)
        let info = try QCOW2Tools.run("qemu-img", ["info", img]).output
        #expect(info.contains("corrupt: true"), "\(info)")
        let checkAfter = try QCOW2Tools.run("qemu-img", ["check", img], allowFailure: true)
        #expect(checkAfter.output == checkBefore.output)
        // Marked corrupt: it opens read-only only, until repaired.
        #expect(throws: BlockError.self) { _ = try QCOW2Test.open(img) }
        try QCOW2Tools.run("qemu-img", ["check", "-q", "-r", "all", img], allowFailure: true)
        let repaired = QCOW2TestRegistry()
        let again = try QCOW2Test.open(img, registry: repaired)
        try QCOW2Test.write(again, 0, QCOW2Test.pattern(0x33, 4096))
        try repaired.closeAll()
        try QCOW2Test.expectClean(img)
    }

    @Test("an L2 entry that points at the refcount table: the overwrite is refused, also inline (.noWait)")
    func overwriteThroughAnL2EntryIntoMetadataIsRefused() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("l2-into-reftable.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        try QCOW2Tools.qemuIO(img, "write -P 0x5a 0 64k")
        let l = try Layout(img)
        let l2 = l.be64(Int(l.l1Offset)) & 0x00ff_ffff_ffff_fe00
        try Self.patch(img, at: l2, Self.bigEndian(l.refcountTableOffset | 1 << 63))
        let qemuLine = try Self.qemuCorruptionLine(img, dir)
        #expect(qemuLine.contains("Preventing invalid write on metadata (overlaps with refcount table)"), "\(qemuLine)")
        let before = try Layout(img).bytes

        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        let events = Self.watch(node)
        // The event-loop path does not decide it: it hands the write to a worker.
        do {
            try QCOW2Test.write(node, 0, QCOW2Test.pattern(0x11, 4096), flags: .noWait)
            Issue.record("the inline write went through")
        } catch let e as BlockError {
            #expect(e.errno == BlockError.wouldBlock.errno)
        }
        #expect(events.all.isEmpty)
        #expect(throws: BlockError.self) { try QCOW2Test.write(node, 0, QCOW2Test.pattern(0x11, 4096)) }
        #expect(events.all.map { "qcow2: Marking image as corrupt: \($0.message); further corruption events will be suppressed" } == [qemuLine])
        try registry.closeAll()
        let after = try Layout(img).bytes
        #expect(after[Int(l.refcountTableOffset)..<Int(l.refcountTableOffset + 4096)]
                == before[Int(l.refcountTableOffset)..<Int(l.refcountTableOffset + 4096)], "the refcount table was overwritten")
    }

    @Test("overlap-check modes and flags decide which structures are guarded")
    func overlapCheckOptionChoosesTheChecks() throws {
        let dir = QCOW2TempDir()
        let cases: [(JSONValue?, Bool)] = [
            (nil, true), (.string("cached"), true), (.string("constant"), true), (.string("all"), true),
            (.string("none"), false),
            (.object(["template": "none", "active-l1": "on"]), true),
            (.object(["active-l1": .bool(false)]), false),
        ]
        for (i, (option, refused)) in cases.enumerated() {
            let img = try Self.imageWithFreeL1(dir, name: "opt\(i).qcow2")
            let registry = QCOW2TestRegistry()
            let node = try QCOW2Test.open(img, extra: option.map { [("overlap-check", $0)] } ?? [], registry: registry)
            let failed: Bool
            do { try QCOW2Test.write(node, 0, QCOW2Test.pattern(0x11, 4096)); failed = false } catch { failed = true }
            try? registry.closeAll()
            #expect(failed == refused, "overlap-check \(String(describing: option))")
            if !refused {
                // Unguarded, the L2 table went over the L1 table: the image is now broken.
                let check = try QCOW2Tools.run("qemu-img", ["check", img], allowFailure: true)
                #expect(check.status != 0, "\(check.output)")
            }
        }
    }

    @Test("bad overlap-check values are refused naming the member")
    func badOverlapCheckValues() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("bad.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        let cases: [(JSONValue, String)] = [
            (.string("bogus"), "Parameter 'overlap-check' does not accept value 'bogus'"),
            (.object(["template": "bogus"]), "Parameter 'template' does not accept value 'bogus'"),
            (.object(["main-header": "maybe"]), "Parameter 'overlap-check.main-header' expects 'on' or 'off'"),
            (.object(["bogus": "on"]), "Parameter 'overlap-check.bogus' is unexpected"),
            (.int(3), "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
        ]
        for (value, message) in cases {
            #expect(throws: BlockError.self) { _ = try QCOW2Test.open(img, extra: [("overlap-check", value)]) }
            do { _ = try QCOW2Test.open(img, extra: [("overlap-check", value)]) } catch let e as BlockError {
                #expect(e.message == message)
            }
        }
    }

    @Test("metadataOverlap: QEMU's order, cluster rounding, and the structure written left out")
    func overlapRanges() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("ranges.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "64M")
        try QCOW2Tools.qemuIO(img, "write -P 1 0 64k")
        let l = try Layout(img)
        let l2 = l.be64(Int(l.l1Offset)) & 0x00ff_ffff_ffff_fe00
        let block = l.be64(Int(l.refcountTableOffset)) & ~UInt64(511)
        let registry = QCOW2TestRegistry()
        let node = try QCOW2Test.open(img, registry: registry)
        defer { try? registry.closeAll() }
        let q = node.driver as! QCOW2Driver
        q.meta.withLock { m in
            #expect(m.metadataOverlap(at: 100, size: 1) == .mainHeader)
            #expect(m.metadataOverlap(at: l.l1Offset + 65535, size: 1) == .activeL1)
            #expect(m.metadataOverlap(at: l.l1Offset - 1, size: 2) == .activeL1, "any byte of the cluster-rounded range")
            #expect(m.metadataOverlap(at: l.refcountTableOffset, size: 8) == .refcountTable)
            #expect(m.metadataOverlap(at: block + 4096, size: 512) == .refcountBlock)
            #expect(m.metadataOverlap(at: l2, size: 65536) == .activeL2)
            #expect(m.metadataOverlap(at: l2, size: 65536, ignoring: .activeL2) == nil)
            #expect(m.metadataOverlap(at: 0, size: 1 << 20, ignoring: .mainHeader) == .activeL1, "QEMU's order")
            #expect(m.metadataOverlap(at: l2 + 65536, size: 65536) == nil)
        }
    }
}
