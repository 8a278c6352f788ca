import BlockCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A `throttle-group` object: limits shared by every throttle node in the group.
/// Supported limits: `bps-total`, `bps-read`, `bps-write`, `iops-total`, `iops-read`,
/// `iops-write` (also as QEMU's `x-` spellings and `limits.` prefix). A simple token bucket
/// per limit with a one-second burst.
public final class ThrottleGroup: Sendable {
    public let id: String
    public struct Limits: Sendable, Equatable {
        public var bpsTotal: UInt64 = 0, bpsRead: UInt64 = 0, bpsWrite: UInt64 = 0
        public var iopsTotal: UInt64 = 0, iopsRead: UInt64 = 0, iopsWrite: UInt64 = 0
        public init() {}
    }
    private struct Bucket {
        var rate: Double
        var level: Double = 0  // debt in units; drains at `rate`/s
        mutating func wait(for units: Double, elapsed: Double) -> Double {
            guard rate > 0 else { return 0 }
            level = max(0, level - elapsed * rate)
            // One second of burst, then wait for the excess to drain.
            let over = level + units - rate
            level += units
            return over > 0 ? over / rate : 0
        }
    }
    private struct State {
        var buckets: [Bucket]
        var last: UInt64
    }
    private let state: Mutex<State>
    public let limits: Limits

    public init(id: String, limits: Limits) {
        self.id = id
        self.limits = limits
        let l = limits
        state = Mutex(State(buckets: [l.bpsTotal, l.bpsRead, l.bpsWrite, l.iopsTotal, l.iopsRead, l.iopsWrite].map { Bucket(rate: Double($0)) },
                            last: ThrottleGroup.now()))
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Charges one request and returns seconds to wait before doing it.
    func charge(bytes: UInt64, write: Bool) -> Double {
        state.withLock { s in
            let now = ThrottleGroup.now()
            let elapsed = Double(now &- s.last) / 1e9
            s.last = now
            var wait = 0.0
            wait = max(wait, s.buckets[0].wait(for: Double(bytes), elapsed: elapsed))
            wait = max(wait, s.buckets[write ? 2 : 1].wait(for: Double(bytes), elapsed: elapsed))
            s.buckets[write ? 1 : 2].level = max(0, s.buckets[write ? 1 : 2].level - elapsed * s.buckets[write ? 1 : 2].rate)
            wait = max(wait, s.buckets[3].wait(for: 1, elapsed: elapsed))
            wait = max(wait, s.buckets[write ? 5 : 4].wait(for: 1, elapsed: elapsed))
            s.buckets[write ? 4 : 5].level = max(0, s.buckets[write ? 4 : 5].level - elapsed * s.buckets[write ? 4 : 5].rate)
            return wait
        }
    }

    /// Charges the request only when it can go at once (returns true); otherwise changes
    /// nothing, so the worker that retries it charges it exactly once.
    func tryCharge(bytes: UInt64, write: Bool) -> Bool {
        state.withLock { s in
            let saved = s
            let now = ThrottleGroup.now()
            let elapsed = Double(now &- s.last) / 1e9
            s.last = now
            var wait = 0.0
            wait = max(wait, s.buckets[0].wait(for: Double(bytes), elapsed: elapsed))
            wait = max(wait, s.buckets[write ? 2 : 1].wait(for: Double(bytes), elapsed: elapsed))
            s.buckets[write ? 1 : 2].level = max(0, s.buckets[write ? 1 : 2].level - elapsed * s.buckets[write ? 1 : 2].rate)
            wait = max(wait, s.buckets[3].wait(for: 1, elapsed: elapsed))
            wait = max(wait, s.buckets[write ? 5 : 4].wait(for: 1, elapsed: elapsed))
            s.buckets[write ? 4 : 5].level = max(0, s.buckets[write ? 4 : 5].level - elapsed * s.buckets[write ? 4 : 5].rate)
            if wait > 0 { s = saved; return false }
            return true
        }
    }

    /// Gives back an inline charge whose request then had to go to a worker after all.
    func refund(bytes: UInt64, write: Bool) {
        state.withLock { s in
            for (i, units) in [(0, Double(bytes)), (write ? 2 : 1, Double(bytes)), (3, 1.0), (write ? 5 : 4, 1.0)] {
                s.buckets[i].level = max(0, s.buckets[i].level - units)
            }
        }
    }

    /// Reads the limits from `object-add` / `--object throttle-group` properties.
    public static func parseLimits(_ props: [String: UInt64]) -> Limits {
        var l = Limits()
        func get(_ name: String) -> UInt64 { props["x-" + name] ?? props["limits." + name] ?? props[name] ?? 0 }
        l.bpsTotal = get("bps-total"); l.bpsRead = get("bps-read"); l.bpsWrite = get("bps-write")
        l.iopsTotal = get("iops-total"); l.iopsRead = get("iops-read"); l.iopsWrite = get("iops-write")
        return l
    }
}

/// The daemon's throttle groups (`object-add qom-type=throttle-group`).
public final class ThrottleGroups: Sendable {
    public static let shared = ThrottleGroups()
    private let groups = Mutex<[String: ThrottleGroup]>([:])
    public func add(_ g: ThrottleGroup) throws(BlockError) {
        let dup = groups.withLock { d -> Bool in
            if d[g.id] != nil { return true }
            d[g.id] = g
            return false
        }
        if dup { throw BlockError.invalid("attempt to add duplicate property '\(g.id)' to object (type 'container')") }
    }
    public func remove(_ id: String) -> Bool { groups.withLock { $0.removeValue(forKey: id) != nil } }
    public func group(_ id: String) -> ThrottleGroup? { groups.withLock { $0[id] } }
}

/// `throttle`: requests through this node are limited by its `throttle-group`. A request
/// that would have to wait is handed to a worker when it arrives with `noWait`.
public final class ThrottleFilter: FilterDriver {
    public let driverName = "throttle"
    public let filtered: BlockChild
    /// Read on the request path; replaced by `blockdev-reopen` (inside a drained section).
    private let currentGroup: AtomicReference<ThrottleGroup>
    public var group: ThrottleGroup { currentGroup.load().unsafelyUnwrapped }

