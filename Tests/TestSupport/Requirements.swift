#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Testing

/// What a test needs from the machine: a tool on PATH, a Python module, a shared library, a
/// device node. Every test target declares its needs with one mechanism:
///
/// ```swift
/// @Test(.requires("nbdinfo", "qemu-img")) func mapShowsHoles() throws { … }
/// @Test(.requiresPython("qemu.qmp")) func transcript() throws { … }
/// @Test(.requires(.library("libzstd.so.1"))) func zstdClusters() throws { … }
/// try require(.device("/dev/fuse"))          // inside a test body, for needs found at run time
/// ```
///
/// On a laptop a missing requirement skips the test (with the reason). Under `CI=true` it is a
/// failure that names what is missing, so a broken CI image can never turn tests into passes.
public enum Requirement: Sendable, CustomStringConvertible, Hashable {
    /// An executable on PATH (or a path containing `/`).
    case tool(String)
    /// A module `INTERPRETER -c 'import MODULE'` can import (`python3` on PATH by default;
    /// libnbd's bindings import only from `/usr/bin/python3`).
    case python(String, interpreter: String = "python3")
    /// A shared library `dlopen` finds (for example `libzstd.so.1`).
    case library(String)
    /// A device node the test can open read-write (for example `/dev/fuse`).
    case device(String)

    public var description: String {
        switch self {
        case .tool(let t): return t
        case .python(let m, let interpreter): return "python module \(m) (for \(interpreter))"
        case .library(let l): return "library \(l)"
        case .device(let d): return "device \(d)"
        }
    }

    /// True when the machine has it. Results are cached per process (checks that spawn
    /// Python cost tens of milliseconds) — except tools, which follow PATH changes.
    public var isMet: Bool {
        switch self {
        case .tool(let t): return Tools.available(t)
        case .python(let m, let interpreter): return RequirementCache.shared.value(for: self) {
            Tools.pythonModuleAvailable(m, interpreter: interpreter)
        }
        case .library(let l): return RequirementCache.shared.value(for: self) { Tools.libraryAvailable(l) }
        case .device(let d): return access(d, R_OK | W_OK) == 0
        }
    }

    /// The requirements in `list` that are not met.
    public static func missing(_ list: [Requirement]) -> [Requirement] { list.filter { !$0.isMet } }
}

/// The error a test fails with under CI when something it needs is missing.
public struct MissingRequirement: Error, CustomStringConvertible, Sendable {
    public let missing: [Requirement]
    public var description: String {
        "missing \(missing.map(\.description).joined(separator: ", ")) "
            + "(CI=true: a missing requirement is a failure, not a skip; ./scripts/test.sh installs it)"
    }
}

/// Whether this run is CI: `CI` set to anything but empty, `0` or `false` (`.ci/run` exports
/// `CI=true`).
public enum CI {
    public static var isCI: Bool {
        guard let v = getenv("CI") else { return false }
        let s = String(cString: v).lowercased()
        return !s.isEmpty && s != "0" && s != "false"
    }

    /// Locally: a skip with `reason`. Under CI: an error naming what is missing.
    static func verdict(_ missing: [Requirement]) throws -> Bool {
        if missing.isEmpty { return true }
        if isCI { throw MissingRequirement(missing: missing) }
        return false
    }
}

extension Trait where Self == ConditionTrait {
    /// Runs the test only when every tool is on PATH. Locally a missing tool skips the test;
    /// under `CI=true` the test fails, naming the tool. `@Test(.requires("nbdinfo"))`.
    public static func requires(_ tools: String..., sourceLocation: SourceLocation = #_sourceLocation) -> Self {
        requirements(tools.map { .tool($0) }, sourceLocation: sourceLocation)
    }

    /// `requires` for any kind of requirement: `.requires(.library("libzstd.so.1"))`.
    public static func requires(_ list: Requirement..., sourceLocation: SourceLocation = #_sourceLocation) -> Self {
        requirements(list, sourceLocation: sourceLocation)
    }

