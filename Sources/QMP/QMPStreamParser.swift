import JSON

/// Splits a QMP byte stream into JSON values the way QEMU's monitor does (`qobject/json-lexer.c`,
/// `json-streamer.c`, `json-parser.c` in QEMU 7.2): a lexer turns bytes into tokens, a streamer
/// counts braces and brackets and hands a message to the parser as soon as they balance (or go
/// negative), and the parser builds the value or reports the first error.
///
/// This is not line based: several values may share a line and one value may span many reads.
/// After a lexical error the lexer skips input until a structural character (`{ } [ ]`), a
/// control character or an impossible UTF-8 byte (0xFE, 0xFF), exactly like QEMU, so a client
/// can resynchronise by sending a newline or 0xFF.
///
/// Limits are QEMU's: 64 MiB of token text per message, 2 Mi tokens, nesting depth 1024. One
/// deliberate difference: when a limit is hit QEMU resets its counters and then reports an error
/// for every leftover fragment of the oversized value; we report one error and silently skip the
/// rest of that value (until its braces balance), then carry on.
public struct QMPStreamParser: Sendable {
    /// One result of `feed`: a complete value or a parse error (the `desc` of a GenericError).
    public enum Item: Sendable, Equatable {
        case value(JSONValue)
        case error(String)
    }

    public static let defaultMaxMessageBytes = 64 << 20
    public static let maxTokenCount = 2 << 20
    public static let maxNesting = 1024

    public let maxMessageBytes: Int

    // Lexer.
    private var state: LexState = .start
    private var token: [UInt8] = []
    private var tokenTooLong = false

    // Streamer: the tokens of the message being collected, as kinds plus ranges into `text`.
    private var kinds: [TokenKind] = []
    private var ends: [Int] = []          // end offset in `text` of each token
    private var text: [UInt8] = []
    private var braces = 0
    private var brackets = 0
    /// After a limit error: depth of the aborted value still to skip (0 = not skipping).
    private var skipping = false

    public init(maxMessageBytes: Int = QMPStreamParser.defaultMaxMessageBytes) {
        self.maxMessageBytes = maxMessageBytes
    }

    /// Feeds bytes; returns the values and errors completed by them, in order.
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [Item] {
        var out: [Item] = []
        for byte in bytes { feedByte(byte, into: &out) }
        return out
    }

    public mutating func feed(_ buffer: UnsafeRawBufferPointer) -> [Item] {
        var out: [Item] = []
        for byte in buffer { feedByte(byte, into: &out) }
        return out
    }

    /// True when no partial message is buffered (useful for tests and clients).
    public var isIdle: Bool { state == .start && kinds.isEmpty && !skipping }

    // MARK: - Lexer

    enum TokenKind: UInt8 { case lcurly, rcurly, lsquare, rsquare, colon, comma, integer, float, keyword, string }

    enum LexState: UInt8 {
        case start, recovery, whitespace
        case dqString, dqEscape, sqString, sqEscape
        case zero, nonzero, negative, mantissa, mantissaDigits, expE, expSign, expDigits
        case keyword
    }

    private enum Step { case stay(LexState), emit(TokenKind), lookahead(TokenKind?), error }

