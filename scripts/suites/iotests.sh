#!/usr/bin/env bash
# Runs QEMU's iotests for the nbd protocol and for qemu-storage-daemon that run without a
# qemu-system binary, with QEMU's qemu-nbd and qemu-storage-daemon and with blockd in their
# place, in one run, and prints a table of pass/fail/skip per test for each way and the totals
# (see lib.sh for the three ways). qemu-img and qemu-io stay QEMU's.
#
#   scripts/suites/iotests.sh [--modes qemu,blockd-nbd,blockd-qsd] [--check FILE] [--only LIST]
#
# The tests come from the sources of the installed QEMU (`apt-get source qemu`; SUITES_SRC may
# name a directory holding qemu-VERSION already unpacked) and run unchanged through their own
# `check` script, three configurations each way:
#   nbd    `check -nbd`: every test, the image served by qemu-nbd (common.rc) or by the test;
#   qcow2  `check -qcow2` and
#   raw    `check -raw`: the tests that start qemu-nbd or qemu-storage-daemon themselves.
# QEMU's run decides what the blockd runs repeat: the tests that started qemu-nbd (blockd-nbd)
# or qemu-storage-daemon (blockd-qsd) and no virtual machine. qemu-system is a stand-in that
# fails (tests needing a VM are left out and counted apart). --only LIST (comma separated,
# "CONFIG/TEST") runs just those tests. --check FILE: see report.py.
source "$(dirname "$0")/lib.sh"

modes="$MODES_ALL"; check=""; only=""
while [ $# -gt 0 ]; do
  case $1 in
    --modes) modes=$(parse_modes "$2"); shift 2 ;;
    --check) check=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done
# Without QEMU's run to choose from, the blockd modes run the tests --only or --check names.
case " $modes " in
  *" qemu "*) ;;
  *) if [ -z "$only" ] && [ -n "$check" ]; then
       only=$(awk '!/^#/ && NF {print $1}' "$check" | sort -u | paste -sd, -)
     fi
     [ -n "$only" ] || die "the blockd modes repeat QEMU's run: include qemu, or give --only or --check" ;;
esac

need_packages qemu-utils qemu-system-common python3 socat
python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp

source_version=$(dpkg-query -W -f='${source:Version}' qemu-utils)   # e.g. 1:7.2+dfsg-7+deb12u18
upstream=${source_version#*:}; upstream=${upstream%-*}
src=$(ensure_source qemu "$source_version" "qemu-$upstream")
iotests=$src/tests/qemu-iotests
blockd=$(ensure_blockd)

# `check` run through a symlink in a build directory keeps its scratch files out of the sources.
build=$SUITES_BUILD/iotests-$upstream/tests/qemu-iotests
mkdir -p "$build"
ln -sfn "$iotests/check" "$build/check"

out=$SUITES_RESULTS/iotests
rm -rf "$out"; mkdir -p "$out"
say "results in $out"

configs="nbd qcow2 raw"
# Candidates: every test for nbd; for qcow2 and raw those that name qemu-nbd or QSD.
all_tests=$(cd "$build" && ./check -n 2>/dev/null) || true
if [ -z "$all_tests" ]; then
  all_tests=$(cd "$build" && QEMU_PROG=/bin/true QEMU_IMG_PROG=$(command -v qemu-img) \
    QEMU_IO_PROG=$(command -v qemu-io) QEMU_NBD_PROG=$QEMU_NBD_BIN QSD_PROG=$QSD_BIN ./check -n)
fi
direct_tests=$(cd "$iotests" && for t in $all_tests; do
  grep -qE 'QEMU_NBD|qemu_nbd|qemu-nbd|QSD_PROG|qemu_storage_daemon|\$QSD\b|qsd' "$t" && echo "$t"; done) || true

# run_config MODE CONFIG TESTS...: runs `check` once, appends one line per test to MODE.tsv.
run_config() {
  local mode=$1 cfg=$2; shift 2
  [ $# -gt 0 ] || return 0
  local bindir=$out/bin-$mode flag=-$cfg
  local starts=$out/$mode/$cfg.starts log=$out/$mode/$cfg.log
  local scratch=$SUITES_BUILD/iotests-$upstream/scratch-$mode-$cfg sock
  rm -rf "$scratch"; mkdir -p "$scratch" "$out/$mode"
  sock=$(mktemp -d /tmp/iotests-sock.XXXXXX)
  say "$mode: check $flag ($# tests)"
  (
    cd "$build"
    PATH="$bindir:$PATH" SUITES_STARTS=$starts TEST_DIR=$scratch SOCK_DIR=$sock \
      QEMU_PROG=$bindir/qemu-system-x86_64 QEMU_IMG_PROG=$(command -v qemu-img) \
      QEMU_IO_PROG=$(command -v qemu-io) QEMU_NBD_PROG=$bindir/qemu-nbd QSD_PROG=$bindir/qemu-storage-daemon \
      ./check --color off "$flag" "${@##*/}" > "$log" 2>&1 || true
  )
  reap_leftovers "$starts"
  rm -rf "$sock"
  # check takes tests by name ("qsd-jobs" for tests/qsd-jobs). Its lines read
  # "TEST  STATUS  [start] [end] SECONDSs  (last: …)  DESCRIPTION", each after a "TEST ..." line
  # ended by CR.
  tr '\r' '\n' < "$log" | python3 "$SUITES_SCRIPTS/iotests_parse.py" --config "$cfg" --mode "$mode" \
    --iotests "$iotests" --starts "$starts" --leftovers "${starts%.starts}.leftovers" --scratch "$scratch" \
    "$@" >> "$out/$mode.tsv"
}

for mode in $modes; do
  make_bindir "$out/bin-$mode" "$mode" "$blockd"
  : > "$out/$mode.tsv"
  for cfg in $configs; do
    if [ -n "$only" ]; then
      sel=$(tr ',' '\n' <<< "$only" | sed -n "s#^$cfg/##p")
      if [ -n "$check" ] && [ "$mode" != qemu ]; then
        sel=$(awk -v m="$mode" -v c="$cfg/" '!/^#/ && $2 == m && index($1, c) == 1 {print substr($1, length(c) + 1)}' "$check" \
          | grep -Fx -f <(printf '%s\n' $sel) || true)
      fi
    elif [ "$mode" = qemu ]; then
      if [ "$cfg" = nbd ]; then sel=$all_tests; else sel=$direct_tests; fi
    else
      want=qemu-nbd; [ "$mode" = blockd-qsd ] && want=qemu-storage-daemon
      # Tests that started the replaced program and no VM in QEMU's run.
      sel=$(awk -F'\t' -v c="$cfg" -v w="$want" '
        { split($1, a, " ") }
        a[2] == "(" c ")" && index(" " $5 " ", " " w " ") && !index(" " $5 " ", " qemu-system ") { print a[1] }' \
        "$out/qemu.tsv")
    fi
    # shellcheck disable=SC2086
    run_config "$mode" "$cfg" $sel
  done
done
python3 "$SUITES_SCRIPTS/report.py" --suite iotests --counted-only ${check:+--check "$check"} "$out" $modes
