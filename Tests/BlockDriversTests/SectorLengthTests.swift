import BlockCore
import BlockDrivers
import Foundation
import Testing

/// qemu-nbd's front end counts a file's length in whole sectors, as QEMU does (iotests 241):
/// a 1000-byte file is a 1024-byte node whose tail reads as zeroes and is a hole.
@Suite struct SectorLengthTests {
    static var sectorLength: FileOptions {
        var o = FileOptions()
        o.sectorLength = true
        return o
    }

    static func file(_ dir: QCOW2TempDir, bytes: Int) throws -> String {
        let path = dir.file("f.raw")
        try Data(repeating: 0x30, count: bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test func tailReadsAsZeroesAndIsAHole() throws {
        let dir = QCOW2TempDir()
        let path = try Self.file(dir, bytes: 1000)
        let exact = try FileDriver(path: path, readOnly: true)
        #expect(exact.length == 1000)
        let node = BlockNode(name: "f", driver: try FileDriver(path: path, readOnly: false, options: Self.sectorLength))
        #expect(node.length == 1024)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 64)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0xff)
        try node.read(at: 0, into: buffer, flags: [])
        #expect(buffer[..<1000].allSatisfy { $0 == 0x30 } && buffer[1000...].allSatisfy { $0 == 0 })
        let data = try node.blockStatus(at: 0, length: 1024)
        #expect(data.isData && data.length == 1000)
        let tail = try node.blockStatus(at: 1000, length: 24)
        #expect(!tail.isData && tail.isZero && tail.length == 24)

        // Writing the tail grows the file to whole sectors, as QEMU's pwrite does.
        try node.write(at: 1016, from: UnsafeRawBufferPointer(rebasing: buffer[0..<8]), flags: [])
        #expect(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int == 1024)
        #expect(node.length == 1024)
        try node.driver.close()
    }

    /// A probed raw node (minimum 512) answers in whole sectors: the sector the file ends in
    /// is data, as QEMU's block layer rounds status to the request alignment.
    @Test func probedRawAnswersInWholeSectors() throws {
        let dir = QCOW2TempDir()
        let path = try Self.file(dir, bytes: 1000)
        let file = BlockNode(name: "f", driver: try FileDriver(path: path, readOnly: true, options: Self.sectorLength))
        let raw = BlockNode(name: "r", driver: try RawDriver(file: file, probed: true))
        #expect(raw.limits.minimum == 512)
        var extents: [(UInt64, Bool)] = []
        var at: UInt64 = 0
        while at < raw.length {
            let s = try raw.blockStatus(at: at, length: raw.length - at)
            #expect(s.length % 512 == 0, "\(at)+\(s.length)")
            extents.append((s.length, s.isData))
            at += s.length
        }
        #expect(extents.map(\.0) == [512, 512] && extents.allSatisfy(\.1))
        // Not probed: the file's own extents.
        let plain = BlockNode(name: "p", driver: try RawDriver(file: file))
        #expect(try plain.blockStatus(at: 0, length: 1024).length == 1000)
        try file.driver.close()
    }
}
