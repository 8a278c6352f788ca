#!/usr/bin/env bash
# An RBD image served over NBD: blockd's rbd driver against qemu-storage-daemon's, with
# `rbd bench` on the same image (librbd alone, no NBD) as the limit. On a throwaway single-node
# cluster (scripts/ceph-single-node.sh: one monitor, one in-memory OSD), in one run:
# 4 KiB random read and write at QD32, 1 MiB sequential read at QD32; fio's nbd engine, one
# connection. Prints IOPS (and MiB/s), p99 latency, server CPU per I/O, and the ratios
# blockd/QSD and blockd/rbd-bench. Run by hand.
#
#   Benchmarks/rbd.sh                          # 10 s per run, 1 GiB image, each run twice
#   RUNTIME=5 SIZE=512M REPEAT=1 Benchmarks/rbd.sh
#   ROWS="randread" SERVERS=blockd Benchmarks/rbd.sh
#   BLOCKD=/path/to/blockd Benchmarks/rbd.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
SERVERS=${SERVERS:-"blockd qsd"}
ROWS=${ROWS:-"randread randwrite seqread"}
REPEAT=${REPEAT:-2}
PY=/usr/bin/python3

for tool in fio qemu-io qemu-storage-daemon rbd ceph-mon ceph-osd $PY; do
  command -v "$tool" >/dev/null || { echo "rbd.sh: $tool is missing (./scripts/test.sh installs it)" >&2; exit 1; }
done

if [ -z "${BLOCKD:-}" ]; then
  echo "building blockd (release)…" >&2
  swift build -c release --product blockd >&2
  BLOCKD="$(swift build -c release --show-bin-path)/blockd"
fi

