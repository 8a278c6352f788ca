#!/usr/bin/env bash
# Runs every test of blockd: installs what the interop tests drive (Debian packages and the
# qemu.qmp Python library) when missing, builds, and runs `swift test`; then, on a full run (no
# arguments), checks that a missing tool fails under CI=true (scripts/check-requirements.sh)
# fuzzes each target for a fixed time (scripts/fuzz.sh; BLOCKD_FUZZ_SECONDS, default 15), runs
# the ThreadSanitizer stage (scripts/tsan.sh) and QEMU's iotests against blockd
# (scripts/suites/iotests.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libnbd-dev libnbd-bin nbdkit python3-libnbd qemu-utils qemu-system-common
          fuse3 fio zlib1g-dev libzstd-dev pkg-config socat libgnutls28-dev gnutls-bin systemd dpkg-dev strace
          librbd-dev ceph-mon ceph-osd ceph-common qemu-block-extra)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
  echo "test.sh: installing qemu.qmp"
  python3 -m pip install -q qemu.qmp
fi

# Each stage's wall time, printed at the end (the CI budget: docs/test-suites.md).
timings=()
stage_start=$SECONDS
stage_done() {
  timings+=("$1 $((SECONDS - stage_start)) s")
  stage_start=$SECONDS
}
trap '[ ${#timings[@]} -gt 0 ] && printf "test.sh: %s\n" "${timings[@]}"' EXIT

swift build
stage_done "build"
swift test "$@"
stage_done "swift test"
if [ $# -eq 0 ]; then
  ./scripts/check-requirements.sh
  stage_done "check-requirements"
  ./scripts/fuzz.sh
  stage_done "fuzz"
fi

# ThreadSanitizer over the unit tests and a subset of the interop tests (scripts/tsan.sh).
if [ $# -eq 0 ]; then
  ./scripts/tsan.sh
  stage_done "tsan"
fi

# Stage: QEMU's iotests with blockd as qemu-nbd and as qemu-storage-daemon, the subset in
# scripts/suites/ci-iotests.txt (~50 s; docs/test-suites.md). Runs with the full test run only
# (no arguments), SUITES=0 skips it. A regression fails the run under CI=true.
if [ $# -eq 0 ] && [ "${SUITES:-1}" != 0 ]; then
  echo "test.sh: iotests with blockd as qemu-nbd and qemu-storage-daemon"
  if ! BLOCKD="$PWD/.build/debug/blockd" scripts/suites/iotests.sh --modes blockd-nbd,blockd-qsd \
      --check scripts/suites/ci-iotests.txt; then
    if [ "${CI:-}" = true ]; then exit 1; fi
    echo "test.sh: warning: the iotests stage regressed (it fails the run under CI=true)" >&2
  fi
  stage_done "iotests"
fi

