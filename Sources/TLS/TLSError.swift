import CGnuTLS
import Glibc

/// A TLS failure, as one sentence for people (the option, file or peer it is about).
public struct TLSError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// GnuTLS's text for an error code ("The TLS connection was non-properly terminated.").
func gnutlsText(_ code: Int32) -> String {
    guard let s = gnutls_strerror(code) else { return "GnuTLS error \(code)" }
    var text = String(cString: s)
    if text.hasSuffix(".") { text.removeLast() }
    return text
}

/// Small whole-file reads for credentials (control plane only: never on an event loop).
enum FileText {
    static func read(_ path: String, what: String) throws(TLSError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw TLSError("Cannot read \(what) \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw TLSError("Cannot read \(what) \(path): \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            out += chunk[0..<n]
            if out.count > 16 << 20 { throw TLSError("\(what) \(path) is larger than 16 MiB") }
        }
        return out
    }

    /// QEMU's check for a credentials file: a missing optional file is fine, any other
    /// failure to reach it is an error ("Unable to access credentials DIR/NAME: …").
    static func exists(_ path: String, required: Bool) throws(TLSError) -> Bool {
        var st = stat()
        if stat(path, &st) == 0 { return true }
        if errno == ENOENT && !required { return false }
        throw TLSError("Unable to access credentials \(path): \(String(cString: strerror(errno)))")
    }
}
