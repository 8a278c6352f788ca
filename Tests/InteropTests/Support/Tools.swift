#if canImport(Glibc)
import Glibc
#endif
import Testing

/// External tools the interop tests drive. Locally a missing tool skips the tests that need
/// it; in CI (env `CI` set) those tests run anyway and fail, so a broken image is noticed.
public enum Tools {
    /// True when running under CI (`.ci/run` exports `CI=true`).
    public static var isCI: Bool {
        guard let v = getenv("CI") else { return false }
        let s = String(cString: v)
        return !s.isEmpty && s != "0" && s != "false"
    }

    /// Full path of an executable on PATH (or the path itself if it contains a slash).
    public static func path(of tool: String) -> String? {
        if tool.contains("/") { return access(tool, X_OK) == 0 ? tool : nil }
        let search = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in search.split(separator: ":") {
            let candidate = "\(dir)/\(tool)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    public static func available(_ tool: String) -> Bool { path(of: tool) != nil }

    /// True when `/usr/bin/python3 -c 'import MODULE'` works.
    public static func pythonModuleAvailable(_ module: String) -> Bool {
        guard available("/usr/bin/python3") else { return false }
        return (try? Run.command(["/usr/bin/python3", "-c", "import \(module)"], timeout: 30))?.succeeded ?? false
    }

    /// The tools in `tools` that are missing.
    public static func missing(_ tools: [String]) -> [String] { tools.filter { !available($0) } }
}

extension Trait where Self == ConditionTrait {
    /// Runs the test only when every tool is installed — except in CI, where the test always
    /// runs (and fails on the missing tool). Usage: `@Test(.requires("nbdinfo", "qemu-img"))`.
    public static func requires(_ tools: String...) -> Self {
        .enabled("needs \(tools.joined(separator: ", ")) (install with ./scripts/test.sh)") {
            Tools.isCI || Tools.missing(tools).isEmpty
        }
    }

    /// Like `requires`, for a Python module importable by /usr/bin/python3 (e.g. `nbd`).
    public static func requiresPython(_ module: String) -> Self {
        .enabled("needs python3 module \(module)") { Tools.isCI || Tools.pythonModuleAvailable(module) }
    }
}
