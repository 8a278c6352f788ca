@testable import Daemon
import QMP
import Testing

/// `--nbd-server` settings besides the address (QAPI `NbdServerOptions`), read by the code
/// `nbd-server-start` uses.
@Suite struct NBDServerOptionTests {
    static func settings(_ text: String) throws -> NBDServerSettings? {
        guard case .daemon(let actions, _) = try CommandLine.parse(["--nbd-server", text]),
              let action = actions.first, action.kind == .nbdServer else { return nil }
        let (options, keyval) = try Startup.argumentObject(action.argument, impliedKey: nil)
        var args = QMPArguments(options, keyval: keyval)
        let config = try Daemon.nbdServerArguments(&args, legacy: false)
        try args.finish()
        return config.settings
    }

    @Test func defaultsAreQemusDefaults() throws {
        let s = try Self.settings("addr.type=unix,addr.path=/tmp/x.sock")
        #expect(s == NBDServerSettings(maxConnections: 0, handshakeMaxSeconds: 10))
    }

    @Test func handshakeMaxSecondsAndMaxConnections() throws {
        let s = try Self.settings("addr.type=unix,addr.path=/tmp/x.sock,handshake-max-seconds=3,max-connections=1")
        #expect(s == NBDServerSettings(maxConnections: 1, handshakeMaxSeconds: 3))
        #expect(try Self.settings("addr.type=unix,addr.path=/tmp/x.sock,handshake-max-seconds=0")?.handshakeMaxSeconds == 0,
                "0 = no limit")
        let json = try Self.settings(#"{"addr": {"type": "unix", "path": "/tmp/x.sock"}, "handshake-max-seconds": 5}"#)
        #expect(json?.handshakeMaxSeconds == 5)
    }

    @Test func badValuesNameTheParameter() {
        for bad in ["handshake-max-seconds=-1", "handshake-max-seconds=x", "handshake-max-seconds=4294967296",
                    "max-connections=-2"] {
            #expect {
                _ = try Self.settings("addr.type=unix,addr.path=/tmp/x.sock,\(bad)")
            } throws: { error in
                let name = String(bad.prefix { $0 != "=" })
                return (error as? QMPError)?.desc.contains("'\(name)'") == true
            }
        }
    }
}
