import Synchronization

/// A small atomic counter for flags that the request path reads once per request.
final class AtomicCounter: Sendable {
    private let storage = Atomic<Int>(0)
    init() {}
    @inline(__always) var value: Int { storage.load(ordering: .sequentiallyConsistent) }
    @discardableResult
    func add(_ n: Int) -> Int { storage.wrappingAdd(n, ordering: .sequentiallyConsistent).newValue }
}
