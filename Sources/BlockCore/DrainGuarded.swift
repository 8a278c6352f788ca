/// A value the request path reads without a lock and graph changes replace only inside a
/// drained section of its owner node: QEMU's rule for `bs->children`, `bs->backing` and the
/// dirty-bitmap list, made checkable.
///
/// Invariant (one of the few `@unchecked Sendable` wrappers of the project):
/// - the value is written only before it is shared with other threads (`init`), or by
///   `set(_:drained:)` while `owner` is drained: no request is in flight in `owner`, and new
///   ones wait for the section to end (`BlockNode.enter`);
/// - it is read only by requests in flight in `owner` (which entered it, or a node above it:
///   a graph change drains the changed node and everything above it), or by the thread that
///   holds the graph's change lock, which every writer holds too.
///
/// The drain's atomics give the ordering: a request enters with a sequentially consistent
/// increment of the owner's in-flight count and then loads its drain depth, and the section
/// ends with a decrement of the depth after the write; a section begins only when the
/// in-flight count was seen at zero, after each earlier reader's decrement. `set` checks the
/// owner is drained (always, not only in debug builds: a change outside a drained section is
/// the bug this type exists to stop). ThreadSanitizer checks the rest (scripts/tsan.sh).
public final class DrainGuarded<Value: Sendable>: @unchecked Sendable {
    private var stored: Value

    public init(_ value: Value) { stored = value }

    /// The value, for a request in flight in the owner or the graph lock holder.
    public var value: Value {
        @inline(__always) _read { yield stored }
    }

    /// Replaces the value; `owner` must be drained (the caller began the drained section).
    public func set(_ value: Value, drained owner: BlockNode) {
        precondition(owner.isDrained, "graph change outside a drained section of '\(owner.nodeName)'")
        stored = value
    }

    /// Replaces the value of a node nobody can reach yet (a driver being opened).
    public func setUnpublished(_ value: Value) { stored = value }
}
