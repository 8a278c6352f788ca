#if canImport(Glibc)
import Glibc
#endif
import Testing

/// The NBD spec's MUSTs that blockd once broke, each as a raw-socket scenario with the strict
/// `ProtocolClient` (which also checks every reply it decodes against the spec).
@Suite struct NBDStrictnessTests {
    static let einval: UInt32 = 22
    static let eperm: UInt32 = 1
    static let sendDF: UInt16 = 1 << 7

    final class Setup {
        let dir: TempDir
        let image: String
        let daemon: Blockd

        /// An 8 MiB raw image with data in its first MiB and a hole after.
        init(readOnly: Bool = false) throws {
            dir = try TempDir(prefix: "nbdstrict")
            image = dir.file("disk.img")
            try Files.createSparse(image, size: 8 << 20)
            try Files.write(image, bytes: Files.pattern(count: 1 << 20, seed: 7), offset: 0)
            // -v: the per-client lines some tests check (quiet by default, like qemu-nbd).
            daemon = try Blockd.serve(image: image, in: dir, readOnly: readOnly, extra: ["-v"])
        }

        func client(structured: Bool = false, extended: Bool = false, contexts: [String] = []) throws -> ProtocolClient {
            let c = try ProtocolClient(unixPath: daemon.socket!)
            try c.handshake(export: "disk", structured: structured, extended: extended, contexts: contexts)
            return c
        }
    }

    @Test func fuaIsAcceptedOnEveryCommand() throws {
        let s = try Setup()
        let c = try s.client(structured: true, contexts: ["base:allocation"])
        #expect(c.flags & (1 << 3) != 0, "SEND_FUA advertised")
        let fua: UInt16 = 1
        #expect(try c.read(offset: 0, length: 4096, flags: fua).error == 0)
        #expect(try c.request(type: 3, flags: fua, offset: 0, length: 0).error == 0, "FLUSH")
        #expect(try c.blockStatus(offset: 0, length: 1 << 20, flags: fua).error == 0)
        #expect(try c.request(type: 5, flags: fua, offset: 0, length: 4096).error == 0, "CACHE")
        #expect(try c.write(offset: 2 << 20, [UInt8](repeating: 9, count: 4096), flags: fua).error == 0)
        #expect(try c.request(type: 4, flags: fua, offset: 3 << 20, length: 4096).error == 0, "TRIM")
        #expect(try c.request(type: 6, flags: fua, offset: 4 << 20, length: 4096).error == 0, "WRITE_ZEROES")
        // Without structured replies too.
        let plain = try s.client()
        #expect(try plain.read(offset: 0, length: 512, flags: fua).error == 0)
        #expect(try plain.request(type: 3, flags: fua, offset: 0, length: 0).error == 0)
        try c.disconnect()
        try plain.disconnect()
        #expect(s.daemon.stop() == 0)
        #expect(try Files.readBytes(s.image, offset: 2 << 20, count: 4096) == [UInt8](repeating: 9, count: 4096))
    }

    @Test func sendDFOnlyWithStructuredReplies() throws {
        let s = try Setup()
        let plain = try s.client()
        #expect(plain.flags & Self.sendDF == 0, "the spec: MUST leave SEND_DF clear without structured replies")
        let r = try plain.request(type: 0, flags: 1 << 2, offset: 0, length: 512)
        #expect(r.simple && r.error == Self.einval, "DF without structured replies is refused")
        // The old option NBD_OPT_EXPORT_NAME reports the same flags.
        let old = try ProtocolClient(unixPath: s.daemon.socket!)
        try old.raw.greet()
        try old.raw.sendOption(1, Array("disk".utf8))
        guard let reply = try old.raw.receive(10) else { Issue.record("no export reply"); return }
        #expect(RawNBDClient.load(reply, 8, UInt16.self) & Self.sendDF == 0)

        let structured = try s.client(structured: true)
        #expect(structured.flags & Self.sendDF != 0)
        // DF over data followed by a hole: one OFFSET_DATA chunk, no hole chunk.
        let df = try structured.read(offset: (1 << 20) - 65536, length: 2 * 65536, flags: 1 << 2)
        #expect(df.error == 0 && df.chunkTypes == [1])
        #expect(df.data == Array(Files.pattern(count: 1 << 20, seed: 7).suffix(65536)) + [UInt8](repeating: 0, count: 65536))
        let sparse = try structured.read(offset: (1 << 20) - 65536, length: 2 * 65536)
        #expect(sparse.chunkTypes.contains(2), "without DF the hole is a hole chunk")
        #expect(sparse.data == df.data)
    }

