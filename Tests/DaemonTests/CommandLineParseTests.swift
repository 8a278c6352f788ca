@testable import Daemon
import JSON
import QMP
import Testing

@Suite struct CommandLineParseTests {
    @Test func noArgumentsIsTheDemo() throws {
        guard case .demo = try CommandLine.parse([]) else { Issue.record("not demo"); return }
    }

    @Test func serveTakesImageAndSocket() throws {
        guard case .serve(let s, _) = try CommandLine.parse(["serve", "a.img", "--socket", "/tmp/s", "-r"]) else {
            Issue.record("not serve"); return
        }
        #expect(s.image == "a.img" && s.socket == "/tmp/s" && s.readOnly)
    }

    /// Options are kept in order with the words they came from; their arguments are parsed
    /// when applied (QSD's second pass), so syntax errors there come in command-line order.
    @Test func actionsInOrderWithLocations() throws {
        guard case .daemon(let actions, let settings) = try CommandLine.parse([
            "--blockdev", "null-co,node-name=n", "--nbd-server=addr.type=unix,addr.path=/s", "-blockdev", "x",
            "--pidfile", "/p", "--daemonize", "-v",
        ]) else { Issue.record("not daemon"); return }
        #expect(actions.map(\.kind) == [.blockdev, .nbdServer, .blockdev])
        #expect(actions.map(\.location) == ["--blockdev null-co,node-name=n", "--nbd-server=addr.type=unix,addr.path=/s", "--blockdev x"])
        #expect(settings.pidfile == "/p" && settings.daemonize && settings.verbose)
    }

    /// getopt's messages, as glibc prints them after the program name.
    @Test(arguments: [
        (["--bogus"], "unrecognized option '--bogus'"),
        (["--bogus=1"], "unrecognized option '--bogus=1'"),
        (["--blockdev"], "option '--blockdev' requires an argument"),
        (["-x"], "invalid option -- 'x'"),
        (["--help=1"], "option '--help' doesn't allow an argument"),
        (["foo"], "foo: Unexpected argument"),
    ])
    func getoptMessages(_ args: [String], _ message: String) {
        do {
            _ = try CommandLine.parse(args)
            Issue.record("no error for \(args)")
        } catch {
            #expect(error.message == message)
        }
    }

    @Test func longOptionsAbbreviate() throws {
        guard case .daemon(let actions, _) = try CommandLine.parse(["--block", "x"]) else {
            Issue.record("not daemon"); return
        }
        #expect(actions.first?.kind == .blockdev)
    }
}

@Suite struct QemuNBDOptionTests {
    func parse(_ args: [String]) throws -> QemuNBDOptions {
        guard case .qemuNBD(let o) = try QemuNBDOptions.parse(args, program: "qemu-nbd") else {
            throw UsageError("not qemu-nbd")
        }
        return o
    }

    func message(_ args: [String]) -> String? {
        do {
            _ = try QemuNBDOptions.parse(args, program: "qemu-nbd")
            return nil
        } catch {
            return error.message
        }
    }

    @Test func defaultsAndClusters() throws {
        let o = try parse(["-rtf", "qcow2", "disk.qcow2", "-x", "e", "-e0", "--persist"])
        #expect(o.readOnly && o.persistent && o.format == "qcow2" && o.exportName == "e" && o.shared == 0)
        #expect(o.file == "disk.qcow2")
        let d = try parse(["f.img"])
        #expect(d.shared == 1 && d.exportName == nil && d.socket == nil && !d.persistent)
    }

    /// qemu-nbd's checks, in its order, with its words (the golden file has the full list).
    @Test(arguments: [
        ([String](), "qemu-nbd: Invalid number of arguments\nTry `qemu-nbd --help' for more information.\n"),
        (["-k", "rel", "f"], "qemu-nbd: socket path must be absolute\n"),
        (["-e", "-1", "f"], "qemu-nbd: Invalid shared device number '-1'\n"),
        (["--cache=x", "f"], "qemu-nbd: Invalid cache mode `x'\n"),
        (["-n", "--cache=none", "f"], "qemu-nbd: -n and --cache can only be specified once\n"),
        (["--detect-zeroes=unmap", "--discard=unmap", "f"],
         "qemu-nbd: setting detect-zeroes to unmap is not allowed without setting discard operation to unmap\n"),
        (["-L", "-x", "a"], "qemu-nbd: List mode is incompatible with per-device settings\n"),
        (["-L", "f"], "qemu-nbd: List mode is incompatible with a file name\n"),
        (["-Z", "f"], "qemu-nbd: invalid option -- 'Z'\nqemu-nbd: Try `qemu-nbd --help' for more information.\n"),
        (["--handshake-limit=x", "f"], "qemu-nbd: Invalid handshake limit 'x'\n"),
    ])
    func qemuNBDMessages(_ args: [String], _ text: String) {
        #expect(message(args) == text)
    }

