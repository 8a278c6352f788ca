#!/usr/bin/env bash
# The cost of a re-export through the nbd driver: fio 4 KiB random read QD32 (fio's nbd
# engine, one connection) against an origin server directly, then against a second daemon
# whose export is an `nbd` node connected to that origin. Done for blockd→blockd and for
# qemu-storage-daemon→qemu-storage-daemon (QEMU's nbd driver re-exporting), in one run.
# Prints IOPS, p99 and server CPU per I/O, and re-export/direct ratios. Run by hand.
#
#   Benchmarks/nbd-client.sh                       # 10 s per run, 1 GiB image
#   RUNTIME=5 SIZE=256M Benchmarks/nbd-client.sh
#   ROWS="randread randwrite" Benchmarks/nbd-client.sh
#   SERVERS=blockd Benchmarks/nbd-client.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
SERVERS=${SERVERS:-"blockd qsd"}
ROWS=${ROWS:-"randread"}
PY=/usr/bin/python3

for tool in fio qemu-storage-daemon $PY; do
  command -v "$tool" >/dev/null || { echo "nbd-client.sh: $tool is missing (./scripts/test.sh installs it)" >&2; exit 1; }
done

echo "building blockd (release)…" >&2
swift build -c release --product blockd >&2
BLOCKD="$(swift build -c release --show-bin-path)/blockd"

work=$(mktemp -d /tmp/nbd-client-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.img
echo "creating a $SIZE image of random data in $work…" >&2
head -c "$SIZE" /dev/urandom > "$img"
origin=$work/origin.sock
reexport=$work/reexport.sock

wait_socket() { for _ in $(seq 400); do [ -S "$1" ] && return; sleep 0.025; done; echo "no socket $1" >&2; exit 1; }

start() {  # $1 = server kind, $2 = origin|reexport; sets last_pid
  local kind=$1 role=$2
  case $kind/$role in
    blockd/origin)
      "$BLOCKD" serve "$img" --format raw --name disk --socket "$origin" >/dev/null 2>"$work/$kind-$role.log" & ;;
    blockd/reexport)
      "$BLOCKD" --blockdev "driver=nbd,node-name=n,server.type=unix,server.path=$origin,export=disk" \
        --nbd-server "addr.type=unix,addr.path=$reexport" --export type=nbd,id=e,node-name=n,name=disk,writable=on \
        >/dev/null 2>"$work/$kind-$role.log" & ;;
    qsd/origin)
      qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$img" \
        --nbd-server "addr.type=unix,addr.path=$origin" --export type=nbd,id=e,node-name=f,name=disk,writable=on \
        2>"$work/$kind-$role.log" & ;;
    qsd/reexport)
      qemu-storage-daemon --blockdev "driver=nbd,node-name=n,server.type=unix,server.path=$origin,export=disk" \
        --nbd-server "addr.type=unix,addr.path=$reexport" --export type=nbd,id=e,node-name=n,name=disk,writable=on \
        2>"$work/$kind-$role.log" & ;;
  esac
  last_pid=$!
  pids+=("$last_pid")
  if [ "$role" = origin ]; then wait_socket "$origin"; else wait_socket "$reexport"; fi
}

cpu_ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

results=$work/results.txt
: > "$results"

run_fio() {  # $1 label, $2 socket, $3 rw, rest: pids to charge CPU to
  local label=$1 sock=$2 rw=$3; shift 3
  local out=$work/$label.json c0 c1
  c0=$(cpu_ticks "$@")
  fio --name="$label" --ioengine=nbd --uri="nbd+unix:///disk?socket=$sock" --rw="$rw" --bs=4k --iodepth=32 \
      --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=2 --output-format=json --output="$out" \
      >/dev/null 2>"$work/fio.err" || { cat "$work/fio.err" >&2; echo "$label fail 0 0 0" >> "$results"; return; }
  c1=$(cpu_ticks "$@")
  $PY - "$out" "$label" "$((c1 - c0))" >> "$results" <<'PYEOF'
import json, os, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
ios = side["total_ios"] * (1 + 2000 / j["job_runtime"]) if j["job_runtime"] else 0
cpu = int(sys.argv[3]) / os.sysconf("SC_CLK_TCK") * 1e6 / ios if ios else 0
print(sys.argv[2], "ok", round(side["iops"]), round(p99), round(cpu, 1))
PYEOF
}

for kind in $SERVERS; do
  echo "== $kind" >&2
  start "$kind" origin; origin_pid=$last_pid
  start "$kind" reexport; re_pid=$last_pid
  for rw in $ROWS; do
    run_fio "$kind-$rw-direct" "$origin" "$rw" "$origin_pid"
    run_fio "$kind-$rw-reexport" "$reexport" "$rw" "$origin_pid" "$re_pid"
  done
  kill "$re_pid" "$origin_pid"; wait "$re_pid" "$origin_pid" 2>/dev/null || true
  rm -f "$origin" "$reexport"
done

echo
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)   ($(nproc) cores, fio on the same machine)"
$PY - "$results" "$ROWS" "$SERVERS" <<'PYEOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    label, status, iops, p99, cpu = line.split()
    rows[label] = (status, int(iops), int(p99), float(cpu))
print(f"{'workload':<28}{'direct':>34}{'re-export (nbd node)':>40}{'re-export/direct':>20}")
print("-" * 122)
for kind in sys.argv[3].split():
    for rw in sys.argv[2].split():
        d, r = rows.get(f"{kind}-{rw}-direct"), rows.get(f"{kind}-{rw}-reexport")
        if not d or not r: continue
        fmt = lambda x: f"{x[1] / 1000:.1f}k IOPS p99 {x[2]}us {x[3]}us/op" if x[0] == "ok" else "failed"
        ratio = f"{r[1] / d[1]:.2f}x IOPS" if d[1] and r[1] else "-"
        print(f"{kind + ' 4k ' + rw + ' QD32':<28}{fmt(d):>34}{fmt(r):>40}{ratio:>20}")
print("\nus/op: CPU time of the serving daemons per I/O (direct: the origin; re-export: origin + re-exporter).")
PYEOF
