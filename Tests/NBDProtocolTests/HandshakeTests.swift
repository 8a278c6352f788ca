@testable import NBDProtocol
import Testing

func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
func string32(_ s: String) -> [UInt8] { be(UInt32(s.utf8.count)) + Array(s.utf8) }

@Suite struct HandshakeTests {
    @Test func greetingIsFixedNewstyleWithNoZeroes() {
        #expect(Handshake.greeting() == Array("NBDMAGIC".utf8) + Array("IHAVEOPT".utf8) + [0, 3])
    }

    @Test func clientFlags() throws {
        #expect(try [UInt8]([0, 0, 0, 3]).withUnsafeBytes { try Handshake.parseClientFlags($0) } == 3)
        #expect(try [UInt8]([0, 0, 0]).withUnsafeBytes { try Handshake.parseClientFlags($0) } == nil)
        #expect(throws: Handshake.ParseError.unknownClientFlags(0x4745_5420)) {
            try Array("GET /".utf8).withUnsafeBytes { try Handshake.parseClientFlags($0) }
        }
    }

    @Test func optionHeader() throws {
        let bytes = Array("IHAVEOPT".utf8) + be(UInt32(7)) + be(UInt32(10))
        #expect(try bytes.withUnsafeBytes { try Handshake.parseOptionHeader($0) } == .init(option: 7, length: 10))
        #expect(try Array(bytes.prefix(15)).withUnsafeBytes { try Handshake.parseOptionHeader($0) } == nil)
        let bad = Array("IHAVEOPX".utf8) + be(UInt32(7)) + be(UInt32(0))
        #expect(throws: Handshake.ParseError.self) { try bad.withUnsafeBytes { try Handshake.parseOptionHeader($0) } }
        let long = Array("IHAVEOPT".utf8) + be(UInt32(7)) + be(NBD.maxOptionLength + 1)
        #expect(throws: Handshake.ParseError.optionTooLong(NBD.maxOptionLength + 1)) {
            try long.withUnsafeBytes { try Handshake.parseOptionHeader($0) }
        }
    }

    @Test func optionReplyLayout() {
        let r = Handshake.optionReply(option: 7, type: .info, payload: [1, 2])
        #expect(r == be(NBD.optReplyMagic) + be(UInt32(7)) + be(UInt32(3)) + be(UInt32(2)) + [1, 2])
        let e = Handshake.errorReply(option: 99, type: .errUnsup, message: "no")
        #expect(Handshake.errorMessage(inReply: e) == "errUnsup: no")
        #expect(Handshake.errorMessage(inReply: r) == nil)
    }

    @Test func infoPayloads() {
        #expect(Handshake.infoExport(size: 1 << 30, flags: [.hasFlags, .readOnly]) == be(UInt16(0)) + be(UInt64(1 << 30)) + be(UInt16(3)))
        #expect(Handshake.infoName("d") == be(UInt16(1)) + Array("d".utf8))
        #expect(Handshake.infoDescription("x y") == be(UInt16(2)) + Array("x y".utf8))
        #expect(Handshake.infoBlockSize(minimum: 1, preferred: 4096, maximum: 1 << 25)
                == be(UInt16(3)) + be(UInt32(1)) + be(UInt32(4096)) + be(UInt32(1 << 25)))
        #expect(Handshake.serverReplyPayload(name: "ab", description: "c") == string32("ab") + Array("c".utf8))
        #expect(Handshake.metaContextPayload(id: 2, name: "base:allocation") == be(UInt32(2)) + Array("base:allocation".utf8))
    }

    @Test func exportNameReplyHonoursNoZeroes() {
        #expect(Handshake.exportNameReply(size: 5, flags: [.hasFlags], noZeroes: true) == be(UInt64(5)) + be(UInt16(1)))
        #expect(Handshake.exportNameReply(size: 5, flags: [.hasFlags], noZeroes: false).count == 10 + 124)
    }

    @Test func infoRequestParsing() {
        #expect(Handshake.parseInfoRequest(string32("disk") + be(UInt16(2)) + be(UInt16(1)) + be(UInt16(3)))
                == .init(name: "disk", requests: [1, 3]))
        #expect(Handshake.parseInfoRequest(string32("") + be(UInt16(0))) == .init(name: "", requests: []))
        // Truncated, trailing garbage, a name longer than the payload, a name over 4096 bytes.
        #expect(Handshake.parseInfoRequest(string32("disk") + be(UInt16(2)) + be(UInt16(1))) == nil)
        #expect(Handshake.parseInfoRequest(string32("disk") + be(UInt16(0)) + [0]) == nil)
        #expect(Handshake.parseInfoRequest(be(UInt32(100)) + Array("abc".utf8)) == nil)
        #expect(Handshake.parseInfoRequest(string32(String(repeating: "a", count: 4097)) + be(UInt16(0))) == nil)
        #expect(Handshake.parseInfoRequest([]) == nil)
    }

    @Test func metaContextRequestParsing() {
        let p = string32("disk") + be(UInt32(2)) + string32("base:allocation") + string32("qemu:")
        #expect(Handshake.parseMetaContextRequest(p) == .init(exportName: "disk", queries: ["base:allocation", "qemu:"]))
        #expect(Handshake.parseMetaContextRequest(string32("disk") + be(UInt32(0))) == .init(exportName: "disk", queries: []))
        #expect(Handshake.parseMetaContextRequest(string32("disk") + be(UInt32(2)) + string32("base:allocation")) == nil)
        #expect(Handshake.parseMetaContextRequest(string32("disk") + be(UInt32(0xffff_ffff))) == nil)
    }

    @Test func payloadReaderIsBoundsChecked() {
        var r = PayloadReader([1, 2, 3])
        #expect(r.u16() == 0x0102)
        #expect(r.u32() == nil)
        #expect(r.take(2) == nil)
        #expect(r.take(-1) == nil)
        #expect(r.take(1) == [3])
        #expect(r.remaining == 0)
    }
}

