import Testing

/// The `nbd` driver end to end (`remote/remote_scenarios.py LOCAL REMOTE SCENARIO`): a local
/// blockd whose nodes live on a second NBD server — another blockd, and qemu-storage-daemon —
/// as a qcow2 overlay's backing, a job's source or target, and a re-export; with the remote
/// killed and restarted, unreachable, or misbehaving.
@Suite("nbd driver", .serialized, .requires("qemu-img", "qemu-io", "python3"))
struct RemoteNBDTests {
    static let script: String = {
        let file = "\(#filePath)"
        return String(file[..<file.lastIndex(of: "/")!]) + "/remote/remote_scenarios.py"
    }()

    /// The remote peers: blockd itself, and qemu-storage-daemon (required in CI).
    static let remotes = ["blockd", "qemu-storage-daemon"]

    func run(_ scenario: String, remote: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let remoteBinary: String
        if remote == "blockd" {
            remoteBinary = try BuildProducts.blockd
        } else {
            try require(.tool(remote), sourceLocation: sourceLocation)
            remoteBinary = Tools.path(of: remote)!
        }
        let r = try Run.command(["python3", Self.script, try BuildProducts.blockd, remoteBinary, scenario], timeout: 240)
        if r.status == 77 {
            // The script found a tool missing (it names it): the same rule as `require`.
            throw MissingScriptRequirement(scenario: scenario, output: r.stdout)
        }
        #expect(r.status == 0 && r.stdout.contains("\nOK "), "\(scenario) against \(remote):\n\(r.stdout)\n\(r.stderr)",
                sourceLocation: sourceLocation)
    }

    /// A qcow2 overlay over a remote base: reads, writes, `qemu-img compare`, fio verify.
    @Test(arguments: remotes) func overlayOverRemoteBase(remote: String) throws { try run("overlay", remote: remote) }

    /// block-stream copies the remote base into the overlay, which then stands alone.
    @Test(arguments: remotes) func streamRemoteBaseIntoOverlay(remote: String) throws { try run("stream", remote: remote) }

    /// Active block-commit writes the overlay down into the remote base.
    @Test(arguments: remotes) func commitOverlayIntoRemoteBase(remote: String) throws { try run("commit", remote: remote) }

    /// The remote is killed and restarted within reconnect-delay under fio with verify:
    /// no error reaches the client of the re-export, and every write verifies.
    @Test(.requires("fio"), arguments: remotes) func reconnectWithinDelayLosesNothing(remote: String) throws {
        try run("reconnect", remote: remote)
    }

    /// Past reconnect-delay requests fail with EIO, the daemon keeps serving, and the node
    /// recovers when the server is back.
    @Test(arguments: remotes) func pastTheDelayClientsGetEIO(remote: String) throws { try run("expire", remote: remote) }

    /// Unreachable server, wrong export, refused options: QMP errors, graph unchanged.
    @Test(arguments: remotes) func badInputGetsClearErrors(remote: String) throws { try run("bad", remote: remote) }

    /// open-timeout retries until the server comes up, and gives up after it.
    @Test func openTimeoutWaitsForALateServer() throws { try run("opentimeout", remote: "blockd") }

    /// Protocol violations, a silent server and an endless handshake: errors, no hang.
    @Test func hostileServersCannotHangTheDaemon() throws { try run("hostile", remote: "blockd") }

    /// x-dirty-bitmap block status equals what QEMU's nbd driver reports (`qemu-img map`).
    @Test(.requires("nbdinfo"), arguments: remotes) func dirtyBitmapStatusLikeQEMU(remote: String) throws {
        try run("bitmap", remote: remote)
    }

    /// Every NBD command through a re-export, with its flags; block status and sparse reads
    /// arrive as the origin sends them.
    @Test(.requires("nbdinfo"), .requiresPython("nbd", interpreter: "/usr/bin/python3"), arguments: remotes) func everyCommandThroughAReExport(remote: String) throws {
        try run("commands", remote: remote)
    }

    /// nbdkit with strict block size constraints: the node advertises them and splits.
    @Test(.requires("nbdkit", "nbdinfo")) func blockSizeConstraintsOfNbdkit() throws { try run("blocksize", remote: "blockd") }

    /// nbd nodes over TLS to a remote that requires it: X.509 over a unix socket (with
    /// tls-hostname) and over TCP (the host as hostname), PSK; every mismatch (no TLS, TLS to a
    /// plain server, another CA, wrong hostname, wrong key, a missing or server-side
    /// credentials object) is a clear QMP error and leaves the graph unchanged.
    @Test(.requires("certtool", "psktool"), arguments: remotes) func tlsToARemoteThatRequiresIt(remote: String) throws {
        try run("tls", remote: remote)
    }

    /// A multi-conn server gets one connection per event loop.
    @Test func multiConnOpensOneConnectionPerLoop() throws { try run("multiconn", remote: "blockd") }
}

/// A scenario script's exit 77 ("missing TOOL"): a failure naming it, as a missing requirement
/// is in CI; locally too, since the suite's traits already skip when the usual tools are absent.
struct MissingScriptRequirement: Error, CustomStringConvertible {
    let scenario: String
    let output: String
    var description: String { "\(scenario): a tool the scenario needs is missing: \(output)" }
}
