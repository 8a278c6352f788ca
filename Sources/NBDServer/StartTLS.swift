import NBDProtocol
import TLS

/// TLS for every client of a server (`tls-creds`, `tls-authz`): server credentials and, if
/// set, the one identity allowed in.
public struct TLSServerPolicy: Sendable {
    public var credentials: TLSCredentials
    public var authorization: TLSAuthorization?
    public init(credentials: TLSCredentials, authorization: TLSAuthorization?) {
        self.credentials = credentials
        self.authorization = authorization
    }
}

/// The TLS rules of option haggling, ahead of `OptionHandler`, as QEMU's `nbd/server.c`
/// applies them. With TLS configured and not yet started (the NBD spec's "forced TLS"):
/// - `NBD_OPT_STARTTLS` is acknowledged and the TLS handshake starts (with data: refused and
///   the client dropped, as QEMU does);
/// - `NBD_OPT_EXPORT_NAME` closes the connection (it has no error reply);
/// - `NBD_OPT_ABORT` is acknowledged and the connection closes (the spec allows ABORT before
///   TLS; QEMU answers it with ERR_TLS_REQD instead);
/// - every other option gets `NBD_REP_ERR_TLS_REQD`, and the client may go on.
/// Without TLS configured STARTTLS gets `NBD_REP_ERR_POLICY` ("TLS not configured"), and once
/// TLS runs a second STARTTLS gets `NBD_REP_ERR_INVALID` ("TLS already enabled").
enum StartTLSGate {
    enum Decision: Equatable {
        /// Not a TLS matter: `OptionHandler` answers.
        case pass
        case reply([UInt8])
        case close([UInt8], reason: String)
        /// Send these bytes in the clear, then run the TLS handshake.
        case startTLS([UInt8])
    }

    static func decide(option: UInt32, payloadLength: Int, tlsConfigured: Bool, tlsActive: Bool,
                       fixedNewstyle: Bool) -> Decision {
        let isStartTLS = option == OptionCode.startTLS.rawValue
        if tlsConfigured && !tlsActive {
            if !fixedNewstyle {
                return .close([], reason: "client is not fixed newstyle; TLS needs it (option \(option) refused)")
            }
            switch OptionCode(rawValue: option) {
            case .startTLS:
                if payloadLength > 0 {
                    return .close(Handshake.errorReply(option: option, type: .errInvalid, message: "NBD_OPT_STARTTLS takes no data"),
                                  reason: "NBD_OPT_STARTTLS with \(payloadLength) bytes of data; dropping the client")
                }
                return .startTLS(Handshake.optionReply(option: option, type: .ack))
            case .exportName:
                return .close([], reason: "client sent NBD_OPT_EXPORT_NAME before STARTTLS; this server requires TLS")
            case .abort:
                return .close(Handshake.optionReply(option: option, type: .ack), reason: "client aborted the handshake")
            default:
                return .reply(Handshake.errorReply(option: option, type: .errTLSReqd,
                                                   message: "Option 0x\(String(option, radix: 16)) not permitted before TLS"))
            }
        }
        guard isStartTLS else { return .pass }
        if payloadLength > 0 {
            return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "NBD_OPT_STARTTLS takes no data"))
        }
        if tlsActive {
            return .reply(Handshake.errorReply(option: option, type: .errInvalid, message: "TLS already enabled"))
        }
        return .reply(Handshake.errorReply(option: option, type: .errPolicy, message: "TLS not configured"))
    }
}
