import BlockCore
import JSON
#if canImport(Glibc)
import Glibc
#endif

/// Format detection for image files.
public enum QCOW2Probe {
    /// True when the file starts with the qcow2 magic `QFI\xfb`.
    public static func isQCOW2(path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { return false }
        defer { close(fd) }
        var magic: UInt32 = 0
        let n = pread(fd, &magic, 4, 0)
        return n == 4 && UInt32(bigEndian: magic) == QCOW2Header.magic
    }

    static func isQCOW2(node: BlockNode) -> Bool {
        guard node.length >= 4 else { return false }
        var magic: UInt32 = 0
        do {
            try withUnsafeMutableBytes(of: &magic) { (raw) throws(BlockError) in try node.read(at: 0, into: raw) }
        } catch { return false }
        return UInt32(bigEndian: magic) == QCOW2Header.magic
    }
}

/// Opens qcow2 nodes from blockdev options and whole image chains from a path.
public enum QCOW2Opener {
    /// The `BlockdevFactory.formatOpeners["qcow2"]` entry: `driver=qcow2,file=…` plus the qcow2
    /// options of qemu-storage-daemon. Without a `backing` key the backing chain named in the
    /// header is opened (read-only, auto-named nodes); `backing=null` opens none.
    public static func open(_ reader: inout OptionReader, _ registry: any NodeRegistry, _ prefix: String,
                            _ readOnly: Bool) throws(BlockError) -> any BlockDriver {
        let file = try BlockdevFactory.child(&reader, "file", in: registry, prefix: prefix, required: true)!
        let backingGiven = reader.has("backing")
        let backing = try BlockdevFactory.child(&reader, "backing", in: registry, prefix: prefix, required: false)
        var options = QCOW2Options()
        options.lazyRefcounts = try reader.bool("lazy-refcounts")
        options.passDiscardRequest = try reader.bool("pass-discard-request") ?? true
        options.passDiscardOther = try reader.bool("pass-discard-other") ?? false
        options.passDiscardSnapshot = try reader.bool("pass-discard-snapshot") ?? true
        options.discardNoUnref = try reader.bool("discard-no-unref") ?? false
        options.overlapChecks = try QCOW2OverlapChecks.read(&reader)
        options.cacheSize = try reader.uint("cache-size")
        options.l2CacheSize = try reader.uint("l2-cache-size")
        options.refcountCacheSize = try reader.uint("refcount-cache-size")
        options.l2CacheEntrySize = try reader.uint("l2-cache-entry-size")
        if let interval = try signedInt(&reader, "cache-clean-interval") {
            guard interval >= 0 && interval <= Int64(UInt32.max) else { throw BlockError.invalid("Cache clean interval too big") }
            options.cacheCleanInterval = UInt64(interval)
        }
        options.encryptFormat = try encryptFormat(&reader)
        // Resolved (a missing node is the error) before the image says it has no data file.
        options.dataFile = try BlockdevFactory.child(&reader, "data-file", in: registry, prefix: prefix, required: false) != nil
        try reader.finish()
        let driver = try QCOW2Driver(file: file, readOnly: readOnly, options: options)
        if backingGiven {
            if let backing { driver.attachBacking(backing) }
        } else if driver.backingFileName != nil {
            var created: [BlockNode] = []
            let visited = canonicalPath(of: file).map { [$0] } ?? []
            let node = try openBacking(of: driver, file: file, registry: registry, visited: visited, created: &created,
                                       defaults: reader.childDefaults.forChild("backing"))
            driver.attachBacking(node)
            for n in created { try registry.register(n) }
        }
        // Activated by the factory once the node is in the graph and its permissions checked.
        return driver
    }

    /// A QAPI `int` (QEMU's `cache-clean-interval` is checked for range after reading).
    static func signedInt(_ reader: inout OptionReader, _ key: String) throws(BlockError) -> Int64? {
        switch reader.value(key) {
        case nil: return nil
        case .int(let i)?: return i
        case .string(let s)?:
            guard let i = Int64(s) else { throw BlockError.invalid("Parameter '\(reader.prefix)\(key)' expects integer") }
            return i
        default: throw BlockError.invalid("Invalid parameter type for '\(reader.prefix)\(key)', expected: integer")
        }
    }

    /// `encrypt` (QAPI's `BlockdevQcow2Encryption`: `format` `aes` or `luks`, and `key-secret`),
    /// checked as QEMU checks it; returns the format.
    static func encryptFormat(_ reader: inout OptionReader) throws(BlockError) -> String? {
        guard reader.has("encrypt") else { return nil }
        guard let object = try reader.object("encrypt") else { return nil }
        var r = OptionReader(object, prefix: reader.prefix + "encrypt.")
        guard let format = try r.enumValue("format", ["aes", "luks"]) else {
            throw BlockError.invalid("Parameter '\(r.prefix)format' is missing")
        }
        _ = try r.string("key-secret")
        try r.finish()
        return format
    }

