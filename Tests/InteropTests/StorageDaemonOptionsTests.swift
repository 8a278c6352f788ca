#if canImport(Glibc)
import Glibc
#endif
import Testing

/// qemu-storage-daemon's option syntax in full: implied keys, inline children at any depth
/// (keyval and JSON, and the same through QMP `blockdev-add`), monitors on stdio, TCP and
/// unix sockets with `pretty=on`, `--daemonize` and `--pidfile`, and a quiet daemon.
@Suite struct StorageDaemonOptionsTests {
    /// base.qcow2 (0x11 in the first MiB) under top.qcow2 (0x22 in the second).
    static func chain(_ dir: TempDir) throws -> (base: String, top: String) {
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"])
        try Run.expectSuccess(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", base])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
        try Run.expectSuccess(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", top])
        return (base, top)
    }

    /// The same graph given three ways: keyval with implied keys and `backing.file.…`, one
    /// JSON object with nested children, and QMP blockdev-add with the same JSON.
    @Test(.requires("qemu-img", "qemu-io", "python3"))
    func inlineChildrenKeyvalJSONAndQMP() throws {
        let dir = try TempDir(prefix: "qsd-inline")
        let (base, top) = try Self.chain(dir)
        let socket = dir.file("nbd.sock"), qmp = dir.file("qmp.sock")
        let keyval = "qcow2,node-name=top,read-only=on,file.driver=file,file.filename=\(top),"
            + "backing.driver=qcow2,backing.node-name=base,backing.file.driver=file,backing.file.filename=\(base)"
        let json = #"{"driver": "qcow2", "node-name": "top", "read-only": true, "file": {"driver": "file", "filename": "\#(top)"}, "#
            + #""backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "\#(base)"}}}"#
        let server = ["--nbd-server", "addr.type=unix,addr.path=\(socket)", "--export", "nbd,id=e0,node-name=top,name=disk"]
        for blockdev in [keyval, json] {
            let d = try Blockd(["--blockdev", blockdev] + server, in: dir, waitForSocket: socket, exportName: "disk")
            try Run.expectSuccess(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", d.uri])
            try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", d.uri, top])
            #expect(d.stop() == 0)
            #expect(d.stdoutText.isEmpty && d.stderrText.isEmpty, "\(d.stderrText)")
        }
        // QMP: the JSON form's object as blockdev-add arguments, then the same export.
        let d = try Blockd(["--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "m0",
                            "--nbd-server", "addr.type=unix,addr.path=\(socket)"], in: dir, waitForSocket: socket)
        let script = """
            import json, sys
            from qemu.qmp.legacy import QEMUMonitorProtocol
            q = QEMUMonitorProtocol(sys.argv[1]); q.connect()
            def cmd(name, args): return q.cmd_obj({"execute": name, "arguments": args})
            r = cmd("blockdev-add", json.loads(sys.argv[2]))
            assert r == {"return": {}}, r
            r = cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "name": "disk"})
            assert r == {"return": {}}, r
            # Flattened keys are the command line's business, not QMP's: QEMU 7.2 says the same.
            r = cmd("blockdev-add", {"driver": "raw", "node-name": "x", "file.driver": "file", "file.filename": sys.argv[3]})
            print(r["error"]["desc"])
            """
        let r = try Run.expectSuccess(["python3", "-c", script, qmp, json, top])
        #expect(r.stdout == "Parameter 'file' is missing\n", "\(r)")
        try Run.expectSuccess(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", "nbd+unix:///disk?socket=\(socket)", top])
        #expect(d.stop() == 0)
    }

    /// A QMP session on stdio, compact and pretty, byte for byte what qemu-storage-daemon
    /// prints (version numbers aside).
    @Test(.requires("qemu-storage-daemon"))
    func stdioMonitorMatchesQemuStorageDaemon() throws {
        let input = """
            {"execute": "qmp_capabilities"}
            {"execute": "query-block-exports"}
            {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 1048576}}
            {"execute": "query-version", "id": 7}
            {"execute": "no-such-command"}
            {"execute": "block-export-del", "arguments": {"id": "nope"}}
            {"execute": "quit"}

            """
        /// The version numbers and package string differ by design; everything else must not.
        func normalized(_ s: String) -> String {
            var out = ""
            var rest = Substring(s)
            while let r = rest.firstRange(of: "\"micro\": ") {
                out += rest[..<r.upperBound] + "N"
                rest = rest[r.upperBound...].drop(while: { $0.isNumber })
            }
            out += rest
            var pkg = ""
            rest = Substring(out)
            while let r = rest.firstRange(of: "\"package\": \"") {
                pkg += rest[..<r.upperBound] + "P\""
                rest = rest[r.upperBound...]
                if let q = rest.firstIndex(of: "\"") { rest = rest[rest.index(after: q)...] }
            }
            return pkg + rest
        }
        for monitor in ["m0", "m0,pretty=on", "chardev=m0,mode=control,pretty=off"] {
            let args = ["--chardev", "stdio,id=m0", "--monitor", monitor]
            let qsd = try Run.command(["qemu-storage-daemon"] + args, timeout: 20, stdin: input)
            let ours = try Run.command([try BuildProducts.blockd] + args, timeout: 20, stdin: input)
            #expect(qsd.status == 0 && ours.status == 0, "\(qsd)\n\(ours)")
            #expect(normalized(ours.stdout) == normalized(qsd.stdout), "--monitor \(monitor):\n\(ours.stdout)\nqsd:\n\(qsd.stdout)")
            #expect(ours.stdout.contains("\r\n"))
            #expect(ours.stderr.isEmpty, "\(ours.stderr)")
        }
    }

    /// A monitor given before other options reads no command until every option is applied
    /// (as in QSD, whose monitors wait for its main loop): commands already waiting on stdin
    /// find the nodes defined after `--monitor` (iotests `qsd-jobs` sends its commands so).
    /// Start-up is held at a `wait=on` chardev until its client connects; only then may the
    /// greeting and the answers come, and they name the nodes of the later `--blockdev`s.
    @Test(.requires("qemu-storage-daemon", "python3"))
    func monitorWaitsForLaterOptions() throws {
        let dir = try TempDir(prefix: "qsd-monitor-order")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 1 << 20)
        let script = """
            import socket, subprocess, sys
            wait_path, image = sys.argv[1], sys.argv[2]
            args = sys.argv[3:] + ["--chardev", "stdio,id=m0", "--monitor", "chardev=m0",
                "--chardev", "socket,id=w0,path=" + wait_path + ",server=on,wait=on",
                "--blockdev", "node-name=file0,driver=file,filename=" + image,
                "--blockdev", "node-name=fmt0,driver=raw,file=file0"]
            p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            p.stdin.write(b'{"execute": "qmp_capabilities"}\\n'
                          b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}\\n'
                          b'{"execute": "quit"}\\n')
            p.stdin.flush()
            line = p.stderr.readline().decode()
            assert "waiting for connection" in line, line
            # Start-up is blocked here; the query must not have been answered yet.
            c = socket.socket(socket.AF_UNIX); c.connect(wait_path)
            out, err = p.communicate(timeout=20)
            replies = out.decode().split("\\r\\n")
            assert p.returncode == 0, (p.returncode, err)
            assert len(replies) == 5 and replies[4] == "", replies
            assert '"node-name": "fmt0"' in replies[2] and '"node-name": "file0"' in replies[2], replies[2]
            print("ok")
            """
        for program in ["qemu-storage-daemon", try BuildProducts.blockd] {
            let r = try Run.command(["python3", "-c", script, dir.file("w-\(program.count).sock"), image, program], timeout: 30)
            #expect(r.status == 0 && r.stdout == "ok\n", "\(program): \(r)")
        }
    }

    /// `quit`, as qemu-storage-daemon answers it: every export goes (`BLOCK_EXPORT_DELETED`)
    /// and every job is cancelled (`BLOCK_JOB_CANCELLED`) before the `return`; and a job that
    /// fails on a permission after QEMU created it reports `created` and `null` before the
    /// error (iotests `qsd-jobs`, whose two runs these are). The event lines are QSD 7.2's.
    @Test(.requires("qemu-img", "python3"))
    func quitEndsExportsAndJobsBeforeItsReply() throws {
        let dir = try TempDir(prefix: "qsd-quit")
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2"), socket = dir.file("nbd.sock")
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"])
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
        let script = """
            import json, subprocess, sys
            program, mode, base, top, sock = sys.argv[1:6]
            args = [program, "--chardev", "stdio,id=stdio", "--monitor", "chardev=stdio"]
            if mode == "commit":
                args += ["--blockdev", "node-name=file0,driver=file,filename=" + top,
                         "--blockdev", "node-name=fmt0,driver=qcow2,file=file0"]
                cmds = [{"execute": "block-commit", "arguments": {"device": "fmt0", "job-id": "job0"}}]
            else:
                args += ["--blockdev", "node-name=file_base,driver=file,filename=" + base,
                         "--blockdev", "node-name=fmt_base,driver=qcow2,file=file_base",
                         "--blockdev", "node-name=file_overlay,driver=file,filename=" + top,
                         "--blockdev", "node-name=fmt_overlay,driver=qcow2,file=file_overlay,backing=fmt_base",
                         "--nbd-server", "addr.type=unix,addr.path=" + sock,
                         "--export", "type=nbd,id=export1,node-name=fmt_base,writable=on,name=export1"]
                cmds = [{"execute": "block-stream", "arguments": {"device": "fmt_overlay", "job-id": "job0"}}]
            text = "".join(json.dumps(c) + "\\n" for c in [{"execute": "qmp_capabilities"}] + cmds + [{"execute": "quit"}])
            out = subprocess.run(args, input=text.encode(), capture_output=True, timeout=30).stdout.decode()
            for line in out.splitlines()[1:]:
                m = json.loads(line)
                if "event" in m:
                    # As the iotest filters: job status changes and READY of the commit run.
                    if mode == "commit" and m["event"] in ("JOB_STATUS_CHANGE", "BLOCK_JOB_READY"): continue
                    print("event", m["event"], json.dumps(m.get("data"), sort_keys=True))
                else:
                    print(json.dumps(m, sort_keys=True))
            """
        let expected = [
            "commit": """
                {"return": {}}
                {"return": {}}
                event BLOCK_JOB_CANCELLED {"device": "job0", "len": 0, "offset": 0, "speed": 0, "type": "commit"}
                {"return": {}}

                """,
            "stream": """
                {"return": {}}
                event JOB_STATUS_CHANGE {"id": "job0", "status": "created"}
                event JOB_STATUS_CHANGE {"id": "job0", "status": "null"}
                {"error": {"class": "GenericError", "desc": "Permission conflict on node 'fmt_base': permissions 'write' are both required by an unnamed block device (uses node 'fmt_base' as 'root' child) and unshared by stream job 'job0' (uses node 'fmt_base' as 'intermediate node' child)."}}
                event BLOCK_EXPORT_DELETED {"id": "export1"}
                {"return": {}}

                """,
        ]
        var programs = [try BuildProducts.blockd]
        if Tools.available("qemu-storage-daemon") { programs.append("qemu-storage-daemon") }
        for program in programs {
            for mode in ["commit", "stream"] {
                let r = try Run.command(["python3", "-c", script, program, mode, base, top, socket], timeout: 60)
                #expect(r.status == 0, "\(program) \(mode): \(r)")
                #expect(r.stdout == expected[mode], "\(program) \(mode):\n\(r.stdout)")
            }
        }
    }

    /// --daemonize: the parent returns once the daemon serves, with the pid file written;
    /// the daemon removes the pid file when it ends (as qemu-storage-daemon does).
    @Test(.requires("nbdinfo"))
    func daemonizeWithPidfile() throws {
        let dir = try TempDir(prefix: "qsd-daemon")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 1 << 20)
        let socket = dir.file("nbd.sock"), pidfile = dir.file("blockd.pid")
        let r = try Run.command([try BuildProducts.blockd, "--daemonize", "--pidfile", pidfile,
                                 "--blockdev", "file,node-name=f0,filename=\(image)",
                                 "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                                 "--export", "nbd,id=e0,node-name=f0,name=disk"])
        #expect(r.status == 0 && r.stdout.isEmpty && r.stderr.isEmpty, "\(r)")
        #expect(Blockd.canConnect(unixPath: socket))
        let pid = pid_t(try Files.read(pidfile).split(separator: "\n").first.map(String.init) ?? "") ?? 0
        #expect(pid > 1 && kill(pid, 0) == 0)
        try Run.expectSuccess(["nbdinfo", "--size", "nbd+unix:///disk?socket=\(socket)"])
        // A second daemon with the same pid file is refused: the first one holds its lock.
        let second = try Run.command([try BuildProducts.blockd, "--pidfile", pidfile, "--blockdev", "null-co,node-name=n"])
        #expect(second.status == 1, "\(second)")
        #expect(second.stderr == "blockd: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n", "\(second)")
        kill(pid, SIGTERM)
        let deadline = Subprocess.now() + 10
        while kill(pid, 0) == 0 && Subprocess.now() < deadline { usleep(5_000) }
        #expect(kill(pid, 0) != 0)
        #expect(!Files.exists(pidfile) && !Files.exists(socket))
    }

    /// --daemonize with a failing option: the parent exits 1 with the error, and nothing
    /// is left running or listening.
    @Test func daemonizeFailureLeavesNothingRunning() throws {
        let dir = try TempDir(prefix: "qsd-daemonfail")
        let missing = dir.file("missing.qcow2"), socket = dir.file("nbd.sock")
        let r = try Run.command([try BuildProducts.blockd, "--daemonize", "--pidfile", dir.file("p.pid"),
                                 "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                                 "--chardev", "socket,id=m,path=\(dir.file("qmp.sock")),server=on,wait=off", "--monitor", "m",
                                 "--blockdev", "qcow2,node-name=d0,file.driver=file,file.filename=\(missing)"])
        #expect(r.status == 1, "\(r)")
        #expect(r.stderr == "blockd: --blockdev qcow2,node-name=d0,file.driver=file,file.filename=\(missing): Could not open '\(missing)': No such file or directory\n", "\(r)")
        #expect(processes(mentioning: missing).isEmpty)
        #expect(!Files.exists(socket) && !Files.exists(dir.file("p.pid")) && !Files.exists(dir.file("qmp.sock")))
    }

    /// Monitors on TCP and on a socket that waits for its first client (`wait=on`).
    @Test(.requires("python3"))
    func tcpAndWaitingMonitors() throws {
        let dir = try TempDir(prefix: "qsd-mon")
        let qmp = dir.file("qmp.sock")
        // wait=on: start-up blocks until a client connects; the notice says where.
        let d = try Spawned([try BuildProducts.blockd, "--chardev", "socket,id=w,path=\(qmp),server=on",
                             "--monitor", "w", "--chardev", "socket,id=t,host=127.0.0.1,port=0,server=on,wait=off"], in: dir)
        let deadline = Subprocess.now() + 10
        while !d.stderrText.contains("waiting for connection") && Subprocess.now() < deadline { usleep(5_000) }
        #expect(d.stderrText == "blockd: --chardev socket,id=w,path=\(qmp),server=on: info: QEMU waiting for connection on: disconnected:unix:\(qmp),server=on\n")
        let script = """
            import socket, sys
            s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
            print(f.readline().decode().strip()[:8])
            f.write(b'{"execute": "qmp_capabilities"}\\n{"execute": "quit"}\\n'); f.flush()
            print(f.readline().decode().strip()); print(f.readline().decode().strip())
            """
        let r = try Run.expectSuccess(["python3", "-c", script, qmp])
        #expect(r.stdout == "{\"QMP\": \n{\"return\": {}}\n{\"return\": {}}\n", "\(r)")
        #expect(d.exited(within: 10) == 0)
    }

    /// A whole session (QMP, clients, shutdown by signal) prints nothing; -v prints the clients.
    @Test(.requires("qemu-io", "nbdinfo"))
    func quietSessionAndVerbose() throws {
        let dir = try TempDir(prefix: "qsd-quiet")
        let image = dir.file("disk.raw")
        try Files.createSparse(image, size: 4 << 20)
        let socket = dir.file("nbd.sock"), qmp = dir.file("qmp.sock")
        for verbose in [false, true] {
            let d = try Blockd((verbose ? ["-v"] : []) + ["--blockdev", "file,node-name=f0,filename=\(image)",
                               "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                               "--export", "nbd,id=e0,node-name=f0,name=disk,writable=on",
                               "--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "m0"],
                              in: dir, waitForSocket: socket, exportName: "disk")
            try Run.expectSuccess(["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", d.uri])
            try Run.expectSuccess(["nbdinfo", "--list", "nbd+unix:///?socket=\(socket)"])
            let fd = socket_connect(socket)   // a client that gives up during the handshake
            close(fd)
            let q = socket_connect(qmp)
            close(q)
            if verbose {
                #expect(d.waitForLog("blockd: info: client") != nil, "\(d.stderrText)")
            }
            #expect(d.stop() == 0)
            if !verbose {
                #expect(d.stdoutText.isEmpty && d.stderrText.isEmpty, "stdout: \(d.stdoutText)\nstderr: \(d.stderrText)")
            }
        }
    }
}
