#if canImport(Glibc)
import Glibc
#endif
import Testing

/// blockd's mistakes and messages against qemu-storage-daemon's and qemu-nbd's, case by case.
/// The expected outputs in `cli/*.expected.txt` were printed by QEMU 7.2
/// (`cli/make-golden.sh` regenerates them); blockd must print the same with its own name
/// (`blockd:` for the storage-daemon syntax, `qemu-nbd:` when run as `qemu-nbd`), and exit
/// with the same status.
@Suite struct CommandLineGoldenTests {
    static let directory: String = {
        let file = #filePath
        return String(file.dropLast("/CommandLineGoldenTests.swift".count)) + "/cli"
    }()

    struct Case: CustomStringConvertible {
        var arguments: [String]
        var expected: String
        var description: String { arguments.joined(separator: " ") }
    }

    /// Cases (tab-separated arguments; `@EMPTY@` is an empty argument) with their expected blocks.
    static func cases(_ name: String, golden: String) throws -> [Case] {
        let lines = try Files.read(directory + "/" + name).split(separator: "\n", omittingEmptySubsequences: false)
        let blocks = try Files.read(directory + "/" + golden).split(separator: "\n\n$", omittingEmptySubsequences: false)
            .map(String.init)
        var out: [Case] = []
        for (n, line) in lines.enumerated() where n < blocks.count {
            let args = line.isEmpty ? [] : line.split(separator: "\t", omittingEmptySubsequences: false)
                .map { $0 == "@EMPTY@" ? "" : String($0) }
            // Each block: "$ ARGS\nexit N\nSTDERR" — keep from "exit".
            var block = blocks[n]
            if let r = block.firstRange(of: "\nexit ") { block = String(block[block.index(after: r.lowerBound)...]) }
            while block.hasSuffix("\n") { block.removeLast() }
            out.append(Case(arguments: args, expected: block))
        }
        return out
    }

    /// The fixtures make-golden.sh runs in: r.raw (16 MiB raw), d.qcow2 (64 MiB qcow2) and
    /// keys.psk (user alice).
    static func fixtures() throws -> TempDir {
        let dir = try TempDir(prefix: "cli-golden")
        try Files.createSparse(dir.file("r.raw"), size: 16 << 20)
        try Run.expectSuccess(["qemu-img", "create", "-q", "-f", "qcow2", dir.file("d.qcow2"), "64M"])
        try Files.write(dir.file("keys.psk"), bytes: Array("alice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n".utf8))
        return dir
    }

    /// Runs one case in `dir` and renders it as the golden file does.
    static func render(_ command: [String], _ arguments: [String], in dir: TempDir, replacing names: [(String, String)]) throws -> String {
        let args = arguments.map { $0.replacingAll("@DIR@", with: dir.path) }
        let r = try Run.command(["/bin/sh", "-c", "cd \"$0\" && exec \"$@\" </dev/null", dir.path] + command + args, timeout: 10)
        var err = r.stderr
        for (from, to) in names { err = err.replacingAll(from, with: to) }
        err = err.replacingAll(dir.path, with: "@DIR@")
        while err.hasSuffix("\n") { err.removeLast() }
        // Start-up must not leave sockets or pid files behind when it fails.
        return "exit \(r.timedOut ? 124 : r.status)\n\(err)"
    }

    @Test(.requires("qemu-img"))
    func qemuStorageDaemonMistakes() throws {
        let dir = try Self.fixtures()
        for c in try Self.cases("qsd-cases.txt", golden: "qsd-7.2.expected.txt") {
            let got = try Self.render([try BuildProducts.blockd], c.arguments, in: dir,
                                      replacing: [])
            let want = c.expected.replacingAll("qemu-storage-daemon:", with: "blockd:")
            #expect(got == want, "blockd \(c)")
        }
    }

    @Test(.requires("qemu-img"))
    func qemuNBDMistakes() throws {
        let dir = try Self.fixtures()
        let qemuNBD = try QemuNBDFrontEnd.path()
        for c in try Self.cases("qemu-nbd-cases.txt", golden: "qemu-nbd-7.2.expected.txt") {
            let got = try Self.render([qemuNBD], c.arguments, in: dir, replacing: [(qemuNBD, "qemu-nbd")])
            #expect(got == c.expected, "qemu-nbd \(c)")
        }
    }
}

/// blockd run under the name `qemu-nbd`: a symlink in a directory of its own, as a user would
/// put it first on PATH.
enum QemuNBDFrontEnd {
    private static let made: Result<String, HarnessError> = {
        do {
            let blockd = try BuildProducts.blockd
            let dir = BuildProducts.directory + "/qemu-nbd-frontend"
            mkdir(dir, 0o755)
            let link = dir + "/qemu-nbd"
            unlink(link)
            guard symlink(blockd, link) == 0 else { return .failure(HarnessError("cannot link \(link)")) }
            return .success(link)
        } catch {
            return .failure(HarnessError("\(error)"))
        }
    }()

    /// Path of the `qemu-nbd` symlink to the built blockd.
    static func path() throws -> String { try made.get() }

    /// A PATH with the front end first, for tools that run `qemu-nbd` themselves.
    static func searchPath() throws -> String {
        let dir = String(try path().dropLast("/qemu-nbd".count))
        return dir + ":" + (getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin")
    }
}

extension String {
    /// Every occurrence of `target` replaced (no Foundation in the test support).
    func replacingAll(_ target: String, with replacement: String) -> String {
        guard !target.isEmpty else { return self }
        var out = ""
        var rest = Substring(self)
        while let r = rest.firstRange(of: target) {
            out += rest[..<r.lowerBound]
            out += replacement
            rest = rest[r.upperBound...]
        }
        return out + rest
    }
}
