import BlockCore
import EventLoop
import JSON
#if canImport(Glibc)
import Glibc
#endif

/// Registers the `rbd` protocol driver with `BlockdevFactory`: its opener, and its preparer
/// (QMP's `blockdev-add` connects to the cluster before it takes the control lock).
public func registerRBD() {
    BlockdevFactory.formatOpeners["rbd"] = RBDDriver.opener
    BlockdevFactory.preparers["rbd"] = RBDDriver.preparer
}

extension RBDDriver {
    /// What the factory decides for an rbd node from its own option object.
    private static func openConfig(_ reader: inout OptionReader, prefix: String, readOnly: Bool) throws(BlockError) -> RBDOpenConfig {
        let options = try RBDOptions.parse(&reader, prefix: prefix)
        let raw = reader.raw
        var readOnly = readOnly
        if options.snapshot != nil && !readOnly {
            // QEMU's bdrv_apply_auto_read_only.
            guard flag(raw["auto-read-only"]) else { throw BlockError(EACCES, "rbd snapshots are read-only") }
            readOnly = true
        }
        let direct = flag(raw["cache"]?["direct"])
        let key = try options.keySecret.map { id throws(BlockError) in try SecretStore.shared.lookupBase64(id) }
        return RBDOpenConfig(options: options, readOnly: readOnly, cache: !direct, key: key)
    }

    private static func flag(_ value: JSONValue?) -> Bool {
        switch value {
        case .bool(let b)?: return b
        case .string(let s)?: return s == "on" || s == "true" || s == "yes"
        default: return false
        }
    }

    static let opener: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        let raw = reader.raw
        let config = try openConfig(&reader, prefix: prefix, readOnly: readOnly)
        guard let loops = registry.eventLoops else {
            throw BlockError.notSupported("the rbd driver needs the daemon's event loops")
        }
        if EventLoop.current != nil { throw BlockError.invalid("an rbd node cannot be opened on an event loop thread") }
        let handle: RBDImageHandle
        if let prepared = BlockdevFactory.prepared?.take(driver: "rbd", options: raw) as? RBDPrepared {
            handle = try prepared.result.get()
        } else {
            handle = try RBDImageHandle.open(config)
        }
        do throws(BlockError) {
            return try RBDDriver(handle: handle, loops: loops)
        } catch {
            handle.close()
            throw error
        }
    }

    /// Opens ahead of the control lock (see `PreparedOpens`); options the opener would refuse
    /// are left to it, so its messages (and their order) stay the same.
    static let preparer: BlockdevFactory.Preparer = { raw in
        var reader = OptionReader(raw)
        // The keys every driver has (read by the factory before the opener runs).
        reader.ignore("driver", "node-name", "read-only", "auto-read-only", "discard", "detect-zeroes", "force-share", "cache")
        let readOnly = flag(raw["read-only"])
        guard let config = try? openConfig(&reader, prefix: "", readOnly: readOnly) else { return nil }
        do throws(BlockError) {
            return RBDPrepared(.success(try RBDImageHandle.open(config)))
        } catch {
            return RBDPrepared(.failure(error))
        }
    }
}
