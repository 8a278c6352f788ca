import Synchronization

/// An object reference that readers load with one atomic load and a writer replaces
/// atomically, for the few values that requests read without being inside the node that owns
/// them (an export's root node, a bitmap's write intent, a throttle node's group).
///
/// Invariant: every object ever stored stays alive until this reference is deallocated, so a
/// reader that loaded an object just before it was replaced can still use it; a replaced
/// object is never freed under a reader. Use it for values replaced rarely (each distinct
/// object is kept once). The pointer is published with release ordering after the object is
/// retained, and loaded with acquire ordering.
public final class AtomicReference<Object: AnyObject & Sendable>: Sendable {
    private let bits: Atomic<UInt>
    /// Strong references to everything ever stored (the invariant above).
    private let kept: Mutex<[Object]>

    public init(_ object: Object?) {
        if let object {
            kept = Mutex([object])
            bits = Atomic(UInt(bitPattern: Unmanaged.passUnretained(object).toOpaque()))
        } else {
            kept = Mutex([])
            bits = Atomic(0)
        }
    }

    @inline(__always)
    public func load() -> Object? {
        let raw = bits.load(ordering: .acquiring)
        guard let p = UnsafeRawPointer(bitPattern: raw) else { return nil }
        return Unmanaged<Object>.fromOpaque(p).takeUnretainedValue()
    }

    /// True when `object` is the one stored now (no retain).
    @inline(__always)
    public func holds(_ object: Object) -> Bool {
        bits.load(ordering: .sequentiallyConsistent) == UInt(bitPattern: Unmanaged.passUnretained(object).toOpaque())
    }

    public func store(_ object: Object?) {
        if let object {
            kept.withLock { list in
                if !list.contains(where: { $0 === object }) { list.append(object) }
            }
            bits.store(UInt(bitPattern: Unmanaged.passUnretained(object).toOpaque()), ordering: .sequentiallyConsistent)
        } else {
            bits.store(0, ordering: .sequentiallyConsistent)
        }
    }

    /// An object stored before that matches `predicate` (to reuse a box instead of keeping
    /// a new one).
    public func kept(where predicate: (Object) -> Bool) -> Object? {
        kept.withLock { list in list.first(where: predicate) }
    }
}
