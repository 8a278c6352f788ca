import BlockDrivers
import JSON
import NBDProtocol
import QMP

/// Entry points shared by the libFuzzer executables in `Fuzz/` and by the unit tests that
/// replay `Fuzz/FailCases` and a random corpus. Each must never trap, whatever the bytes.
public enum FuzzTargets {
    /// NBD handshake and transmission parsing, then request validation.
    public static func nbd(_ data: [UInt8]) {
        data.withUnsafeBytes { raw in
            _ = try? Handshake.parseClientFlags(raw)
            if let header = try? Handshake.parseOptionHeader(raw) {
                let payload = Array(data.dropFirst(16).prefix(Int(header.length)))
                _ = Handshake.parseInfoRequest(payload)
                _ = Handshake.parseMetaContextRequest(payload)
            }
            var at = 0
            while at < raw.count {
                guard let r = try? Transmission.parseRequest(raw.baseAddress! + at, count: raw.count - at) else { break }
                for size in [UInt64(0), 4096, UInt64.max] {
                    let limits = Transmission.Limits(size: size, readOnly: size == 4096, maxPayload: 1 << 20,
                                                     structuredReplies: size != 0, hasMetaContexts: size != 0)
                    _ = Transmission.validate(r, limits)
                }
                at += RequestHeader.size + r.payloadLength
            }
        }
        _ = Handshake.parseInfoRequest(data)
        _ = Handshake.parseMetaContextRequest(data)
    }

    /// The qcow2 header and extension parser over an arbitrary first cluster.
    public static func qcow2Header(_ data: [UInt8]) {
        for length in [UInt64(data.count), UInt64(1) << 30, 0] {
            _ = try? QCOW2Header.parse(data, fileLength: length, image: "fuzz.qcow2")
        }
    }

    /// QMP framing and JSON parsing, fed in two pieces to exercise resumption.
    public static func qmp(_ data: [UInt8]) {
        var parser = QMPStreamParser(maxMessageBytes: 1 << 16)
        let cut = data.isEmpty ? 0 : Int(data[0]) % (data.count + 1)
        _ = parser.feed(data[..<cut])
        _ = parser.feed(data[cut...])
        _ = try? JSONParser.parse(data)
        if let text = String(validating: data, as: UTF8.self) {
            _ = try? KeyValue.parse(text, impliedKey: "driver")
        }
    }
}
