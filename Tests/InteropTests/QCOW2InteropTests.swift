#if canImport(Glibc)
import Glibc
#endif
import Testing

/// qcow2 images made by qemu-img, served by a real blockd: content and maps against
/// qemu-img's own view of the same chain, writes against a raw twin, bad images refused.
@Suite struct QCOW2InteropTests {
    // MARK: helpers

    /// Compares `nbdinfo --map` (base:allocation and qemu:allocation-depth) of `uri` with
    /// `qemu-img map --output=json` of `image`, after merging adjacent equal extents.
    /// Prints "ok" or the first difference.
    static let compareMaps = #"""
import json, subprocess, sys
uri, image = sys.argv[1], sys.argv[2]
qmap = json.loads(subprocess.run(["qemu-img", "map", "--output=json", image], check=True, capture_output=True).stdout)
def nbd(ctx):
    out = subprocess.run(["nbdinfo", "--map=" + ctx, "--json", uri], check=True, capture_output=True).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
def merge(xs):
    out = []
    for s, l, v in xs:
        if out and out[-1][2] == v and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + l, v)
        else:
            out.append((s, l, v))
    return out
# base:allocation: bit 0 hole (not data), bit 1 zero.
want = merge([(e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0)) for e in qmap])
got = merge(nbd("base:allocation"))
if want != got:
    print("base:allocation differs:\n qemu-img %s\n blockd   %s" % (want[:20], got[:20])); sys.exit(1)
# qemu:allocation-depth: 0 unallocated, else 1-based layer.
want = merge([(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0) for e in qmap])
got = merge(nbd("qemu:allocation-depth"))
if want != got:
    print("allocation-depth differs:\n qemu-img %s\n blockd   %s" % (want[:20], got[:20])); sys.exit(1)
