import Testing
@testable import JSON

@Suite struct JSONParserTests {
    @Test func parsesNestedValues() throws {
        let v = try JSONParser.parse(#"{"execute": "blockdev-add", "arguments": {"size": 1024, "ro": true, "x": null, "l": [1, -2.5, "s"]}}"#)
        #expect(v["execute"]?.stringValue == "blockdev-add")
        #expect(v["arguments"]?["size"]?.intValue == 1024)
        #expect(v["arguments"]?["ro"]?.boolValue == true)
        #expect(v["arguments"]?["x"] == .null)
        #expect(v["arguments"]?["l"]?.arrayValue?.count == 3)
    }

    @Test func roundTripsThroughSerializer() throws {
        let text = #"{"a": [1, 2, {"b": "c\"d\n"}], "e": false}"#
        let v = try JSONParser.parse(text)
        #expect(try JSONParser.parse(v.serialized) == v)
        #expect(v.serialized == text)
    }

    @Test(arguments: ["{", "[1,]", "{\"a\" 1}", "tru", "\"abc", "01", "{\"a\":1}}", "\"\\u12\"", "{'a': 1", "nul"])
    func rejectsMalformedInput(_ text: String) {
        #expect(throws: JSONParseError.self) { try JSONParser.parse(text) }
    }

    @Test func rejectsDeepNesting() {
        let deep = String(repeating: "[", count: 5000) + String(repeating: "]", count: 5000)
        #expect(throws: JSONParseError.self) { try JSONParser.parse(deep) }
    }

    @Test func unicodeEscapes() throws {
        #expect(try JSONParser.parse(#""\u00e9\ud83d\ude00""#).stringValue == "é😀")
    }
}

@Suite struct KeyValueTests {
    @Test func nestsDottedKeys() throws {
        let o = try KeyValue.parse("driver=raw,node-name=r,file.driver=file,file.filename=/a,,b")
        #expect(o["driver"] == "raw")
        #expect(o["file"]?["driver"] == "file")
        #expect(o["file"]?["filename"] == "/a,b")
    }

    @Test func impliedFirstKey() throws {
        let o = try KeyValue.parse("socket,id=m,path=/tmp/x", impliedKey: "backend")
        #expect(o["backend"] == "socket")
        #expect(o["id"] == "m")
    }

    @Test(arguments: ["a", "a=1,a=2", "a=1,", "=x", "a.b=1,a=2", "a..b=1"])
    func rejectsBadSyntax(_ text: String) {
        #expect(throws: KeyValue.ParseError.self) { try KeyValue.parse(text) }
    }
}