    /// A Python module (`python3` on PATH by default): `.requiresPython("qemu.qmp")`,
    /// `.requiresPython("nbd", interpreter: "/usr/bin/python3")`.
    public static func requiresPython(_ module: String, interpreter: String = "python3",
                                      sourceLocation: SourceLocation = #_sourceLocation) -> Self {
        requirements([.tool(interpreter), .python(module, interpreter: interpreter)], sourceLocation: sourceLocation)
    }

    static func requirements(_ list: [Requirement], sourceLocation: SourceLocation) -> Self {
        let names = list.map(\.description).joined(separator: ", ")
        // A condition that throws makes Swift Testing record the error as the test's failure
        // (and not run it); one that returns false skips the test with the comment.
        return .enabled("needs \(names) (install with ./scripts/test.sh)", sourceLocation: sourceLocation) {
            // Python and library checks only matter once the interpreter exists.
            var missing: [Requirement] = []
            for r in list {
                if case .python(_, let interpreter) = r, missing.contains(.tool(interpreter)) { continue }
                if !r.isMet { missing.append(r) }
            }
            return try CI.verdict(missing)
        }
    }
}

/// For needs found inside a test body: locally cancels (skips) the test, under CI fails it
/// with an error naming what is missing. Returns normally when everything is there.
public func require(_ list: Requirement..., sourceLocation: SourceLocation = #_sourceLocation) throws {
    let missing = Requirement.missing(list)
    if missing.isEmpty { return }
    if CI.isCI { throw MissingRequirement(missing: missing) }
    try Test.cancel("needs \(missing.map(\.description).joined(separator: ", ")) (install with ./scripts/test.sh)",
                    sourceLocation: sourceLocation)
}

/// Looks tools up without Foundation.
public enum Tools {
    /// True under CI (see `CI.isCI`).
    public static var isCI: Bool { CI.isCI }

    /// Full path of an executable on PATH (or the path itself if it contains a slash).
    public static func path(of tool: String) -> String? {
        if tool.contains("/") { return access(tool, X_OK) == 0 ? tool : nil }
        let search = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in search.split(separator: ":") {
            let candidate = "\(dir)/\(tool)"
            var st = stat()
            if access(candidate, X_OK) == 0 && stat(candidate, &st) == 0 && (st.st_mode & S_IFMT) != S_IFDIR {
                return candidate
            }
        }
        return nil
    }

    public static func available(_ tool: String) -> Bool { path(of: tool) != nil }

    /// The tools in `tools` that are missing.
    public static func missing(_ tools: [String]) -> [String] { tools.filter { !available($0) } }

    /// True when `INTERPRETER -c 'import MODULE'` exits 0 (within 30 s).
    public static func pythonModuleAvailable(_ module: String, interpreter: String = "python3") -> Bool {
        guard let python = path(of: interpreter) else { return false }
        return runQuietly([python, "-c", "import \(module)"], timeout: 30) == 0
    }

    /// True when the dynamic linker finds `name` (e.g. `libzstd.so.1`).
    public static func libraryAvailable(_ name: String) -> Bool {
        guard let handle = dlopen(name, RTLD_LAZY | RTLD_LOCAL) else { return false }
        dlclose(handle)
        return true
    }

    /// Runs `arguments` with all output discarded; returns the exit status, or nil when it could
    /// not start or ran past `timeout` seconds (then it is killed).
    static func runQuietly(_ arguments: [String], timeout: Double) -> Int32? {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd in Int32(0)...2 { posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0) }
        let argv = arguments.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, arguments[0], &actions, nil, argv, environ) == 0 else { return nil }
        let deadline = Deadline(seconds: timeout)
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f) }
            if r < 0 && errno != EINTR { return nil }
            if deadline.passed {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, 0)
                return nil
            }
            usleep(1_000)
        }
    }
}

/// Caches checks that are slow to repeat (a Python import per test would add seconds).
final class RequirementCache: Sendable {
    static let shared = RequirementCache()
    private let values = Mutex<[Requirement: Bool]>([:])

    func value(for key: Requirement, _ compute: () -> Bool) -> Bool {
        if let v = values.withLock({ $0[key] }) { return v }
        let v = compute()
        values.withLock { $0[key] = v }
        return v
    }
}
