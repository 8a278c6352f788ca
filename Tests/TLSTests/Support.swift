#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import TLS

/// Test credentials made by `scripts/make-pki.sh` (certtool, psktool) in a fresh directory.
final class PKI: @unchecked Sendable {
    let root: String
    var pki: String { root + "/pki" }
    var pki2: String { root + "/pki2" }
    var rogue: String { root + "/rogue" }
    var psk: String { root + "/psk/keys.psk" }
    var pskWrong: String { root + "/psk-wrong/keys.psk" }

    init() throws {
        var template = Array("/tmp/blockd-tls-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw TLSError("mkdtemp failed")
        }
        root = String(cString: p)
        let script = PKI.sourceRoot + "/scripts/make-pki.sh"
        let status = PKI.run(["/bin/bash", script, root])
        if status != 0 { throw TLSError("make-pki.sh failed with status \(status)") }
    }

    deinit { _ = PKI.run(["/bin/rm", "-rf", root]) }

    /// The package directory, from this file's path (Tests/TLSTests/Support.swift).
    static var sourceRoot: String {
        var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return parts.joined(separator: "/")
    }

    static func run(_ argv: [String]) -> Int32 {
        var pid: pid_t = 0
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        let args = argv.map { strdup($0) } + [nil]
        defer { for a in args { free(a) } }
        guard posix_spawnp(&pid, argv[0], &actions, nil, args, environ) == 0 else { return -1 }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return (status >> 8) & 0xff
    }

    static func available(_ tool: String) -> Bool {
        for dir in ["/usr/bin", "/bin", "/usr/local/bin"] where access("\(dir)/\(tool)", X_OK) == 0 { return true }
        return false
    }
}

extension Trait where Self == ConditionTrait {
    /// certtool and psktool (gnutls-bin): skipped locally when missing, required under CI=true.
    static var requiresGnuTLSTools: Self {
        .enabled("needs certtool and psktool (gnutls-bin; ./scripts/test.sh installs it)") {
            let ci = getenv("CI").map { String(cString: $0) } ?? ""
            return (!ci.isEmpty && ci != "0" && ci != "false") || (PKI.available("certtool") && PKI.available("psktool"))
        }
    }
}

/// A connected pair of non-blocking unix sockets with a TLS session on each end.
final class Pair {
    let fds: (Int32, Int32)
    let server: TLSSession
    let client: TLSSession

    init(server s: TLSCredentials, client c: TLSCredentials, authorization: TLSAuthorization? = nil,
         hostname: String? = "localhost") throws {
        var sv: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
            throw TLSError("socketpair failed")
        }
        fds = (sv[0], sv[1])
        server = try TLSSession(fd: sv[0], credentials: s, authorization: authorization)
        client = try TLSSession(fd: sv[1], credentials: c, hostname: hostname)
    }

    deinit {
        close(fds.0)
        close(fds.1)
    }

    /// Steps both handshakes until each is done or failed (5 s at most).
    func handshake() -> (server: TLSSession.Progress, client: TLSSession.Progress) {
        var s = TLSSession.Progress.wouldBlock, c = TLSSession.Progress.wouldBlock
        for _ in 0..<100_000 {
            if s == .wouldBlock { s = server.handshake() }
            if c == .wouldBlock { c = client.handshake() }
            if s != .wouldBlock && c != .wouldBlock { break }
            if s == .failed || c == .failed {
                // The failed side hangs up, as a connection would; the other side reads its
                // alert, then the end of the stream.
                if s == .failed { shutdown(fds.0, Int32(SHUT_WR)) }
                if c == .failed { shutdown(fds.1, Int32(SHUT_WR)) }
                for _ in 0..<100 {
                    if s == .wouldBlock { s = server.handshake() }
                    if c == .wouldBlock { c = client.handshake() }
                    if s != .wouldBlock && c != .wouldBlock { break }
                    usleep(100)
                }
                break
            }
            usleep(50)
        }
        return (s, c)
    }
}