    private static func canonicalPath(of file: BlockNode) -> String? {
        guard let path = (file.driver as? FileDriver)?.path else { return nil }
        return canonical(path)
    }

    private static func canonical(_ path: String) -> String? {
        guard let r = realpath(path, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    /// Opens the backing file named in `driver`'s header (relative to the image's directory),
    /// recursively, as read-only auto-named nodes collected in `created` (not yet registered).
    static func openBacking(of driver: QCOW2Driver, file: BlockNode, registry: any NodeRegistry,
                            visited: [String], created: inout [BlockNode],
                            defaults: BlockdevFactory.ChildDefaults = BlockdevFactory.ChildDefaults().forChild("backing")) throws(BlockError) -> BlockNode {
        guard let name = driver.backingFileName else { throw BlockError.invalid("no backing file") }
        var path = name
        if !name.hasPrefix("/") {
            guard let base = (file.driver as? FileDriver)?.path else {
                throw BlockError.invalid("Could not open backing file '\(name)' of '\(driver.imageName)': the image has no file path to resolve it against")
            }
            if let slash = base.lastIndex(of: "/") {
                path = String(base[...slash]) + name
            }
        }
        if let c = canonical(path), visited.contains(c) {
            throw BlockError.invalid("Backing file loop: '\(path)' is already part of the backing chain of '\(driver.imageName)'")
        }
        let fileDriver: FileDriver
        do throws(BlockError) {
            fileDriver = try FileDriver(path: path, readOnly: true, options: defaults.fileOptions)
        } catch {
            throw BlockError(error.errno, "Could not open backing file of '\(driver.imageName)': \(error.message)")
        }
        let fileNode = BlockNode(name: registry.makeAutoName(), driver: fileDriver, readOnly: true, autoNamed: true,
                                 options: defaults.nodeOptions)
        created.append(fileNode)
        let format = driver.backingFormat ?? (QCOW2Probe.isQCOW2(node: fileNode) ? "qcow2" : "raw")
        let formatDriver: any BlockDriver
        switch format {
        case "qcow2":
            let d: QCOW2Driver
            do throws(BlockError) {
                d = try QCOW2Driver(file: fileNode, readOnly: true)
            } catch {
                throw BlockError(error.errno, "Could not open backing file of '\(driver.imageName)': \(error.message)")
            }
            if d.backingFileName != nil {
                let below = try openBacking(of: d, file: fileNode, registry: registry,
                                            visited: visited + [canonical(path) ?? path], created: &created,
                                            defaults: defaults.forChild("backing"))
                d.attachBacking(below)
            }
            formatDriver = d
        case "raw":
            formatDriver = try RawDriver(file: fileNode)
        default:
            throw BlockError.invalid("Could not open backing file '\(path)': unknown backing format '\(format)'")
        }
        let node = BlockNode(name: registry.makeAutoName(), driver: formatDriver, readOnly: true, autoNamed: true,
                             options: defaults.nodeOptions)
        created.append(node)
        return node
    }

    /// Opens an image file and its backing chain for `blockd serve IMAGE`: a `file` node, a
    /// `qcow2` node if the file starts with the qcow2 magic (else `raw`), and the chain.
    /// Every node is registered; the returned node is the top format node.
    public static func openImage(path: String, readOnly: Bool, in registry: any NodeRegistry,
                                 nodeName: String? = nil) throws(BlockError) -> BlockNode {
        let fileDriver = try FileDriver(path: path, readOnly: readOnly)
        let fileNode = BlockNode(name: registry.makeAutoName(), driver: fileDriver, readOnly: readOnly, autoNamed: true)
        var created: [BlockNode] = [fileNode]
        let driver: any BlockDriver
        if QCOW2Probe.isQCOW2(node: fileNode) {
            let q = try QCOW2Driver(file: fileNode, readOnly: readOnly)
            if q.backingFileName != nil {
                let visited = canonical(path).map { [$0] } ?? []
                let below = try openBacking(of: q, file: fileNode, registry: registry, visited: visited, created: &created)
                q.attachBacking(below)
            }
            driver = q
        } else {
            driver = try RawDriver(file: fileNode)
        }
        let top = BlockNode(name: nodeName ?? registry.makeAutoName(), driver: driver, readOnly: readOnly,
                            autoNamed: nodeName == nil)
        created.append(top)
        // Registered (permissions checked, image locks taken) before anything is written.
        for n in created { try registry.register(n) }
        try driver.activate()
        return top
    }
}
