/// A PSK key file as QEMU, nbdkit and libnbd read it (`keys.psk`, made by `psktool`): one
/// `username:hexkey` per line. Blank lines and lines starting with `#` are skipped; for a
/// username listed twice the first line wins (as QEMU's and GnuTLS's lookups do).
public struct PSKKeyFile: Sendable, Equatable {
    public private(set) var keys: [String: [UInt8]] = [:]
    /// Usernames in file order.
    public private(set) var usernames: [String] = []

    public init(keys: [(String, [UInt8])]) {
        for (user, key) in keys where self.keys[user] == nil {
            self.keys[user] = key
            usernames.append(user)
        }
    }

    /// Parses the text of a key file; `path` only names the file in errors.
    public init(parsing text: String, path: String) throws(TLSError) {
        var lineNumber = 0
        // Lines by bytes: a String splits "\r\n" as one character.
        for raw in Array(text.utf8).split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            lineNumber += 1
            var bytes = raw
            if bytes.last == UInt8(ascii: "\r") { bytes = bytes.dropLast() }
            let line = Substring(String(decoding: bytes, as: UTF8.self))
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) || line.hasPrefix("#") { continue }
            guard let colon = line.firstIndex(of: ":") else {
                throw TLSError("PSK file \(path), line \(lineNumber): expected 'username:hexkey'")
            }
            let user = String(line[..<colon])
            let hex = line[line.index(after: colon)...]
            if user.isEmpty { throw TLSError("PSK file \(path), line \(lineNumber): the username is empty") }
            guard let key = PSKKeyFile.decodeHex(hex), !key.isEmpty, key.count <= 512 else {
                throw TLSError("PSK file \(path), line \(lineNumber): the key for '\(user)' is not 1 to 512 bytes of hexadecimal")
            }
            if keys[user] == nil {
                keys[user] = key
                usernames.append(user)
            }
        }
        if keys.isEmpty { throw TLSError("PSK file \(path) has no keys (expected lines of 'username:hexkey', see psktool)") }
    }

    /// Reads and parses `path`.
    public static func load(path: String) throws(TLSError) -> PSKKeyFile {
        let bytes = try FileText.read(path, what: "PSK file")
        return try PSKKeyFile(parsing: String(decoding: bytes, as: UTF8.self), path: path)
    }

    static func decodeHex(_ text: Substring) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var i = 0
        while i < digits.count {
            guard let hi = nibble(digits[i]), let lo = nibble(digits[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
