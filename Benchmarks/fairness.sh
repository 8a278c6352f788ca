#!/usr/bin/env bash
# A small client's latency while another client pulls the disk in large requests, A/B in one
# run: each variant serves a 1 GiB raw file on a unix socket; fio reads 4 KiB at random at QD1
# (one connection) for RUNTIME seconds, once alone ("idle") and once while nbdcopy pulls the
# export to null: with 4 connections × 64 × 256 KiB in a loop ("busy"). Prints the small
# client's IOPS, p50, p99 and p99.9 completion latency both ways, and the puller's MiB/s; the
# variants take turns (ROUNDS rounds) and medians close the table. Run by hand; see README.md.
#
#   Benchmarks/fairness.sh 'main|/tmp/blockd-main' 'new|.build/release/blockd' \
#       'noinline|.build/release/blockd|BLOCKD_INLINE_WRITES=0'
#   Benchmarks/fairness.sh 'nbdkit|nbdkit' 'qsd|qemu-storage-daemon' 'blockd|.build/release/blockd'
#   ROUNDS=5 RUNTIME=10 BS=4k REQUEST_SIZE=262144 Benchmarks/fairness.sh …
#   DIRECTION=in Benchmarks/fairness.sh …   # the bulk client restores instead: nbdcopy FILE URI
#                                           # (a second 1 GiB file of random data) into the export
#
# A BINARY named nbdkit or qemu-storage-daemon runs that server instead (nbdkit's file plugin;
# QSD with cache.direct=off,aio=threads), with the same image and socket.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-8}
BS=${BS:-4k}
REQUEST_SIZE=${REQUEST_SIZE:-262144}
NICE=${NICE:-$([ "$(id -u)" = 0 ] && echo -20)}
N=(); [ -n "$NICE" ] && N=(nice -n "$NICE")
PY=/usr/bin/python3
[ $# -gt 0 ] || set -- "blockd|$(pwd)/.build/release/blockd"
for t in fio nbdcopy nbdinfo; do command -v "$t" >/dev/null || { echo "fairness.sh: $t is missing" >&2; exit 1; }; done
DIR=${DIR:-/var/tmp/blockd-fairness}
mkdir -p "$DIR"
IMG=$DIR/disk.img
[ -f "$IMG" ] || { head -c 1G /dev/urandom > "$IMG.tmp" && mv "$IMG.tmp" "$IMG"; }
DIRECTION=${DIRECTION:-out}
SRC=$DIR/src.img
if [ "$DIRECTION" = in ]; then
  [ -f "$SRC" ] || { head -c 1G /dev/urandom > "$SRC.tmp" && mv "$SRC.tmp" "$SRC"; }
fi
D=$(mktemp -d /tmp/fairness.XXXXXX)
SOCK=$D/nbd.sock
URI="nbd+unix:///disk?socket=$SOCK"
PID=""
PULL=""
cleanup() {
  [ -n "$PULL" ] && { touch "$D/stop"; pkill -P "$PULL" nbdcopy 2>/dev/null; wait "$PULL" 2>/dev/null; } || true
  [ -n "$PID" ] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; } || true
  rm -rf "$D"
}
trap cleanup EXIT

start_server() {  # label binary env...
  local bin=$2; shift 2
  rm -f "$SOCK"
  case $(basename "$bin") in
    nbdkit) env "$@" "${N[@]}" nbdkit --foreground -e disk -U "$SOCK" file "$IMG" 2>"$D/server.log" & ;;
    qemu-storage-daemon)
      env "$@" "${N[@]}" qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$IMG,cache.direct=off,aio=threads" \
        --blockdev driver=raw,node-name=disk0,file=file0 --nbd-server "addr.type=unix,addr.path=$SOCK" \
        --export type=nbd,id=e0,node-name=disk0,name=disk,writable=on 2>"$D/server.log" & ;;
    *)
      env "$@" "${N[@]}" "$bin" --blockdev "driver=file,node-name=file0,filename=$IMG" \
        --blockdev driver=raw,node-name=disk0,file=file0 --nbd-server "addr.type=unix,addr.path=$SOCK" \
        --export type=nbd,id=e0,node-name=disk0,name=disk,writable=on >"$D/server.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 200); do nbdinfo --size "$URI" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "fairness.sh: $bin did not start" >&2; cat "$D/server.log" >&2; exit 1
}

