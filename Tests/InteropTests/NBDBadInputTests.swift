#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Malformed and hostile clients. Each scenario checks the protocol's answer (or a clean
/// disconnect of that client only), one log line, and that a second client connected the
/// whole time keeps working and nothing it had acknowledged is lost.
@Suite struct NBDBadInputTests {
    /// A daemon with a writable export "disk" and a well-behaved client that has already
    /// written (and had acknowledged) a block.
    final class Setup {
        let dir: TempDir
        let image: String
        let daemon: Blockd
        let witness: RawNBDClient
        let witnessData = Files.pattern(count: 65536, seed: 42)

        init(readOnly: Bool = false) throws {
            dir = try TempDir(prefix: "nbdbad")
            image = dir.file("disk.img")
            try Files.createSparse(image, size: 8 << 20)
            // -v: per-client lines (quiet by default, like qemu-nbd) are what these tests check.
            daemon = try Blockd.serve(image: image, in: dir, readOnly: readOnly, extra: ["-v"])
            witness = try RawNBDClient(unixPath: daemon.socket!)
            try witness.connect(export: "disk")
            if !readOnly {
                #expect(try witness.write(offset: 1 << 20, witnessData) == 0)
            }
        }

        /// The witness still reads, writes and flushes; the daemon still runs; its data is there.
        func checkWitness(sourceLocation: SourceLocation = #_sourceLocation) throws {
            #expect(daemon.isRunning, "daemon died:\n\(daemon.stderrText)", sourceLocation: sourceLocation)
            let r = try witness.read(offset: 0, length: 4096)
            #expect(r.error == 0, sourceLocation: sourceLocation)
            if witness.transmissionFlags & 2 == 0 {
                let back = try witness.read(offset: 1 << 20, length: 65536)
                #expect(back.error == 0 && back.data == witnessData, sourceLocation: sourceLocation)
                #expect(try witness.write(offset: 2 << 20, [1, 2, 3, 4]) == 0, sourceLocation: sourceLocation)
                #expect(try witness.flush() == 0, sourceLocation: sourceLocation)
            }
            // A brand-new client is accepted too.
            let fresh = try RawNBDClient(unixPath: daemon.socket!)
            try fresh.connect(export: "disk")
            #expect(try fresh.read(offset: 0, length: 512).error == 0, sourceLocation: sourceLocation)
            try fresh.disconnect()
        }

        /// Stops the daemon and checks the witness's acknowledged write reached the image.
        func finish(sourceLocation: SourceLocation = #_sourceLocation) throws {
            try witness.disconnect()
            #expect(daemon.stop() == 0, sourceLocation: sourceLocation)
            if witness.transmissionFlags & 2 == 0 {
                #expect(try Files.readBytes(image, offset: 1 << 20, count: 65536) == witnessData, sourceLocation: sourceLocation)
            }
        }
    }

    static let einval: UInt32 = 22
    static let eperm: UInt32 = 1
    static let enospc: UInt32 = 28

