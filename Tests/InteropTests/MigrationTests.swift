import Testing

/// Live storage migration between two daemons, driven by `blockctl migrate`
/// (`jobs/migrate_scenarios.py BLOCKCTL SOURCE DEST SCENARIO`, docs/migration.md): fio writes
/// through the source's export from before the migration until after it, with verify; the
/// destination image must equal what the client sees afterwards.
@Suite("live migration", .serialized, .requires("qemu-img", "qemu-io", "fio", "python3"))
struct MigrationTests {
    static let script: String = {
        let file = "\(#filePath)"
        return String(file[..<file.lastIndex(of: "/")!]) + "/jobs/migrate_scenarios.py"
    }()

    func run(_ source: String, _ dest: String, _ scenario: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Run.command(["python3", Self.script, try BuildProducts.blockctl, source, dest, scenario], timeout: 240)
        if r.status == 77 { throw MissingScriptRequirement(scenario: scenario, output: r.stdout) }
        #expect(r.status == 0 && r.stdout.contains("\nOK "), "\(scenario) \(source) → \(dest):\n\(r.stdout)\n\(r.stderr)",
                sourceLocation: sourceLocation)
    }

    /// blockd → blockd under a writer that never pauses, with a persistent bitmap that must
    /// continue on the destination: afterwards its dirty granules are exactly the earlier
    /// dirty range plus every granule in fio's `--write_iolog`, and it is in the image.
    @Test(.requires("nbdinfo")) func blockdToBlockdWithBitmap() throws {
        try run(try BuildProducts.blockd, try BuildProducts.blockd, "bitmap")
    }

    /// The migration's NBD connections over x509 TLS (both NBD servers require it).
    @Test(.requires("certtool", "psktool")) func overTLS() throws {
        try run(try BuildProducts.blockd, try BuildProducts.blockd, "tls")
    }

    /// Refusals — a destination of another size, an unreachable destination, TLS required but
    /// not given, bitmaps without `--source-nbd`, an unknown node, a bad address — fail with a
    /// clear message and leave both daemons' nodes, bitmaps, exports and jobs as they were.
    @Test(.requires("certtool", "psktool")) func badInputChangesNothing() throws {
        try run(try BuildProducts.blockd, try BuildProducts.blockd, "bad")
    }

    /// qemu-storage-daemon as the destination, and as the source (QEMU 7.2 has no
    /// block-job-change: blockctl mirrors in write-blocking mode from the start there).
    @Test(arguments: ["to-qsd", "from-qsd"]) func withQSD(_ direction: String) throws {
        try require(.tool("qemu-storage-daemon"))
        let qsd = Tools.path(of: "qemu-storage-daemon")!
        let blockd = try BuildProducts.blockd
        if direction == "to-qsd" {
            try run(blockd, qsd, "plain")
        } else {
            try run(qsd, blockd, "plain")
        }
    }
}
