/// The image formats QEMU 7.2 recognises from an image's first 512 bytes (each driver's
/// `bdrv_probe`: qcow2, qcow, qed, vmdk, vpc, vhdx, vdi, luks, parallels, bochs, cloop; dmg goes
/// by file name only). A raw image opened by probing must never get a first sector that one of
/// these recognises: the next probe would open it as that format, with that format's backing
/// file, on a client's say (CVE-2008-2004). QEMU refuses such writes with EPERM.
public enum FormatSignature {
    /// The format `sector` (the first 512 bytes of an image) would probe as, or nil for raw.
    public static func format(of sector: UnsafeRawBufferPointer) -> String? {
        let b = sector
        let n = b.count
        func bytes(_ at: Int, _ s: [UInt8]) -> Bool {
            at + s.count <= n && (0..<s.count).allSatisfy { b[at + $0] == s[$0] }
        }
        func ascii(_ at: Int, _ s: String) -> Bool { bytes(at, Array(s.utf8)) }
        func be32(_ at: Int) -> UInt32? {
            at + 4 <= n ? (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(b[at + $1]) } : nil
        }
        func le32(_ at: Int) -> UInt32? {
            at + 4 <= n ? (0..<4).reversed().reduce(UInt32(0)) { $0 << 8 | UInt32(b[at + $1]) } : nil
        }
        /// A NUL-terminated string in a fixed field, as `strcmp` compares it.
        func cString(_ at: Int, _ s: String) -> Bool { ascii(at, s) && at + s.utf8.count < n && b[at + s.utf8.count] == 0 }

        // qcow2 and qcow: "QFI\xfb", version >= 2 (qcow2, 112-byte header) or 1 (qcow, 48 bytes).
        if bytes(0, [0x51, 0x46, 0x49, 0xFB]), let version = be32(4) {
            if version >= 2 && n >= 112 { return "qcow2" }
            if version == 1 && n >= 48 { return "qcow" }
        }
        if n >= 64 && bytes(0, Array("QED".utf8) + [0]) { return "qed" }
        if ascii(0, "COWD") || ascii(0, "KDMV") { return "vmdk" }
        if vmdkDescriptor(b) { return "vmdk" }
        if ascii(0, "conectix") { return "vpc" }
        if ascii(0, "vhdxfile") { return "vhdx" }
        if n >= 512 && le32(0x40) == 0xBEDA_107F { return "vdi" }
        if bytes(0, Array("LUKS".utf8) + [0xBA, 0xBE]) && n >= 8 && b[6] == 0 && b[7] == 1 { return "luks" }
        if n >= 64 && (ascii(0, "WithoutFreeSpace") || ascii(0, "WithouFreSpacExt")) && le32(16) == 2 { return "parallels" }
        if n >= 512 && cString(0, "Bochs Virtual HD Image") && cString(32, "Redolog") && cString(48, "Growing"),
           let v = le32(64), v == 0x0002_0000 || v == 0x0001_0000 {
            return "bochs"
        }
        let cloop = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
        if ascii(0, String(decoding: cloop.utf8.prefix(n), as: UTF8.self)) && n > 0 { return "cloop" }
        return nil
    }

    /// QEMU's `vmdk_probe` for a text descriptor: comment lines and blank lines, then
    /// `version=1|2|3` on a line of its own.
    private static func vmdkDescriptor(_ b: UnsafeRawBufferPointer) -> Bool {
        var p = 0
        let end = b.count
        let nl = UInt8(ascii: "\n"), cr = UInt8(ascii: "\r")
        while p < end {
            if b[p] == UInt8(ascii: "#") {
                while p < end && b[p] != nl { p += 1 }
                p += 1
                continue
            }
            if b[p] == UInt8(ascii: " ") {
                while p < end && b[p] == UInt8(ascii: " ") { p += 1 }
                if p < end && b[p] == cr { p += 1 }
                if p == end || b[p] != nl { return false }
                p += 1
                continue
            }
            for version in [UInt8(ascii: "1"), UInt8(ascii: "2"), UInt8(ascii: "3")] {
                let prefix = Array("version=".utf8) + [version]
                if end - p >= prefix.count + 1 && (0..<prefix.count).allSatisfy({ b[p + $0] == prefix[$0] }) {
                    if b[p + prefix.count] == nl { return true }
                    if end - p >= prefix.count + 2 && b[p + prefix.count] == cr && b[p + prefix.count + 1] == nl { return true }
                }
            }
            return false
        }
        return false
    }
}
