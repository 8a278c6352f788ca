import BlockCore
import NBDProtocol

/// One transmission request from header to reply. Owned by exactly one thread at a time:
/// the loop thread, or the worker it was handed to (and back through the loop's inbox).
final class Request: @unchecked Sendable {
    /// Room before the data for the longest reply header (structured OFFSET_DATA, 28 bytes),
    /// so header and data go out as one contiguous iovec.
    static let headroom = 32

    var header = RequestHeader(flags: [], type: 0, cookie: 0, offset: 0, length: 0)
    /// Pool buffer: `headroom` bytes, then the payload (read data or write payload).
    var buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    /// Outcome: 0 or an errno from the block layer, with its message.
    var errno: Int32 = 0
    var message = ""
    /// Reply bytes built by the executor for commands whose reply is not the data buffer
    /// (block status chunks, split sparse reads).
    var replyBytes: [UInt8] = []
    /// For reads with structured replies: how the data splits into data and hole chunks.
    var chunks: [(offset: Int, length: Int, hole: Bool)] = []

    var data: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: buffer[Request.headroom...])
    }

    func reset() {
        errno = 0
        message = ""
        if !replyBytes.isEmpty { replyBytes.removeAll(keepingCapacity: true) }
        if !chunks.isEmpty { chunks.removeAll(keepingCapacity: true) }
    }
}
