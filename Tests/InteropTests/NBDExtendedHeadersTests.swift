#if canImport(Glibc)
import Glibc
#endif
import Testing

/// `NBD_OPT_EXTENDED_HEADERS` (QEMU 8.2+, nbdkit 1.36+, libnbd 1.18+): 32-byte request and
/// reply headers, 64-bit effect lengths, `BLOCK_STATUS_EXT`, the block-status payload filter.
/// The installed libnbd (1.14) predates them, so the project's `ProtocolClient` speaks them.
@Suite struct NBDExtendedHeadersTests {
    static let einval: UInt32 = 22
    static let blockStatPayload: UInt16 = 1 << 12

    final class Setup {
        let dir: TempDir
        let image: String
        let daemon: Blockd

        /// A sparse raw image of `size` bytes (8 GiB by default: effect lengths past 4 GiB).
        init(size: Int = 8 << 30) throws {
            dir = try TempDir(prefix: "nbdext")
            image = dir.file("disk.img")
            try Files.createSparse(image, size: size)
            // -v: the per-client lines some tests check (quiet by default, like qemu-nbd).
            daemon = try Blockd.serve(image: image, in: dir, extra: ["-v"])
        }

        func client(contexts: [String] = []) throws -> ProtocolClient {
            let c = try ProtocolClient(unixPath: daemon.socket!)
            try c.handshake(export: "disk", extended: true, contexts: contexts)
            return c
        }
    }

    @Test func negotiationAndFlags() throws {
        let s = try Setup(size: 64 << 20)
        let c = try ProtocolClient(unixPath: s.daemon.socket!)
        try c.raw.greet()
        #expect(try c.option(11, [1]).map(\.type) == [0x8000_0003], "the option takes no data")
        #expect(try c.option(11).map(\.type) == [1])
        #expect(try c.option(11).map(\.type) == [0x8000_0003], "twice is invalid")
        #expect(try c.option(8).map(\.type) == [0x8000_000a], "no downgrade to structured replies")
        c.assume(.extended)
        try c.go(export: "disk")
        #expect(c.flags & (1 << 7) != 0, "SEND_DF")
        #expect(c.flags & Self.blockStatPayload == 0, "no contexts, no block-status payload")
        #expect(try c.read(offset: 0, length: 4096).error == 0)

        let withContexts = try s.client(contexts: ["base:allocation"])
        #expect(withContexts.flags & Self.blockStatPayload != 0)

        // NBD_OPT_EXPORT_NAME after extended headers: the spec forbids it; hard disconnect.
        let old = try ProtocolClient(unixPath: s.daemon.socket!)
        try old.raw.greet()
        #expect(try old.option(11).map(\.type) == [1])
        try old.raw.sendOption(1, Array("disk".utf8))
        #expect(old.raw.waitForClose())
        #expect(s.daemon.waitForLog("NBD_OPT_EXPORT_NAME after negotiating extended headers") != nil)
    }

    @Test func readsWritesAnd64BitEffectLengths() throws {
        let s = try Setup()
        let c = try s.client()
        let data = Files.pattern(count: 65536, seed: 3)
        let w = try c.write(offset: 5 << 30, data)
        #expect(w.error == 0 && w.chunkTypes == [0], "success without data is a NONE chunk")
        let r = try c.read(offset: 5 << 30, length: 65536)
        #expect(r.error == 0 && r.data == data)
        let df = try c.read(offset: (5 << 30) - 4096, length: 8192, flags: 1 << 2)
        #expect(df.chunkTypes == [1] && df.data == [UInt8](repeating: 0, count: 4096) + data.prefix(4096))
        #expect(try c.read(offset: 100, length: 0).chunkTypes == [0])
        #expect(try c.write(offset: 4096, [7, 7, 7], flags: 1).error == 0, "FUA write")
        #expect(try c.request(type: 3, offset: 0, length: 0).chunkTypes == [0])
        // Write-zeroes and trim over more than 4 GiB in one request.
        #expect(try c.request(type: 6, offset: 1 << 30, length: 5 << 30).error == 0)
        #expect(try c.read(offset: 5 << 30, length: 65536).data == [UInt8](repeating: 0, count: 65536))
        #expect(try c.request(type: 4, offset: 1 << 30, length: 6 << 30).error == 0)
        // Still limited: a read longer than the maximum payload, a range past the end.
        #expect(try c.read(offset: 0, length: 64 << 20).error == Self.einval)
        #expect(try c.request(type: 6, offset: 4 << 30, length: 5 << 30).error == 28, "ENOSPC past the end")
        try c.disconnect()
        #expect(c.raw.waitForClose())
        #expect(s.daemon.stop() == 0)
        #expect(try Files.readBytes(s.image, offset: 4096, count: 3) == [7, 7, 7])
    }