    @inline(__always)
    private static func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }

    private static func step(_ state: LexState, _ c: UInt8) -> Step {
        switch state {
        case .start:
            switch c {
            case UInt8(ascii: "\""): return .stay(.dqString)
            case UInt8(ascii: "'"): return .stay(.sqString)
            case UInt8(ascii: "0"): return .stay(.zero)
            case UInt8(ascii: "1")...UInt8(ascii: "9"): return .stay(.nonzero)
            case UInt8(ascii: "-"): return .stay(.negative)
            case UInt8(ascii: "{"): return .emit(.lcurly)
            case UInt8(ascii: "}"): return .emit(.rcurly)
            case UInt8(ascii: "["): return .emit(.lsquare)
            case UInt8(ascii: "]"): return .emit(.rsquare)
            case UInt8(ascii: ","): return .emit(.comma)
            case UInt8(ascii: ":"): return .emit(.colon)
            case UInt8(ascii: "a")...UInt8(ascii: "z"): return .stay(.keyword)
            case 0x20, 0x09, 0x0A, 0x0D: return .stay(.whitespace)
            default: return .error
            }
        case .recovery:
            switch c {
            case 0x09: return .stay(.recovery)
            case 0x00...0x1F, 0xFE, 0xFF,
                 UInt8(ascii: "{"), UInt8(ascii: "}"), UInt8(ascii: "["), UInt8(ascii: "]"):
                return .lookahead(nil)
            default: return .stay(.recovery)
            }
        case .whitespace:
            switch c {
            case 0x20, 0x09, 0x0A, 0x0D: return .stay(.whitespace)
            default: return .lookahead(nil)
            }
        case .dqString, .sqString:
            let quote = state == .dqString ? UInt8(ascii: "\"") : UInt8(ascii: "'")
            if c == quote { return .emit(.string) }
            if c == UInt8(ascii: "\\") { return .stay(state == .dqString ? .dqEscape : .sqEscape) }
            if c >= 0x20 && c <= 0xFD { return .stay(state) }
            return .error
        case .dqEscape: return c >= 0x20 && c <= 0xFD ? .stay(.dqString) : .error
        case .sqEscape: return c >= 0x20 && c <= 0xFD ? .stay(.sqString) : .error
        case .zero:
            if isDigit(c) { return .error }
            if c == UInt8(ascii: ".") { return .stay(.mantissa) }
            return .lookahead(.integer)
        case .nonzero:
            if isDigit(c) { return .stay(.nonzero) }
            if c == UInt8(ascii: ".") { return .stay(.mantissa) }
            if c == UInt8(ascii: "e") || c == UInt8(ascii: "E") { return .stay(.expE) }
            return .lookahead(.integer)
        case .negative:
            if c == UInt8(ascii: "0") { return .stay(.zero) }
            if isDigit(c) { return .stay(.nonzero) }
            return .error
        case .mantissa: return isDigit(c) ? .stay(.mantissaDigits) : .error
        case .mantissaDigits:
            if isDigit(c) { return .stay(.mantissaDigits) }
            if c == UInt8(ascii: "e") || c == UInt8(ascii: "E") { return .stay(.expE) }
            return .lookahead(.float)
        case .expE:
            if c == UInt8(ascii: "-") || c == UInt8(ascii: "+") { return .stay(.expSign) }
            return isDigit(c) ? .stay(.expDigits) : .error
        case .expSign: return isDigit(c) ? .stay(.expDigits) : .error
        case .expDigits: return isDigit(c) ? .stay(.expDigits) : .lookahead(.float)
        case .keyword:
            if c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z") { return .stay(.keyword) }
            return .lookahead(.keyword)
        }
    }

    private mutating func feedByte(_ c: UInt8, into out: inout [Item]) {
        while true {
            switch Self.step(state, c) {
            case .stay(let next):
                if next != .recovery && next != .whitespace { appendToToken(c) }
                state = next
                return
            case .emit(let kind):
                appendToToken(c)
                finishToken(kind, into: &out)
                return
            case .lookahead(let kind):
                if let kind { finishToken(kind, into: &out) } else { token.removeAll(keepingCapacity: true) }
                state = .start
                // Re-examine the same byte from the start state.
            case .error:
                appendToToken(c)
                lexicalError(into: &out)
                state = .recovery
                return
            }
        }
    }

    @inline(__always)
    private mutating func appendToToken(_ c: UInt8) {
        if token.count < maxMessageBytes { token.append(c) } else { tokenTooLong = true }
    }

    private mutating func lexicalError(into out: inout [Item]) {
        let stray = String(decoding: token, as: UTF8.self)
        token.removeAll(keepingCapacity: true)
        tokenTooLong = false
        resetMessage()
        skipping = false
        out.append(.error("JSON parse error, stray '\(stray)'"))
    }

    // MARK: - Streamer

    private mutating func resetMessage() {
        kinds.removeAll(keepingCapacity: false)
        ends.removeAll(keepingCapacity: false)
        text.removeAll(keepingCapacity: false)
        braces = 0
        brackets = 0
    }

    private mutating func finishToken(_ kind: TokenKind, into out: inout [Item]) {
        defer {
            token.removeAll(keepingCapacity: token.count < 4096)
            tokenTooLong = false
            state = .start
        }
        switch kind {
        case .lcurly: braces += 1
        case .rcurly: braces -= 1
        case .lsquare: brackets += 1
        case .rsquare: brackets -= 1
        default: break
        }
        if skipping {
            // Dropping the rest of a value that broke a limit; stop when it balances.
            if braces <= 0 && brackets <= 0 { skipping = false; braces = 0; brackets = 0 }
            return
        }
        var limitError: String?
        if tokenTooLong || text.count + token.count + 1 > maxMessageBytes {
            limitError = "JSON token size limit exceeded"
        } else if kinds.count + 1 > Self.maxTokenCount {
            limitError = "JSON token count limit exceeded"
        } else if braces + brackets > Self.maxNesting {
            limitError = "JSON nesting depth limit exceeded"
        }
        if let limitError {
            let depth = braces + brackets
            let openBraces = braces, openBrackets = brackets
            resetMessage()
            out.append(.error(limitError))
            if depth > 0 {
                skipping = true
                braces = openBraces
                brackets = openBrackets
            }
            return
        }
        kinds.append(kind)
        text.append(contentsOf: token)
        ends.append(text.count)
        if (braces > 0 || brackets > 0) && braces >= 0 && brackets >= 0 { return }
        var parser = TokenParser(kinds: kinds, ends: ends, text: text)
        let item = parser.parse()
        resetMessage()
        out.append(item)
    }
}

