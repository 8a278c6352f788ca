import Foundation
import Testing

/// Dirty bitmaps against real tools: nbdinfo, qemu-img, qemu-io, nbdsh, with a real blockd.
/// Skips when a tool is missing, fails when `CI` is set.
@Suite(.serialized) struct BitmapInteropTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static var blockd: String { root.appendingPathComponent(".build/debug/blockd").path }

    static func have(_ tools: [String]) -> Bool {
        for t in tools + [] where sh("command -v \(t)").status != 0 {
            if ProcessInfo.processInfo.environment["CI"] != nil { Issue.record("\(t) is missing") }
            return false
        }
        return FileManager.default.isExecutableFile(atPath: blockd)
    }

    @discardableResult
    static func sh(_ command: String) -> (status: Int32, out: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try? p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    final class Daemon {
        let process = Process()
        let dir: String
        var qmp: String { dir + "/qmp.sock" }
        var nbd: String { dir + "/nbd.sock" }
        init(dir: String, image: String, extra: [String] = []) throws {
            self.dir = dir
            process.executableURL = URL(fileURLWithPath: BitmapInteropTests.blockd)
            process.arguments = ["--blockdev", "driver=file,filename=\(image),node-name=f",
                                 "--blockdev", "driver=qcow2,file=f,node-name=n0",
                                 "--chardev", "socket,path=\(dir)/qmp.sock,server=on,wait=off,id=c", "--monitor", "chardev=c",
                                 "--nbd-server", "addr.type=unix,addr.path=\(dir)/nbd.sock"] + extra
            process.standardError = FileHandle.nullDevice
            try? FileManager.default.removeItem(atPath: dir + "/qmp.sock")
            try? FileManager.default.removeItem(atPath: dir + "/nbd.sock")
            try process.run()
            for _ in 0..<100 where !FileManager.default.fileExists(atPath: dir + "/nbd.sock") { usleep(20_000) }
        }
        var uri: String { "nbd+unix:///n0?socket=\(nbd)" }
        /// Runs QMP commands (JSON objects), returns one reply line each.
        func qmp(_ commands: String...) -> [String] {
            let script = """
            import socket, json, sys
            s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw"); f.readline()
            for c in ['{"execute":"qmp_capabilities"}'] + sys.argv[2:]:
                f.write(c + "\\n"); f.flush()
                while True:
                    l = f.readline()
                    if '"event"' not in l: break
                if c != '{"execute":"qmp_capabilities"}': print(l.strip())
            """
            let args = commands.map { "'" + $0 + "'" }.joined(separator: " ")
            return BitmapInteropTests.sh("python3 -c '\(script.replacingOccurrences(of: "'", with: "'\\''"))' \(qmp) \(args)")
                .out.split(separator: "\n").map(String.init)
        }
        func stop() { process.terminate(); process.waitUntilExit() }
        func crash() { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
    }

    static func tempDir() -> String {
        let d = NSTemporaryDirectory() + "blockd-bitmaps-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }

    /// Dirty extents (start, length) from `nbdinfo --map`.
    static func dirtyMap(_ uri: String, _ bitmap: String) -> [(UInt64, UInt64)] {
        sh("nbdinfo --map=qemu:dirty-bitmap:\(bitmap) '\(uri)'").out.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 3, f[2] == "1", let a = UInt64(f[0]), let b = UInt64(f[1]) else { return nil }
            return (a, b)
        }
    }

    @Test func writesShowUpExactly() throws {
        guard Self.have(["qemu-img", "qemu-io", "nbdinfo"]) else { return }
        let dir = Self.tempDir()
        let img = dir + "/a.qcow2"
        Self.sh("qemu-img create -f qcow2 \(img) 1G")
        let d = try Daemon(dir: dir, image: img)
        defer { d.stop() }
        #expect(d.qmp(#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b0"}}"#) == [#"{"return": {}}"#])
        _ = d.qmp(#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"n0","writable":true,"bitmaps":["b0"]}}"#)
        Self.sh("qemu-io -f raw -c 'write 1M 4k' -c 'write 100M 128k' -c 'write -z 300M 64k' '\(d.uri)'")
        let map = Self.dirtyMap(d.uri, "b0")
        #expect(map.map(\.0) == [1 << 20, 100 << 20, 300 << 20])
        #expect(map.map(\.1) == [65536, 131072, 65536])
        let q = Self.sh("qemu-img map --output=json --image-opts driver=nbd,server.type=unix,server.path=\(d.nbd),export=n0,x-dirty-bitmap=qemu:dirty-bitmap:b0").out
        #expect(q.contains(#""start": 1048576, "length": 65536, "depth": 0, "present": false"#))
        // Clear, disable, enable, merge.
        _ = d.qmp(#"{"execute":"block-export-del","arguments":{"id":"e"}}"#)
        let r = d.qmp(#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b1","granularity":4096}}"#,
                      #"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"n0","target":"b1","bitmaps":["b0"]}}"#,
                      #"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"n0","name":"b0"}}"#,
                      #"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"n0","name":"b0"}}"#,
                      #"{"execute":"transaction","arguments":{"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"n0","name":"t"}},{"type":"block-dirty-bitmap-clear","data":{"node":"n0","name":"nope"}}]}}"#,
                      #"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)
        #expect(r[4].contains("Dirty bitmap 'nope' not found"))
        #expect(r[5].contains(#"{"name": "b1", "recording": true, "persistent": false, "busy": false, "granularity": 4096, "count": 262144}"#))
        #expect(r[5].contains(#"{"name": "b0", "recording": false, "persistent": false, "busy": false, "granularity": 65536, "count": 0}"#))
        #expect(!r[5].contains(#""name": "t""#))
    }

    @Test func badInput() throws {
        guard Self.have(["qemu-img"]) else { return }
        let dir = Self.tempDir()
        let img = dir + "/a.qcow2"
        Self.sh("qemu-img create -f qcow2 \(img) 1G")
        let d = try Daemon(dir: dir, image: img)
        defer { d.stop() }
        let long = String(repeating: "x", count: 1024)
        let r = d.qmp(#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"\#(long)"}}"#,
                      #"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"g","granularity":1000}}"#,
                      #"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"a"}}"#,
                      #"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"a"}}"#,
                      #"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"n0","bitmaps":["zz"]}}"#,
                      #"{"execute":"block-dirty-bitmap-add","arguments":{"node":"f","name":"p","persistent":true}}"#)
        #expect(r[0].contains("Bitmap name too long"))
        #expect(r[1].contains("Granularity must be power of 2 and at least 512"))
        #expect(r[2] == #"{"return": {}}"#)
        #expect(r[3].contains("Bitmap already exists: a"))
        #expect(r[4].contains("Bitmap 'zz' is not found"))
        #expect(r[5].contains("Can't store persistent bitmaps to f"))
    }

    @Test func persistenceBothWays() throws {
        guard Self.have(["qemu-img", "qemu-io", "nbdinfo"]) else { return }
        let dir = Self.tempDir()
        let img = dir + "/a.qcow2"
        Self.sh("qemu-img create -f qcow2 \(img) 1G && qemu-img bitmap --add \(img) q0 && qemu-io -c 'write 2M 64k' -c 'write 500M 1M' \(img)")
        var d = try Daemon(dir: dir, image: img)
        let r = d.qmp(#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b0","persistent":true}}"#,
                      #"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"n0","writable":true,"bitmaps":["q0","b0"]}}"#)
        #expect(r == [#"{"return": {}}"#, #"{"return": {}}"#])
        #expect(Self.dirtyMap(d.uri, "q0").map(\.0) == [2 << 20, 500 << 20])
        Self.sh("qemu-io -f raw -c 'write 7M 4k' '\(d.uri)'")
        #expect(Self.sh("qemu-img info -U \(img)").out.contains("in-use"))
        d.stop()
        let info = Self.sh("qemu-img info \(img)").out
        #expect(info.contains("name: b0") && !info.contains("in-use"))
        #expect(Self.sh("qemu-img check \(img)").status == 0)
        d = try Daemon(dir: dir, image: img, extra: ["--export", "type=nbd,id=e,node-name=n0,writable=on,bitmaps=b0:q0"])
        #expect(Self.dirtyMap(d.uri, "b0").map(\.0) == [7 << 20])
        #expect(Self.dirtyMap(d.uri, "q0").map(\.0) == [2 << 20, 7 << 20, 500 << 20])
        d.stop()
    }

    @Test func corruptDirectoryIsRefused() throws {
        guard Self.have(["qemu-img", "python3"]) else { return }
        let dir = Self.tempDir()
        let img = dir + "/a.qcow2"
        Self.sh("qemu-img create -f qcow2 \(img) 1G && qemu-img bitmap --add \(img) q0")
        // Find the bitmap directory through the header extension and break entry 0's type.
        Self.sh("""
        python3 -c '
        import struct
        f = open("\(img)", "r+b"); h = f.read(65536); at = struct.unpack(">I", h[100:104])[0]
        while True:
            t, l = struct.unpack(">II", h[at:at+8])
            if t == 0x23852875: break
            at = (at + 8 + l + 7) & ~7
        off = struct.unpack(">Q", h[at+8+16:at+8+24])[0]
        f.seek(off + 16); f.write(bytes([7])); f.close()'
        """)
        let before = Self.sh("md5sum < \(img)").out
        let p = Self.sh("\(Self.blockd) --blockdev driver=file,filename=\(img),node-name=f --blockdev driver=qcow2,file=f,node-name=n0")
        #expect(p.status != 0)
        #expect(p.out.contains("corrupt bitmap directory"))
        #expect(Self.sh("md5sum < \(img)").out == before)
    }

    /// kill -9 while a client writes; after each restart every range written is dirty.
    @Test func crashSafety() throws {
        guard Self.have(["qemu-img", "nbdinfo", "nbdsh"]) else { return }
        let dir = Self.tempDir()
        let img = dir + "/a.qcow2"
        Self.sh("qemu-img create -f qcow2 \(img) 4G")
        var d = try Daemon(dir: dir, image: img)
        _ = d.qmp(#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"b0","persistent":true}}"#)
        d.stop()
        var written: [UInt64] = []
        for round in 0..<20 {
            d = try Daemon(dir: dir, image: img, extra: ["--export", "type=nbd,id=e,node-name=n0,writable=on,bitmaps=b0"])
            // The writer logs an offset before issuing its write; the log is a superset of what was written.
            let log = dir + "/log\(round)"
            let writer = Process()
            writer.executableURL = URL(fileURLWithPath: "/usr/bin/nbdsh")
            writer.arguments = ["-u", d.uri, "-c", """
            import random, sys
            buf = b"x" * 4096
            out = open("\(log)", "w")
            for i in range(100000):
                off = random.randrange(0, (4 << 30) // 4096) * 4096
                out.write("%d\\n" % off); out.flush()
                h.pwrite(buf, off)
            """]
            writer.standardError = FileHandle.nullDevice
            try writer.run()
            usleep(UInt32.random(in: 50_000...300_000))
            d.crash()
            writer.waitUntilExit()
            let offs = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n").compactMap { UInt64($0) } ?? []
            written += offs
            d = try Daemon(dir: dir, image: img, extra: ["--export", "type=nbd,id=e,node-name=n0,writable=on,bitmaps=b0"])
            let map = Self.dirtyMap("nbd+unix:///n0?socket=\(d.nbd)", "b0")
            let reply = d.qmp(#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)
            d.stop()
            #expect(!(reply.first ?? "").contains("inconsistent"))
            for o in written {
                let ok = map.contains { o >= $0.0 && o < $0.0 + $0.1 }
                #expect(ok, "round \(round): offset \(o) written but clean")
                if !ok { return }
            }
        }
        #expect(Self.sh("qemu-img check \(img)").status == 0)
    }
}
