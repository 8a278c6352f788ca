#if canImport(Glibc)
import Glibc
#endif
import Testing

/// block-stream end to end: chains made with qemu-img, streamed by blockd over QMP, checked with
/// qemu-img info/check/compare, fio and qemu-io. Each test is one scenario of
/// `jobs/stream_scenarios.py` (which also runs against qemu-storage-daemon: pass its path).
@Suite struct StreamInteropTests {
    static let jobs: String = {
        let file = #filePath
        return String(file.dropLast("/StreamInteropTests.swift".count)) + "/jobs"
    }()

    func scenario(_ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Run.command(["python3", Self.jobs + "/stream_scenarios.py", try BuildProducts.blockd, name], timeout: 120)
        #expect(r.succeeded, "\(r)", sourceLocation: sourceLocation)
    }

    // MARK: chains of 2, 3 and 5 layers, with and without base / base-node

    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfTwoStreamedWhole() throws { try scenario("chain2_full") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfTwoToBaseNode() throws { try scenario("chain2_base_node") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfThreeStreamedWhole() throws { try scenario("chain3_full") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfThreeToBaseNode() throws { try scenario("chain3_base_node") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfThreeToBaseFileName() throws { try scenario("chain3_base_file") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfFiveStreamedWhole() throws { try scenario("chain5_full") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfFiveToMiddleBaseNode() throws { try scenario("chain5_base_node") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func chainOfFiveToBaseFileName() throws { try scenario("chain5_base_file") }

    // MARK: client writes during the job

    @Test(.requires("qemu-img", "qemu-io", "python3"))
    func qemuIOWritesIntoRegionsBeingCopiedAreKept() throws { try scenario("qemu_io_writes_into_copied_regions") }

    @Test(.requires("qemu-img", "qemu-io", "python3", "fio"))
    func fioVerifyWritesDuringTheWholeJobSurvive() throws { try scenario("fio_verify_during_stream") }

    @Test(.requires("qemu-img", "qemu-io", "python3"))
    func writesThroughCopyOnReadWithFilterAboveBaseAreKept() throws {
        let r = try Run.command(["python3", Self.jobs + "/stream_under_writes.py", try BuildProducts.blockd], timeout: 120)
        #expect(r.succeeded, "\(r)")
    }

    // MARK: verbs and events

    /// The event and answer transcript of a scripted session equals qemu-storage-daemon 7.2's.
    @Test(.requires("qemu-img", "qemu-io", "python3"))
    func eventTranscriptEqualsQemuStorageDaemons() throws {
        let r = try Run.command(["python3", Self.jobs + "/stream_scenarios.py", try BuildProducts.blockd, "events"], timeout: 120)
        let expected = try Files.read(Self.jobs + "/stream_events.qsd-7.2.expected.txt")
        #expect(r.succeeded && r.stdout == expected, "transcript differs from qemu-storage-daemon's:\n\(r)")
    }

    @Test(.requires("qemu-img", "qemu-io", "python3")) func pauseResumeAndSetSpeed() throws { try scenario("pause_resume_set_speed") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func cancelLeavesTheChainAsItWas() throws { try scenario("cancel_keeps_chain") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func manualFinalizeAndDismiss() throws { try scenario("finalize_and_dismiss_by_hand") }

    // MARK: errors

    @Test(.requires("qemu-img", "qemu-io", "python3"))
    func frozenNodeSecondJobForeignBaseAndNoBackingAreRefused() throws { try scenario("errors_change_nothing") }
    @Test(.requires("qemu-img", "qemu-io", "python3"))
    func reopenRefusesFrozenLinksAndCycles() throws { try scenario("reopen_refuses_frozen_link") }

    // MARK: filters in the chain

    @Test(.requires("qemu-img", "qemu-io", "python3")) func copyOnReadAboveTop() throws { try scenario("cor_above_top") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func copyOnReadBetweenLayers() throws { try scenario("cor_between_layers") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func copyOnReadDirectlyAboveBase() throws { try scenario("cor_above_base") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func throttleAboveTop() throws { try scenario("throttle_above_top") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func throttleBetweenLayers() throws { try scenario("throttle_between_layers") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func throttleDirectlyAboveBase() throws { try scenario("throttle_above_base") }

    /// Kevin's case 1: base-node is a filter the user removes during the job.
    @Test(.requires("qemu-img", "qemu-io", "python3")) func userRemovesTheFilterGivenAsBase() throws { try scenario("remove_filter_base") }
    /// Kevin's case 2: a filter inserted between the base filter and the layer above it stays.
    @Test(.requires("qemu-img", "qemu-io", "python3")) func userInsertsFilterAboveFilterBase() throws { try scenario("insert_above_filter_base") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func userInsertsFilterDirectlyAboveBase() throws { try scenario("insert_above_base") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func userReplacesTheBase() throws { try scenario("replace_base") }

    // MARK: bitmaps, crash, filters on their own

    @Test(.requires("qemu-img", "qemu-io", "python3")) func dirtyBitmapSeesOnlyClientWrites() throws { try scenario("bitmap_sees_only_client_writes") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func killDashNineDuringStreamLeavesConsistentChain() throws { try scenario("kill9_during_stream") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func copyOnReadPopulatesTopAndKeepsBitmapClean() throws { try scenario("copy_on_read_populates_top") }
    @Test(.requires("qemu-img", "qemu-io", "python3")) func throttleLimitsIOPS() throws { try scenario("throttle_limits") }
}
