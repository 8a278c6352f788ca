import BlockCore
import Testing

@Suite struct BlockLimitsTests {
    @Test func defaultsMatchTheNBDAdvertisement() {
        let l = BlockLimits()
        #expect(l.minimum == 1 && l.preferred == 4096 && l.maximum == 32 << 20)
    }

    @Test func requestFlagsAreDistinct() {
        let all: [RequestFlags] = [.fua, .mayUnmap, .noFallback, .writeUnchanged, .copyOnRead, .noWait]
        #expect(Set(all.map(\.rawValue)).count == all.count)
    }
}
