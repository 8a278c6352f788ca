import BlockCore
@testable import BlockDrivers
import JSON
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The rbd driver's pieces that need no cluster: options (QAPI, keyval lists, the legacy file
/// name), secret objects, the block status fold, and prepared opens.
@Suite struct RBDOptionsTests {
    func parse(_ object: JSONObject) throws(BlockError) -> RBDOptions {
        var reader = OptionReader(object)
        return try RBDOptions.parse(&reader, prefix: "")
    }

    func message(_ object: JSONObject) -> String {
        do {
            _ = try parse(object)
            return ""
        } catch {
            return error.message
        }
    }

    @Test func qapiOptionsInJSONAndKeyvalForms() throws {
        let json = try parse(["pool": "p", "image": "i", "namespace": "ns", "snapshot": "s", "conf": "/c", "user": "u",
                              "key-secret": "k", "auth-client-required": .array(["cephx", "none"]),
                              "server": .array([.object(["host": "h1", "port": "6789"]), .object(["host": "::1", "port": "3300"])])])
        #expect(json.spec == "p/ns/i@s")
        #expect(json.conf == "/c" && json.user == "u" && json.keySecret == "k")
        #expect(json.authClientRequired == ["cephx", "none"])
        #expect(json.servers.map(\.monHost) == ["h1:6789", "[::1]:3300"])
        // --blockdev driver=rbd,…,server.0.host=h1,server.0.port=6789,auth-client-required.0=cephx
        let keyval = try KeyValue.parse("pool=p,image=i,server.0.host=h1,server.0.port=6789,server.1.host=h2,server.1.port=1,auth-client-required.0=cephx")
        let o = try parse(keyval)
        #expect(o.servers == [RBDServer(host: "h1", port: "6789"), RBDServer(host: "h2", port: "1")])
        #expect(o.authClientRequired == ["cephx"])
    }

