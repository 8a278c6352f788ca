import BlockCore

/// QEMU's transaction engine (`util/transactions.c`, `qmp_transaction`): every action is
/// prepared in order — checked, with its in-memory effect made and a way to undo it — and
/// when one fails, the ones before are undone in reverse order and nothing is committed.
/// When all are prepared, each commits the part that cannot be undone (on-disk changes).
///
/// `transaction` of bitmap actions uses it; graph actions (backup, snapshots) join later.
public struct GraphTransaction {
    public struct Action {
        public var undo: () -> Void
        public var commit: () throws(BlockError) -> Void
        public init(undo: @escaping () -> Void = {}, commit: @escaping () throws(BlockError) -> Void = {}) {
            self.undo = undo
            self.commit = commit
        }
    }

    private var prepared: [Action] = []

    public init() {}

    public var count: Int { prepared.count }

    /// Prepares one more action; when `prepare` throws, undoes the ones before (newest first)
    /// and rethrows.
    public mutating func prepare<E: Error>(_ prepare: () throws(E) -> Action) throws(E) {
        do throws(E) {
            prepared.append(try prepare())
        } catch {
            abort()
            throw error
        }
    }

    /// Undoes every prepared action, newest first.
    public mutating func abort() {
        for a in prepared.reversed() { a.undo() }
        prepared.removeAll()
    }

    /// Commits every prepared action in order, all of them (QEMU's commit phase cannot fail,
    /// blockd's writes to disk can: a later action, such as a backup job starting, still
    /// commits); the first failure is thrown afterwards.
    public mutating func commit() throws(BlockError) {
        let actions = prepared
        prepared.removeAll()
        var first: BlockError?
        for a in actions {
            do throws(BlockError) { try a.commit() } catch { if first == nil { first = error } }
        }
        if let first { throw first }
    }
}
