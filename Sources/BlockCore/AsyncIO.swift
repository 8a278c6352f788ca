import EventLoop
import Synchronization

/// What an asynchronous request does; each maps to one `BlockDriver` method.
public enum BlockOperation: UInt8, Sendable, CustomStringConvertible {
    case read, write, writeZeroes, discard, flush, blockStatus

    public var description: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .writeZeroes: "write-zeroes"
        case .discard: "discard"
        case .flush: "flush"
        case .blockStatus: "block-status"
        }
    }

    /// Changes guest-visible data (range lock, write observers, read-only check).
    public var changesData: Bool { self == .write || self == .writeZeroes || self == .discard }
}

/// One request as a layer passes it to the next: offsets change on the way down (`raw`'s
/// `offset`), the rest stays. `buffer` holds `length` bytes for `read` (destination) and
/// `write` (source) and is nil otherwise; it belongs to the submitter until the completion.
public struct BlockRequest {
    public var operation: BlockOperation
    public var offset: UInt64
    public var length: UInt64
    public var buffer: UnsafeMutableRawPointer?
    public var flags: RequestFlags

    public init(_ operation: BlockOperation, offset: UInt64 = 0, length: UInt64 = 0,
                buffer: UnsafeMutableRawPointer? = nil, flags: RequestFlags = []) {
        self.operation = operation
        self.offset = offset
        self.length = length
        self.buffer = buffer
        self.flags = flags
    }

    public static func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, flags: RequestFlags = []) -> BlockRequest {
        BlockRequest(.read, offset: offset, length: UInt64(buffer.count), buffer: buffer.baseAddress, flags: flags)
    }

    public static func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer, flags: RequestFlags = []) -> BlockRequest {
        BlockRequest(.write, offset: offset, length: UInt64(buffer.count), buffer: UnsafeMutableRawPointer(mutating: buffer.baseAddress),
                     flags: flags)
    }
}

/// The asynchronous half of a driver (`BlockDriver.asyncInterface`): requests start on the
/// calling thread, never sleep, and complete later through `BlockIO.complete`.
///
/// The contract, which `BlockNode.submit` relies on:
/// - `submit` either throws (nothing was started, the completion will not run; `.wouldBlock`
///   asks the caller to use the synchronous API on a worker thread instead), or returns and
///   the driver calls `io.complete` exactly once, later — never from inside `submit`.
/// - `submit` never sleeps: it runs on event loop threads. `request.flags` never has `.noWait`
///   (every asynchronous request is non-blocking by construction).
/// - The request arrives checked by its `BlockNode` (range, permission, drain), as for the
///   synchronous methods. `.fua` on a write, write-zeroes or discard means the change is
///   durable when the request completes (the synchronous NBD path flushes after a trim
///   instead).
///
/// Drivers with native asynchronous I/O (`nbd`; `rbd` with librbd completions through
/// an eventfd) implement it; pass-through layers (`raw`, `null-filter`) forward it while
/// their child supports it. Everything else stays synchronous.
public protocol AsyncBlockDriver: AnyObject, Sendable {
    func submit(_ io: BlockIO, _ request: BlockRequest) throws(BlockError)
}

/// One asynchronous request in flight, reusable: the submitter keeps one per outstanding
/// request (the NBD server one per `Request`), so the data path allocates nothing.
///
/// On the way down, layers push *frames* (what to do when the request comes back: leave the
/// node, release the range lock, tell write observers, adjust the status); the driver that
/// performs the request calls `complete`, which unwinds the frames on the driver's thread and
/// then runs the completion on `loop` (directly when already there, else through the loop's
/// inbox).
///
/// Ownership moves along with the request: the submitter owns it until `submit`, the driver
/// until `complete`, the completion after that. `phase` checks that it is never submitted
/// twice or completed twice; between those points exactly one thread touches it.
public final class BlockIO: @unchecked Sendable {
    public typealias Completion = (BlockIO) -> Void

    /// Where `completion` runs; nil runs it on whichever thread completes the request.
    public let loop: EventLoop?
    private let completion: Completion
    /// The outcome, set by `complete`: nil when the request succeeded.
    public private(set) var error: BlockError?
    /// The answer to a `blockStatus` request (the driver sets it before `complete`).
    public var status = BlockStatus(length: 0, flags: [])
    /// The frame stack: the first two inline (a node, and raw or a filter above it, need no
    /// allocation), deeper ones in `moreFrames`.
    private var frame0: Frame?
    private var frame1: Frame?
    private var moreFrames: [Frame] = []
    private var frameCount = 0
    private let phase = Atomic<UInt8>(Phase.idle)