@Suite struct BlockSizeRulesTests {
    @Test func advertisedSizesFollowTheSpec() {
        // Already valid: unchanged.
        #expect(Handshake.blockSizes(minimum: 1, preferred: 4096, maximum: 32 << 20, exportSize: 1 << 30, cap: 32 << 20)
                == (1, 4096, 32 << 20))
        // Preferred below 512 or not a power of two; minimum not a power of two.
        let a = Handshake.blockSizes(minimum: 3, preferred: 100, maximum: 1 << 20, exportSize: 1 << 30, cap: 32 << 20)
        #expect(a == (4, 512, 1 << 20))
        // Minimum over 64 KiB; maximum not a multiple of the minimum; over the cap.
        let b = Handshake.blockSizes(minimum: 1 << 20, preferred: 4096, maximum: (64 << 20) + 5, exportSize: 1 << 30,
                                     cap: 32 << 20)
        #expect(b == (65536, 65536, 32 << 20))
        let c = Handshake.blockSizes(minimum: 4096, preferred: 4096, maximum: 10_000, exportSize: 1 << 30, cap: 32 << 20)
        #expect(c == (4096, 4096, 8192))
        // Maximum at least the smaller of preferred and the export size; 0 means the cap.
        let d = Handshake.blockSizes(minimum: 512, preferred: 65536, maximum: 1024, exportSize: 1 << 20, cap: 32 << 20)
        #expect(d == (512, 65536, 65536))
        let e = Handshake.blockSizes(minimum: 512, preferred: 65536, maximum: 0, exportSize: 3000, cap: 32 << 20)
        #expect(e.maximum == 32 << 20)
        let f = Handshake.blockSizes(minimum: 512, preferred: 65536, maximum: 512, exportSize: 3000, cap: 32 << 20)
        #expect(f.maximum == 3072, "≥ the 3000-byte export, a multiple of 512")
    }
}
