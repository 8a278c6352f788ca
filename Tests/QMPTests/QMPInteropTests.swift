#if canImport(Glibc)
import Glibc
#endif
import JSON
import QMP
import Testing
import TestSupport

/// Runs `Tests/InteropTests/qmp/qmp_protocol_check.py` (qemu.qmp plus raw malformed input)
/// against an in-process server. Needs python3 with the qemu.qmp library (a skip on a laptop
/// without it, a failure under CI).
/// Set QMP_TRANSCRIPT_OUT=FILE to keep the transcript for diffing with qemu-storage-daemon's.
@Suite struct QMPInteropTests {
    static func shell(_ command: String) -> (status: Int32, output: String) {
        guard let pipe = popen(command + " 2>&1", "r") else { return (-1, "") }
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&buffer, 1, buffer.count, pipe)
            if n <= 0 { break }
            output += buffer[0..<n]
        }
        let status = pclose(pipe)
        return ((status >> 8) & 0xFF, String(decoding: output, as: UTF8.self))
    }

    @Test(.requiresPython("qemu.qmp")) func protocolCheckScript() throws {
        let t = try TestServer()
        let script = String(#filePath.split(separator: "/").dropLast(2).joined(separator: "/"))
        let path = "/" + script + "/InteropTests/qmp/qmp_protocol_check.py"
        let (status, output) = Self.shell("python3 '\(path)' '\(t.path)'")
        if let out = getenv("QMP_TRANSCRIPT_OUT") {
            let file = fopen(out, "w")
            fputs(output, file)
            fclose(file)
        }
        #expect(status == 0, "\(output)")
        #expect(output.hasSuffix("done\n"), "\(output)")
        #expect(!output.contains("FAILED"))
        // Same transcript as qemu-storage-daemon 7.2 (recorded with the same script).
        let golden = "/" + script + "/InteropTests/qmp/qsd-7.2.expected.txt"
        let expected = Self.shell("cat '\(golden)'").output
        #expect(output == expected, "transcript differs from \(golden)")
        #expect(output.contains("query-commands lists qmp_capabilities, query-commands, query-version, quit: yes"))
    }
}
