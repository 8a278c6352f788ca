import Foundation
import Testing
import JSON
@testable import BlockCore
@testable import BlockDrivers

/// Bad images are refused at open with one clear error, nothing written, no crash.
@Suite("QCOW2 malformed images", .needsQemu)
struct QCOW2MalformedTests {
    private func patch(_ path: String, _ offset: Int, _ bytes: [UInt8]) throws {
        var data = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        data.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
        try Data(data).write(to: URL(fileURLWithPath: path))
    }

    private func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
    private func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32($0))) } }

    /// Creates an image, applies `damage`, and expects a writable open to fail with a message
    /// containing `message`, leaving the file unchanged.
    private func expectRefused(_ message: String, create: [String] = [], size: String = "1M",
                               readOnly: Bool = false,
                               damage: (String) throws -> Void) throws {
        let dir = QCOW2TempDir()
        let img = dir.file("bad.qcow2")
        try QCOW2Tools.run("qemu-img", ["create", "-q", "-f", "qcow2"] + create + [img, size])
        try damage(img)
        let before = try QCOW2Test.md5(img)
        do {
            _ = try QCOW2Test.open(img, readOnly: readOnly)
            Issue.record("opening succeeded; expected an error containing '\(message)'")
        } catch let e as BlockError {
            #expect(e.message.contains(message), "message: \(e.message)")
            #expect(e.message.contains(img) || e.message.contains("backing"), "message names the image: \(e.message)")
        }
        #expect(try QCOW2Test.md5(img) == before)
    }

    @Test func truncatedHeader() throws {
        try expectRefused("truncated header") { img in
            let fd = open(img, O_WRONLY)
            ftruncate(fd, 50)
            close(fd)
        }
    }

    @Test func badMagic() throws {
        try expectRefused("bad magic") { try patch($0, 0, [0, 0, 0, 0]) }
    }

    @Test func l1PastEndOfFile() throws {
        try expectRefused("L1 table") { try patch($0, 40, be64(1 << 40)) }
    }

    @Test func refcountTableOverlapsHeader() throws {
        try expectRefused("refcount table offset") { try patch($0, 48, be64(0)) }
    }

    @Test func clusterBitsOutOfRange() throws {
        try expectRefused("cluster_bits") { try patch($0, 20, be32(31)) }
    }

    @Test func unknownIncompatibleBit() throws {
        try expectRefused("bit 9") { try patch($0, 72, be64(1 << 9)) }
    }

    @Test func externalDataFileRefused() throws {
        try expectRefused("external data file") { try patch($0, 72, be64(1 << 2)) }
    }

    @Test func l1TooSmallForSize() throws {
        try expectRefused("L1 table is too small") { try patch($0, 24, be64(1 << 50)) }
    }

    @Test func absurdL1Size() throws {
        try expectRefused("L1 table") { try patch($0, 36, be32(0xffff_ffff)) }
    }

    @Test func dirtyImageRefusedWritable() throws {
        try expectRefused("image is dirty") { try patch($0, 72, be64(1)) }
    }

    @Test func corruptImageRefusedWritable() throws {
        try expectRefused("corrupt") { try patch($0, 72, be64(2)) }
    }

    @Test func dirtyAndCorruptOpenReadOnly() throws {
        let dir = QCOW2TempDir()
        let img = dir.file("ro.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", img, "1M")
        try QCOW2Tools.qemuIO(img, "write -P 0x44 0 64k")
        try patch(img, 72, be64(3))
        let before = try QCOW2Test.md5(img)
        let node = try QCOW2Test.open(img, readOnly: true)
        #expect(try QCOW2Test.readAll(node)[0..<65536].allSatisfy { $0 == 0x44 })
        try node.driver.close()
        #expect(try QCOW2Test.md5(img) == before)
    }

    @Test func missingBackingFile() throws {
        let dir = QCOW2TempDir()
        let base = dir.file("gone.qcow2"), img = dir.file("top.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", base, "1M")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", img, "1M")
        try FileManager.default.removeItem(atPath: base)
        let before = try QCOW2Test.md5(img)
        #expect {
            _ = try QCOW2Test.open(img)
        } throws: { error in
            (error as? BlockError)?.message == "Could not open backing file of '\(img)': Could not open '\(base)': No such file or directory"
        }
        #expect(try QCOW2Test.md5(img) == before)
    }

    @Test func backingLoop() throws {
        let dir = QCOW2TempDir()
        let a = dir.file("a.qcow2"), b = dir.file("b.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", a, "1M")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
        // Point a at b with -u (no checks), making a loop.
        try QCOW2Tools.run("qemu-img", ["rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a])
        #expect {
            _ = try QCOW2Test.open(b)
        } throws: { error in
            (error as? BlockError)?.message.contains("loop") == true
        }
    }

    @Test func headerFuzzNeverTraps() throws {
        // Random byte patches in the header cluster: open either fails cleanly or reads.
        let dir = QCOW2TempDir()
        let good = dir.file("good.qcow2")
        try QCOW2Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", good, "1M")
        try QCOW2Tools.qemuIO(good, "write -P 0x5 0 64k")
        let original = [UInt8](try Data(contentsOf: URL(fileURLWithPath: good)))
        var rng = SystemRandomNumberGenerator()
        for i in 0..<150 {
            var bytes = original
            for _ in 0..<(1 + i % 4) {
                let at = Int.random(in: 0..<min(bytes.count, 4096 * 4), using: &rng)
                bytes[at] = UInt8.random(in: 0...255, using: &rng)
            }
            let path = dir.file("f\(i).qcow2")
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            if let node = try? QCOW2Test.open(path, readOnly: true, extra: [("backing", .null)]) {
                _ = try? QCOW2Test.readAll(node)
                var off: UInt64 = 0
                while off < node.length, let s = try? node.blockStatus(at: off, length: node.length - off) {
                    off += max(s.length, 1)
                }
            }
            try? FileManager.default.removeItem(atPath: path)
        }
    }
}
