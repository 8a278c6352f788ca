/// Numbers from the NBD protocol (`doc/proto.md` of NetworkBlockDevice/nbd) and QEMU's
/// extensions (`docs/interop/nbd.rst`).
public enum NBD {
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    public static let optMagic: UInt64 = 0x4948_4156_454f_5054   // "IHAVEOPT"
    public static let optReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef
    /// Request and reply magics once `NBD_OPT_EXTENDED_HEADERS` is negotiated.
    public static let extendedRequestMagic: UInt32 = 0x21e4_1c71
    public static let extendedReplyMagic: UInt32 = 0x6e8a_278c

    /// Handshake flags sent by the server.
    public static let flagFixedNewstyle: UInt16 = 1 << 0
    public static let flagNoZeroes: UInt16 = 1 << 1
    /// Client flags.
    public static let clientFixedNewstyle: UInt32 = 1 << 0
    public static let clientNoZeroes: UInt32 = 1 << 1

    /// Longest option payload we accept (names are ≤ 4096 bytes; meta-context lists are small).
    public static let maxOptionLength: UInt32 = 64 * 1024
    /// Longest string (export name, context name) the protocol allows.
    public static let maxStringLength = 4096
}

/// Option codes (`NBD_OPT_*`).
public enum OptionCode: UInt32, Sendable {
    case exportName = 1
    case abort = 2
    case list = 3
    case peekExport = 4
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    case extendedHeaders = 11
}

/// Option reply types (`NBD_REP_*`).
public enum OptionReplyType: UInt32, Sendable {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsup = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSReqd = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeReqd = 0x8000_0008
    case errTooBig = 0x8000_0009
    case errExtHeaderReqd = 0x8000_000a
}

/// `NBD_INFO_*` types in `NBD_OPT_INFO`/`NBD_OPT_GO`.
public enum InfoType: UInt16, Sendable {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Transmission flags (`NBD_FLAG_*`), sent with the export size.
public struct TransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    /// `NBD_FLAG_BLOCK_STAT_PAYLOAD`: `NBD_CMD_BLOCK_STATUS` may carry a payload naming
    /// the contexts wanted (extended headers only).
    public static let blockStatusPayload = TransmissionFlags(rawValue: 1 << 12)
}

/// Commands (`NBD_CMD_*`).
public enum Command: UInt16, Sendable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
    case resize = 8
}

/// Command flags (`NBD_CMD_FLAG_*`).
public struct CommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = CommandFlags(rawValue: 1 << 0)
    public static let noHole = CommandFlags(rawValue: 1 << 1)
    public static let df = CommandFlags(rawValue: 1 << 2)
    public static let reqOne = CommandFlags(rawValue: 1 << 3)
    public static let fastZero = CommandFlags(rawValue: 1 << 4)
    /// Extended headers only: `length` is the payload that follows, not the effect length.
    public static let payloadLen = CommandFlags(rawValue: 1 << 5)
    public static let all: CommandFlags = [.fua, .noHole, .df, .reqOne, .fastZero, .payloadLen]
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
public enum ReplyType: UInt16, Sendable {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case blockStatusExt = 6
    case error = 0x8001
    case errorOffset = 0x8002
}

public enum ReplyFlags {
    public static let done: UInt16 = 1 << 0
}

/// Error values on the wire (`NBD_E*`).
public enum NBDErrorCode: UInt32, Sendable {
    case ok = 0
    case perm = 1
    case io = 5
    case nomem = 12
    case inval = 22
    case nospc = 28
    case overflow = 75
    case notsup = 95
    case shutdown = 108
}

extension NBDErrorCode {
    /// The errno name (`EINVAL`), for logs.
    public var name: String {
        switch self {
        case .ok: "OK"
        case .perm: "EPERM"
        case .io: "EIO"
        case .nomem: "ENOMEM"
        case .inval: "EINVAL"
        case .nospc: "ENOSPC"
        case .overflow: "EOVERFLOW"
        case .notsup: "ENOTSUP"
        case .shutdown: "ESHUTDOWN"
        }
    }
}

/// `base:allocation` flags.
public enum AllocationFlags {
    public static let hole: UInt32 = 1 << 0
    public static let zero: UInt32 = 1 << 1
}
