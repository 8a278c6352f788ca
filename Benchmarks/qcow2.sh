#!/usr/bin/env bash
# qcow2 benchmark: blockd against qemu-storage-daemon and qemu-nbd, same fio workloads
# (nbd engine over a unix socket), same images. Run by hand (not in CI):
#
#   swift build -c release && Benchmarks/qcow2.sh            # all rows
#   RUNTIME=5 ROWS="randread randwrite" Benchmarks/qcow2.sh   # a subset, shorter
#   BLOCKD_BASE=other/blockd SERVERS="blockd blockd-base" Benchmarks/qcow2.sh  # A/B two builds
#
# Rows:
#   randread   4 KiB random read, QD32, fully allocated 1 GiB qcow2
#   randwrite  4 KiB random write, QD32, fully allocated 1 GiB qcow2
#   alloc      4 KiB random write, QD32, empty 1 GiB qcow2 (the allocation path)
#   seqread    1 MiB sequential read, QD8, through a two-level chain (base full, top half)
#   map        time of `nbdinfo --map` over a 1 TiB qcow2 with 1,000 scattered 64 KiB
#              extents, and of the same map over a 1 TiB raw sparse file (served by blockd)
#   copy-out, copy-in, copy-out-tcp, copy-in-tcp   (issue 15's bulk copies; not in the default ROWS)
#              nbdcopy with 4 connections, 64 × 256 KiB in flight: a fully allocated 1 GiB
#              qcow2 export -> null:, and a 1 GiB raw file -> an empty qcow2 export (the
#              allocation path), on the unix socket and over TCP. MiB/s and server CPU per MiB,
#              through Benchmarks/copy-profile.sh (COPY_REPEAT runs each, median):
#              ROWS="copy-out copy-in copy-out-tcp copy-in-tcp" Benchmarks/qcow2.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BLOCKD=${BLOCKD:-.build/release/blockd}
RUNTIME=${RUNTIME:-10}
ROWS=${ROWS:-"randread randwrite alloc seqread map"}
SERVERS=${SERVERS:-"blockd qsd qemu-nbd"}
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/blockd-bench.XXXXXX")
SOCK=$DIR/nbd.sock
PID=""
trap 'stop_server; rm -rf "$DIR"' EXIT

for t in fio qemu-img qemu-storage-daemon qemu-nbd nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "qcow2.sh: $t is missing" >&2; exit 1; }
done
[ -x "$BLOCKD" ] || { echo "qcow2.sh: $BLOCKD not built (swift build -c release)" >&2; exit 1; }

stop_server() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
  fi
  rm -f "$SOCK"
}

wait_socket() {
  for _ in $(seq 1 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "qcow2.sh: server did not create $SOCK" >&2; exit 1
}

# start_server SERVER IMAGE FORMAT: export name "disk", writable.
start_server() {
  local server=$1 image=$2 fmt=$3
  # No writeback of earlier runs' dirty pages may overlap the measurement.
  sync
  # Start every server from the same page-cache state. Pages left by qemu-io's 1 GiB
  # sequential write sit in large folios, and a 4 KiB write into one costs ~50 µs in
  # ext4_block_write_begin (perf) — for every server alike; dropping the cache (as root)
  # removes that artefact. Reading a file back builds large folios as well, so the write
  # rows run on a cold cache and the read row warms it after this (see row_randread).
  if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
  case $server in
    blockd)
      "$BLOCKD" serve "$image" --socket "$SOCK" --name disk >"$DIR/server.log" 2>&1 &
      PID=$! ;;
    blockd-base)
      "$BLOCKD_BASE" serve "$image" --socket "$SOCK" --name disk >"$DIR/server.log" 2>&1 &
      PID=$! ;;
    qsd)
      qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$image,cache.direct=off,aio=threads" \
        --blockdev "driver=$fmt,node-name=disk0,file=file0" \
        --nbd-server "addr.type=unix,addr.path=$SOCK" \
        --export "type=nbd,id=e0,node-name=disk0,name=disk,writable=on" >"$DIR/server.log" 2>&1 &
      PID=$! ;;
    qemu-nbd)
      qemu-nbd -t --shared=8 -f "$fmt" -x disk -k "$SOCK" --cache=writeback --aio=threads "$image" >"$DIR/server.log" 2>&1 &
      PID=$! ;;
  esac
  wait_socket
}

