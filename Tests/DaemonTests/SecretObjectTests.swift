import BlockCore
import BlockDrivers
@testable import Daemon
import JSON
import QMP
import Testing

/// `secret` objects as `object-add` and `--object` make them (Daemon.addObject): one id
/// namespace with throttle groups and TLS objects, and QEMU's help text.
@Suite(.serialized) struct SecretObjectTests {
    /// `--object TEXT` as the command line converts it, added without a daemon.
    static func add(_ text: String, _ tls: TLSObjects) throws {
        let (options, keyval, _) = try Startup.objectArgument(text)
        try Daemon.addObject(try Daemon.typedObjectOptions(options, keyval: keyval), tlsObjects: tls)
    }

    static func refusal(_ text: String, _ tls: TLSObjects) -> String {
        do {
            try add(text, tls)
            return ""
        } catch let e as BlockError {
            return e.message
        } catch {
            return "\(error)"
        }
    }

    @Test func secretsShareTheObjectNamespace() throws {
        let tls = TLSObjects()
        defer {
            SecretStore.shared.remove("so-key")
            SecretStore.shared.remove("so-tg2")
            _ = ThrottleGroups.shared.remove("so-tg")
            _ = ThrottleGroups.shared.remove("so-tg2")
        }
        try Self.add("secret,id=so-key,data=c2VjcmV0,format=base64", tls)
        #expect(try SecretStore.shared.lookup("so-key") == Array("secret".utf8))
        let duplicate = "attempt to add duplicate property"
        #expect(Self.refusal("secret,id=so-key,data=x", tls).contains(duplicate))
        #expect(Self.refusal("throttle-group,id=so-key,x-bps-total=1000", tls).contains(duplicate))
        #expect(Self.refusal("authz-simple,id=so-key,identity=x", tls).contains(duplicate))
        try Self.add("throttle-group,id=so-tg,x-bps-total=1000", tls)
        #expect(Self.refusal("secret,id=so-tg,data=x", tls).contains(duplicate))
        try Self.add("authz-simple,id=so-authz,identity=x", tls)
        #expect(Self.refusal("secret,id=so-authz,data=x", tls).contains(duplicate))
        #expect(!SecretStore.shared.contains("so-tg") && !SecretStore.shared.contains("so-authz"))
        // A secret's id is free again once it is deleted.
        #expect(SecretStore.shared.remove("so-key"))
        try Self.add("throttle-group,id=so-key,x-bps-total=1000", tls)
        #expect(ThrottleGroups.shared.remove("so-key"))
        // Properties checked as QEMU's visitor does; encrypted secrets refused.
        #expect(Self.refusal("secret,id=so-tg2,data=x,bogus=1", tls) != "")
        #expect(Self.refusal("secret,id=so-tg2,data=x,keyid=k,iv=aXY=", tls).contains("not supported"))
        #expect(!SecretStore.shared.contains("so-tg2"))
    }

    /// `--object help` and `--object secret,help` print what qemu-storage-daemon 7.2 prints
    /// for `secret` (the deprecated `loaded` left out).
    @Test func helpListsSecret() {
        #expect(Daemon.objectHelp([:]).contains("\n  secret\n"))
        #expect(Daemon.objectHelp(["qom-type": "secret"]) == """
            secret options:
              data=<string>
              file=<string>
              format=<QCryptoSecretFormat>
              iv=<string>
              keyid=<string>

            """)
    }
}
