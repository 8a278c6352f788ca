import BlockDrivers
import Testing

/// What makes a first sector probe as another format (QEMU 7.2's `bdrv_probe` of each driver):
/// a probed raw image refuses writes that leave such a sector (RawDriver.probed).
@Suite struct FormatSignatureTests {
    static func sector(_ head: [UInt8], at offset: Int = 0, _ more: [(Int, [UInt8])] = []) -> [UInt8] {
        var s = [UInt8](repeating: 0, count: 512)
        s.replaceSubrange(offset..<offset + head.count, with: head)
        for (at, bytes) in more { s.replaceSubrange(at..<at + bytes.count, with: bytes) }
        return s
    }
    static func format(_ s: [UInt8]) -> String? { s.withUnsafeBytes { FormatSignature.format(of: $0) } }
    static func ascii(_ text: String) -> [UInt8] { Array(text.utf8) }

    @Test func recognisedHeaders() {
        #expect(Self.format(Self.sector([0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 3])) == "qcow2")
        #expect(Self.format(Self.sector([0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 2])) == "qcow2")
        #expect(Self.format(Self.sector([0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 1])) == "qcow")
        #expect(Self.format(Self.sector(Self.ascii("QED") + [0])) == "qed")
        #expect(Self.format(Self.sector(Self.ascii("KDMV"))) == "vmdk")
        #expect(Self.format(Self.sector(Self.ascii("COWD"))) == "vmdk")
        #expect(Self.format(Self.sector(Self.ascii("# Disk DescriptorFile\n  \r\nversion=2\r\n"))) == "vmdk")
        #expect(Self.format(Self.sector(Self.ascii("conectix"))) == "vpc")
        #expect(Self.format(Self.sector(Self.ascii("vhdxfile"))) == "vhdx")
        #expect(Self.format(Self.sector([0x7F, 0x10, 0xDA, 0xBE], at: 64)) == "vdi")
        #expect(Self.format(Self.sector(Self.ascii("LUKS") + [0xBA, 0xBE, 0, 1])) == "luks")
        #expect(Self.format(Self.sector(Self.ascii("WithoutFreeSpace"), [(16, [2, 0, 0, 0])])) == "parallels")
        #expect(Self.format(Self.sector(Self.ascii("WithouFreSpacExt"), [(16, [2, 0, 0, 0])])) == "parallels")
        #expect(Self.format(Self.sector(Self.ascii("Bochs Virtual HD Image"),
                                        [(32, Self.ascii("Redolog")), (48, Self.ascii("Growing")), (64, [0, 0, 2, 0])])) == "bochs")
        let cloop = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
        #expect(Self.format(Self.sector(Self.ascii(cloop))) == "cloop")
    }

    /// Near misses stay raw, as QEMU's probes leave them.
    @Test func nearMissesAreRaw() {
        #expect(Self.format(Self.sector([])) == nil)
        #expect(Self.format(Self.sector([0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 0])) == nil)     // version 0
        #expect(Self.format(Self.sector(Self.ascii("LUKS") + [0xBA, 0xBE, 0, 2])) == nil)   // LUKS2
        #expect(Self.format(Self.sector(Self.ascii("WithoutFreeSpace"), [(16, [3, 0, 0, 0])])) == nil)
        #expect(Self.format(Self.sector(Self.ascii("Bochs Virtual HD Image"),
                                        [(32, Self.ascii("Redolog")), (48, Self.ascii("Undoable")), (64, [0, 0, 2, 0])])) == nil)
        #expect(Self.format(Self.sector(Self.ascii("# Disk DescriptorFile\nversion=4\n"))) == nil)
        #expect(Self.format(Self.sector(Self.ascii("hello, world\n"))) == nil)
        #expect(Self.format(Self.sector(Self.ascii("conectiX"))) == nil)
    }
}
