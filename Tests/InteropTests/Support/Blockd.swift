#if canImport(Glibc)
import Glibc
#endif
import Testing

/// Where the built executables are: next to the test bundle in the build directory
/// (`.build/<triple>/debug/`), or `BLOCKD_BUILD_DIR` if set.
public enum BuildProducts {
    public static let directory: String = {
        if let dir = getenv("BLOCKD_BUILD_DIR") { return String(cString: dir) }
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return ".build/debug" }
        let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // .../debug/blockdPackageTests.xctest (Linux: an executable) → .../debug
        var parts = exe.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast()
        return parts.joined(separator: "/")
    }()

    /// Path of a built executable, e.g. `blockd` or `blockctl`.
    public static func executable(_ name: String) throws -> String {
        let path = directory + "/" + name
        guard access(path, X_OK) == 0 else {
            throw HarnessError("\(path) not found: build it first (swift build) or set BLOCKD_BUILD_DIR")
        }
        return path
    }

    public static var blockd: String { get throws { try executable("blockd") } }
    public static var blockctl: String { get throws { try executable("blockctl") } }
}

/// One running `blockd` for one test, in its own temp directory. Its stdout and stderr go to
/// files (`stdoutText`, `stderrText`). It is killed when the value is released, so a failing
/// test never leaks a daemon; call `stop()` to check a clean shutdown.
///
/// ```swift
/// let d = try Blockd.serve(image: img, in: dir)          // blockd serve IMG --socket …
/// try Run.expectSuccess(["nbdinfo", d.uri])
/// #expect(try d.stop() == 0)
/// ```
public final class Blockd: @unchecked Sendable {
    public let pid: pid_t
    public let directory: TempDir
    public let arguments: [String]
    public let stdoutPath: String
    public let stderrPath: String
    /// The NBD unix socket (when started with one).
    public let socket: String?
    /// Export name, for `uri`.
    public var exportName: String
    private var exitStatus: Int32?

    /// Starts `blockd ARGUMENTS` with its files in `directory`, and waits until
    /// `waitForSocket` accepts connections (if given) or `waitForOutput` appears on stdout.
    /// Paths in `arguments` should be absolute (the daemon inherits the test's working directory).
    public init(_ arguments: [String], in directory: TempDir, waitForSocket socket: String? = nil,
                waitForOutput: String? = nil, exportName: String = "",
                environment: [String: String] = [:], timeout: Double = 10, launcher: [String] = []) throws {
        self.directory = directory
        self.arguments = arguments
        self.socket = socket
        self.exportName = exportName
        let tag = "blockd-\(Blockd.counter.next())"
        stdoutPath = directory.file("\(tag).stdout")
        stderrPath = directory.file("\(tag).stderr")
        // `launcher` runs first and must exec blockd in its place (same pid), as
        // systemd-socket-activate does.
        pid = try Subprocess.spawn(launcher + [try BuildProducts.blockd] + arguments, stdoutPath: stdoutPath, stderrPath: stderrPath,
                                   environment: environment)
        let deadline = Subprocess.now() + timeout
        while true {
            if let status = Subprocess.wait(pid, timeout: 0) {
                exitStatus = status
                throw HarnessError("blockd \(arguments.joined(separator: " ")) exited with \(status) before it was ready:\n\(stderrText)")
            }
            if let socket, Blockd.canConnect(unixPath: socket) { break }
            if let text = waitForOutput, stdoutText.contains(text) { break }
            if socket == nil && waitForOutput == nil { break }
            if Subprocess.now() > deadline {
                kill9()
                throw HarnessError("blockd did not become ready within \(timeout) s:\n\(stderrText)")
            }
            usleep(2_000)
        }
    }

    deinit {
        if exitStatus == nil { kill9() }
    }

    /// `blockd serve IMAGE --socket DIR/nbd.sock [extra]`, ready to accept clients.
    public static func serve(image: String, in directory: TempDir, name: String = "disk", readOnly: Bool = false,
                             extra: [String] = []) throws -> Blockd {
        let socket = directory.file("nbd.sock")
        var args = ["serve", image, "--socket", socket, "--name", name]
        if readOnly { args.append("--read-only") }
        return try Blockd(args + extra, in: directory, waitForSocket: socket, exportName: name)
    }

    /// `nbd+unix:///NAME?socket=PATH` for the started export.
    public var uri: String { uri(export: exportName) }

    public func uri(export: String) -> String { "nbd+unix:///\(export)?socket=\(socket ?? "")" }

    public var stdoutText: String { (try? Files.read(stdoutPath)) ?? "" }
    public var stderrText: String { (try? Files.read(stderrPath)) ?? "" }

    /// stderr lines containing `text`.
    public func logLines(containing text: String) -> [String] {
        stderrText.split(separator: "\n").map(String.init).filter { $0.contains(text) }
    }

    /// Waits (up to `timeout`) until stderr has a line containing `text`; returns it.
    @discardableResult
    public func waitForLog(_ text: String, timeout: Double = 5) -> String? {
        let deadline = Subprocess.now() + timeout
        repeat {
            if let line = logLines(containing: text).first { return line }
            usleep(5_000)
        } while Subprocess.now() < deadline
        return nil
    }

    /// Waits (up to `timeout`) until stdout contains `text` (`serve` prints its URI after
    /// the socket listens); returns whether it did.
    @discardableResult
    public func waitForStdout(_ text: String, timeout: Double = 5) -> Bool {
        let deadline = Subprocess.now() + timeout
        repeat {
            if stdoutText.contains(text) { return true }
            usleep(5_000)
        } while Subprocess.now() < deadline
        return false
    }

    public var isRunning: Bool {
        if exitStatus != nil { return false }
        if let s = Subprocess.wait(pid, timeout: 0) { exitStatus = s; return false }
        return true
    }

    /// SIGTERM, then waits for exit; returns the exit status (0 for a clean shutdown).
    /// Kills with SIGKILL and returns -1 if it does not exit within `timeout`.
    @discardableResult
    public func stop(timeout: Double = 10) -> Int32 {
        if let exitStatus { return exitStatus }
        kill(pid, SIGTERM)
        if let s = Subprocess.wait(pid, timeout: timeout) {
            exitStatus = s
            return s
        }
        kill9()
        return -1
    }

    /// SIGKILL and reap (a crash, as far as the images are concerned).
    public func kill9() {
        if exitStatus != nil { return }
        kill(pid, SIGKILL)
        exitStatus = Subprocess.wait(pid, timeout: 10) ?? -1
    }

    /// Tries one connect to a unix socket.
    public static func canConnect(unixPath: String) -> Bool {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(unixPath.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
    }

    /// Runs `blockd ARGUMENTS` to completion (for command-line error tests).
    public static func runOnce(_ arguments: [String], timeout: Double = 10,
                               environment: [String: String] = [:]) throws -> CommandResult {
        try Run.command([try BuildProducts.blockd] + arguments, timeout: timeout, environment: environment)
    }

    final class Counter: @unchecked Sendable {
        private var value = 0
        private var lock = pthread_mutex_t()
        init() { pthread_mutex_init(&lock, nil) }
        func next() -> Int {
            pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
            value += 1
            return value
        }
    }
    static let counter = Counter()
}
