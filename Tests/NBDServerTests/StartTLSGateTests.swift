import NBDProtocol
@testable import NBDServer
import Testing

/// The TLS rules of option haggling, as QEMU's nbd/server.c applies them.
@Suite struct StartTLSGateTests {
    static let tlsReqd: UInt32 = 0x8000_0005, policy: UInt32 = 0x8000_0002, invalid: UInt32 = 0x8000_0003, ack: UInt32 = 1

    static func decide(_ option: UInt32, length: Int = 0, configured: Bool = true, active: Bool = false,
                       fixed: Bool = true) -> StartTLSGate.Decision {
        StartTLSGate.decide(option: option, payloadLength: length, tlsConfigured: configured, tlsActive: active,
                            fixedNewstyle: fixed)
    }

    @Test func everyOptionBeforeStartTLSNeedsTLS() {
        for option: UInt32 in [3, 6, 7, 8, 9, 10, 11, 0x1234] {
            guard case .reply(let bytes) = Self.decide(option, length: 7) else {
                Issue.record("option \(option) was not refused")
                continue
            }
            let r = replies(bytes)
            #expect(r.count == 1 && r[0].option == option && r[0].type == Self.tlsReqd)
            #expect(String(decoding: r[0].payload, as: UTF8.self) == "Option 0x\(String(option, radix: 16)) not permitted before TLS")
        }
    }

    @Test func startTLSExportNameAndAbortBeforeTLS() {
        guard case .startTLS(let bytes) = Self.decide(5) else { Issue.record("STARTTLS not started"); return }
        #expect(replies(bytes).map(\.type) == [Self.ack])
        guard case .close(let bad, _) = Self.decide(5, length: 3) else { Issue.record("STARTTLS with data kept"); return }
        #expect(replies(bad).map(\.type) == [Self.invalid])
        guard case .close(let none, let reason) = Self.decide(1, length: 4) else { Issue.record("EXPORT_NAME kept"); return }
        #expect(none.isEmpty)
        #expect(reason.contains("NBD_OPT_EXPORT_NAME before STARTTLS"))
        guard case .close(let abort, _) = Self.decide(2) else { Issue.record("ABORT kept"); return }
        #expect(replies(abort).map(\.type) == [Self.ack])
        guard case .close(let old, _) = Self.decide(5, fixed: false) else { Issue.record("non-fixed newstyle kept"); return }
        #expect(old.isEmpty)
    }

    @Test func afterTLSOnlyStartTLSIsRefused() {
        #expect(Self.decide(7, active: true) == .pass)
        #expect(Self.decide(1, active: true) == .pass)
        guard case .reply(let bytes) = Self.decide(5, active: true) else { Issue.record("second STARTTLS accepted"); return }
        #expect(replies(bytes).map(\.type) == [Self.invalid])
        #expect(String(decoding: replies(bytes)[0].payload, as: UTF8.self) == "TLS already enabled")
    }

    @Test func withoutTLSStartTLSIsAgainstPolicy() {
        #expect(Self.decide(7, configured: false) == .pass)
        #expect(Self.decide(1, configured: false, fixed: false) == .pass)
        guard case .reply(let bytes) = Self.decide(5, configured: false) else { Issue.record("STARTTLS accepted"); return }
        #expect(replies(bytes).map(\.type) == [Self.policy])
        #expect(String(decoding: replies(bytes)[0].payload, as: UTF8.self) == "TLS not configured")
        guard case .reply(let data) = Self.decide(5, length: 1, configured: false) else { Issue.record("STARTTLS accepted"); return }
        #expect(replies(data).map(\.type) == [Self.invalid])
    }
}
