#!/usr/bin/env bash
# Tests that fail when they should: hides a tool (or a Python module) from one test, then
#   - with CI=true the test must FAIL, and its output must name what is missing;
#   - without CI it must be SKIPPED (and the run pass).
# One case per kind of requirement, each one test run straight from the built test bundle
# (a fraction of a second each), so scripts/test.sh runs it after `swift test` built it.
set -euo pipefail
cd "$(dirname "$0")/.."

bundle="$(swift build --show-bin-path)/blockdPackageTests.xctest"
[ -x "$bundle" ] || { echo "check-requirements: $bundle not built (run swift build --build-tests)"; exit 1; }
scratch=$(mktemp -d /tmp/blockd-reqcheck-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
failures=0

# farm DIR NAME...: DIR holds a symlink to every executable on PATH except NAME...
# (earlier PATH entries win: ln refuses names that exist already).
farm() {
  local dir=$1; shift
  mkdir -p "$dir"
  local IFS=: d h
  for d in $PATH; do
    [ -d "$d" ] && ln -s "$d"/* "$dir"/ 2>/dev/null || true
  done
  for h in "$@"; do rm -f "$dir/$h"; done
}

# expect NAME PATHDIR FILTER MISSING: runs FILTER with PATH=PATHDIR, with and without CI.
expect() {
  local name=$1 path=$2 filter=$3 missing=$4 out rc
  out=$(env CI=true PATH="$path" "$bundle" --testing-library swift-testing --filter "$filter" 2>&1) && rc=0 || rc=$?
  if [ $rc -eq 0 ]; then
    echo "check-requirements: FAIL $name: with CI=true and $missing missing, '$filter' passed"
    echo "$out" | tail -5; failures=$((failures + 1))
  elif ! grep -q "missing .*$missing" <<<"$out"; then
    echo "check-requirements: FAIL $name: the CI failure does not name $missing:"
    echo "$out" | grep -E "✘|error" | head -5; failures=$((failures + 1))
  fi
  out=$(env -u CI PATH="$path" "$bundle" --testing-library swift-testing --filter "$filter" 2>&1) && rc=0 || rc=$?
  if [ $rc -ne 0 ] || ! grep -q "skipped" <<<"$out"; then
    echo "check-requirements: FAIL $name: without CI, '$filter' was not skipped (exit $rc)"
    echo "$out" | grep -E "✘|➜|error" | head -5; failures=$((failures + 1))
  fi
}

# One PATH without nbdinfo, qemu-img and python3 serves every case (symlinks are slow to
# make on some file systems; /usr/bin alone takes a second or two).
farm "$scratch/bin" nbdinfo qemu-img python3
real_python=$(command -v python3)

# 1. A tool, in an interop test.
expect "tool" "$scratch/bin" "NBDClientTests/nbdinfoListShowsTheExport" "nbdinfo"

# 2. A tool, in a unit test target (suite-level requirement).
expect "suite" "$scratch/bin" "QCOW2MalformedTests/badMagic" "qemu-img"

# 3. A Python module: python3 without site-packages (-S) cannot import qemu.qmp.
mkdir -p "$scratch/python"
printf '#!/bin/sh\nexec %s -S "$@"\n' "$real_python" > "$scratch/python/python3"
chmod +x "$scratch/python/python3"
expect "python module" "$scratch/python:$scratch/bin" "QMPTests.QMPInteropTests/protocolCheckScript" "qemu.qmp"

if [ $failures -ne 0 ]; then
  echo "check-requirements: $failures check(s) failed"
  exit 1
fi
echo "check-requirements: a missing tool, suite tool and Python module fail under CI=true (naming them) and skip locally"
