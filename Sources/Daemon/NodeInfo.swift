import BlockCore
import BlockDrivers
import Glibc
import JSON

/// `BlockDeviceInfo` as `query-named-block-nodes` reports it, with qemu-storage-daemon's
/// field names so tools that parse QSD's answer parse ours.
enum NodeInfo {
    /// The path of the file at the bottom of a node's `file` children.
    static func filename(of node: BlockNode) -> String {
        var n: BlockNode? = node
        while let current = n {
            if let f = current.driver as? FileDriver { return f.path }
            if let n = current.driver as? NBDDriver { return n.uri }
            if let r = current.driver as? RBDDriver { return r.filename }
            n = current.file ?? current.children.first?.node
        }
        return ""
    }

    static func actualSize(_ path: String) -> Int64? {
        var st = stat()
        guard !path.isEmpty, stat(path, &st) == 0 else { return nil }
        return Int64(st.st_blocks) * 512
    }

    /// Depth of the backing chain below a node (non-filter layers).
    static func backingDepth(_ node: BlockNode) -> Int64 {
        var depth: Int64 = 0
        var n = node.backingSkippingFilters()
        while let current = n {
            depth += 1
            n = current.backingSkippingFilters()
        }
        return depth
    }

    static func image(_ node: BlockNode, recursive: Bool) -> JSONObject {
        let path = filename(of: node)
        var image: JSONObject = [:]
        image["virtual-size"] = .int(Int64(node.length))
        image["filename"] = .string(path)
        if let r = node.driver as? RBDDriver {
            // qemu-storage-daemon's fields for an rbd node (no LUKS header: no encryption-format).
            image["cluster-size"] = .int(Int64(r.objectSize))
            image["format"] = "rbd"
            image["format-specific"] = .object(["type": "rbd", "data": .object([:])])
        }
        if let q = node.driver as? QCOW2Driver {
            let h = q.header
            image["cluster-size"] = .int(Int64(q.clusterSize))
            image["format"] = "qcow2"
            if let size = actualSize(path) { image["actual-size"] = .int(size) }
            var data: JSONObject = [:]
            data["compat"] = .string(h.version >= 3 ? "1.1" : "0.10")
            data["compression-type"] = .string(h.compressionType == 1 ? "zstd" : "zlib")
            data["lazy-refcounts"] = .bool(h.compatibleFeatures & QCOW2Feature.lazyRefcounts != 0)
            // The bitmap directory on disk, as QEMU lists it (only when there is one).
            let stored = q.storedBitmaps
            if !stored.isEmpty {
                data["bitmaps"] = .array(stored.map { b in
                    var flags: [JSONValue] = []
                    if b.inUse { flags.append("in-use") }
                    if b.auto { flags.append("auto") }
                    return .object(["flags": .array(flags), "name": .string(b.name), "granularity": .int(Int64(b.granularity))])
                })
            }
            data["refcount-bits"] = .int(Int64(1) << Int64(h.refcountOrder))
            data["corrupt"] = .bool(h.incompatibleFeatures & QCOW2Feature.corrupt != 0)
            data["extended-l2"] = .bool(h.hasExtendedL2)
            image["format-specific"] = .object(["type": "qcow2", "data": .object(data)])
            if let backing = h.backingFile {
                if let f = h.backingFormat { image["backing-filename-format"] = .string(f) }
                if let b = node.backing { image["full-backing-filename"] = .string(filename(of: b)) }
                image["backing-filename"] = .string(backing)
            }
        } else {
            image["format"] = .string(node.driverName)
            if let size = actualSize(path) { image["actual-size"] = .int(size) }
        }
        image["dirty-flag"] = false
        if recursive, let b = node.backingSkippingFilters() {
            image["backing-image"] = .object(Self.image(b, recursive: true))
        }
        return image
    }

    static func info(_ node: BlockNode, recursive: Bool, bitmaps: [JSONValue]?) -> JSONObject {
        var o: JSONObject = [:]
        o["iops_rd"] = 0
        o["detect_zeroes"] = "off"
        o["image"] = .object(image(node, recursive: recursive))
        o["iops_wr"] = 0
        o["ro"] = .bool(node.isReadOnly)
        o["node-name"] = .string(node.nodeName)
        o["backing_file_depth"] = .int(backingDepth(node))
        o["drv"] = .string(node.driverName)
        o["iops"] = 0
        o["bps_wr"] = 0
        o["write_threshold"] = 0
        if let b = node.backingSkippingFilters() { o["backing_file"] = .string(filename(of: b)) }
        if let bitmaps, !bitmaps.isEmpty { o["dirty-bitmaps"] = .array(bitmaps) }
        o["encrypted"] = false
        o["bps"] = 0
        o["bps_rd"] = 0
        o["cache"] = ["no-flush": false, "direct": false, "writeback": true]
        o["file"] = .string(filename(of: node))
        return o
    }
}
