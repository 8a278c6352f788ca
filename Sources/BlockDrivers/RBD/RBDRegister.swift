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
    /// What the factory decides for an rbd node from its own option object and its settings
    /// (`read-only`, `auto-read-only`, `cache.direct`: its own or inherited from its parents).
    private static func openConfig(_ reader: inout OptionReader, prefix: String,
                                   settings: BlockdevFactory.ChildDefaults) throws(BlockError) -> RBDOpenConfig {
        let options = try RBDOptions.parse(&reader, prefix: prefix)
        var readOnly = settings.readOnly
        if options.snapshot != nil && !readOnly {
            // QEMU's bdrv_apply_auto_read_only.
            guard settings.autoReadOnly else { throw BlockError(EACCES, "rbd snapshots are read-only") }
            readOnly = true
        }
        let key = try options.keySecret.map { id throws(BlockError) in try SecretStore.shared.lookupBase64(id) }
        return RBDOpenConfig(options: options, readOnly: readOnly, cache: !settings.cacheDirect, key: key)
    }

    static let opener: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        let raw = reader.raw
        // The factory's resolution of this node's settings (its children's defaults before
        // `forChild`); `readOnly` is the same as its `readOnly`.
        var settings = reader.childDefaults
        settings.readOnly = readOnly
        let config = try openConfig(&reader, prefix: prefix, settings: settings)
        guard let loops = registry.eventLoops else {
            throw BlockError.notSupported("the rbd driver needs the daemon's event loops")
        }
        if EventLoop.current != nil { throw BlockError.invalid("an rbd node cannot be opened on an event loop thread") }
        let prepared = BlockdevFactory.prepared?.take(driver: "rbd", options: raw)
        let handle: RBDImageHandle
        if let prepared = prepared as? RBDPrepared, prepared.config == config {
            handle = try prepared.result.get()
        } else {
            // Not prepared, or for other settings than the factory's.
            prepared?.discard()
            handle = try RBDImageHandle.open(config)
        }
        do throws(BlockError) {
            return try RBDDriver(handle: handle, loops: loops, noFlush: settings.cacheNoFlush)
        } catch {
            handle.close()
            throw error
        }
    }

    /// Opens ahead of the control lock (see `PreparedOpens`); options the opener would refuse
    /// are left to it, so its messages (and their order) stay the same.
    static let preparer: BlockdevFactory.Preparer = { raw, settings in
        var reader = OptionReader(raw)
        // The keys every driver has (read by the factory before the opener runs).
        reader.ignore("driver", "node-name", "read-only", "auto-read-only", "discard", "detect-zeroes", "force-share", "cache")
        guard let config = try? openConfig(&reader, prefix: "", settings: settings) else { return nil }
        do throws(BlockError) {
            return RBDPrepared(config, .success(try RBDImageHandle.open(config)))
        } catch {
            return RBDPrepared(config, .failure(error))
        }
    }
}
