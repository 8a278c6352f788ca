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
            if let path = current.driver.filename { return path }
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

    static func image(_ node: BlockNode, recursive: Bool) -> JSONObject {
        let path = filename(of: node)
        var image: JSONObject = [:]
        // QEMU counts a node's length in 512-byte sectors (`bdrv_getlength`), rounding up.
        image["virtual-size"] = .int(Int64((node.length + 511) & ~511))
        image["filename"] = .string(path)
        if let specific = node.driver.formatSpecificInfo {
            if let cluster = node.driver.clusterSizeInfo { image["cluster-size"] = .int(Int64(cluster)) }
            image["format"] = .string(node.driverName)
            if let size = actualSize(path) { image["actual-size"] = .int(size) }
            image["format-specific"] = .object(["type": .string(specific.type), "data": json(.object(specific.data))])
            if let backing = node.driver.backingFileName {
                if let f = node.driver.backingFormat { image["backing-filename-format"] = .string(f) }
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
        if let size = node.skippingFilters().driver.allocatedFileSize { image["actual-size"] = .int(size) }
        if node.driver.answersImageInfo { image["dirty-flag"] = false }
        if recursive, let b = filterOrCow(node) {
            image["backing-image"] = .object(Self.image(b, recursive: true))
        }
        return image
    }

    /// A driver's format-specific facts as JSON, in the driver's order.
    static func json(_ value: FormatSpecificInfo.Value) -> JSONValue {
        switch value {
        case .bool(let b): return .bool(b)
        case .int(let i): return .int(i)
        case .string(let t): return .string(t)
        case .list(let items): return .array(items.map(json))
        case .object(let pairs): return .object(JSONObject(pairs.map { ($0.0, json($0.1)) }))
        }
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
