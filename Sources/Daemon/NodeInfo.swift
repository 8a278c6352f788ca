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
        image["dirty-flag"] = false
        if recursive, let b = node.backingSkippingFilters() {
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
