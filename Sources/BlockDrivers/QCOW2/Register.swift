import BlockCore

/// Registers the format drivers that live outside `BlockdevFactory` (qcow2). Call once at
/// start-up, before any `blockdev-add`.
public func registerFormats() {
    BlockdevFactory.formatOpeners["qcow2"] = QCOW2Opener.opener
}

extension QCOW2Opener {
    static let opener: BlockdevFactory.Opener = { reader, registry, prefix, readOnly throws(BlockError) in
        try QCOW2Opener.open(&reader, registry, prefix, readOnly)
    }
}
