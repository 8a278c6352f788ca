import JSON

/// The QAPI error classes (`qapi/error.json`). QEMU answers almost everything with
/// `GenericError`; the others exist for compatibility with old clients.
public enum QMPErrorClass: String, Sendable, Equatable, CaseIterable {
    case genericError = "GenericError"
    case commandNotFound = "CommandNotFound"
    case deviceNotActive = "DeviceNotActive"
    case deviceNotFound = "DeviceNotFound"
    case kvmMissingCap = "KVMMissingCap"
}

/// An error reply: `{"error": {"class": CLASS, "desc": DESC}}`.
public struct QMPError: Error, Sendable, Equatable, CustomStringConvertible {
    public var errorClass: QMPErrorClass
    public var desc: String
    /// A second sentence for people at a terminal (QEMU's `error_append_hint`, e.g. "Is
    /// another process using the image [x]?"): the command line prints it on a line of its
    /// own; a QMP reply leaves it out, as QEMU does.
    public var hint: String?

    public init(_ errorClass: QMPErrorClass, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    public static func generic(_ desc: String) -> QMPError { QMPError(.genericError, desc) }
    /// A `GenericError` with a terminal hint.
    public static func generic(_ desc: String, hint: String?) -> QMPError {
        var e = QMPError(.genericError, desc)
        e.hint = hint
        return e
    }

    /// What a terminal shows: the description, and the hint on a line of its own.
    public var descWithHint: String {
        guard let hint else { return desc }
        return desc + "\n" + hint
    }
    public static func commandNotFound(_ desc: String) -> QMPError { QMPError(.commandNotFound, desc) }
    public static func deviceNotActive(_ desc: String) -> QMPError { QMPError(.deviceNotActive, desc) }
    public static func deviceNotFound(_ desc: String) -> QMPError { QMPError(.deviceNotFound, desc) }

    /// The `error` member of a reply.
    public var json: JSONObject {
        JSONObject([("class", .string(errorClass.rawValue)), ("desc", .string(desc))])
    }

    /// Reads an `error` member; unknown classes become `GenericError`.
    public init?(json: JSONValue) {
        guard let desc = json["desc"]?.stringValue else { return nil }
        let cls = json["class"]?.stringValue.flatMap(QMPErrorClass.init(rawValue:)) ?? .genericError
        self.init(cls, desc)
    }

    public var description: String { desc }
}