# run_fio NAME RW BS QD SIZE -> prints "iops mibs p99us"
run_fio() {
  local rw=$1 bs=$2 qd=$3 size=$4 extra=${5:-}
  fio --name=bench --ioengine=nbd --uri="nbd+unix:///disk?socket=$SOCK" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --size="$size" --time_based --runtime="$RUNTIME" --ramp_time=1 \
      --norandommap --randrepeat=0 $extra --output-format=json >"$DIR/fio.json" 2>"$DIR/fio.err" || {
        cat "$DIR/fio.err" >&2; echo "0 0 0"; return; }
  python3 - "$DIR/fio.json" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
op = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p99 = op.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000
print(f'{op["iops"]:.0f} {op["bw_bytes"]/1048576:.0f} {p99:.0f}')
EOF
}

declare -A RESULT

make_full() {  # fully allocated 1 GiB qcow2 (data everywhere, not zeroes)
  qemu-img create -q -f qcow2 "$1" 1G
  qemu-io -f qcow2 -c "write -P 0xa5 0 1G" "$1" >/dev/null
}

row_randread() {
  make_full "$DIR/full.qcow2"
  for s in $SERVERS; do
    start_server "$s" "$DIR/full.qcow2" qcow2
    cat "$DIR/full.qcow2" >/dev/null
    RESULT[randread,$s]=$(run_fio randread 4k 32 1G)
    stop_server
  done
}

row_randwrite() {
  [ -f "$DIR/full.qcow2" ] || make_full "$DIR/full.qcow2"
  for s in $SERVERS; do
    start_server "$s" "$DIR/full.qcow2" qcow2
    RESULT[randwrite,$s]=$(run_fio randwrite 4k 32 1G)
    stop_server
  done
}

row_alloc() {
  for s in $SERVERS; do
    rm -f "$DIR/empty.qcow2"
    qemu-img create -q -f qcow2 "$DIR/empty.qcow2" 1G
    start_server "$s" "$DIR/empty.qcow2" qcow2
    RESULT[alloc,$s]=$(run_fio randwrite 4k 32 1G)
    stop_server
    qemu-img check -q "$DIR/empty.qcow2" || echo "qcow2.sh: qemu-img check failed after $s alloc" >&2
  done
}

row_seqread() {
  [ -f "$DIR/base.qcow2" ] || {
    make_full "$DIR/base.qcow2"
    qemu-img create -q -f qcow2 -b "$DIR/base.qcow2" -F qcow2 "$DIR/top.qcow2"
    # The top layer holds every other 1 MiB.
    local cmds=()
    for i in $(seq 0 2 1023); do cmds+=(-c "write -P 0x5a ${i}M 1M"); done
    qemu-io -f qcow2 "${cmds[@]}" "$DIR/top.qcow2" >/dev/null
  }
  cat "$DIR/base.qcow2" "$DIR/top.qcow2" >/dev/null
  for s in $SERVERS; do
    start_server "$s" "$DIR/top.qcow2" qcow2
    RESULT[seqread,$s]=$(run_fio read 1M 8 1G)
    stop_server
  done
}

# time_map -> milliseconds of `nbdinfo --map` (best of 3)
time_map() {
  python3 - "$SOCK" <<'EOF'
import subprocess, sys, time
best = 1e9
for _ in range(3):
    t = time.perf_counter()
    out = subprocess.run(["nbdinfo", "--map", f"nbd+unix:///disk?socket={sys.argv[1]}"],
                         check=True, capture_output=True).stdout
    best = min(best, time.perf_counter() - t)
print("%.1f %d" % (best * 1000, out.count(b"\n")))
EOF
}

row_map() {
  local q=$DIR/map.qcow2 raw=$DIR/map.raw
  rm -f "$q" "$raw"
  qemu-img create -q -f qcow2 "$q" 1T
  truncate -s 1T "$raw"
  # 1,000 scattered 64 KiB extents (deterministic positions, 64 KiB aligned).
  python3 - "$q" "$raw" <<'EOF' | qemu-io -f qcow2 "$q" >/dev/null
import os, random, sys
random.seed(7)
slots = sorted(random.sample(range((1 << 40) // 65536), 1000))
fd = os.open(sys.argv[2], os.O_WRONLY)
block = b"\x5a" * 65536
for s in slots:
    os.pwrite(fd, block, s * 65536)
    print(f"write -P 0x5a {s * 65536} 64k")
os.close(fd)
EOF
  for s in $SERVERS; do
    start_server "$s" "$q" qcow2
    RESULT[map,$s]=$(time_map)
    stop_server
  done
  start_server blockd "$raw" raw
  RESULT[mapraw,blockd]=$(time_map)
  stop_server
  start_server qsd "$raw" raw
  RESULT[mapraw,qsd]=$(time_map)
  stop_server
}

# Issue 15's nbdcopy rows, measured by copy-profile.sh (which starts each server itself).
copy_rows() {
  local r=$1 prow tr
  case $r in copy-out*) prow=qcow2-out ;; *) prow=qcow2-in ;; esac
  case $r in *-tcp) tr=tcp ;; *) tr=unix ;; esac
  for s in $SERVERS; do
    local out
    out=$(BLOCKD=$BLOCKD TRANSPORT=$tr REPEAT=${COPY_REPEAT:-3} Benchmarks/copy-profile.sh "$s" "$prow" 2>&1) ||
      { echo "$out" >&2; COPY[$r,$s]="0 0"; continue; }
    COPY[$r,$s]="$(awk '/MiB\/s/ {print $2; exit}' <<<"$out") $(sed -nE 's/.*task-clock ([0-9]+) ms.*/\1/p' <<<"$out")"
  done
}
declare -A COPY
for r in copy-out copy-in copy-out-tcp copy-in-tcp; do eval "row_$r() { copy_rows $r; }"; done

