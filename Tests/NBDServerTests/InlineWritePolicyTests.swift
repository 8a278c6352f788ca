import BlockCore
@testable import NBDServer
import Testing

@Suite struct InlineWritePolicyTests {
    static let ms: UInt64 = 1_000_000

    @Test func backOffStartsShortDoublesWhileWritesKeepSleepingAndResetsAfterAQuietWhile() {
        let policy = InlineWritePolicy(node: BlockNode(name: "n", driver: RecordingDriver()))
        let t0: UInt64 = 1_000_000 * Self.ms
        // One write that slept: 100 ms on the workers.
        #expect(policy.backOff(now: t0) == 100 * Self.ms)
        #expect(policy.isSuspended(now: t0 + 99 * Self.ms))
        #expect(!policy.isSuspended(now: t0 + 100 * Self.ms))
        // Sleeping again within one period of resuming: twice as long, up to 2 s.
        var t = t0 + 150 * Self.ms
        var expected: UInt64 = 200
        for _ in 0..<6 {
            #expect(policy.backOff(now: t) == expected * Self.ms)
            t += expected * Self.ms + 10 * Self.ms
            expected = min(expected * 2, 2000)
        }
        #expect(policy.backOff(now: t) == 2000 * Self.ms)
        // After a quiet while (no slow write within a period of resuming): 100 ms again.
        #expect(policy.backOff(now: t + 10_000 * Self.ms) == 100 * Self.ms)
    }
}
