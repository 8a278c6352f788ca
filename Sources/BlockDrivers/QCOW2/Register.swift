import BlockCore

/// Registers the format drivers that live outside `BlockdevFactory` (qcow2). Call once at
/// start-up, before any `blockdev-add`.
public func registerFormats() {
    BlockdevFactory.formatOpeners["qcow2"] = { (reader: inout OptionReader, registry: any NodeRegistry,
                                                prefix: String, readOnly: Bool) throws(BlockError) -> any BlockDriver in
        try QCOW2Opener.open(&reader, registry, prefix, readOnly)
    }
}
