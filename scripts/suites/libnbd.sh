#!/usr/bin/env bash
# Runs libnbd's tests that start qemu-nbd or qemu-storage-daemon (interop/, info/, copy/, dump/,
# fuse/) with QEMU's programs and with blockd in their place, in one run, and prints a table of
# pass/fail/skip per test for each way and the totals (see lib.sh for the three ways).
#
#   scripts/suites/libnbd.sh [--modes qemu,blockd-nbd,blockd-qsd] [--check FILE] [TEST...]
#
# The libnbd sources are those of the installed libnbd (`apt-get source libnbd`, with deb-src
# lines added to the apt sources when missing), configured and built once under
# $SUITES_BUILD; the tests are the suite's own, run with `make check TESTS=…` unchanged.
# SUITES_SRC names a directory holding libnbd-VERSION already unpacked; BLOCKD a blockd binary
# (default: `swift build -c release`). --check FILE compares blockd's results with the
# expectations in FILE and exits 1 on a regression (a test expected to pass that does not).
source "$(dirname "$0")/lib.sh"

# dir:test, every test of these directories that starts qemu-nbd or qemu-storage-daemon
# (the TESTS of interop/Makefile.am under HAVE_QEMU_NBD and HAVE_QEMU_STORAGE_DAEMON, and the
# scripts of info/, copy/, dump/ and fuse/ that run qemu-nbd).
ALL_TESTS="
interop:interop-qemu-nbd
interop:interop-qemu-nbd-tls-certs
interop:interop-qemu-nbd-tls-psk
interop:list-exports-qemu-nbd
interop:socket-activation-qemu-nbd
interop:dirty-bitmap.sh
interop:structured-read.sh
interop:interop-qemu-block-size.sh
interop:interop-qemu-storage-daemon.sh
info:info-description-qemu.sh
info:info-list-json-qemu.sh
info:info-list-qemu.sh
info:info-map-qemu-allocation-depth.sh
info:info-map-qemu-dirty-bitmap.sh
copy:copy-file-to-qcow2.sh
copy:copy-file-to-qcow2-compressed.sh
dump:dump-empty-qcow2.sh
fuse:test-qcow2.sh
"

modes="$MODES_ALL"; check=""; only=()
while [ $# -gt 0 ]; do
  case $1 in
    --modes) modes=$(parse_modes "$2"); shift 2 ;;
    --check) check=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) only+=("$1"); shift ;;
  esac
done
tests=()
for t in $ALL_TESTS; do
  if [ ${#only[@]} -eq 0 ] || printf '%s\n' "${only[@]}" | grep -qx -e "${t#*:}" -e "$t"; then tests+=("$t"); fi
done
[ ${#tests[@]} -gt 0 ] || die "no test selected"

# What building and running the tests needs (build dependencies less the language bindings).
need_packages gcc make pkg-config libxml2-dev libgnutls28-dev gnutls-bin libfuse3-dev fuse3 \
  python3-dev jq nbdkit qemu-utils qemu-system-common libnbd-bin

source_version=$(dpkg-query -W -f='${source:Version}' libnbd0)   # e.g. 1.14.2-1
upstream=${source_version%-*}
src=$(ensure_source libnbd "$source_version" "libnbd-$upstream")
build=$SUITES_BUILD/libnbd-$upstream
if [ ! -f "$build/.suites-built" ]; then
  say "building libnbd $upstream in $build"
  rm -rf "$build"; mkdir -p "$(dirname "$build")"
  cp -a "$src" "$build"
  (
    cd "$build"
    # The Python bindings must match the python3 nbdsh runs with (Debian's).
    ./configure -q PYTHON=/usr/bin/python3 --disable-ocaml --disable-golang --disable-rust >/dev/null
    make -s -j"$(nproc)" >/dev/null
    make -s -C tests pki/stamp-pki keys.psk >/dev/null
    # The test programs of every directory (make check would build them on first use).
    for d in interop info copy dump fuse; do make -s -C "$d" TESTS= check >/dev/null; done
  )
  touch "$build/.suites-built"
fi
blockd=$(ensure_blockd)

out=$SUITES_RESULTS/libnbd
rm -rf "$out"; mkdir -p "$out"
say "results in $out"
for mode in $modes; do
  bindir=$out/bin-$mode
  make_bindir "$bindir" "$mode" "$blockd"
  mkdir -p "$out/$mode"
  : > "$out/$mode.tsv"
  for t in "${tests[@]}"; do
    dir=${t%%:*} name=${t#*:}
    # A blockd mode runs the tests that started the program it replaces in QEMU's run.
    if [ "$mode" != qemu ] && [ -f "$out/qemu.tsv" ]; then
      want=qemu-nbd; [ "$mode" = blockd-qsd ] && want=qemu-storage-daemon
      awk -F'\t' -v t="$name" -v w="$want" '$1 == t && index(" " $5 " ", " " w " ") {f=1} END {exit !f}' \
        "$out/qemu.tsv" || continue
    fi
    starts=$out/$mode/$name.starts
    rm -f "$build/$dir/${name%.sh}.log" "$build/$dir/$name.log" "$build/$dir/$name.trs" \
      "$build/$dir/${name%.sh}.trs"
    t0=$(date +%s.%N)
    PATH="$bindir:$PATH" SUITES_STARTS=$starts make -s -C "$build/$dir" check TESTS="$name" \
      >"$out/$mode/$name.make" 2>&1 || true
    t1=$(date +%s.%N)
    reap_leftovers "$starts"
    trs="$build/$dir/$name.trs"; log="$build/$dir/$name.log"
    result=$(sed -n 's/^:test-result: //p' "$trs" 2>/dev/null | head -1)
    case $result in PASS|XFAIL) status=pass ;; SKIP) status=skip ;; "") status=error ;; *) status=fail ;; esac
    [ -f "$log" ] && cp "$log" "$out/$mode/$name.log"
    started=$(programs_started "$starts")
    left=""; [ -f "${starts%.starts}.leftovers" ] && left="left running"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$mode" "$status" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')" \
      "$started" "$left" \
      >> "$out/$mode.tsv"
    printf '%-40s %-11s %s\n' "$name" "$mode" "$status" >&2
  done
done
python3 "$SUITES_SCRIPTS/report.py" --suite libnbd ${check:+--check "$check"} "$out" $modes
