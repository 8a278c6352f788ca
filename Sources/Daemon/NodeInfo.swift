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
            if let null = current.driver as? NullDriver { return null.filename }
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

    /// The child QEMU's `bdrv_filter_or_cow_bs` follows: a filter's filtered child, else the
    /// backing node.
    static func filterOrCow(_ node: BlockNode) -> BlockNode? {
        node.isFilter ? node.children.first?.node : node.backing
    }

    /// `backing_file_depth`: QEMU counts filtered and backing children (filters too), and
    /// nothing at all in the flat listing.
    static func backingDepth(_ node: BlockNode, recursive: Bool) -> Int64 {
        guard recursive else { return 0 }
        var depth: Int64 = 0
        var n = filterOrCow(node)
        while let current = n {
            depth += 1
            n = filterOrCow(current)
        }
        return depth
    }

    /// Whether QEMU's `bdrv_get_info` succeeds for the node: its driver answers (file,
    /// qcow2), or forwards to its file or filtered child (raw, filters).
    static func answersGetInfo(_ node: BlockNode) -> Bool {
        var n: BlockNode? = node
        while let current = n {
            switch current.driver {
            case is FileDriver, is QCOW2Driver: return true
            case is RawDriver: n = current.file
            default: n = current.isFilter ? current.children.first?.node : nil
            }
        }
        return false
    }

    static func image(_ node: BlockNode, recursive: Bool) -> JSONObject {
        let path = filename(of: node)
        var image: JSONObject = [:]
        // QEMU counts a node's length in 512-byte sectors (`bdrv_getlength`), rounding up.
        image["virtual-size"] = .int(Int64((node.length + 511) & ~511))
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
        // QEMU reports the dirty flag where the driver answers `bdrv_get_info` (filters and raw
        // ask the node below): file and qcow2 do, null-co and nbd do not. null-co has no file
        // (actual size 0); an nbd node's size on disk is unknown (none reported).
        if node.skippingFilters().driver is NullDriver { image["actual-size"] = 0 }
        if answersGetInfo(node) { image["dirty-flag"] = false }
        if recursive, let b = filterOrCow(node) {
            image["backing-image"] = .object(Self.image(b, recursive: true))
        }
        return image
    }

    static func info(_ node: BlockNode, recursive: Bool, bitmaps: [JSONValue]?) -> JSONObject {
        var o: JSONObject = [:]
        o["iops_rd"] = 0
        o["detect_zeroes"] = .string(node.options.detectZeroes.rawValue)
        o["image"] = .object(image(node, recursive: recursive))
        o["iops_wr"] = 0
        o["ro"] = .bool(node.isReadOnly)
        o["node-name"] = .string(node.nodeName)
        o["backing_file_depth"] = .int(backingDepth(node, recursive: recursive))
        o["drv"] = .string(node.driverName)
        o["iops"] = 0
        o["bps_wr"] = 0
        o["write_threshold"] = 0
        // QEMU: the node's own COW child (none for a filter).
        if let b = node.backing { o["backing_file"] = .string(filename(of: b)) }
        if let bitmaps, !bitmaps.isEmpty { o["dirty-bitmaps"] = .array(bitmaps) }
        o["encrypted"] = false
        o["bps"] = 0
        o["bps_rd"] = 0
        // A named node has no BlockBackend, so QEMU reports writeback=true whatever the
        // export's writethrough.
        o["cache"] = ["no-flush": .bool(node.options.cacheNoFlush), "direct": .bool(node.options.cacheDirect), "writeback": true]
        o["file"] = .string(filename(of: node))
        return o
    }
}
