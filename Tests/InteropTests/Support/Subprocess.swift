#if canImport(Glibc)
import Glibc
#endif
import Testing

/// The outcome of one external command: exit status and everything it printed.
public struct CommandResult: Sendable, CustomStringConvertible {
    public var command: [String]
    /// Exit status; 128+N when killed by signal N; -1 when it hit the timeout (then killed).
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var timedOut: Bool
    public var succeeded: Bool { status == 0 && !timedOut }

    public var description: String {
        "$ \(command.joined(separator: " "))\nexit \(status)\(timedOut ? " (timed out)" : "")\n--- stdout\n\(stdout)--- stderr\n\(stderr)"
    }
}

public struct HarnessError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Spawning processes without Foundation: `posix_spawnp` with stdout/stderr sent to files,
/// so a chatty child can never block on a full pipe, and every child starts with default
/// signal handling and an empty signal mask.
public enum Subprocess {
    /// Starts `arguments` (PATH is searched) with stdin from `stdinPath` (default /dev/null)
    /// and stdout/stderr appended to the given files. Returns the pid.
    public static func spawn(_ arguments: [String], stdinPath: String = "/dev/null",
                             stdoutPath: String, stderrPath: String,
                             environment: [String: String] = [:]) throws -> pid_t {
        precondition(!arguments.isEmpty)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, stdinPath, O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdoutPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attr, 0)

        // Environment: ours, overridden by `environment`.
        var env: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        for (k, v) in environment { env[k] = v }

        let argv = arguments.map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for a in argv { free(a) }
            for e in envp { free(e) }
        }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, arguments[0], &actions, &attr, argv, envp)
        if rc != 0 {
            throw HarnessError("cannot start \(arguments[0]): \(String(cString: strerror(rc)))")
        }
        return pid
    }

    /// Waits for `pid` up to `timeout` seconds; returns the exit status (128+signal when
    /// killed), or nil on timeout (the process is left running).
    public static func wait(_ pid: pid_t, timeout: Double) -> Int32? {
        let deadline = now() + timeout
        var sleepMicros: UInt32 = 200
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { return decode(status) }
            if r < 0 && errno != EINTR { return -1 }
            if now() >= deadline { return nil }
            usleep(sleepMicros)
            sleepMicros = min(sleepMicros * 2, 20_000)
        }
    }

    static func decode(_ status: Int32) -> Int32 {
        let sig = status & 0x7f
        if sig == 0 { return (status >> 8) & 0xff }
        return 128 + sig
    }

    public static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// Runs external tools for tests.
public enum Run {
    /// Runs `arguments` to completion (killed after `timeout` seconds) and captures its output.
    /// `stdin` is fed from a string (or `stdinFile`). A tool that is not installed throws
    /// (so it fails the test; declare it with `.requires(...)` to skip instead).
    @discardableResult
    public static func command(_ arguments: [String], timeout: Double = 60, stdin: String? = nil, stdinFile: String? = nil,
                               environment: [String: String] = [:]) throws -> CommandResult {
        guard Tools.path(of: arguments[0]) != nil else {
            throw HarnessError("\(arguments[0]) is not installed (needed by this test)")
        }
        let scratch = try TempDir(prefix: "run")
        let out = scratch.path + "/stdout", err = scratch.path + "/stderr"
        var input = stdinFile ?? "/dev/null"
        if let stdin {
            input = scratch.path + "/stdin"
            try Files.write(input, stdin)
        }
        let pid = try Subprocess.spawn(arguments, stdinPath: input, stdoutPath: out, stderrPath: err,
                                       environment: environment)
        var status = Subprocess.wait(pid, timeout: timeout)
        var timedOut = false
        if status == nil {
            timedOut = true
            kill(-pid, SIGKILL)
            kill(pid, SIGKILL)
            status = Subprocess.wait(pid, timeout: 10) ?? -1
        }
        return CommandResult(command: arguments, status: timedOut ? -1 : status!,
                             stdout: (try? Files.read(out)) ?? "", stderr: (try? Files.read(err)) ?? "", timedOut: timedOut)
    }

    /// `command`, and records a test issue (with all output) if it did not exit 0.
    @discardableResult
    public static func expectSuccess(_ arguments: [String], timeout: Double = 60, stdin: String? = nil,
                                     environment: [String: String] = [:],
                                     sourceLocation: SourceLocation = #_sourceLocation) throws -> CommandResult {
        let r = try command(arguments, timeout: timeout, stdin: stdin, environment: environment)
        #expect(r.succeeded, "\(r)", sourceLocation: sourceLocation)
        return r
    }

    /// A python3 script (libnbd bindings are for /usr/bin/python3) with arguments.
    @discardableResult
    public static func python(_ script: String, _ arguments: [String] = [], timeout: Double = 60) throws -> CommandResult {
        try command(["/usr/bin/python3", "-c", script] + arguments, timeout: timeout)
    }
}