    /// `bdrv_parse_cache_mode`: what each mode turns into.
    @Test func cacheModes() {
        #expect(QemuNBDOptions.cacheMode("none")! == (true, false, false))
        #expect(QemuNBDOptions.cacheMode("directsync")! == (true, false, true))
        #expect(QemuNBDOptions.cacheMode("unsafe")! == (false, true, false))
        #expect(QemuNBDOptions.cacheMode("writethrough")! == (false, false, true))
        #expect(QemuNBDOptions.cacheMode("writeback")! == (false, false, false))
        #expect(QemuNBDOptions.cacheMode("sometimes") == nil)
    }

    /// The blockdev options qemu-nbd's flags make (what QEMU's blk_new_open would get).
    @Test func imageOptionsFromFlags() throws {
        let o = try parse(["-f", "qcow2", "--cache=none", "--aio=native", "--discard=unmap", "--detect-zeroes=unmap", "-r", "d.qcow2"])
        let image = try QemuNBDRunner.imageOptions(o, file: "d.qcow2")
        #expect(image["driver"] == "qcow2")
        #expect(image["read-only"] == true && image["discard"] == "unmap" && image["detect-zeroes"] == "unmap")
        #expect(image["cache"]?["direct"] == true)
        #expect(image["file"]?["driver"] == "file" && image["file"]?["filename"] == "d.qcow2")
        #expect(image["file"]?["aio"] == "native" && image["file"]?["cache"]?["direct"] == true)
        #expect(image["file"]?["read-only"] == true)
    }

    @Test func imageOptsNestAndFillTheFileDriver() throws {
        let o = try parse(["--image-opts", "driver=qcow2,file.filename=d.qcow2,cache.no-flush=on", "-r"])
        let image = try QemuNBDRunner.imageOptions(o, file: o.file!)
        #expect(image["driver"] == "qcow2" && image["read-only"] == true)
        #expect(image["file"]?["driver"] == "file")
        #expect(image["cache"]?["no-flush"] == "on")
    }
}

@Suite struct StartupArgumentTests {
    @Test func keyvalOrJSON() throws {
        let (k, keyval) = try Startup.argumentObject("nbd,id=e,node-name=n", impliedKey: "type")
        #expect(keyval && k["type"] == "nbd")
        let (j, notKeyval) = try Startup.argumentObject(#"{"type": "nbd", "writable": true}"#, impliedKey: "type")
        #expect(!notKeyval && j["writable"] == true)
    }

    @Test(arguments: [
        (#"{"a":"#, "JSON parse error, premature EOI"),
        (#"{"a":}"#, "JSON parse error, expecting value"),
        (#"{"a" 1}"#, "JSON parse error, missing : in object pair"),
        (#"{"a":tru}"#, "JSON parse error, invalid keyword 'tru'"),
        (#"{"a":1} x"#, "Expecting at most one JSON value"),
    ])
    func qemuJSONMessages(_ text: String, _ message: String) {
        do {
            _ = try Startup.argumentObject(text, impliedKey: nil)
            Issue.record("no error")
        } catch {
            #expect(error.desc == message)
        }
    }

    /// `--object` strings become the property types (QEMU's keyval visitor), with its messages.
    @Test func objectProperties() throws {
        let o = try KeyValue.parse("throttle-group,id=t,x-bps-total=1000,limits.iops-total=0x10", impliedKey: "qom-type")
        let typed = try Daemon.typedObjectOptions(o)
        #expect(typed["x-bps-total"] == 1000 && typed["limits"]?["iops-total"] == 16)
        let bad = try KeyValue.parse("throttle-group,id=t,x-bps-total=1M", impliedKey: "qom-type")
        do {
            _ = try Daemon.typedObjectOptions(bad)
            Issue.record("1M taken as an integer")
        } catch {
            #expect(error.desc == "Parameter 'x-bps-total' expects integer")
        }
        let tls = try KeyValue.parse("tls-creds-x509,id=c,dir=/d,endpoint=server,verify-peer=off", impliedKey: "qom-type")
        #expect(try Daemon.typedObjectOptions(tls)["verify-peer"] == false)
    }
}

