import JSON
@testable import QMP
import Testing

@Suite struct QMPStreamParserTests {
    func feed(_ text: String, _ parser: inout QMPStreamParser) -> [QMPStreamParser.Item] {
        parser.feed(Array(text.utf8))
    }

    func items(_ text: String) -> [QMPStreamParser.Item] {
        var p = QMPStreamParser()
        return feed(text, &p)
    }

    @Test func severalValuesOnOneLine() {
        let out = items(#"{"execute":"a"}{"execute":"b"} {"execute":"c"}"# + "\n")
        #expect(out == [.value(["execute": "a"]), .value(["execute": "b"]), .value(["execute": "c"])])
    }

    @Test func oneValueOverSeveralReads() {
        var p = QMPStreamParser()
        #expect(feed(#"{"execute":"#, &p).isEmpty)
        #expect(feed("\n", &p).isEmpty)
        #expect(feed(#""query-version", "id": [1, {"a": null}]"#, &p).isEmpty)
        #expect(feed("}", &p) == [.value(["execute": "query-version", "id": [1, ["a": nil]]])])
        #expect(p.isIdle)
    }

    @Test func byteByByte() {
        var p = QMPStreamParser()
        var out: [QMPStreamParser.Item] = []
        for b in Array(#"{"a": [1, 2.5, -3, true, false, null, 'sq', "\u00e9\n"]}"#.utf8) { out += p.feed([b]) }
        #expect(out == [.value(["a": [1, 2.5, -3, true, false, nil, "sq", "é\n"]])])
    }

    @Test func scalarsAndArraysAreValues() {
        #expect(items("[1, 2]") == [.value([1, 2])])
        #expect(items("3 ") == [.value(3)])
        #expect(items("\"s\"") == [.value("s")])
        #expect(items("3").isEmpty)  // a number needs a following byte to end
    }

    @Test func qemuErrorMessages() {
        #expect(items("garbage ") == [.error("JSON parse error, invalid keyword 'garbage'")])
        #expect(items("{\"a\":}") == [.error("JSON parse error, expecting value")])
        #expect(items("{\"a\": 1 2}") == [.error("JSON parse error, expected separator in dict")])
        #expect(items("{\"a\" 1}") == [.error("JSON parse error, missing : in object pair")])
        #expect(items("{1: 2}") == [.error("JSON parse error, key is not a string in object")])
        #expect(items("[1 2]") == [.error("JSON parse error, expected separator in list")])
        #expect(items("[1,]") == [.error("JSON parse error, expecting value")])
        #expect(items("01") == [.error("JSON parse error, stray '01'")])
        #expect(items("{\"a\":-}") == [.error("JSON parse error, stray '-}'")])
        #expect(items(#""\q""#) == [.error("JSON parse error, invalid escape sequence in string")])
        #expect(items(#""\u00zz""#) == [.error(#"JSON parse error, \u00zz is not a valid Unicode character"#)])
        #expect(items(#""\uD800\u0041""#) == [.error(#"JSON parse error, \uD800 is not a valid Unicode character"#)])
        #expect(items(#""\uD83D\uDE00""#) == [.value("😀")])
        #expect(QMPStreamParser().feedBytes([0x22, 0xC3, 0x28, 0x22]) == [.error("JSON parse error, invalid UTF-8 sequence in string")])
        #expect(items("]") == [.error("JSON parse error, expecting value")])
    }

    @Test func garbageResynchronises() {
        let out = items("{\"execute\":\"a\"} @@@ {\"execute\":\"b\"}")
        #expect(out == [.value(["execute": "a"]), .error("JSON parse error, stray '@'"), .value(["execute": "b"])])
        // A newline inside a string is a lexical error; recovery resumes at the next '}'.
        let out2 = items("{\"exec\n}\n{\"execute\":\"c\"}")
        #expect(out2 == [.error("JSON parse error, stray '\"exec\n'"), .error("JSON parse error, expecting value"),
                         .value(["execute": "c"])])
        // 0xFF forces a reset, as the QMP spec suggests.
        var p = QMPStreamParser()
        let out3 = p.feed(Array("{\"a\": [1, ".utf8) + [0xFF] + Array("{\"b\": 2}".utf8))
        #expect(out3.count == 2)
        #expect(out3.last == .value(["b": 2]))
    }

    @Test func nestingLimit() {
        let deep = String(repeating: "[", count: 1100) + String(repeating: "]", count: 1100)
        let out = items(deep + "{\"ok\": 1}")
        #expect(out == [.error("JSON nesting depth limit exceeded"), .value(["ok": 1])])
    }

    @Test func sizeLimitThenRecovery() {
        var p = QMPStreamParser(maxMessageBytes: 1000)
        let big = "{\"execute\": \"x\", \"arguments\": {\"s\": \"" + String(repeating: "a", count: 5000) + "\"}}"
        let out = p.feed(Array((big + "{\"execute\": \"y\"}").utf8))
        #expect(out == [.error("JSON token size limit exceeded"), .value(["execute": "y"])])
        // A single oversized scalar.
        let out2 = p.feed(Array(("\"" + String(repeating: "b", count: 5000) + "\" {\"z\": 1}").utf8))
        #expect(out2 == [.error("JSON token size limit exceeded"), .value(["z": 1])])
    }

    @Test func tenMiBLineIsFast() {
        let clock = ContinuousClock()
        var p = QMPStreamParser()
        let line = Array(("{\"execute\": \"x\", \"arguments\": {\"s\": \"" + String(repeating: "a", count: 10 << 20) + "\"}}\n").utf8)
        let start = clock.now
        let out = p.feed(line)
        #expect(out.count == 1)
        if case .value(let v)? = out.first {
            #expect(v["arguments"]?["s"]?.stringValue?.utf8.count == 10 << 20)
        } else {
            Issue.record("no value")
        }
        #expect(clock.now - start < .seconds(10))
    }

    @Test func bigIntegersAndFloats() {
        #expect(items("[12345678901234567890, 1.5e3, -0, 9223372036854775807]") ==
                [.value([.double(12345678901234567890.0), .double(1500), 0, .int(Int64.max)])])
    }
}

extension QMPStreamParser {
    func feedBytes(_ bytes: [UInt8]) -> [Item] {
        var copy = self
        return copy.feed(bytes)
    }
}