    @Test func refusalsNameTheOption() {
        #expect(message(["image": "i"]) == "Parameter 'pool' is missing")
        #expect(message(["pool": "p"]) == "Parameter 'image' is missing")
        #expect(message(["pool": "p", "image": "i", "bogus": 1]) == "Parameter 'bogus' is unexpected")
        #expect(message(["pool": "p", "image": "i", "auth-client-required": .array(["x"])])
            == "Parameter 'auth-client-required[0]' does not accept value 'x'")
        #expect(message(["pool": "p", "image": "i", "server": .array([.object(["host": "h"])])])
            == "Parameter 'server[0].port' is missing")
        #expect(message(["pool": "p", "image": "i", "server": .array([.object(["host": "h", "port": "1", "x": "y"])])])
            == "Parameter 'server[0].x' is unexpected")
        #expect(message(["pool": "p", "image": "i", "server": "h"]) == "Invalid parameter type for 'server', expected: array")
        #expect(message(["pool": "p", "image": "i", "encrypt": .object(["format": "luks"])]).contains("does not support 'encrypt'"))
        #expect(message(["pool": "", "image": "i"]) == "RBD pool and image names must not be empty")
        #expect(message(["filename": "rbd:p/i", "pool": "p"]) == "Parameter 'pool' cannot be combined with 'filename'")
    }

    @Test func legacyFilenameAsQEMUParsesIt() throws {
        let plain = try RBDOptions.parseFilename("rbd:pool/image")
        #expect(plain.pool == "pool" && plain.image == "image" && plain.snapshot == nil && plain.namespace == "")
        let full = try RBDOptions.parseFilename("rbd:pool/ns/image@snap:conf=/etc/c\\:x.conf:id=admin:rados_osd_op_timeout=5")
        #expect(full.pool == "pool" && full.namespace == "ns" && full.image == "image" && full.snapshot == "snap")
        #expect(full.conf == "/etc/c:x.conf" && full.user == "admin")
        #expect(full.confPairs == [RBDOptions.ConfPair(key: "rados_osd_op_timeout", value: "5")])
        let escaped = try RBDOptions.parseFilename("rbd:p/im\\@age\\:1")
        #expect(escaped.image == "im@age:1" && escaped.snapshot == nil)
        let snapOnly = try RBDOptions.parseFilename("rbd:p/i@s")
        #expect(snapOnly.snapshot == "s")
        for (bad, text) in [("nbd:x", "File name must start with 'rbd:'"), ("rbd:", "Pool name is required"),
                            ("rbd:p/i:conf", "conf option conf has no value")] {
            #expect(throws: BlockError.self) { _ = try RBDOptions.parseFilename(bad) }
            do { _ = try RBDOptions.parseFilename(bad) } catch { #expect(error.message == text) }
        }
    }

    @Test func secretsAsQEMULoadsThem() throws {
        let store = SecretStore()
        try store.add(["qom-type": "secret", "id": "raw", "data": "AQB key"])
        #expect(try store.lookup("raw") == Array("AQB key".utf8))
        #expect(try store.lookupBase64("raw") == "QVFCIGtleQ==")
        // format=base64: decoded when created, given back re-encoded (Ceph's key as it was).
        try store.add(["qom-type": "secret", "id": "b64", "data": "AQCI9w5rwIeQNBAAdXvv7cUpGE7PAWFbQ1rygg==", "format": "base64"])
        #expect(try store.lookupBase64("b64") == "AQCI9w5rwIeQNBAAdXvv7cUpGE7PAWFbQ1rygg==")
        let dir = "/tmp/blockd-secret-\(getpid())"
        mkdir(dir, 0o700)
        defer { unlink(dir + "/key"); rmdir(dir) }
        let fd = open(dir + "/key", O_CREAT | O_WRONLY | O_TRUNC, 0o600)
        _ = "c2VjcmV0\n".withCString { write(fd, $0, 9) }
        close(fd)
        try store.add(["qom-type": "secret", "id": "f", "file": .string(dir + "/key"), "format": "base64"])
        #expect(try store.lookup("f") == Array("secret".utf8))
        func refusal(_ o: JSONObject) -> String {
            do { try store.add(o); return "" } catch { return error.message }
        }
        #expect(refusal(["qom-type": "secret", "id": "x"]) == "Either 'file' or 'data' must be provided")
        #expect(refusal(["qom-type": "secret", "id": "x", "data": "a", "file": "/f"]) == "'file' and 'data' are mutually exclusive")
        #expect(refusal(["qom-type": "secret", "id": "x", "data": "a b", "format": "base64"]) == "Base64 data contains invalid characters")
        #expect(refusal(["qom-type": "secret", "id": "x", "data": "a", "format": "hex"]) == "Parameter 'format' does not accept value 'hex'")
        #expect(refusal(["qom-type": "secret", "id": "x", "data": "a", "keyid": "k"]).contains("encrypted secrets"))
        #expect(refusal(["qom-type": "secret", "id": "raw", "data": "a"]) == "attempt to add duplicate property 'raw' to object (type 'container')")
        #expect(refusal(["qom-type": "secret", "id": "x", "file": "/nonexistent/k"]).hasPrefix("Unable to read /nonexistent/k"))
        #expect(throws: BlockError.self) { _ = try store.lookup("nope") }
        #expect(store.remove("raw") && !store.remove("raw"))
    }

    @Test func base64RoundTrips() {
        for n in 0..<40 {
            let bytes = (0..<n).map { UInt8(truncatingIfNeeded: $0 * 37 + n) }
            #expect(Base64.decode(Array(Base64.encode(bytes).utf8)) == bytes)
        }
        #expect(Base64.decode(Array("Zm9v\nYmFy".utf8)) == Array("foobar".utf8))
        #expect(Base64.decode(Array("Zm=9v".utf8)) == nil)
    }

    /// `rbd_diff_iterate2`'s extents folded into the first run from the queried offset.
    @Test func diffScanFindsTheFirstRun() {
        func scan(_ offset: UInt64, _ end: UInt64, _ extents: [(UInt64, UInt64)]) -> (Bool, UInt64) {
            var s = RBDDriver.DiffScan(offset: offset)
            for (o, n) in extents where s.add(o, n, true) == RBDDriver.DiffScan.stop { break }
            return s.result(end: end)
        }
        #expect(scan(0, 100, []) == (false, 100))                         // nothing allocated
        #expect(scan(0, 100, [(0, 10), (10, 5), (40, 10)]) == (true, 15)) // data, then a gap
        #expect(scan(0, 100, [(20, 10)]) == (false, 20))                  // a hole before data
        #expect(scan(25, 100, [(20, 10), (30, 10)]) == (true, 40))        // an extent starting before
        #expect(scan(35, 100, [(20, 10), (50, 10)]) == (false, 50))       // in a gap after one
        #expect(scan(0, 100, [(0, 100)]) == (true, 100))
    }

    final class Resource: PreparedResource, @unchecked Sendable {
        var discarded = 0
        func discard() { discarded += 1 }
    }

    @Test func preparedOpensAreTakenOnceOrDiscarded() throws {
        let a = Resource(), b = Resource()
        let objects: [JSONObject] = [["driver": "rbd", "image": "a"], ["driver": "rbd", "image": "b"]]
        BlockdevFactory.preparers["test-prep"] = nil
        let set = PreparedOpens([(objects[0], "rbd", a), (objects[1], "rbd", b)])
        let taken = try BlockdevFactory.withPrepared(set) { () throws(BlockError) -> (any PreparedResource)? in
            BlockdevFactory.prepared?.take(driver: "rbd", options: objects[0])
        }
        #expect(taken === a)
        #expect(a.discarded == 0 && b.discarded == 1)
        #expect(BlockdevFactory.prepared == nil)
        #expect(set.isEmpty)
    }

    final class Seen: Sendable {
        let settings = Mutex<[String: BlockdevFactory.ChildDefaults]>([:])
    }

    @Test func prepareFindsInlineNodes() {
        let seen = Seen()
        BlockdevFactory.preparers["test-prep"] = { o, settings in
            seen.settings.withLock { $0[o["image"]?.stringValue ?? ""] = settings }
            return o["image"] == "x" ? nil : Resource()
        }
        defer { BlockdevFactory.preparers["test-prep"] = nil }
        let inner: JSONObject = ["driver": "test-prep", "image": "a"]
        let options: JSONObject = ["driver": "qcow2", "node-name": "q", "cache": ["direct": true],
                                   "file": .object(["driver": "raw", "file": .object(inner)]),
                                   "backing": .object(["driver": "test-prep", "image": "x"])]
        let set = BlockdevFactory.prepare(options)
        #expect(set != nil)
        #expect(set?.take(driver: "test-prep", options: inner) != nil)
        #expect(set?.isEmpty == true)
        #expect(BlockdevFactory.prepare(["driver": "file", "filename": "/f"]) == nil)
        // Each node is prepared with the settings the factory gives it: inherited cache.direct,
        // and a backing child read-only.
        let a = seen.settings.withLock { $0["a"] }, x = seen.settings.withLock { $0["x"] }
        #expect(a?.readOnly == false && a?.cacheDirect == true && a?.discard == .unmap)
        #expect(x?.readOnly == true && x?.cacheDirect == true)
        // A read-only parent makes its file child read-only; the child's own setting wins.
        _ = BlockdevFactory.prepare(["driver": "raw", "node-name": "r", "read-only": true,
                                     "file": .object(["driver": "test-prep", "image": "b"])])
        _ = BlockdevFactory.prepare(["driver": "raw", "node-name": "r", "cache": ["direct": true],
                                     "file": .object(["driver": "test-prep", "image": "c", "cache": ["direct": false]])])
        #expect(seen.settings.withLock { $0["b"]?.readOnly } == true)
        #expect(seen.settings.withLock { $0["c"]?.cacheDirect } == false)
        // Options of the wrong type: nothing below them is prepared (the open fails first).
        #expect(BlockdevFactory.prepare(["driver": "raw", "read-only": "maybe", "file": .object(inner)]) == nil)
    }
}