print("ok")
"""#

    static func qemuImg(_ args: String...) throws {
        try Run.expectSuccess(["qemu-img"] + args)
    }

    /// Runs qemu-io commands on `target` (an image path with `format`, or an NBD URI as raw).
    static func qemuIO(_ target: String, format: String, _ commands: [String]) throws {
        var args = ["qemu-io", "-f", format]
        for c in commands { args += ["-c", c] }
        let r = try Run.expectSuccess(args + [target])
        #expect(!r.stdout.contains("failed"), "\(r)")
    }

    static func sha256(_ path: String) throws -> String {
        try Run.command(["sha256sum", path]).stdout.split(separator: " ").first.map(String.init) ?? ""
    }

    /// `qemu-img check` exit status: 0 clean, 2 corrupt, 3 leaks only.
    static func check(_ image: String) throws -> CommandResult {
        try Run.command(["qemu-img", "check", image])
    }

    /// Serves `image` read-only with blockd and checks content and maps against qemu-img.
    static func expectServedLikeQemu(_ image: String, in dir: TempDir) throws {
        let raw = dir.file("expected.raw")
        try qemuImg("convert", "-O", "raw", image, raw)
        let d = try Blockd.serve(image: image, in: dir, readOnly: true)
        let cmp = try Run.command(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, raw])
        #expect(cmp.status == 0, "\(cmp)\n\(d.stderrText)")
        let maps = try Run.command(["/usr/bin/python3", "-c", compareMaps, d.uri, image])
        #expect(maps.status == 0 && maps.stdout.contains("ok"), "\(maps)")
        #expect(d.stop() == 0)
    }

    /// Data, zero clusters, discarded clusters and partial clusters at a few places.
    static let fillCommands = [
        "write -P 0x11 0 192k", "write -P 0x22 1000k 13k", "write -z 256k 128k",
        "write -P 0x33 3M 1M", "discard 3200k 128k", "write -P 0x44 7340032 5k",
        "write -P 0x55 15M 1M",
    ]

    // MARK: content and maps

    @Test(.requires("qemu-img", "qemu-io", "nbdinfo"),
          arguments: ["cluster_size=512", "cluster_size=4096", "cluster_size=65536", "cluster_size=2097152",
                      "extended_l2=on,cluster_size=65536", "compression_type=zstd", "compat=0.10"])
    func imageReadsBackLikeQemu(options: String) throws {
        let dir = try TempDir(prefix: "qcow2-read")
        let image = dir.file("disk.qcow2")
        try Self.qemuImg("create", "-q", "-f", "qcow2", "-o", options, image, "16M")
        var commands = Self.fillCommands
        if options == "compat=0.10" { commands = commands.filter { !$0.contains("-z") && !$0.contains("discard") } }
        try Self.qemuIO(image, format: "qcow2", commands)
        try Self.expectServedLikeQemu(image, in: dir)
    }

    @Test(.requires("qemu-img", "qemu-io", "nbdinfo"), arguments: ["zlib", "zstd"])
    func compressedImageReadsBackLikeQemu(type: String) throws {
        let dir = try TempDir(prefix: "qcow2-comp")
        let plain = dir.file("plain.qcow2")
        try Self.qemuImg("create", "-q", "-f", "qcow2", plain, "16M")
        try Self.qemuIO(plain, format: "qcow2", Self.fillCommands)
        let image = dir.file("disk.qcow2")
        try Self.qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", plain, image)
        try Self.expectServedLikeQemu(image, in: dir)
    }

    /// base ← mid ← top, each hiding or replacing parts of the one below.
    static func makeChain(in dir: TempDir, clusterSize: String = "65536") throws -> (base: String, mid: String, top: String) {
        let base = dir.file("base.qcow2"), mid = dir.file("mid.qcow2"), top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", base, "16M")
        try qemuIO(base, format: "qcow2", ["write -P 0xb0 0 4M", "write -P 0xb1 8M 2M", "write -P 0xb2 15M 1M"])
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", "-b", base, "-F", "qcow2", mid)
        try qemuIO(mid, format: "qcow2", ["write -P 0xa0 1M 512k", "write -z 2M 256k", "discard 8M 64k",
                                         "write -P 0xa1 12M 100k"])
        // The top is shorter than nothing: same size, a few small writes.
        try qemuImg("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
        try qemuIO(top, format: "qcow2", ["write -P 0xc0 64k 4k", "write -z 1M 64k", "write -P 0xc1 9M 300k"])
        return (base, mid, top)
    }

    @Test(.requires("qemu-img", "qemu-io", "nbdinfo"))
    func threeLevelChainReadsBackLikeQemu() throws {
        let dir = try TempDir(prefix: "qcow2-chain")
        let chain = try Self.makeChain(in: dir)
        try Self.expectServedLikeQemu(chain.top, in: dir)
    }

    // MARK: writes

    @Test(.requires("qemu-img", "qemu-io", "nbdinfo", "fio"))
    func writesIntoTopLayerMatchRawTwin() throws {
        let dir = try TempDir(prefix: "qcow2-write")
        let chain = try Self.makeChain(in: dir)
        let twin = dir.file("twin.raw")
        try Self.qemuImg("convert", "-O", "raw", chain.top, twin)
        let baseSum = try Self.sha256(chain.base), midSum = try Self.sha256(chain.mid)

        let writes = [
            "write -P 0x61 0 4k", "write -P 0x62 60k 8k", "aio_write -P 0x63 2M 1M", "aio_write -P 0x64 5M 300k",
            "aio_flush", "write -z 8M 1M", "write -z 8200k 3k", "discard 12M 1M", "write -P 0x65 12M 70k",
            "writev -P 0x66 14M 4k 512 64k", "write -P 0x67 16773120 4k", "flush",
        ]
        let d = try Blockd.serve(image: chain.top, in: dir)
        try Self.qemuIO(d.uri, format: "raw", writes)
        // fio with verify on a region of its own; the same job replays on the twin (the
        // pattern depends only on the offset, so the order of writes does not matter).
        // Fixed-size aligned blocks: overlapping writes carry identical bytes.
        let fio = ["--name=w", "--rw=randwrite", "--bs=4k", "--offset=4M", "--size=3M",
                   "--io_size=12M", "--randseed=7", "--verify=pattern", "--verify_pattern=%o", "--verify_fatal=1", "--verify_state_save=0"]
        let r = try Run.command(["fio", "--ioengine=nbd", "--uri=\(d.uri)", "--iodepth=16"] + fio)
        #expect(r.succeeded && !r.stdout.contains("err= 1"), "\(r)")
        #expect(d.stop() == 0, "\(d.stderrText)")

        try Self.qemuIO(twin, format: "raw", writes)
        try Run.expectSuccess(["fio", "--ioengine=psync", "--filename=\(twin)"] + fio)

        for layer in [chain.top, chain.mid, chain.base] {
            let c = try Self.check(layer)
            #expect(c.status == 0, "\(c)")
        }
        let cmp = try Run.command(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", chain.top, twin])
        #expect(cmp.status == 0, "\(cmp)")
        #expect(try Self.sha256(chain.base) == baseSum)
        #expect(try Self.sha256(chain.mid) == midSum)
        // The map still agrees with qemu-img after our writes.
        try Self.expectServedLikeQemu(chain.top, in: dir)
    }

    @Test(.requires("qemu-img", "qemu-io", "fio"), arguments: ["512", "65536", "2097152"])
    func concurrentAllocatingWritesStayConsistent(clusterSize: String) throws {
        let dir = try TempDir(prefix: "qcow2-alloc")
        let image = dir.file("disk.qcow2")
        try Self.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", image, "32M")
        let d = try Blockd.serve(image: image, in: dir)
        // Overlapping small writes into fresh clusters from two jobs, plus trims: exercises
        // in-flight allocation marks, copy-on-write of partial clusters and epoch-delayed frees.
        let r = try Run.command(["fio", "--ioengine=nbd", "--uri=\(d.uri)", "--iodepth=32", "--size=32M",
                                 "--name=a", "--rw=randwrite", "--bsrange=512-96k", "--size=24M", "--io_size=24M",
                                 "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
                                 "--name=b", "--rw=randtrim", "--bs=64k", "--offset=24M", "--size=8M", "--io_size=4M"])
        #expect(r.succeeded, "\(r)")
        #expect(d.stop() == 0, "\(d.stderrText)")
        let c = try Self.check(image)
        #expect(c.status == 0, "\(c)")
    }

    // MARK: command line

    @Test(.requires("qemu-img", "qemu-io"))
    func blockdevBackingNullAndExplicitBacking() throws {
        let dir = try TempDir(prefix: "qcow2-blockdev")
        let chain = try Self.makeChain(in: dir)
        let socket = dir.file("nbd.sock")
        let sums = try [chain.base, chain.mid, chain.top].map(Self.sha256)
        let export = ["--nbd-server", "addr.type=unix,addr.path=\(socket)",
                      "--export", "type=nbd,id=e0,node-name=top,name=disk"]

        // backing=null: what the top does not have reads as zeroes (as a copy of the top
        // with its backing reference removed).
        let detached = dir.file("detached.qcow2")
        try Run.expectSuccess(["cp", chain.top, detached])
        try Self.qemuImg("rebase", "-q", "-u", "-b", "", detached)
        let noBacking = dir.file("nobacking.raw")
        try Self.qemuImg("convert", "-O", "raw", detached, noBacking)
        var d = try Blockd(["--blockdev", "driver=file,node-name=f0,filename=\(chain.top),read-only=on",
                            "--blockdev", "driver=qcow2,node-name=top,file=f0,backing=null,read-only=on"] + export,
                           in: dir, waitForSocket: socket, exportName: "disk")
        var cmp = try Run.command(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, noBacking])
        #expect(cmp.status == 0, "\(cmp)")
        #expect(d.stop() == 0)

        // backing=NODE: the chain named on the command line, not from the header.
        let full = dir.file("full.raw")
        try Self.qemuImg("convert", "-O", "raw", chain.top, full)
        d = try Blockd(["--blockdev", "driver=file,node-name=fb,filename=\(chain.base),read-only=on",
                        "--blockdev", "driver=qcow2,node-name=base,file=fb,read-only=on",
                        "--blockdev", "driver=file,node-name=fm,filename=\(chain.mid),read-only=on",
                        "--blockdev", "driver=qcow2,node-name=mid,file=fm,backing=base,read-only=on",
                        "--blockdev", "driver=file,node-name=ft,filename=\(chain.top),read-only=on",
                        "--blockdev", "driver=qcow2,node-name=top,file=ft,backing=mid,read-only=on"] + export,
                       in: dir, waitForSocket: socket, exportName: "disk")
        cmp = try Run.command(["qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri, full])
        #expect(cmp.status == 0, "\(cmp)")
        #expect(d.stop() == 0)
        #expect(try [chain.base, chain.mid, chain.top].map(Self.sha256) == sums)
    }

    // MARK: bad images

    enum Damage: String, CaseIterable, Sendable {
        case truncatedHeader, l1PastEnd, refcountTableOverlapsHeader, hugeClusterSize, unknownIncompatibleBit,
             missingBacking, backingLoop
    }

    static func patch(_ path: String, at offset: Int, _ bytes: [UInt8]) throws {
        try Files.write(path, bytes: bytes, offset: offset)
    }

    @Test(.requires("qemu-img"), arguments: Damage.allCases)
    func badImageIsRefusedAtOpen(damage: Damage) throws {
        let dir = try TempDir(prefix: "qcow2-bad")
        let image = dir.file("bad.qcow2")
        try Self.qemuImg("create", "-q", "-f", "qcow2", image, "16M")
        let expected: String
        switch damage {
        case .truncatedHeader:
            #expect(truncate(image, 50) == 0)
            expected = "truncated"
        case .l1PastEnd:
            try Self.patch(image, at: 40, [0, 0, 1, 0, 0, 0, 0, 0])  // l1_table_offset = 1 TiB
            expected = "L1 table"
        case .refcountTableOverlapsHeader:
            try Self.patch(image, at: 48, [0, 0, 0, 0, 0, 0, 0, 0])  // refcount_table_offset = 0
            expected = "refcount table"
        case .hugeClusterSize:
            try Self.patch(image, at: 20, [0, 0, 0, 31])             // cluster_bits = 31
            expected = "cluster_bits 31"
        case .unknownIncompatibleBit:
            try Self.patch(image, at: 72, [0, 0, 0, 0, 0, 0, 0x40, 0])  // bit 14
            expected = "incompatible"
        case .missingBacking:
            try Self.qemuImg("rebase", "-q", "-u", "-b", dir.file("missing.qcow2"), "-F", "qcow2", image)
            expected = "missing.qcow2"
        case .backingLoop:
            let other = dir.file("other.qcow2")
            try Self.qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", image, "-F", "qcow2", other, "16M")
            try Self.qemuImg("rebase", "-q", "-u", "-b", other, "-F", "qcow2", image)
            expected = "loop"
        }
        let before = try Self.sha256(image)
        let r = try Blockd.runOnce(["serve", image, "--socket", dir.file("nbd.sock")])
        #expect(r.status == 1, "\(r)")
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 1, "\(r)")
        #expect(r.stderr.contains(image), "\(r)")
        #expect(r.stderr.lowercased().contains(expected.lowercased()), "\(r)")
        #expect(!r.stderr.contains("Fatal error") && !r.stderr.contains("crashed"))
        #expect(try Self.sha256(image) == before)
    }
}
