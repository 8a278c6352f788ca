import BlockCore
import BlockDrivers
import BlockGraph
import Glibc
import JSON
import QMP

/// `blockdev-reopen`: QEMU's graph-changing command, for the edges blockd can change.
///
/// Supported changes (everything else must keep its value; see docs/qmp.md):
/// * a `qcow2` node's `backing`: another node, or `null` to drop the backing edge (the image
///   header is not rewritten, as in QEMU);
/// * a `throttle` or `null-filter` node's `file`, and a throttle node's `throttle-group`.
///
/// All entries are checked before anything changes — the options here, then frozen links,
/// cycles and permissions in `BlockGraph.change` — and every change happens inside one
/// drained section of the changed nodes and everything above them, with QEMU's wording for
/// each refusal.
extension Daemon {
    private struct Reopen {
        let node: BlockNode
        /// nil: keep; .some(nil): detach; .some(n): point at n.
        let newChild: BlockNode??
        /// The driver's own change (`BlockDriver.prepareReopen`), applied in the section.
        let driverChange: (@Sendable () -> Void)?
    }

    func registerReopenCommand(on server: QMPServer) {
        server.register("blockdev-reopen") { [self] args, _ throws(QMPError) in
            guard let raw = args.value("options") else { throw args.missing("options") }
            guard case .array(let list) = raw else { throw args.invalidType("options", expected: "array") }
            try args.finish()
            // QSD 7.2 aborts on an empty list (assertion); blockd refuses it.
            if list.isEmpty { throw .generic("Parameter 'options' must not be empty") }
            var plan: [Reopen] = []
            for (i, item) in list.enumerated() {
                guard case .object(let o) = item else { throw args.invalidType("options[\(i)]", expected: "object") }
                plan.append(try parseReopen(QMPArguments(o, path: "options[\(i)]."), pending: plan))
            }
            var changes: [BlockGraph.EdgeChange] = []
            for r in plan {
                guard let target = r.newChild else { continue }
                if r.node.isFilter, let t = target {
                    changes.append(.filtered(of: r.node, to: t))
                } else {
                    changes.append(.backing(of: r.node, to: target))
                }
            }
            let driverChanges = plan.compactMap(\.driverChange)
            if changes.isEmpty && driverChanges.isEmpty { return .object([:]) }
            do throws(BlockError) {
                try graph.change(changes, apply: driverChanges)
            } catch {
                throw .generic(error.message)
            }
            return .object([:])
        }
    }

    /// Checks one `BlockdevOptions` entry (QSD's order of errors: schema, then node, then edges).
    private func parseReopen(_ a: QMPArguments, pending: [Reopen]) throws(QMPError) -> Reopen {
        var a = a
        guard let driver = try a.string("driver") else { throw a.missing("driver") }
        let isQCOW2 = driver == "qcow2"
        let isFilter = ["throttle", "null-filter", "copy-on-read", "compress"].contains(driver)
        // Schema-required members, as QSD reports them before looking at the node.
        let fileValue = a.value("file")
        if fileValue == nil && (isQCOW2 || isFilter || driver == "raw") { throw a.missing("file") }
        let groupName = driver == "throttle" ? try a.string("throttle-group") : nil
        if driver == "throttle" && groupName == nil { throw a.missing("throttle-group") }
        let hasBacking = a.has("backing")
        let backingValue = a.value("backing")
        if hasBacking && !isQCOW2 { throw .generic("Parameter '\(a.name("backing"))' is unexpected") }
        let nodeName = try a.string("node-name")
        let readOnly = try a.bool("read-only")
        if driver == "copy-on-read" { _ = try a.string("bottom") }
        for key in ["cache", "discard", "detect-zeroes", "auto-read-only", "force-share"] where a.has(key) {
            throw .generic("blockd's blockdev-reopen cannot change option '\(key)'; give only node-name, driver, file, backing (and throttle-group)")
        }
        try a.finish()
        guard let nodeName else { throw .generic("node-name not specified") }
        guard let node = graph.node(named: nodeName) else {
            throw .generic("Failed to find node with node-name='\(nodeName)'")
        }
        if node.driverName != driver { throw .generic("Cannot change the option 'driver'") }
        if let readOnly, readOnly != node.isReadOnly {
            throw .generic("blockd cannot change 'read-only' of node '\(nodeName)' with blockdev-reopen")
        }
        func lookup(_ v: JSONValue, _ key: String) throws(QMPError) -> BlockNode {
            guard case .string(let name) = v else {
                throw .generic("blockd's blockdev-reopen takes '\(key)' as a node name reference only")
            }
            guard let n = graph.node(named: name) else { throw .generic("Cannot find device='' nor node-name='\(name)'") }
            return n
        }
        // Absent only for drivers without a `file` child (null-co, file): nothing to change there.
        let fileNode: BlockNode? = try fileValue.map { v throws(QMPError) in try lookup(v, "file") }
        var newChild: BlockNode??
        // The edge that would change, if any.
        let edge: BlockChild?
        if isQCOW2 {
            if fileNode !== node.file {
                throw .generic("blockd cannot replace the 'file' child of format node '\(nodeName)'; only 'backing' can change")
            }
            edge = node.driver.backingChild
            if !hasBacking {
                if edge != nil || (node.driver.backingFileName ?? "").isEmpty == false {
                    throw .generic("backing is missing for '\(nodeName)'")
                }
            } else if backingValue == .null {
                if edge != nil { newChild = .some(nil) }
            } else {
                let b = try lookup(backingValue!, "backing")
                if b !== edge?.node { newChild = .some(b) }
            }
        } else if isFilter {
            edge = node.isFilter ? node.chainChild : nil
            if fileNode !== edge?.node {
                if driver == "copy-on-read" || driver == "compress" {
                    throw .generic("Block format '\(driver)' used by node '\(nodeName)' does not support reopening files")
                }
                newChild = .some(fileNode)
            }
        } else {
            edge = nil
            if fileNode !== node.file {
                throw .generic("blockd cannot change the 'file' child of node '\(nodeName)' (\(driver))")
            }
        }
        // Frozen links, cycles and permissions: checked by the graph for all entries at once.
        _ = edge
        if let target = newChild {
            if let t = target {
                if !isQCOW2 && t.length != node.length {
                    // A filter's size is its child's: a size change under an export is not supported.
                    throw .generic("blockd cannot give filter '\(nodeName)' a 'file' child of a different size")
                }
            }
        }
        var driverOptions: [String: String] = [:]
        if let groupName { driverOptions["throttle-group"] = groupName }
        let driverChange: (@Sendable () -> Void)?
        do throws(BlockError) {
            driverChange = try node.driver.prepareReopen(options: driverOptions)
        } catch {
            throw .generic(error.message)
        }
        _ = pending
        return Reopen(node: node, newChild: newChild, driverChange: driverChange)
    }
}