// MARK: - Parser

/// QEMU's recursive descent over one message's tokens; the first error wins.
private struct TokenParser {
    typealias Kind = QMPStreamParser.TokenKind
    let kinds: [Kind]
    let ends: [Int]
    let text: [UInt8]
    var i = 0
    var error: String?

    init(kinds: [Kind], ends: [Int], text: [UInt8]) {
        self.kinds = kinds
        self.ends = ends
        self.text = text
    }

    mutating func parse() -> QMPStreamParser.Item {
        let value = parseValue()
        if let value, error == nil { return .value(value) }
        return .error("JSON parse error, " + (error ?? "expecting value"))
    }

    mutating func fail(_ message: String) {
        if error == nil { error = message }
    }

    func range(_ n: Int) -> Range<Int> { (n == 0 ? 0 : ends[n - 1])..<ends[n] }

    var peek: Kind? { i < kinds.count ? kinds[i] : nil }

    mutating func pop() -> Kind? {
        guard i < kinds.count else { return nil }
        i += 1
        return kinds[i - 1]
    }

    mutating func parseValue() -> JSONValue? {
        guard let kind = peek else { fail("premature EOI"); return nil }
        switch kind {
        case .lcurly: return parseObject()
        case .lsquare: return parseArray()
        case .string:
            let r = range(i); i += 1
            return decodeString(text[r]).map(JSONValue.string)
        case .integer:
            let r = range(i); i += 1
            let s = String(decoding: text[r], as: UTF8.self)
            if let v = Int64(s) { return .int(v) }
            return .double(Double(s) ?? 0)
        case .float:
            let r = range(i); i += 1
            return .double(Double(String(decoding: text[r], as: UTF8.self)) ?? 0)
        case .keyword:
            let r = range(i); i += 1
            let word = String(decoding: text[r], as: UTF8.self)
            switch word {
            case "true": return .bool(true)
            case "false": return .bool(false)
            case "null": return .null
            default: fail("invalid keyword '\(word)'"); return nil
            }
        default:
            fail("expecting value")
            return nil
        }
    }