work=$(mktemp -d /tmp/rbd-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  [ -d "$work/ceph" ] && scripts/ceph-single-node.sh stop "$work/ceph" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "starting a single-node cluster in $work/ceph…" >&2
# Room for the image in the OSD's memory store, plus headroom.
bytes=$($PY -c "import sys; s=sys.argv[1]; u={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*u[s[-1]] if s[-1] in u else int(s))" "$SIZE")
conf=$(CEPH_MEMSTORE_BYTES=$((bytes + (512 << 20))) scripts/ceph-single-node.sh start "$work/ceph" | tail -1)
img=bench
rbd -c "$conf" create --size "$SIZE" "$img"
echo "filling the $SIZE image (reads of unwritten objects never reach the OSD)…" >&2
rbd -c "$conf" bench --io-type write --io-size 4M --io-threads 8 --io-pattern seq --io-total "$bytes" "$img" >/dev/null

sock=$work/nbd.sock
wait_socket() { for _ in $(seq 400); do [ -S "$1" ] && return; sleep 0.025; done; echo "no socket $1" >&2; cat "$work"/*.log >&2; exit 1; }

start() {  # $1 = server kind; sets last_pid
  rm -f "$sock"
  local node="driver=rbd,node-name=r,pool=rbd,image=$img,conf=$conf"
  local args=(--blockdev "$node" --nbd-server "addr.type=unix,addr.path=$sock" --export type=nbd,id=e,node-name=r,name=disk,writable=on)
  case $1 in
    blockd) "$BLOCKD" "${args[@]}" >/dev/null 2>"$work/$1.log" & ;;
    qsd) qemu-storage-daemon "${args[@]}" 2>"$work/$1.log" & ;;
  esac
  last_pid=$!
  pids+=("$last_pid")
  wait_socket "$sock"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

results=$work/results.txt
: > "$results"

fio_args() {  # $1 row -> rw, block size
  case $1 in
    randread) echo "randread 4k" ;;
    randwrite) echo "randwrite 4k" ;;
    seqread) echo "read 1M" ;;
  esac
}

run_fio() {  # $1 kind, $2 row, $3 server pid
  local kind=$1 row=$2 pid=$3 out=$work/$1-$2.json c0 c1 rw bs
  read -r rw bs < <(fio_args "$row")
  # One flush first, as a real client sends: librbd's cache writes through until it sees one
  # (rbd_cache_writethrough_until_flush), and rbd bench runs with it on. fio sends none.
  qemu-io -f raw -c flush "nbd+unix:///disk?socket=$sock" >/dev/null
  c0=$(cpu_ticks "$pid")
  fio --name="$kind-$row" --ioengine=nbd --uri="nbd+unix:///disk?socket=$sock" --rw="$rw" --bs="$bs" --iodepth=32 \
      --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=2 --output-format=json --output="$out" \
      >/dev/null 2>"$work/fio.err" || { cat "$work/fio.err" >&2; echo "$kind $row fail 0 0 0 0" >> "$results"; return; }
  c1=$(cpu_ticks "$pid")
  $PY - "$out" "$kind" "$row" "$((c1 - c0))" >> "$results" <<'PYEOF'
import json, os, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
ios = side["total_ios"] * (1 + 2000 / j["job_runtime"]) if j["job_runtime"] else 0
cpu = int(sys.argv[4]) / os.sysconf("SC_CLK_TCK") * 1e6 / ios if ios else 0
print(sys.argv[2], sys.argv[3], "ok", round(side["iops"]), round(side["bw_bytes"] / 1048576), round(p99), round(cpu, 1))
PYEOF
}

run_bench() {  # $1 row: rbd bench on the image, nothing else has it open
  local row=$1 type size pattern total
  case $row in
    randread) type=read; size=4096; pattern=rand ;;
    randwrite) type=write; size=4096; pattern=rand ;;
    seqread) type=read; size=1048576; pattern=seq ;;
  esac
  # About RUNTIME seconds at the rates measured here (rbd bench stops at a byte count).
  case $row in
    seqread) total=$((RUNTIME * 600 * 1048576)) ;;
    *) total=$((RUNTIME * 12000 * 4096)) ;;
  esac
  /usr/bin/time -f "%U %S" -o "$work/bench-$row.cpu" rbd -c "$conf" bench --io-type "$type" --io-size "$size" \
      --io-threads 32 --io-pattern "$pattern" --io-total "$total" "$img" > "$work/bench-$row.txt" 2>&1 \
      || { echo "rbd-bench $row fail 0 0 0 0" >> "$results"; return; }
  $PY - "$work/bench-$row.txt" "$row" "$size" "$work/bench-$row.cpu" >> "$results" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)", text)
if not m:
    print("rbd-bench", sys.argv[2], "fail 0 0 0 0")
else:
    iops, ops = float(m.group(3)), int(m.group(2))
    cpu = sum(float(x) for x in open(sys.argv[4]).read().split()[-2:]) * 1e6 / ops
    print("rbd-bench", sys.argv[2], "ok", round(iops), round(iops * int(sys.argv[3]) / 1048576), 0, round(cpu, 1))
PYEOF
}

# Row by row, the contenders back to back (the machine's load changes less within a row), in
# alternating order on each repetition; the table keeps each one's best run.
for row in $ROWS; do
  for rep in $(seq "$REPEAT"); do
    order="rbd-bench $SERVERS"
    [ $((rep % 2)) -eq 0 ] && order=$(echo "$order" | tr ' ' '\n' | tac | tr '\n' ' ')
    for kind in $order; do
      echo "== $row: $kind ($rep/$REPEAT)" >&2
      if [ "$kind" = rbd-bench ]; then run_bench "$row"; continue; fi
      start "$kind"; pid=$last_pid
      run_fio "$kind" "$row" "$pid"
      kill "$pid"; wait "$pid" 2>/dev/null || true
    done
  done
done

echo
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)   ($(nproc) cores; fio, the daemons and the cluster share them)"
$PY - "$results" "$ROWS" "$SERVERS" <<'PYEOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    kind, row, status, iops, mib, p99, cpu = line.split()
    r = (status, int(iops), int(mib), int(p99), float(cpu))
    best = rows.get((kind, row))
    if best is None or (r[0] == "ok" and (best[0] != "ok" or r[1] > best[1])):
        rows[(kind, row)] = r
names = {"randread": "4k randread QD32", "randwrite": "4k randwrite QD32", "seqread": "1M seqread QD32"}
kinds = ["rbd-bench"] + sys.argv[3].split()
W = {"rbd-bench": 34}
w = lambda k: W.get(k, 44)
print(f"{'workload':<20}" + "".join(f"{k:>{w(k)}}" for k in kinds) + f"{'blockd/qsd':>12}{'blockd/bench':>14}")
print("-" * (20 + sum(w(k) for k in kinds) + 26))
for row in sys.argv[2].split():
    cells = []
    for k in kinds:
        r = rows.get((k, row))
        if not r or r[0] != "ok": cells.append(f"{'failed' if r else '-':>{w(k)}}"); continue
        text = f"{r[1] / 1000:.1f}k IOPS {r[2]} MiB/s"
        if k != "rbd-bench": text += f" p99 {r[3] / 1000:.1f}ms"
        text += f" {r[4]}us/op"
        cells.append(f"{text:>{w(k)}}")
    def ratio(a, b):
        x, y = rows.get((a, row)), rows.get((b, row))
        return f"{x[1] / y[1]:.2f}x" if x and y and x[0] == y[0] == "ok" and y[1] else "-"
    print(f"{names[row]:<20}" + "".join(cells) + f"{ratio('blockd', 'qsd'):>12}{ratio('blockd', 'rbd-bench'):>14}")
print("\nBest of the repetitions. us/op: CPU time per I/O of the serving daemon (librbd's threads included),")
print("or of rbd bench (librbd alone).")
PYEOF
