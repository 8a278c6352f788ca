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

    @Test func nestsAtAnyDepth() throws {
        let o = try KeyValue.parse("qcow2,node-name=t,file.driver=file,file.filename=t.qcow2,backing.driver=qcow2,backing.file.driver=file,backing.file.filename=b.qcow2",
                                   impliedKey: "driver")
        #expect(o["driver"] == "qcow2")
        #expect(o["backing"]?["file"]?["filename"] == "b.qcow2")
        #expect(o.keys == ["driver", "node-name", "file", "backing"])
    }

    @Test func impliedFirstKey() throws {
        let o = try KeyValue.parse("socket,id=m,path=/tmp/x", impliedKey: "backend")
        #expect(o["backend"] == "socket")
        #expect(o["id"] == "m")
        // Only the first element, and only without '='.
        #expect(try KeyValue.parse("backend=x,id=m", impliedKey: "backend")["backend"] == "x")
        #expect(throws: KeyValue.ParseError.self) { try KeyValue.parse("id=m,socket", impliedKey: "backend") }
    }

    /// util/keyval.c: the last of a repeated key wins, a trailing comma is fine.
    @Test func lastValueWinsAndTrailingComma() throws {
        #expect(try KeyValue.parse("a=1,a=2")["a"] == "2")
        #expect(try KeyValue.parse("a=1,")["a"] == "1")
        #expect(try KeyValue.parse("").isEmpty)
    }

    @Test func indexesMakeLists() throws {
        let o = try KeyValue.parse("bitmaps.1=b,bitmaps.0=a,x.0.y=1")
        #expect(o["bitmaps"] == ["a", "b"])
        #expect(o["x"] == [["y": "1"]])
    }

    /// QEMU's messages, word for word (checked against qemu-storage-daemon 7.2).
    @Test(arguments: [
        ("a", "Expected '=' after parameter 'a'"),
        ("=x", "Invalid parameter ''"),
        (",a=1", "Invalid parameter ''"),
        ("a..b=1", "Invalid parameter 'a..b'"),
        ("9a=1", "Invalid parameter '9a'"),
        ("a.b=1,a=2", "Parameters 'a.*' used inconsistently"),
        ("a=2,a.b=1", "Parameters 'a.*' used inconsistently"),
        ("a.b.c=1,a.b=2", "Parameters 'a.b.*' used inconsistently"),
        ("a.1=x", "Parameter 'a.0' missing"),
        ("a.0=x,a.b=y", "Parameters 'a.*' used inconsistently"),
        ("help", "Help is not available for this option"),
        (String(repeating: "k", count: 128) + "=1", "Parameter '\(String(repeating: "k", count: 128))' is too long"),
    ])
    func qemuMessages(_ text: String, _ message: String) {
        #expect(throws: KeyValue.ParseError.self) { try KeyValue.parse(text) }
        do { _ = try KeyValue.parse(text) } catch { #expect(error.message == message) }
    }

    @Test func helpIsReported() throws {
        let (o, help) = try KeyValue.parseAllowingHelp("throttle-group,help", impliedKey: "qom-type")
        #expect(help && o["qom-type"] == "throttle-group")
    }
}

@Suite struct QemuOptsTests {
    @Test func impliedNameFlagsAndID() {
        let p = QemuOpts.parse("socket,id=c0,path=/a,,b,server,nowait", impliedName: "backend")
        #expect(p.id == "c0")
        #expect(p.value("backend") == "socket")
        #expect(p.value("path") == "/a,b")
        #expect(p.value("server") == "on")
        #expect(p.value("wait") == "off")
        #expect(p.warnings == ["warning: short-form boolean option 'server' deprecated\nPlease use server=on instead",
                               "warning: short-form boolean option 'nowait' deprecated\nPlease use wait=off instead"])
    }

    @Test func identifiers() {
        #expect(QemuOpts.isValidID("mon0.a-b_c"))
        #expect(!QemuOpts.isValidID("0mon"))
        #expect(!QemuOpts.isValidID(""))
    }
}

@Suite struct PrettyJSONTests {
    /// QEMU's `pretty=on` layout (qobject/json-writer.c), including its empty containers.
    @Test func qemuLayout() throws {
        let v = try JSONParser.parse(#"{"return": {}, "list": [], "x": [1, {"a": true}]}"#)
        #expect(v.prettySerialized == """
            {
                "return": {
                },
                "list": [
                ],
                "x": [
                    1,
                    {
                        "a": true
                    }
                ]
            }
            """)
    }
}