    @Test func namespaceOnlyQueryDoesNotSelectBaseAllocation() throws {
        let s = try Setup()
        let c = try ProtocolClient(unixPath: s.daemon.socket!)
        try c.raw.greet()
        #expect(try c.option(8).last?.type == 1)
        let query = ProtocolClient.string32("disk") + ProtocolClient.be(UInt32(1)) + ProtocolClient.string32("base:")
        // LIST: `base:` is a wildcard for every base context.
        let list = try c.option(9, query)
        #expect(list.filter { $0.type == 4 }.map { String(decoding: $0.payload.dropFirst(4), as: UTF8.self) } == ["base:allocation"])
        // SET: the same query must select nothing.
        let set = try c.option(10, query)
        #expect(set.map(\.type) == [1])
        c.assume(.structured)
        try c.go(export: "disk")
        let bs = try c.blockStatus(offset: 0, length: 4096)
        #expect(bs.error == Self.einval && bs.extents.isEmpty, "no context was selected")
        #expect(try c.read(offset: 0, length: 4096).error == 0)
    }

    @Test func failedSetMetaContextClearsTheSelection() throws {
        let s = try Setup()
        let c = try ProtocolClient(unixPath: s.daemon.socket!)
        try c.raw.greet()
        #expect(try c.option(8).last?.type == 1)
        let good = try c.option(10, ProtocolClient.string32("disk") + ProtocolClient.be(UInt32(1))
                                    + ProtocolClient.string32("base:allocation"))
        #expect(good.map(\.type) == [4, 1])
        let bad = try c.option(10, ProtocolClient.string32("nope") + ProtocolClient.be(UInt32(1))
                                   + ProtocolClient.string32("base:allocation"))
        #expect(bad.map(\.type) == [0x8000_0006])
        c.assume(.structured)
        try c.go(export: "disk")
        let bs = try c.blockStatus(offset: 0, length: 4096)
        #expect(bs.error == Self.einval, "the failed SET replaced the earlier selection with none")
    }

    @Test(arguments: [ProtocolClient.Mode.simple, .structured, .extended])
    func zeroLengthReadIsAnsweredWithoutAnEmptyDataChunk(mode: ProtocolClient.Mode) throws {
        let s = try Setup()
        let c = try s.client(structured: mode == .structured, extended: mode == .extended)
        let r = try c.read(offset: 4096, length: 0)
        #expect(r.error == 0 && r.data.isEmpty)
        switch mode {
        case .simple: #expect(r.simple)
        case .structured, .extended: #expect(r.chunkTypes == [0], "a NONE chunk, not OFFSET_DATA of length 8")
        }
        // The stream is still in step.
        #expect(try c.read(offset: 0, length: 512).data == Array(Files.pattern(count: 512, seed: 7)))
    }

