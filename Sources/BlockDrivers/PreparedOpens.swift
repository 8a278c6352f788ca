import BlockCore
import JSON
import Synchronization

/// The slow part of opening a node, done before the control lock is taken.
///
/// Some drivers wait on the network to open (`rbd` connects to a Ceph cluster, which may
/// not answer for many seconds). QMP handlers run under one control lock, so an open that
/// waits there would hold up every other monitor command. A driver registers a *preparer*:
/// `blockdev-add` runs it on the options tree before it takes the lock, and the driver's
/// opener, reached later under the lock, takes the prepared result (a connected handle, or
/// the error the attempt ended with) instead of connecting itself. Whatever was prepared but
/// not used (the command failed earlier, or a node of the same options was refused) is
/// discarded when the command ends. Opens without a preparation (command line, nested
/// opens by jobs) connect in the opener, as before.
public protocol PreparedResource: AnyObject, Sendable {
    /// Releases the resource; called once for results no opener took.
    func discard()
}

/// The prepared results of one command, matched to openers by their exact option object.
public final class PreparedOpens: Sendable {
    private let entries: Mutex<[(options: JSONObject, driver: String, resource: any PreparedResource)]>

    init(_ entries: [(options: JSONObject, driver: String, resource: any PreparedResource)]) {
        self.entries = Mutex(entries)
    }

    public var isEmpty: Bool { entries.withLock { $0.isEmpty } }

    /// The prepared result for a node with exactly these options, removed from the set.
    public func take(driver: String, options: JSONObject) -> (any PreparedResource)? {
        entries.withLock { list in
            guard let i = list.firstIndex(where: { $0.driver == driver && $0.options == options }) else { return nil }
            return list.remove(at: i).resource
        }
    }

    /// Discards every result no opener took.
    public func discardUnused() {
        let left = entries.withLock { list in
            defer { list.removeAll() }
            return list
        }
        for entry in left { entry.resource.discard() }
    }
}

extension BlockdevFactory {
    /// Prepares a node of one driver from its option object (the object that has `driver`)
    /// and the node's own settings as the factory will resolve them (`read-only`,
    /// `auto-read-only`, `cache.*`, `force-share`, with what it inherits from its parents), or
    /// returns nil to leave the whole open to the opener (options it cannot read, say). The
    /// opener should check that what it takes was prepared for the settings it got.
    public typealias Preparer = @Sendable (JSONObject, ChildDefaults) -> (any PreparedResource)?

    /// Preparers by driver name.
    public static var preparers: PreparerTable { PreparerTable.shared }

    public final class PreparerTable: Sendable {
        static let shared = PreparerTable()
        private let table = Mutex<[String: Preparer]>([:])
        public subscript(name: String) -> Preparer? {
            get { table.withLock { $0[name] } }
            set { table.withLock { $0[name] = newValue } }
        }
        var isEmpty: Bool { table.withLock { $0.isEmpty } }
    }

    /// Runs the preparers of every node defined in `options` (inline children included),
    /// outside any lock; nil when there is nothing to prepare.
    public static func prepare(_ options: JSONObject, defaults: ChildDefaults = ChildDefaults()) -> PreparedOpens? {
        if preparers.isEmpty { return nil }
        var found: [(options: JSONObject, driver: String, resource: any PreparedResource)] = []
        func walk(_ object: JSONObject, _ inherited: ChildDefaults) {
            // Settings of the wrong type: the open fails before it reaches any opener below.
            guard let settings = inherited.resolving(object) else { return }
            if let driver = object["driver"]?.stringValue, let preparer = preparers[driver],
               let resource = preparer(object, settings) {
                found.append((object, driver, resource))
            }
            for (key, value) in object {
                if case .object(let child) = value { walk(child, settings.forChild(key)) }
            }
        }
        walk(options, defaults)
        return found.isEmpty ? nil : PreparedOpens(found)
    }

    /// The preparations of the command being executed on this thread (set by `withPrepared`).
    @TaskLocal public static var prepared: PreparedOpens?

    /// Runs `body` (which opens nodes) with `prepared` visible to openers, then discards what
    /// no opener took.
    public static func withPrepared<T>(_ prepared: PreparedOpens?, _ body: () throws(BlockError) -> T) throws(BlockError) -> T {
        guard let prepared else { return try body() }
        defer { prepared.discardUnused() }
        let result: Result<T, BlockError> = $prepared.withValue(prepared) {
            do throws(BlockError) { return .success(try body()) } catch { return .failure(error) }
        }
        return try result.get()
    }
}

extension BlockdevFactory.ChildDefaults {
    /// The settings `BlockdevFactory.open` gives a node with `options` under a parent whose
    /// children inherit `self` (the same reading, without its messages); nil when one has the
    /// wrong type.
    func resolving(_ options: JSONObject) -> Self? {
        var reader = OptionReader(options)
        var d = self
        do throws(BlockError) {
            d.readOnly = try reader.bool("read-only") ?? readOnly
            d.autoReadOnly = try reader.bool("auto-read-only") ?? autoReadOnly
            d.forceShare = try reader.bool("force-share") ?? forceShare
            if let discard = try reader.enumValue("discard", NodeOptions.Discard.allCases.map(\.rawValue)) {
                d.discard = NodeOptions.Discard(rawValue: discard) ?? self.discard
            }
            if let cache = try reader.object("cache") {
                var c = OptionReader(cache)
                d.cacheDirect = try c.bool("direct") ?? cacheDirect
                d.cacheNoFlush = try c.bool("no-flush") ?? cacheNoFlush
            }
        } catch {
            return nil
        }
        return d
    }
}
