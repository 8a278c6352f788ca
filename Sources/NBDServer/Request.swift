import BlockCore
import NBDProtocol

/// One transmission request from header to the last byte of its reply. Owned by exactly one
/// thread at a time: the loop thread, or the worker it was handed to (and back through the
/// loop's inbox). A request lives until its reply has left the socket: its reply bytes are in
/// its own memory (data buffer, `scratch`), so nothing is copied or allocated to queue them,
/// and the connection charges the memory it keeps alive to its budget (`charge`).
final class Request: @unchecked Sendable {
    /// Room before the data for the longest reply header (extended OFFSET_DATA, 40 bytes),
    /// so header and data go out as one contiguous iovec.
    static let headroom = 64
    /// Scratch bytes every request has (one reply header, a short error chunk).
    static let inlineScratch = 128

    var header = RequestHeader(flags: [], type: 0, cookie: 0, offset: 0, length: 0)
    /// Pool buffer: `headroom` bytes, then the payload (read data or write payload).
    var buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    /// Outcome: 0 or an errno from the block layer, with its message.
    var errno: Int32 = 0
    var message = ""
    /// Block status: indices into the connection's selected contexts to answer for
    /// (the extended-header payload filter); empty means all of them.
    var statusSelection: [Int] = []
    /// Block status results, one list per context answered, in `statusSelection` order.
    var statusResults: [[Transmission.Extent]] = []
    /// For reads with structured replies: how the data splits into data and hole chunks.
    var chunks: [(offset: Int, length: Int, hole: Bool)] = []
    /// Bytes charged to the connection's memory budget for this request.
    var charge = 0

    /// Reply bytes that are not read data: headers, hole chunks, block status, errors.
    private(set) var scratch: UnsafeMutableRawPointer
    private(set) var scratchCapacity: Int

    init() {
        scratch = .allocate(byteCount: Request.inlineScratch, alignment: 16)
        scratchCapacity = Request.inlineScratch
    }

    deinit { scratch.deallocate() }

    var data: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: buffer[Request.headroom...])
    }

    /// Scratch space for at least `count` bytes of reply; grows (losing the contents) only
    /// while nothing queued points into it.
    func reserveScratch(_ count: Int) -> UnsafeMutableRawPointer {
        if count > scratchCapacity {
            scratch.deallocate()
            scratchCapacity = max(count, scratchCapacity * 2)
            scratch = .allocate(byteCount: scratchCapacity, alignment: 16)
        }
        return scratch
    }

    /// Scratch bytes beyond the inline part (charged to the budget).
    var extraScratch: Int { scratchCapacity - Request.inlineScratch }

    /// Ready for reuse. Large scratch and result arrays are dropped so an idle request in the
    /// free list keeps little memory alive.
    func reset() {
        errno = 0
        message = ""
        charge = 0
        if !statusSelection.isEmpty { statusSelection.removeAll() }
        if !statusResults.isEmpty { statusResults.removeAll() }
        if !chunks.isEmpty { chunks.removeAll(keepingCapacity: chunks.capacity <= 64) }
        if scratchCapacity > 64 * 1024 {
            scratch.deallocate()
            scratch = .allocate(byteCount: Request.inlineScratch, alignment: 16)
            scratchCapacity = Request.inlineScratch
        }
    }
}