    @Test func blockStatusExtReportsExtentsPast4GiB() throws {
        let s = try Setup()
        try Files.write(s.image, bytes: Files.pattern(count: 65536, seed: 9), offset: 7 << 30)
        let c = try s.client(contexts: ["base:allocation", "qemu:allocation-depth"])
        let base = try #require(c.contextIDs["base:allocation"])
        let all = try c.blockStatus(offset: 0, length: 8 << 30)
        #expect(all.chunkTypes == [6, 6], "BLOCK_STATUS_EXT, one per context")
        let extents = try #require(all.extents[base])
        #expect(extents.first.map { $0.length == 7 << 30 && $0.flags == 3 } == true, "\(extents.prefix(3))")
        #expect(extents.dropFirst().first.map { $0.length == 65536 && $0.flags == 0 } == true)
        #expect(extents.reduce(0) { $0 + $1.length } == 8 << 30)
        let one = try c.blockStatus(offset: 1 << 30, length: 5 << 30, flags: 1 << 3)
        for (_, list) in one.extents { #expect(list.count == 1 && list[0].length == 5 << 30) }
    }

    @Test func blockStatusPayloadSelectsContexts() throws {
        let s = try Setup(size: 64 << 20)
        let c = try s.client(contexts: ["base:allocation", "qemu:allocation-depth"])
        let base = try #require(c.contextIDs["base:allocation"])
        let depth = try #require(c.contextIDs["qemu:allocation-depth"])
        func payload(_ effect: UInt64, _ ids: [UInt32]) -> [UInt8] {
            ids.reduce(ProtocolClient.be(effect)) { $0 + ProtocolClient.be($1) }
        }
        func status(_ p: [UInt8]) throws -> ProtocolClient.Reply {
            try c.blockStatus(offset: 0, length: UInt64(p.count), flags: 1 << 5, payload: p)
        }
        let onlyDepth = try status(payload(1 << 20, [depth]))
        #expect(onlyDepth.error == 0 && Array(onlyDepth.extents.keys) == [depth])
        #expect(onlyDepth.extents[depth]?.reduce(0) { $0 + $1.length } == 1 << 20, "the effect length comes from the payload")
        let both = try status(payload(1 << 20, [depth, base]))
        #expect(Set(both.extents.keys) == [base, depth])
        // Invalid payloads: EINVAL, the payload consumed, the connection goes on.
        #expect(try status(payload(4096, [99])).error == Self.einval, "an id that was not selected")
        #expect(try status(payload(4096, [base, base])).error == Self.einval, "an id twice")
        #expect(try status(payload(4096, [])).error == Self.einval, "no id")
        #expect(try status(payload(4096, [base]) + [0, 0]).error == Self.einval, "not a whole id")
        #expect(try status(payload(4096, [base, depth, 5])).error == Self.einval, "more ids than selected")
        #expect(try status(payload(0, [base])).error == Self.einval, "effect length 0")
        #expect(try c.read(offset: 0, length: 4096).error == 0)
        // Without the flag, every selected context answers.
        #expect(try c.blockStatus(offset: 0, length: 4096).extents.count == 2)
    }

    @Test func malformedExtendedRequests() throws {
        let s = try Setup(size: 64 << 20)
        let c = try s.client()
        // A payload on a command that takes none: consumed, then EINVAL.
        let r = try c.request(type: 0, flags: 1 << 5, offset: 0, length: 8, payload: [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(r.error == Self.einval)
        #expect(try c.read(offset: 0, length: 512).error == 0, "the stream is in step")
        // A write without PAYLOAD_LEN still carries its data (as QEMU tolerates).
        #expect(try c.request(type: 1, offset: 0, length: 4, payload: [1, 2, 3, 4]).error == 0)
        #expect(try c.read(offset: 0, length: 4).data == [1, 2, 3, 4])

        // A compact header once extended headers are negotiated: the stream is lost.
        let compact = try s.client()
        try compact.raw.send(ProtocolClient.be(UInt32(0x2560_9513)) + [UInt8](repeating: 0, count: 28))
        #expect(compact.raw.waitForClose())
        #expect(s.daemon.waitForLog("badMagic") != nil)

        // A payload longer than the maximum: the spec asks for a hard disconnect.
        let huge = try s.client()
        try huge.send(type: 1, flags: 1 << 5, offset: 0, length: 64 << 20)
        #expect(huge.raw.waitForClose())
        #expect(s.daemon.waitForLog("exceeds the maximum") != nil)

        // Everyone else is unaffected.
        #expect(try c.read(offset: 0, length: 4).data == [1, 2, 3, 4])
    }
}
