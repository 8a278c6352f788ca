#!/usr/bin/env bash
# Fuzzes every target for a fixed time with libFuzzer (ASan) and fails on any crash, hang,
# out-of-memory or oracle finding. scripts/test.sh runs it after the tests.
#
#   scripts/fuzz.sh                  # 15 s per target (CI)
#   scripts/fuzz.sh 600 qcow2        # 10 minutes of qcow2 only
#   BLOCKD_FUZZ_KEEP=dir scripts/fuzz.sh 600   # keep the grown corpora in dir/<target>
#
# Targets and inputs: Fuzz/README.md. Seeds come from Fuzz/Corpus/<target> (read only); new
# inputs go to a scratch corpus. A finding leaves its input under Fuzz/artifacts/: reproduce
# with `Fuzz/.build/debug/FuzzX FILE`, fix, then keep the input in Fuzz/FailCases/<target>/
# (the unit tests replay it).
set -euo pipefail
cd "$(dirname "$0")/../Fuzz"

seconds=${1:-${BLOCKD_FUZZ_SECONDS:-15}}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(nbd qcow2 qmp)

start=$SECONDS
mkdir -p artifacts
if ! swift build -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library > artifacts/build.log 2>&1; then
  grep -E "error" artifacts/build.log | head -20
  echo "fuzz: the build failed (Fuzz/artifacts/build.log)"
  exit 1
fi
bin=$(swift build --show-bin-path)
echo "fuzz: built in $((SECONDS - start)) s"

work=${BLOCKD_FUZZ_KEEP:-$(mktemp -d /tmp/blockd-fuzz-corpus-XXXXXX)}
[ -n "${BLOCKD_FUZZ_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  case $t in
    nbd) exe=FuzzNBD; max_len=16384 ;;
    qcow2) exe=FuzzQCOW2; max_len=65536 ;;
    qmp) exe=FuzzQMP; max_len=16384 ;;
    *) echo "fuzz: unknown target $t (nbd, qcow2, qmp)"; exit 2 ;;
  esac
  mkdir -p "$work/$t"
  log="$work/$t.log"
  # Leak checking at exit only would blame the harness's long-lived server; per-input leak
  # checks cost a third of the speed. Hangs over 10 s and RSS over 2 GiB are findings.
  if SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=detect_leaks=0:malloc_context_size=5 \
     "$bin/$exe" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=$max_len \
       -detect_leaks=0 -print_final_stats=1 -artifact_prefix="artifacts/$t-" \
       "$work/$t" "Corpus/$t" > "$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    first=$(grep -m1 -o 'INITED cov: [0-9]* ft: [0-9]*' "$log" | sed 's/INITED //' || true)
    last=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
    echo "fuzz: $t: $runs runs in $seconds s ($rate/s), coverage ${first:-?} -> ${last:-?}"
  else
    failed+=("$t")
    echo "fuzz: $t FAILED:"
    grep -E "Fatal error|ERROR:|SUMMARY|Test unit written|==[0-9]+==" "$log" | head -20
    grep -E "^    #[0-9]+ .* in \\\$s" "$log" | head -15
  fi
done
echo "fuzz: done in $((SECONDS - start)) s"
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: findings in ${failed[*]} (inputs under Fuzz/artifacts/)"
  exit 1
fi
