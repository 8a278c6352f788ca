import BlockCore
import EventLoop

/// Registers the `nbd` protocol driver with `BlockdevFactory`. Call once at start-up.
public func registerNBD() {
    BlockdevFactory.formatOpeners["nbd"] = NBDDriver.opener
}

extension NBDDriver {
    static let opener: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        let options = try NBDClientOptions.parse(&reader, prefix: prefix)
        guard let loops = registry.eventLoops else {
            throw BlockError.notSupported("the nbd driver needs the daemon's event loops")
        }
        var autoReadOnly = false
        if case .bool(let b)? = reader.raw["auto-read-only"] { autoReadOnly = b }
        if case .string(let s)? = reader.raw["auto-read-only"] { autoReadOnly = s == "on" || s == "true" || s == "yes" }
        return try NBDDriver.open(options, loops: loops, tls: registry.nbdClientTLS, readOnly: readOnly,
                                  autoReadOnly: autoReadOnly)
    }
}
