import JSON
import QMP
import Testing

@Suite struct QMPArgumentsTests {
    func args(_ json: String) throws -> QMPArguments {
        guard case .object(let o) = try JSONParser.parse(json) else { throw QMPError.generic("not an object") }
        return QMPArguments(o)
    }

    func message(_ body: () throws -> Void) -> String? {
        do { try body(); return nil } catch let error as QMPError {
            #expect(error.errorClass == .genericError)
            return error.desc
        } catch { return "unexpected \(error)" }
    }

    @Test func missingAndTypes() throws {
        var a = try args(#"{"node-name": 5, "writable": "yes", "speed": 1.5, "type": "foo", "n": "x"}"#)
        #expect(message { _ = try a.requiredString("id") } == "Parameter 'id' is missing")
        #expect(message { _ = try a.requiredString("node-name") } == "Invalid parameter type for 'node-name', expected: string")
        #expect(message { _ = try a.bool("writable") } == "Invalid parameter type for 'writable', expected: boolean")
        #expect(message { _ = try a.int("speed") } == "Invalid parameter type for 'speed', expected: integer")
        #expect(message { _ = try a.enumValue("type", allowed: ["nbd"]) } == "Parameter 'type' does not accept value 'foo'")
        #expect(message { _ = try a.uint("n") } == "Parameter 'n' expects uint64")
        #expect(message { try a.finish() } == nil)
    }

    @Test func unexpectedAndNested() throws {
        var a = try args(#"{"driver": "raw", "file": {"filename": "/x"}, "foo": 1, "granularity": 4294967296, "l": ["a", 2]}"#)
        #expect(try a.requiredString("driver") == "raw")
        var file = try a.requiredObject("file")
        #expect(message { _ = try file.requiredString("driver") } == "Parameter 'file.driver' is missing")
        #expect(try file.string("filename") == "/x")
        #expect(message { try file.finish() } == nil)
        #expect(message { _ = try a.uint32("granularity") } == "Parameter 'granularity' expects uint32_t")
        #expect(message { _ = try a.stringArray("l") } == "Invalid parameter type for 'l[1]', expected: string")
        #expect(message { try a.finish() } == "Parameter 'foo' is unexpected")
        #expect(a.unexpectedKeys == ["foo"])
    }

    @Test func goodValues() throws {
        var a = try args(#"{"s": "x", "b": true, "i": -5, "u": 18446744073709551615, "neg": -1, "o": {}, "arr": [1], "raw": null}"#)
        #expect(try a.string("s") == "x")
        #expect(try a.bool("b") == true)
        #expect(try a.int("i") == -5)
        #expect(try a.uint("u") == UInt64.max)
        #expect(try a.uint("neg") == UInt64.max)  // QEMU accepts negative uint64 as two's complement
        #expect(try a.object("o") != nil)
        #expect(try a.array("arr") == [1])
        #expect(a.value("raw") == .null)
        #expect(try a.string("absent") == nil)
        try a.finish()
    }
}
