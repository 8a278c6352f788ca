import Foundation
import Testing
@testable import FuzzTargets

/// Replays every saved crasher in `Fuzz/FailCases/<target>/` and a deterministic random corpus
/// through the fuzz entry points: none may trap.
@Suite struct FuzzReplayTests {
    static let failCases = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/FailCases")

    static func saved(_ target: String) -> [[UInt8]] {
        let dir = failCases.appendingPathComponent(target)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        return names.sorted().compactMap { try? Array(Data(contentsOf: dir.appendingPathComponent($0))) }
    }

    /// Random inputs that start with valid magics, so parsers get past their first check.
    static func corpus(seed: UInt64, prefixes: [[UInt8]], count: Int = 2000) -> [[UInt8]] {
        var state = seed
        func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        return (0..<count).map { i in
            let n = Int(next() % 600)
            var bytes = prefixes[i % prefixes.count]
            for _ in 0..<n { bytes.append(UInt8(truncatingIfNeeded: next())) }
            return bytes
        }
    }

    @Test func nbdParsersSurviveRandomInput() {
        let prefixes: [[UInt8]] = [[], [0x25, 0x60, 0x95, 0x13], [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54]]
        for input in Self.saved("nbd") + Self.corpus(seed: 1, prefixes: prefixes) { FuzzTargets.nbd(input) }
    }

    @Test func qcow2HeaderParserSurvivesRandomInput() {
        let prefixes: [[UInt8]] = [[0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3], [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 2]]
        for input in Self.saved("qcow2") + Self.corpus(seed: 2, prefixes: prefixes) { FuzzTargets.qcow2Header(input) }
    }

    @Test func qmpFramingSurvivesRandomInput() {
        let prefixes: [[UInt8]] = [Array(#"{"execute": "#.utf8), Array("[{'".utf8), []]
        for input in Self.saved("qmp") + Self.corpus(seed: 3, prefixes: prefixes) { FuzzTargets.qmp(input) }
    }
}