    public init(file: BlockNode, group: ThrottleGroup) {
        filtered = BlockChild(name: "file", role: .filteredPrimary, node: file)
        currentGroup = AtomicReference(group)
    }

    public func reopened(readOnly: Bool, file: BlockNode?, backing: BlockNode?) throws(BlockError) -> any BlockDriver {
        ThrottleFilter(file: file ?? filtered.node, group: group)
    }

    /// `blockdev-reopen … throttle-group=G`.
    public func prepareReopen(options: [String: String]) throws(BlockError) -> (@Sendable () -> Void)? {
        for key in options.keys.sorted() where key != "throttle-group" {
            throw BlockError.invalid("Cannot change the option '\(key)'")
        }
        guard let id = options["throttle-group"] else { return nil }
        guard let g = ThrottleGroups.shared.group(id) else {
            throw BlockError.invalid("Throttle group '\(id)' does not exist")
        }
        if g === group { return nil }
        let current = currentGroup
        return { current.store(g) }
    }

    // An event-loop (`noWait`) request goes inline when its charge needs no wait (the common
    // case under the limits); otherwise nothing is charged and it goes to a worker, which
    // charges it once and sleeps as long as the group asks.
    private func admit(_ bytes: UInt64, write: Bool, flags: RequestFlags) throws(BlockError) {
        if flags.contains(.noWait) {
            if group.tryCharge(bytes: bytes, write: write) { return }
            throw .wouldBlock
        }
        let wait = group.charge(bytes: bytes, write: write)
        if wait <= 0 { return }
        usleep(UInt32(min(wait, 10) * 1e6))
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: RequestFlags) throws(BlockError) {
        try admit(UInt64(buffer.count), write: false, flags: flags)
        do throws(BlockError) { try filtered.node.read(at: offset, into: buffer, flags: flags) } catch {
            if error.errno == EAGAIN && flags.contains(.noWait) { group.refund(bytes: UInt64(buffer.count), write: false) }
            throw error
        }
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                      flags: RequestFlags) throws(BlockError) {
        try admit(UInt64(buffer.count), write: true, flags: flags)
        do throws(BlockError) { try filtered.node.write(at: offset, from: buffer, flags: flags) } catch {
            if error.errno == EAGAIN && flags.contains(.noWait) { group.refund(bytes: UInt64(buffer.count), write: true) }
            throw error
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, flags: RequestFlags) throws(BlockError) {
        try admit(length, write: true, flags: flags)
        do throws(BlockError) { try filtered.node.writeZeroes(at: offset, length: length, flags: flags) } catch {
            if error.errno == EAGAIN && flags.contains(.noWait) { group.refund(bytes: length, write: true) }
            throw error
        }
    }
}

/// Registers the filter drivers with the factory.
public func registerFilters() {
    BlockdevFactory.formatOpeners["copy-on-read"] = FilterOpeners.copyOnRead
    BlockdevFactory.formatOpeners["null-filter"] = FilterOpeners.nullFilter
    BlockdevFactory.formatOpeners["throttle"] = FilterOpeners.throttle
    BlockdevFactory.formatOpeners["compress"] = FilterOpeners.compress
}

enum FilterOpeners {
    static let copyOnRead: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        try openCopyOnRead(&reader, registry, prefix)
    }
    static let nullFilter: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        try openNullFilter(&reader, registry, prefix)
    }
    static let throttle: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        try openThrottle(&reader, registry, prefix)
    }

    static let compress: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        try openCompress(&reader, registry, prefix)
    }

    /// `compress` takes QAPI's `BlockdevOptionsGenericFormat`: just `file`.
    static func openCompress(_ reader: inout OptionReader, _ registry: any NodeRegistry,
                             _ prefix: String) throws(BlockError) -> any BlockDriver {
        let file = try BlockdevFactory.child(&reader, "file", in: registry, prefix: prefix, required: true)!
        try reader.finish()
        return try CompressFilter(file: file)
    }

    static func openCopyOnRead(_ reader: inout OptionReader, _ registry: any NodeRegistry,
                               _ prefix: String) throws(BlockError) -> any BlockDriver {
        let file = try BlockdevFactory.child(&reader, "file", in: registry, prefix: prefix, required: true)!
        var bottom: BlockNode?
        if let name = try reader.string("bottom") {
            guard let b = registry.node(named: name) else {
                throw BlockError.invalid("Cannot find device='' nor node-name='\(name)'")
            }
            bottom = b
        }
        try reader.finish()
        return CopyOnReadFilter(file: file, bottom: bottom)
    }

    static func openNullFilter(_ reader: inout OptionReader, _ registry: any NodeRegistry,
                               _ prefix: String) throws(BlockError) -> any BlockDriver {
        let file = try BlockdevFactory.child(&reader, "file", in: registry, prefix: prefix, required: true)!
        try reader.finish()
        return NullFilter(file: file)
    }

    static func openThrottle(_ reader: inout OptionReader, _ registry: any NodeRegistry,
                             _ prefix: String) throws(BlockError) -> any BlockDriver {
        let file = try BlockdevFactory.child(&reader, "file", in: registry, prefix: prefix, required: true)!
        let id = try reader.requiredString("throttle-group")
        try reader.finish()
        guard let group = ThrottleGroups.shared.group(id) else {
            throw BlockError.invalid("Throttle group '\(id)' does not exist")
        }
        return ThrottleFilter(file: file, group: group)
    }
}
