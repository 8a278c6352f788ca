import EventLoop
/// Serialises overlapping requests on one node where correctness needs it (QEMU's
/// serialising requests, `bdrv_wait_serialising_requests`).
///
/// A job copy (stream, copy-on-read) reads the visible data of a range and writes it back as
/// `writeUnchanged`; a client write to the same range between that read and that write would
/// be overwritten with old data. So copies hold the range *exclusively* for read + write, and
/// client writes hold it *shared* (client writes do not serialise against each other: NBD
/// gives no ordering between overlapping in-flight writes anyway).
///
/// Cost: nothing while no copier is active. `BlockNode` asks `isActive` (one atomic load) on
/// each write; only when a job or copy-on-read filter has called `activate()` do writes take the
/// lock's mutex. `activate()` is followed by a drain of the node by the caller (or
/// `BlockNode.enableSerialisation()`), so no write that skipped the lock is still in flight.
public final class RangeLock: Sendable {
    private struct Held {
        var id: UInt64
        var start: UInt64
        var end: UInt64
        var exclusive: Bool
    }
    private struct State {
        var held: [Held] = []
        var nextID: UInt64 = 1
    }
    /// The held ranges, behind the lock whose condition waiters sleep on.
    private let state = LockGuarded(State())
    private var condition: ConditionLock { state.lock }
    private let users = AtomicCounter()
    private let readUsers = AtomicCounter()

    public init() {}

    /// True while at least one copier needs writes to be serialised.
    @inline(__always)
    public var isActive: Bool { users.value > 0 }

    /// A copier starts using the lock; writes take it from now on (after a drain).
    public func activate() { users.add(1) }
    public func deactivate() { users.add(-1) }

    /// True while reads of the node take the lock shared too: a fleecing target, whose
    /// copy-before-write copies must not land under a reader that looked through to the
    /// source (`BlockCopy`). One atomic load per read otherwise.
    @inline(__always)
    public var serialisesReads: Bool { readUsers.value > 0 }
    public func activateReads() { readUsers.add(1) }
    public func deactivateReads() { readUsers.add(-1) }

    /// A held range; pass it back to `unlock`.
    public struct Token: Sendable {
        fileprivate let id: UInt64
    }

    private func conflicts(_ start: UInt64, _ end: UInt64, exclusive: Bool) -> Bool {
        for h in state.value.held where h.start < end && start < h.end && (h.exclusive || exclusive) {
            return true
        }
        return false
    }

    /// Takes `[offset, offset+length)`, sleeping while a conflicting holder has it. With
    /// `noWait` it throws `.wouldBlock` instead of sleeping (event-loop threads).
    public func lock(offset: UInt64, length: UInt64, exclusive: Bool,
                     noWait: Bool = false) throws(BlockError) -> Token {
        let end = offset &+ max(length, 1)
        condition.lock()
        defer { condition.unlock() }
        while conflicts(offset, end, exclusive: exclusive) {
            if noWait { throw .wouldBlock }
            condition.wait()
        }
        let id = state.value.nextID
        state.value.nextID &+= 1
        state.value.held.append(Held(id: id, start: offset, end: end, exclusive: exclusive))
        return Token(id: id)
    }

    public func unlock(_ token: Token) {
        state.withLock { s in s.held.removeAll { $0.id == token.id } }
        condition.broadcast()
    }

    /// Runs `body` holding the range.
    public func withLock<T>(offset: UInt64, length: UInt64, exclusive: Bool,
                            _ body: () throws(BlockError) -> T) throws(BlockError) -> T {
        let token = try lock(offset: offset, length: length, exclusive: exclusive)
        defer { unlock(token) }
        return try body()
    }

    /// Number of ranges held now (tests).
    public var heldCount: Int { state.withLock { $0.held.count } }
}
