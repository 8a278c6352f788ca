#if canImport(Glibc)
import Glibc
#endif

/// The one error carrier of the block layer: an errno and a sentence for people.
///
/// The NBD mapping (errno → NBD error) lives in `NBDProtocol.NBDError`; QMP shows `message`.
public struct BlockError: Error, Sendable, CustomStringConvertible {
    public var errno: Int32
    public var message: String
    /// A second sentence for people at a terminal (QEMU's error hint, e.g. "Is another process
    /// using the image [x]?"): the command line prints it on its own line, QMP leaves it out
    /// as QEMU does.
    public var hint: String?

    public init(_ errno: Int32, _ message: String, hint: String? = nil) {
        self.errno = errno
        self.message = message
        self.hint = hint
    }

    /// `noWait` request that would have slept; nothing was changed. Retry without `noWait`.
    public static let wouldBlock = BlockError(EAGAIN, "operation would block")

    public var isWouldBlock: Bool { errno == EAGAIN }

    /// The node was replaced under its parents while the request waited for a drained section
    /// (active commit's pivot). Retry on the node the parent (export) points to now.
    public static let replaced = BlockError(ESTALE, "node was replaced while the request waited")

    public var isReplaced: Bool { errno == ESTALE }

    public static func io(_ message: String) -> BlockError { BlockError(EIO, message) }
    public static func invalid(_ message: String) -> BlockError { BlockError(EINVAL, message) }
    public static func notSupported(_ message: String) -> BlockError { BlockError(ENOTSUP, message) }
    public static func readOnly(_ message: String = "the node is read-only") -> BlockError { BlockError(EPERM, message) }

    /// From the current `errno` after a failed system call.
    public static func system(_ what: String, errno code: Int32 = Glibc.errno) -> BlockError {
        BlockError(code, "\(what): \(String(cString: strerror(code)))")
    }

    public var description: String { message }

    /// The message, and the hint on a line of its own (what a terminal shows).
    public var messageWithHint: String {
        guard let hint else { return message }
        return message + "\n" + hint
    }
}