for r in $ROWS; do echo "running $r ..." >&2; "row_$r"; done

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}x' if b else '-')" "$1" "$2"; }

echo
printf "%-10s %-12s %10s %9s %9s %10s %10s %10s\n" row server IOPS MiB/s p99us vs-qsd vs-qemu-nbd vs-base
for r in randread randwrite alloc seqread; do
  [[ " $ROWS " == *" $r "* ]] || continue
  q=${RESULT[$r,qsd]:-"0 0 0"}; n=${RESULT[$r,qemu-nbd]:-"0 0 0"}; b=${RESULT[$r,blockd-base]:-"0 0 0"}
  for s in $SERVERS; do
    read -r iops mibs p99 <<<"${RESULT[$r,$s]}"
    if [ "$r" = seqread ]; then a=$mibs; qa=$(echo $q | cut -d' ' -f2); na=$(echo $n | cut -d' ' -f2); ba=$(echo $b | cut -d' ' -f2)
    else a=$iops; qa=$(echo $q | cut -d' ' -f1); na=$(echo $n | cut -d' ' -f1); ba=$(echo $b | cut -d' ' -f1); fi
    printf "%-10s %-12s %10s %9s %9s %10s %10s %10s\n" "$r" "$s" "$iops" "$mibs" "$p99" "$(ratio "$a" "$qa")" "$(ratio "$a" "$na")" "$(ratio "$a" "$ba")"
  done
done
if [[ " $ROWS " == *" map "* ]]; then
  echo
  raw=$(echo "${RESULT[mapraw,blockd]}" | cut -d' ' -f1)
  printf "%-24s %10s %8s %12s\n" "map (1 TiB, 1000 ext)" ms lines vs-raw-blockd
  for s in $SERVERS; do
    read -r ms lines <<<"${RESULT[map,$s]}"
    printf "%-24s %10s %8s %12s\n" "qcow2 $s" "$ms" "$lines" "$(ratio "$ms" "$raw")"
  done
  for s in blockd qsd; do
    read -r ms lines <<<"${RESULT[mapraw,$s]}"
    printf "%-24s %10s %8s %12s\n" "raw $s" "$ms" "$lines" "$(ratio "$ms" "$raw")"
  done
fi
if [[ " $ROWS " == *" copy"* ]]; then
  echo
  printf "%-34s %-9s %8s %12s %8s\n" "nbdcopy 4 conn × 64 × 256 KiB" server MiB/s "CPU us/MiB" vs-qsd
  for r in copy-out copy-in copy-out-tcp copy-in-tcp; do
    [[ " $ROWS " == *" $r "* ]] || continue
    case $r in copy-out) d="qcow2 export -> null (unix)" ;; copy-in) d="file -> empty qcow2 export (unix)" ;;
               copy-out-tcp) d="qcow2 export -> null (TCP)" ;; copy-in-tcp) d="file -> empty qcow2 export (TCP)" ;; esac
    q=${COPY[$r,qsd]:-"0 0"}
    for s in $SERVERS; do
      read -r mibs cpu <<<"${COPY[$r,$s]}"
      # task-clock ms per GiB = µs per MiB (×1000/1024 ≈ 0.98): printed as µs per MiB.
      printf "%-34s %-9s %8s %12s %8s\n" "$d" "$s" "$mibs" "$(awk -v c="$cpu" 'BEGIN{printf "%.0f", c * 1000 / 1024}')" \
        "$(ratio "$mibs" "${q%% *}")"
    done
  done
fi