    @Test func blockStatusNeverHasAZeroLengthDescriptor() throws {
        let s = try Setup()
        let c = try s.client(structured: true, contexts: ["base:allocation", "qemu:allocation-depth"])
        #expect(c.contextIDs.count == 2)
        let zero = try c.blockStatus(offset: 4096, length: 0)
        #expect(zero.error == Self.einval && zero.extents.isEmpty)
        // The last byte, at the end of the export: every descriptor is nonzero (the client
        // checks) and one per context.
        let last = try c.blockStatus(offset: (8 << 20) - 1, length: 1)
        #expect(last.error == 0 && last.extents.count == 2)
        for (_, list) in last.extents { #expect(list.map(\.length) == [1]) }
        let one = try c.blockStatus(offset: 0, length: 8 << 20, flags: 1 << 3)
        for (_, list) in one.extents { #expect(list.count == 1 && list[0].length <= 8 << 20) }
        let all = try c.blockStatus(offset: 0, length: 8 << 20)
        let base = all.extents[c.contextIDs["base:allocation"]!] ?? []
        #expect(base.first.map { $0.length == 1 << 20 && $0.flags == 0 } == true)
        #expect(base.reduce(0) { $0 + $1.length } == 8 << 20)
    }

    @Test func requestsReceivedBeforeAHalfCloseAreAnswered() throws {
        let s = try Setup()
        let c = try s.client()
        var expected: [UInt64: (read: Int?, data: [UInt8]?)] = [:]
        var written: [(offset: UInt64, data: [UInt8])] = []
        for i in 0..<20 {
            let data = Files.pattern(count: 65536, seed: UInt64(100 + i))
            let offset = UInt64(2 << 20) + UInt64(i) * 65536
            expected[try c.send(type: 1, offset: offset, length: 65536, payload: data)] = (nil, nil)
            written.append((offset, data))
        }
        expected[try c.send(type: 3, offset: 0, length: 0)] = (nil, nil)   // flush: a worker
        for i in 0..<10 {   // 1 MiB reads: workers
            expected[try c.send(type: 0, offset: 0, length: 1 << 20)] = (1 << 20, i == 0 ? Files.pattern(count: 1 << 20, seed: 7) : nil)
        }
        for i in 0..<50 {   // 4 KiB reads: inline
            expected[try c.send(type: 0, offset: UInt64(i) * 4096, length: 4096)] = (4096, nil)
        }
        c.raw.shutdownWrite()
        // Every request gets its reply, in completion order; then the server closes.
        var pending = expected
        while !pending.isEmpty {
            guard let head = try c.raw.receive(16) else {
                Issue.record("closed with \(pending.count) replies missing:\n\(s.daemon.stderrText)")
                return
            }
            let cookie = RawNBDClient.load(head, 8, UInt64.self)
            #expect(RawNBDClient.load(head, 4, UInt32.self) == 0)
            guard let e = pending.removeValue(forKey: cookie) else { Issue.record("unexpected cookie \(cookie)"); return }
            if let n = e.read {
                let data = try c.raw.receive(n)
                if let want = e.data { #expect(data == want) }
            }
        }
        #expect(c.raw.waitForClose(), "the server closes once everything is answered")
        #expect(s.daemon.waitForLog("disconnected without NBD_CMD_DISC") != nil)
        #expect(s.daemon.stop() == 0)
        for w in written { #expect(try Files.readBytes(s.image, offset: Int(w.offset), count: 65536) == w.data) }
    }

    @Test func errorsAreStructuredChunksWithAMessage() throws {
        let s = try Setup(readOnly: true)
        let c = try s.client(structured: true)
        let w = try c.write(offset: 0, [1, 2, 3, 4])
        #expect(w.error == Self.eperm && w.chunkTypes == [0x8001])
        #expect(w.message.contains("read-only"), "\(w.message)")
        let past = try c.read(offset: 8 << 20, length: 512)
        #expect(past.error == Self.einval && past.chunkTypes == [0x8001])
        // Without structured replies: simple replies.
        let plain = try s.client()
        let p = try plain.write(offset: 0, [1, 2, 3, 4])
        #expect(p.simple && p.error == Self.eperm)
    }

    @Test func anOversizedOptionIsRefusedAndTheHandshakeGoesOn() throws {
        let s = try Setup()
        let c = try ProtocolClient(unixPath: s.daemon.socket!)
        try c.raw.greet()
        // 100 KiB of data on an unknown option: skipped, refused with NBD_REP_ERR_TOO_BIG.
        let r = try c.option(0x1234, [UInt8](repeating: 0x41, count: 100 * 1024))
        #expect(r.map(\.type) == [0x8000_0009])
        #expect(String(decoding: r[0].payload, as: UTF8.self).contains("too large"))
        try c.go(export: "disk")
        #expect(try c.read(offset: 0, length: 512).error == 0)
    }
}
