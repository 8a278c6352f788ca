import BlockDrivers
import EventLoop
import JSON
import NBDProtocol
import QMP

/// Entry points shared by the libFuzzer executables in `Fuzz/` and by the unit tests that
/// replay `Fuzz/FailCases` and `Fuzz/Corpus`. Each reaches the real code: a real NBD server
/// over a socket, the qcow2 driver on an image file, a daemon's QMP monitor. Whatever the
/// bytes, none may trap, hang or leak without bound; each returns the protocol violations its
/// oracles found (empty when all is well), which the fuzzers turn into crashes.
public enum FuzzTargets {
    /// Errors only: the fuzzers call it first (a bad client is logged at info level, and a
    /// fuzzer is nothing but bad clients). Tests keep the daemon's normal logging.
    public static func quiet() {
        Log.level = .error
    }

    /// A whole NBD client stream (client flags, options, requests) through a real server;
    /// the reply stream is decoded and checked. See `NBDFuzzHarness`.
    @discardableResult
    public static func nbd(_ data: [UInt8]) -> [String] {
        nbdCodec(data)
        return NBDFuzzHarness.shared.run(data)
    }

    /// A qcow2 image (after an 8-byte prefix) opened, used and closed through the driver.
    /// See `QCOW2Fuzz`.
    @discardableResult
    public static func qcow2(_ data: [UInt8]) -> [String] {
        if data.count > QCOW2Fuzz.prefixSize { qcow2Header(Array(data[QCOW2Fuzz.prefixSize...])) }
        return QCOW2Fuzz.run(data)
    }

    /// A QMP stream through the splitter, the parsers and a daemon's command table.
    /// See `QMPFuzz`.
    @discardableResult
    public static func qmp(_ data: [UInt8]) -> [String] {
        if let text = String(validating: data, as: UTF8.self) {
            _ = try? KeyValue.parse(text, impliedKey: "driver")
        }
        return QMPFuzz.run(data)
    }

    /// The pure codec on its own, with request limits the server never uses (zero size,
    /// huge size): cheap, and reaches validation paths a real export cannot.
    static func nbdCodec(_ data: [UInt8]) {
        data.withUnsafeBytes { raw in
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

    /// The header parser alone, with file lengths the image file does not have.
    static func qcow2Header(_ data: [UInt8]) {
        for length in [UInt64(data.count), UInt64(1) << 30, 0] {
            _ = try? QCOW2Header.parse(data, fileLength: length, image: "fuzz.qcow2")
        }
    }
}
