import Daemon
import Testing

@Suite struct CommandLineParseTests {
    @Test func noArgumentsIsTheDemo() throws {
        guard case .demo = try CommandLine.parse([]) else { Issue.record("not demo"); return }
    }

    @Test func serveTakesImageAndSocket() throws {
        guard case .serve(let s, _) = try CommandLine.parse(["serve", "a.img", "--socket", "/tmp/s", "-r"]) else {
            Issue.record("not serve"); return
        }
        #expect(s.image == "a.img" && s.socket == "/tmp/s" && s.readOnly)
    }

    @Test func mistakesNameTheOption() {
        #expect(throws: UsageError.self) { try CommandLine.parse(["--bogus"]) }
        #expect(throws: UsageError.self) { try CommandLine.parse(["serve"]) }
        #expect(throws: UsageError.self) { try CommandLine.parse(["--nbd-server", "addr.type=x"]) }
        #expect(throws: UsageError.self) { try CommandLine.parse(["serve", "a", "--port", "70000"]) }
    }
}