small_client() {  # out.json
  "${N[@]}" fio --name=small --ioengine=nbd --uri="$URI" --rw=randread --bs="$BS" --iodepth=1 --numjobs=1 \
    --size=1G --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json --output="$1" \
    --percentile_list=50:99:99.9 >/dev/null
}

: > "$D/results"
echo "fairness: $BS QD1 reads, alone and beside nbdcopy ($DIRECTION) 4 x 64 x $REQUEST_SIZE, ${RUNTIME}s, $ROUNDS rounds, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for round in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    IFS='|' read -r -a parts <<<"$spec"
    label=${parts[0]}; bin=${parts[1]}; envs=("${parts[@]:2}")
    cat "$IMG" > /dev/null
    start_server "$label" "$bin" "${envs[@]}"
    small_client "$D/idle.json"
    # The puller: nbdcopy again and again until fio is done; bytes counted per completed copy.
    : > "$D/pulls"
    rm -f "$D/stop"
    ( while [ ! -e "$D/stop" ]; do
        t0=$(date +%s.%N)
        if [ "$DIRECTION" = in ]; then from=$SRC; to=$URI; else from=$URI; to=null:; fi
        "${N[@]}" nbdcopy --connections=4 --threads=4 --requests=64 --request-size="$REQUEST_SIZE" "$from" "$to" || exit 0
        echo "$t0 $(date +%s.%N)" >> "$D/pulls"
      done ) &
    PULL=$!
    sleep 0.5
    small_client "$D/busy.json"
    # The loop starts no more copies; the one running is stopped (between two copies, the
    # loop is already on its way out), so none is left behind.
    touch "$D/stop"; pkill -P "$PULL" nbdcopy 2>/dev/null || true; wait "$PULL" 2>/dev/null || true; PULL=""
    kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; PID=""
    $PY - "$D/idle.json" "$D/busy.json" "$D/pulls" "$label" "$round" "$(cut -d' ' -f1 /proc/loadavg)" >> "$D/results" <<'PYEOF'
import json, sys
def lat(path):
    r = json.load(open(path))["jobs"][0]["read"]
    p = r["clat_ns"]["percentile"]
    return r["iops"], p["50.000000"] / 1000, p["99.000000"] / 1000, p["99.900000"] / 1000
pulls = [tuple(map(float, l.split())) for l in open(sys.argv[3]) if l.strip()]
mibs = 1024 * len(pulls) / sum(b - a for a, b in pulls) if pulls else 0
print(sys.argv[4], sys.argv[5], *lat(sys.argv[1]), *lat(sys.argv[2]), mibs, sys.argv[6])
PYEOF
    tail -1 "$D/results" | awk '{printf "  %-10s round %s: idle %6.0f IOPS p99 %5.0f us | busy %6.0f IOPS p50 %5.0f p99 %6.0f p99.9 %6.0f us | pull %5.0f MiB/s | load %s\n", $1, $2, $3, $5, $7, $8, $9, $10, $11, $12}' >&2
  done
done
$PY - "$D/results" "$@" <<'PYEOF'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    p = line.split()
    rows[p[0]].append(list(map(float, p[2:])))
print(f"{'variant':12}{'idle IOPS':>10}{'p99 us':>8}{'busy IOPS':>11}{'p50 us':>8}{'p99 us':>8}{'p99.9 us':>10}{'pull MiB/s':>12}{'load':>6}")
for spec in sys.argv[2:]:
    l = spec.split("|")[0]
    m = lambda i: statistics.median(x[i] for x in rows[l])
    print(f"{l:12}{m(0):10.0f}{m(2):8.0f}{m(4):11.0f}{m(5):8.0f}{m(6):8.0f}{m(7):10.0f}{m(8):12.0f}{m(9):6.1f}")
PYEOF
