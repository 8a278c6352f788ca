#!/usr/bin/env bash
# ThreadSanitizer stage (run by scripts/test.sh after the normal run; alone: scripts/tsan.sh).
#
# Builds blockd and the tests with -sanitize=thread into their own scratch path (.build-tsan),
# runs every unit test and a subset of the interop tests chosen for concurrency (the NBD data
# path with several connections and fio, stream jobs under client writes, graph changes and
# job holds over QMP, QMP sessions), and fails if any process — the test
# runner or a blockd it started — reported anything. Reports go to files (TSAN_OPTIONS
# log_path), so a daemon's report cannot hide in a log nobody reads.
#
# BLOCKD_TSAN=1 links Sources/CTSanShim, which tells TSan about Synchronization.Mutex's slow
# paths (without it every contended Mutex looks like a race).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
reports=$(mktemp -d "${TMPDIR:-/tmp}/blockd-tsan.XXXXXX")
export BLOCKD_TSAN=1
export TSAN_OPTIONS="log_path=$reports/tsan halt_on_error=0 history_size=4 ${TSAN_OPTIONS:-}"
scratch=(--sanitize=thread --scratch-path .build-tsan)

swift build --build-tests "${scratch[@]}"
built=$(date +%s)

status=0
# Timing assertions do not hold at TSan's speed (5-15x slower): tenMiBLineIsFast.
swift test --skip-build "${scratch[@]}" --skip InteropTests --skip tenMiBLineIsFast || status=$?
# (The comparison runs against qemu-storage-daemon are the normal run's business.)
swift test --skip-build "${scratch[@]}" \
  --filter 'InteropTests\.(GraphPermissionTests|NBDClientTests|StreamInteropTests|QMPInteropTests)' \
  --skip qemuStorageDaemonAnswersTheSame \
  || status=$?
end=$(date +%s)

if compgen -G "$reports/tsan.*" > /dev/null; then
  echo "tsan.sh: ThreadSanitizer reported problems:" >&2
  for f in "$reports"/tsan.*; do echo "--- $f" >&2; cat "$f" >&2; done
  status=1
fi
rm -rf "$reports"
echo "tsan.sh: build $((built - start)) s, tests $((end - built)) s, total $((end - start)) s"
exit $status