    mutating func parseObject() -> JSONValue? {
        _ = pop()  // {
        var object = JSONObject()
        guard let first = peek else { fail("premature EOI"); return nil }
        if first == .rcurly { _ = pop(); return .object(object) }
        while true {
            // A pair.
            guard peek != nil else { fail("premature EOI"); return nil }
            let key = parseValue()
            guard case .string(let name)? = key else { fail("key is not a string in object"); return nil }
            guard let colon = pop() else { fail("premature EOI"); return nil }
            guard colon == .colon else { fail("missing : in object pair"); return nil }
            guard let value = parseValue() else { fail("Missing value in dict"); return nil }
            object[name] = value   // QEMU keeps the last of duplicate keys.
            guard let sep = pop() else { fail("premature EOI"); return nil }
            if sep == .rcurly { return .object(object) }
            guard sep == .comma else { fail("expected separator in dict"); return nil }
        }
    }

    mutating func parseArray() -> JSONValue? {
        _ = pop()  // [
        var array: [JSONValue] = []
        guard let first = peek else { fail("premature EOI"); return nil }
        if first == .rsquare { _ = pop(); return .array(array) }
        while true {
            guard let value = parseValue() else { fail("expecting value"); return nil }
            array.append(value)
            guard let sep = pop() else { fail("premature EOI"); return nil }
            if sep == .rsquare { return .array(array) }
            guard sep == .comma else { fail("expected separator in list"); return nil }
        }
    }

    /// Unescapes a string token including its quotes (QEMU's `parse_string`).
    mutating func decodeString(_ bytes: ArraySlice<UInt8>) -> String? {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var p = bytes.startIndex + 1
        let end = bytes.endIndex - 1
        var raw: [UInt8] = []   // run of unescaped bytes, validated as UTF-8 in one go

        func flushRaw(_ raw: inout [UInt8], _ out: inout [UInt8]) -> Bool {
            if raw.isEmpty { return true }
            guard String(validating: raw, as: UTF8.self) != nil else { return false }
            out.append(contentsOf: raw)
            raw.removeAll(keepingCapacity: true)
            return true
        }

        func hex4(at q: Int) -> UInt32? {
            guard q + 4 <= end else { return nil }
            var v: UInt32 = 0
            for k in 0..<4 {
                let c = bytes[q + k]
                let d: UInt32
                switch c {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - 0x30)
                case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - 0x61 + 10)
                case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - 0x41 + 10)
                default: return nil
                }
                v = v << 4 | d
            }
            return v
        }

        while p < end {
            let c = bytes[p]
            if c != UInt8(ascii: "\\") {
                raw.append(c)
                p += 1
                continue
            }
            guard flushRaw(&raw, &out) else { fail("invalid UTF-8 sequence in string"); return nil }
            p += 1
            let e = bytes[p]
            p += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "'"): out.append(0x27)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                let shown = String(decoding: bytes[p..<min(p + 4, end)], as: UTF8.self)
                guard var cp = hex4(at: p) else { fail("\\u\(shown) is not a valid Unicode character"); return nil }
                p += 4
                if cp >= 0xD800 && cp < 0xDC00 {
                    if p + 1 < end, bytes[p] == UInt8(ascii: "\\"), bytes[p + 1] == UInt8(ascii: "u"),
                       let low = hex4(at: p + 2), low >= 0xDC00 && low < 0xE000 {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                        p += 6
                    } else {
                        fail("\\u\(shown) is not a valid Unicode character"); return nil
                    }
                } else if cp >= 0xDC00 && cp < 0xE000 {
                    fail("\\u\(shown) is not a valid Unicode character"); return nil
                }
                guard let scalar = Unicode.Scalar(cp) else {
                    fail("\\u\(shown) is not a valid Unicode character"); return nil
                }
                out.append(contentsOf: Array(String(Character(scalar)).utf8))
            default:
                fail("invalid escape sequence in string")
                return nil
            }
        }
        guard flushRaw(&raw, &out) else { fail("invalid UTF-8 sequence in string"); return nil }
        return String(decoding: out, as: UTF8.self)
    }
}
