import Foundation
import Testing
@testable import FuzzTargets

/// Replays every saved crasher (`Fuzz/FailCases/<target>/`), the seed corpus
/// (`Fuzz/Corpus/<target>/`) and a deterministic random corpus through the fuzz harnesses,
/// which reach the real code (an NBD server, the qcow2 driver, a daemon's QMP monitor): none
/// may trap, and no oracle may report a problem.
@Suite struct FuzzReplayTests {
    static let fuzz = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz")

    /// Files of `Fuzz/<folder>/<target>/`, by name (dot files skipped).
    static func saved(_ folder: String, _ target: String) throws -> [(name: String, bytes: [UInt8])] {
        let dir = fuzz.appendingPathComponent(folder).appendingPathComponent(target)
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { !$0.hasPrefix(".") }.sorted()
        return try names.map { ("\(folder)/\(target)/\($0)", Array(try Data(contentsOf: dir.appendingPathComponent($0)))) }
    }

    /// Random inputs that start with valid prefixes, so parsers get past their first check.
    static func random(seed: UInt64, prefixes: [[UInt8]], count: Int, maxLength: Int = 600) -> [(name: String, bytes: [UInt8])] {
        var rng = FuzzRandom(seed: seed)
        return (0..<count).map { i in
            var bytes = prefixes[i % prefixes.count]
            for _ in 0..<rng.below(UInt64(maxLength)) { bytes.append(UInt8(truncatingIfNeeded: rng.next())) }
            return ("random \(seed)/\(i)", bytes)
        }
    }

    static func replay(_ inputs: [(name: String, bytes: [UInt8])], _ target: ([UInt8]) -> [String]) {
        for input in inputs {
            let problems = target(input.bytes)
            #expect(problems.isEmpty, "\(input.name): \(problems.joined(separator: "; "))")
        }
    }

    @Test func corpusAndFailCasesHaveFiles() throws {
        for target in ["nbd", "qcow2", "qmp"] {
            #expect(try !Self.saved("Corpus", target).isEmpty, "Fuzz/Corpus/\(target) is empty")
            _ = try Self.saved("FailCases", target)   // the folder exists
        }
    }

    @Test func nbdStreamsThroughARealServer() throws {
        let flags: [UInt8] = [0, 0, 0, 3]
        let go: [UInt8] = flags + [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0]
        Self.replay(try Self.saved("FailCases", "nbd") + Self.saved("Corpus", "nbd")
                    + Self.random(seed: 1, prefixes: [[], flags, go, go + [0x25, 0x60, 0x95, 0x13]], count: 300),
                    FuzzTargets.nbd)
    }

    @Test func qcow2ImagesThroughTheDriver() throws {
        let corpus = try Self.saved("Corpus", "qcow2")
        // Seeds with a bit flipped here and there: metadata the driver must refuse or survive.
        var rng = FuzzRandom(seed: 2)
        let mutated = (0..<200).map { i -> (name: String, bytes: [UInt8]) in
            var bytes = corpus[i % corpus.count].bytes
            for _ in 0..<(1 + rng.below(4)) {
                let at = 8 + Int(rng.below(UInt64(min(bytes.count - 8, 4096))))
                bytes[at] ^= UInt8(1) << rng.below(8)
            }
            return ("mutated \(corpus[i % corpus.count].name) #\(i)", bytes)
        }
        Self.replay(try Self.saved("FailCases", "qcow2") + corpus + mutated, FuzzTargets.qcow2)
    }

    @Test func qmpStreamsThroughADaemon() throws {
        let prefixes: [[UInt8]] = [Array(#"{"execute": "#.utf8), Array(#"{"execute": "blockdev-add", "arguments": {"#.utf8), []]
        Self.replay(try Self.saved("FailCases", "qmp") + Self.saved("Corpus", "qmp")
                    + Self.random(seed: 3, prefixes: prefixes, count: 100, maxLength: 200),
                    FuzzTargets.qmp)
    }

    /// The consistency checker the qcow2 oracles rely on: every seed (made by qemu-img) is
    /// consistent, and breaking a refcount or a reference makes it inconsistent.
    @Test func qcow2ConsistencyCheckerAgreesWithQemuImg() throws {
        for seed in try Self.saved("Corpus", "qcow2") {
            #expect(QCOW2Consistency.check(Array(seed.bytes.dropFirst(8))) == .consistent, "\(seed.name)")
        }
        let plain = try #require(try Self.saved("Corpus", "qcow2").first { $0.name.contains("/plain-") })
        var image = Array(plain.bytes.dropFirst(8))
        // The L1 table offset (header bytes 40-47) pointed at the header itself.
        for i in 40..<48 { image[i] = 0 }
        guard case .inconsistent = QCOW2Consistency.check(image) else {
            Issue.record("an L1 table over the header passed the check")
            return
        }
    }
}