    @Test func garbageInsteadOfHandshakeDropsOnlyThatClient() throws {
        let s = try Setup()
        let bad = try RawNBDClient(unixPath: s.daemon.socket!)
        _ = try bad.receive(18)
        try bad.send(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(bad.waitForClose())
        let line = s.daemon.waitForLog("bad client flags")
        #expect(line != nil, "\(s.daemon.stderrText)")
        try s.checkWitness()
        try s.finish()
    }

    @Test func badOptionMagicDropsOnlyThatClient() throws {
        let s = try Setup()
        let bad = try RawNBDClient(unixPath: s.daemon.socket!)
        try bad.greet()
        try bad.send([UInt8](repeating: 0x41, count: 16))
        #expect(bad.waitForClose())
        #expect(s.daemon.waitForLog("handshake: badMagic") != nil, "\(s.daemon.stderrText)")
        try s.checkWitness()
        try s.finish()
    }

    @Test func unknownOptionGetsErrUnsupAndTheClientCanGoOn() throws {
        let s = try Setup()
        let c = try RawNBDClient(unixPath: s.daemon.socket!)
        try c.greet()
        try c.sendOption(0x1234, [1, 2, 3])
        let reply = try c.receiveOptionReply()
        #expect(reply?.type == 0x8000_0001)  // NBD_REP_ERR_UNSUP
        #expect(s.daemon.waitForLog("option 4660 refused") != nil, "\(s.daemon.stderrText)")
        // Same connection continues to transmission.
        let name = Array("disk".utf8)
        try c.sendOption(7, RawNBDClient.be(UInt32(name.count)) + name + RawNBDClient.be(UInt16(0)))
        var acked = false
        while let (type, _) = try c.receiveOptionReply() { if type == 1 { acked = true; break } }
        #expect(acked)
        #expect(try c.read(offset: 0, length: 512).error == 0)
        try s.checkWitness()
        try s.finish()
    }

    @Test func badRequestMagicDropsOnlyThatClient() throws {
        let s = try Setup()
        let bad = try RawNBDClient(unixPath: s.daemon.socket!)
        try bad.connect(export: "disk")
        try bad.sendRequest(type: 0, offset: 0, length: 512, magic: 0xdead_beef)
        #expect(bad.waitForClose())
        #expect(s.daemon.waitForLog("badMagic") != nil, "\(s.daemon.stderrText)")
        try s.checkWitness()
        try s.finish()
    }

    @Test func requestPastTheEndGetsEINVALOrENOSPC() throws {
        let s = try Setup()
        let c = try RawNBDClient(unixPath: s.daemon.socket!)
        try c.connect(export: "disk")
        #expect(try c.read(offset: (8 << 20) - 512, length: 1024).error == Self.einval)
        // The spec: a write past the end SHOULD get ENOSPC (as nbdkit and QEMU answer).
        #expect(try c.write(offset: 8 << 20, [1, 2, 3]) == Self.enospc)
        // Offset + length overflowing 64 bits.
        #expect(try c.read(offset: UInt64.max - 100, length: 512).error == Self.einval)
        // The connection stays usable, and the rejected write's payload was skipped cleanly.
        #expect(try c.read(offset: 0, length: 512).error == 0)
        #expect(s.daemon.waitForLog("offset 8388608 length 3") != nil, "\(s.daemon.stderrText)")
        #expect(Files.size(s.image) == 8 << 20)
        try s.checkWitness()
        try s.finish()
    }

    @Test func writeToReadOnlyExportGetsEPERM() throws {
        let s = try Setup(readOnly: true)
        let c = try RawNBDClient(unixPath: s.daemon.socket!)
        try c.connect(export: "disk")
        #expect(c.transmissionFlags & 2 != 0)
        #expect(try c.write(offset: 0, Files.pattern(count: 4096, seed: 1)) == Self.eperm)
        // Trim and write-zeroes too.
        try c.sendRequest(type: 4, offset: 0, length: 4096)
        #expect(try c.receiveSimpleReply()?.error == Self.eperm)
        try c.sendRequest(type: 6, offset: 0, length: 4096)
        #expect(try c.receiveSimpleReply()?.error == Self.eperm)
        #expect(try c.read(offset: 0, length: 4096).data == [UInt8](repeating: 0, count: 4096))
        #expect(s.daemon.waitForLog("read-only") != nil, "\(s.daemon.stderrText)")
        try s.checkWitness()
        try s.finish()
    }

    @Test func requestLongerThanTheMaximumGetsEINVAL() throws {
        let s = try Setup()
        let c = try RawNBDClient(unixPath: s.daemon.socket!)
        try c.connect(export: "disk")
        // Over the advertised 32 MiB maximum (the export is only 8 MiB, but size is checked after).
        #expect(try c.read(offset: 0, length: 64 << 20).error == Self.einval)
        #expect(try c.read(offset: 0, length: 512).error == 0)
        #expect(s.daemon.waitForLog("length 67108864") != nil, "\(s.daemon.stderrText)")
        // A write header announcing a huge payload: the server may not be able to skip it, so
        // either it answers EINVAL after the payload or drops the client; the witness lives.
        try c.sendRequest(type: 1, offset: 0, length: 0xffff_fff0)
        c.shutdownWrite()
        _ = c.waitForClose()
        try s.checkWitness()
        try s.finish()
    }

    @Test func disconnectInTheMiddleOfAWritePayloadLosesNothingAcknowledged() throws {
        let s = try Setup()
        do {
            let c = try RawNBDClient(unixPath: s.daemon.socket!)
            try c.connect(export: "disk")
            #expect(try c.write(offset: 3 << 20, [UInt8](repeating: 0x33, count: 4096)) == 0)
            // Header for 1 MiB, then only 100 KiB of it, then gone.
            try c.sendRequest(type: 1, offset: 4 << 20, length: 1 << 20, payload: [UInt8](repeating: 0x44, count: 100 << 10))
        }
        #expect(s.daemon.waitForLog("in the middle of a write payload") != nil, "\(s.daemon.stderrText)")
        try s.checkWitness()
        try s.finish()
        #expect(try Files.readBytes(s.image, offset: 3 << 20, count: 4096) == [UInt8](repeating: 0x33, count: 4096))
    }

    @Test func unknownCommandGetsEINVAL() throws {
        let s = try Setup()
        let c = try RawNBDClient(unixPath: s.daemon.socket!)
        try c.connect(export: "disk")
        try c.sendRequest(type: 99, offset: 0, length: 0)
        #expect(try c.receiveSimpleReply()?.error == Self.einval)
        // A flag the command does not take (REQ_ONE on a read).
        try c.sendRequest(type: 0, flags: 1 << 3, offset: 0, length: 512)
        #expect(try c.receiveSimpleReply()?.error == Self.einval)
        #expect(try c.read(offset: 0, length: 512).error == 0)
        try s.checkWitness()
        try s.finish()
    }

    @Test func exportNameOptionForAMissingExportClosesCleanly() throws {
        let s = try Setup()
        let c = try RawNBDClient(unixPath: s.daemon.socket!)
        try c.greet()
        try c.sendOption(1, Array("nope".utf8))
        #expect(c.waitForClose())
        #expect(s.daemon.waitForLog("unknown export 'nope'") != nil, "\(s.daemon.stderrText)")
        // NBD_OPT_GO for a missing export gets ERR_UNKNOWN instead.
        let g = try RawNBDClient(unixPath: s.daemon.socket!)
        try g.greet()
        let name = Array("nope".utf8)
        try g.sendOption(7, RawNBDClient.be(UInt32(name.count)) + name + RawNBDClient.be(UInt16(0)))
        #expect(try g.receiveOptionReply()?.type == 0x8000_0006)
        try s.checkWitness()
        try s.finish()
    }
}

extension RawNBDClient {
    /// Half-closes the sending side.
    public func shutdownWrite() { _ = Glibc.shutdown(fd, Int32(SHUT_WR)) }
}