    private enum Phase {
        static let idle: UInt8 = 0
        static let submitted: UInt8 = 1
    }

    enum Frame {
        /// `BlockNode` bookkeeping: leave the node, unlock, and tell observers of a change.
        case node(BlockNode, token: RangeLock.Token?, offset: UInt64, length: UInt64, flags: RequestFlags, changes: Bool)
        /// A layer that reports its child's status as its own (`raw` adds `.allocated`).
        case addStatusFlags(BlockStatus.Flags)
    }

    public init(loop: EventLoop?, completion: @escaping Completion) {
        self.loop = loop
        self.completion = completion
    }

    /// Marks the start of one request; called by `BlockNode.submit` (and by drivers that
    /// submit on their own behalf, as the synchronous wrapper does).
    public func begin() {
        let (ok, _) = phase.compareExchange(expected: Phase.idle, desired: Phase.submitted, ordering: .acquiringAndReleasing)
        precondition(ok, "BlockIO submitted while a request is still in flight")
        error = nil
    }

    /// Gives the request back unstarted (its `submit` threw): the owner may reuse it.
    func abandon() {
        while frameCount > 0 { _ = popFrame() }
        phase.store(Phase.idle, ordering: .releasing)
    }

    func push(_ frame: Frame) {
        switch frameCount {
        case 0: frame0 = frame
        case 1: frame1 = frame
        default: moreFrames.append(frame)
        }
        frameCount += 1
    }

    @discardableResult
    func popFrame() -> Frame? {
        guard frameCount > 0 else { return nil }
        frameCount -= 1
        switch frameCount {
        case 0: defer { frame0 = nil }; return frame0
        case 1: defer { frame1 = nil }; return frame1
        default: return moreFrames.removeLast()
        }
    }

    /// Runs `body` (a child's `submit`) with a frame that adds `flags` to the status once the
    /// request succeeds; the frame is removed again if `body` throws.
    public func addingStatusFlags(_ flags: BlockStatus.Flags, _ body: () throws(BlockError) -> Void) throws(BlockError) {
        push(.addStatusFlags(flags))
        do { try body() } catch {
            popFrame()
            throw error
        }
    }

    /// Ends the request: called exactly once by the driver that accepted it, on any thread
    /// (its own event loop), never from inside its `submit`.
    public func complete(error: BlockError?) {
        precondition(phase.load(ordering: .acquiring) == Phase.submitted, "BlockIO completed twice")
        self.error = error
        while let frame = popFrame() {
            switch frame {
            case .node(let node, let token, let offset, let length, let flags, let changes):
                node.finishAsync(token: token, offset: offset, length: length, flags: flags,
                                 changes: changes, succeeded: self.error == nil)
            case .addStatusFlags(let flags):
                if self.error == nil { status.flags.formUnion(flags) }
            }
        }
        if let loop, !loop.inLoopThread {
            // The task keeps the request alive until it has run (its owner may hold it only
            // through the completion).
            loop.execute { self.deliver() }
        } else {
            deliver()
        }
    }

    private func deliver() {
        phase.store(Phase.idle, ordering: .releasing)
        completion(self)
    }
}

extension AsyncBlockDriver {
    /// The synchronous API of an asynchronous driver: submits `request` and sleeps until it
    /// completes. Only worker, job and control threads may wait: with `.noWait` (the event
    /// loop's inline attempt) or on an event loop thread it throws `.wouldBlock` instead, so
    /// the caller retries on a worker. The request goes straight to the driver: its node has
    /// already checked it.
    public func performSynchronously(_ request: BlockRequest) throws(BlockError) -> BlockStatus {
        if request.flags.contains(.noWait) || EventLoop.current != nil { throw .wouldBlock }
        let waiter = SyncWaiter()
        let io = BlockIO(loop: nil) { _ in waiter.signal() }
        var r = request
        r.flags.remove(.bufferedWriteMayBlock)
        io.begin()
        do {
            try submit(io, r)
        } catch {
            io.abandon()
            throw error
        }
        waiter.wait()
        if let error = io.error { throw error }
        return io.status
    }
}

/// A one-shot signal for `performSynchronously`.
final class SyncWaiter: Sendable {
    private let done = LockGuarded(false)

    func signal() {
        done.withLock { d in
            d = true
            done.lock.broadcast()
        }
    }

    func wait() {
        done.lock.lock()
        defer { done.lock.unlock() }
        while !done.value { done.lock.wait() }
    }
}
