import BlockCore
import JSON
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// QEMU's `secret` objects (`--object secret,id=ID,data=…|file=…[,format=raw|base64]`,
/// `object-add qom-type=secret`): bytes that options name by id instead of carrying them
/// (`key-secret` of an `rbd` node). As in QEMU, the data is loaded when the object is created
/// (`file` is read then, verbatim) and `format=base64` is decoded then; encrypted secrets
/// (`keyid`, `iv`) are refused.
public final class SecretStore: Sendable {
    public static let shared = SecretStore()
    private let secrets = Mutex<[String: [UInt8]]>([:])

    public init() {}

    /// Creates the secret described by `object-add` options (`qom-type` and `id` included).
    public func add(_ options: JSONObject) throws(BlockError) {
        var r = OptionReader(options)
        _ = try r.requiredString("qom-type")
        let id = try r.requiredString("id")
        let data = try r.string("data")
        let file = try r.string("file")
        let format = try r.enumValue("format", ["raw", "base64"]) ?? "raw"
        if try r.string("keyid") != nil || r.has("iv") {
            throw BlockError.notSupported("encrypted secrets ('keyid', 'iv') are not supported by blockd")
        }
        _ = try r.bool("loaded")
        try r.finish()
        var bytes: [UInt8]
        if let file {
            if data != nil { throw BlockError.invalid("'file' and 'data' are mutually exclusive") }
            bytes = try Self.readFile(file)
        } else if let data {
            bytes = Array(data.utf8)
        } else {
            throw BlockError.invalid("Either 'file' or 'data' must be provided")
        }
        if format == "base64" {
            guard let decoded = Base64.decode(bytes) else {
                throw BlockError.invalid("Base64 data contains invalid characters")
            }
            bytes = decoded
        }
        let clash = secrets.withLock { s -> Bool in
            if s[id] != nil { return true }
            s[id] = bytes
            return false
        }
        if clash { throw BlockError.invalid("attempt to add duplicate property '\(id)' to object (type 'container')") }
    }

    /// Removes a secret; false when there is none with that id.
    @discardableResult
    public func remove(_ id: String) -> Bool {
        secrets.withLock { $0.removeValue(forKey: id) != nil }
    }

    public func contains(_ id: String) -> Bool { secrets.withLock { $0[id] != nil } }

    /// The secret's bytes (QEMU's `qcrypto_secret_lookup`).
    public func lookup(_ id: String) throws(BlockError) -> [UInt8] {
        guard let bytes = secrets.withLock({ $0[id] }) else {
            throw BlockError.invalid("No secret with id '\(id)'")
        }
        return bytes
    }

    /// The secret's bytes as base64 text (QEMU's `qcrypto_secret_lookup_as_base64`): what Ceph's
    /// `key` option takes.
    public func lookupBase64(_ id: String) throws(BlockError) -> String {
        Base64.encode(try lookup(id))
    }

    private static func readFile(_ path: String) throws(BlockError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw BlockError.system("Unable to read \(path)") }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockError.system("Unable to read \(path)")
            }
            if n == 0 { break }
            out += chunk[0..<n]
            if out.count > 1 << 20 { throw BlockError.invalid("Unable to read \(path): secrets are limited to 1 MiB") }
        }
        return out
    }
}

/// Standard base64 (RFC 4648, with padding), as GLib's: newlines are skipped when decoding.
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = bytes[i]
            let b1 = i + 1 < bytes.count ? bytes[i + 1] : 0
            let b2 = i + 2 < bytes.count ? bytes[i + 2] : 0
            out.append(alphabet[Int(b0 >> 2)])
            out.append(alphabet[Int((b0 & 3) << 4 | b1 >> 4)])
            out.append(i + 1 < bytes.count ? alphabet[Int((b1 & 15) << 2 | b2 >> 6)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(b2 & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// nil for characters outside the alphabet, `=` and newline (QEMU's check).
    static func decode(_ text: [UInt8]) -> [UInt8]? {
        var values: [UInt8] = []
        values.reserveCapacity(text.count)
        var padding = 0
        for c in text {
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): values.append(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): values.append(c - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): values.append(c - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "+"): values.append(62)
            case UInt8(ascii: "/"): values.append(63)
            case UInt8(ascii: "="): padding += 1
            case UInt8(ascii: "\n"): continue
            default: return nil
            }
            if padding > 0 && c != UInt8(ascii: "=") { return nil }
        }
        var out: [UInt8] = []
        out.reserveCapacity(values.count * 3 / 4)
        var i = 0
        while i + 1 < values.count {
            out.append(values[i] << 2 | values[i + 1] >> 4)
            if i + 2 < values.count { out.append(values[i + 1] << 4 | values[i + 2] >> 2) }
            if i + 3 < values.count { out.append(values[i + 2] << 6 | values[i + 3]) }
            i += 4
        }
        return out
    }
}
