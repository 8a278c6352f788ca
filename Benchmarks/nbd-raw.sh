#!/usr/bin/env bash
# Serves the same 1 GiB raw file with blockd (release build), qemu-nbd and nbdkit's file
# plugin, one after the other, and drives each with the same fio (nbd engine, unix socket)
# and nbdcopy workloads, plus the TCP connect time. Prints IOPS / MiB/s / p99 per server and
# the ratios blockd/qemu-nbd and blockd/nbdkit. Run by hand (not in CI); see README.md.
#
#   Benchmarks/nbd-raw.sh                 # all rows, 15 s per fio run
#   RUNTIME=5 Benchmarks/nbd-raw.sh       # quicker
#   SERVERS="blockd nbdkit" Benchmarks/nbd-raw.sh
#   ROWS="randread-1 seqread" Benchmarks/nbd-raw.sh
#   BLOCKD=path/to/blockd                   # use that binary (no build)
#   BLOCKD_BASE=/other/build/blockd SERVERS="blockd-base blockd" Benchmarks/nbd-raw.sh   # A/B two builds
#   SERVERS="blockd nbdkit qsd" ROWS="copy-out copy-in copy-out-tcp copy-in-tcp" Benchmarks/nbd-raw.sh
#
# The copy-* rows are issue 15's bulk copies: nbdcopy with 4 connections, 64 × 256 KiB
# requests in flight (--threads=4 too: nbdcopy opens at most --threads connections, and
# --threads defaults to the number of cores), export -> null: (backup pull) and
# file -> export (restore), on the unix socket and over TCP, with server CPU per MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-15}
SERVERS=${SERVERS:-"blockd qemu-nbd nbdkit qsd"}
ROWS=${ROWS:-"randread-1 randread-4 randwrite seqread seqwrite nbdcopy-out nbdcopy-in copy-out copy-in connect copy-out-tcp copy-in-tcp"}
COPY_FLAGS=(--connections=4 --threads=4 --requests=64 --request-size=262144)
CONNECTS=${CONNECTS:-200}
PY=/usr/bin/python3

for tool in fio nbdcopy qemu-nbd nbdkit qemu-storage-daemon $PY; do
  command -v "$tool" >/dev/null || { echo "nbd-raw.sh: $tool is missing (./scripts/test.sh installs it)" >&2; exit 1; }
done
$PY -c 'import nbd' 2>/dev/null || { echo "nbd-raw.sh: python3-libnbd is missing" >&2; exit 1; }

if [ -z "${BLOCKD:-}" ]; then
  echo "building blockd (release)…" >&2
  swift build -c release --product blockd >&2
  BLOCKD="$(swift build -c release --show-bin-path)/blockd"
fi
BLOCKD_BASE=${BLOCKD_BASE:-}

work=$(mktemp -d /tmp/nbd-bench.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.img
src=$work/src.img
echo "creating 1 GiB images in $work…" >&2
head -c 1G /dev/urandom > "$img"
cp "$img" "$src"
sock=$work/nbd.sock
port=$((20000 + RANDOM % 20000))

start_server() {  # $1 = server, $2 = unix|tcp
  local name=$1 mode=$2
  rm -f "$sock"
  case $name in
    blockd|blockd-noinline|blockd-base)
      # blockd-noinline: every write through the worker pool (A/B of the inline write path).
      # blockd-base: the build at $BLOCKD_BASE (A/B of two builds in one run).
      export BLOCKD_INLINE_WRITES=1; [ "$name" = blockd-noinline ] && export BLOCKD_INLINE_WRITES=0
      local bin=$BLOCKD; [ "$name" = blockd-base ] && bin=${BLOCKD_BASE:?set BLOCKD_BASE to the other blockd}
      if [ "$mode" = unix ]; then "$bin" serve "$img" --format raw --name disk --socket "$sock" >/dev/null 2>"$work/$name.log" &
      else "$bin" serve "$img" --format raw --name disk --host 127.0.0.1 --port "$port" >/dev/null 2>"$work/$name.log" &
      fi ;;
    qemu-nbd)
      if [ "$mode" = unix ]; then qemu-nbd -f raw -x disk -t -e 16 --cache=writeback -k "$sock" "$img" 2>"$work/$name.log" &
      else qemu-nbd -f raw -x disk -t -e 16 --cache=writeback -b 127.0.0.1 -p "$port" "$img" 2>"$work/$name.log" &
      fi ;;
    nbdkit)
      if [ "$mode" = unix ]; then nbdkit --foreground -e disk -U "$sock" file "$img" 2>"$work/$name.log" &
      else nbdkit --foreground -e disk -i 127.0.0.1 -p "$port" file "$img" 2>"$work/$name.log" &
      fi ;;
    qsd)
      local addr="addr.type=unix,addr.path=$sock"
      [ "$mode" = tcp ] && addr="addr.type=inet,addr.host=127.0.0.1,addr.port=$port"
      qemu-storage-daemon --blockdev "driver=file,node-name=file0,filename=$img,cache.direct=off,aio=threads" \
        --blockdev driver=raw,node-name=disk0,file=file0 --nbd-server "$addr" \
        --export type=nbd,id=e0,node-name=disk0,name=disk,writable=on 2>"$work/$name.log" & ;;
  esac
  server_pid=$!
  for _ in $(seq 200); do
    if [ "$mode" = unix ]; then [ -S "$sock" ] && break
    else (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    fi
    sleep 0.05
  done
}

server_cpu() {  # utime+stime of the server, in clock ticks
  awk '{print $14 + $15}' "/proc/$server_pid/stat" 2>/dev/null || echo 0
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
  port=$((port + 1))
}

uri="nbd+unix:///disk?socket=$sock"
results=$work/results.txt
: > "$results"

# fio row: name rw bs iodepth numjobs
fio_row() {
  local row=$1 rw=$2 bs=$3 qd=$4 jobs=$5 server=$6
  local out=$work/$server-$row.json
  local cpu0; cpu0=$(server_cpu)
  fio --name="$row" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs="$jobs" \
      --size=1G --time_based --runtime="$RUNTIME" --ramp_time=2 --group_reporting --output-format=json \
      --output="$out" >/dev/null 2>"$work/fio.err" || { cat "$work/fio.err" >&2; echo "$server $row fail 0 0 0 0" >> "$results"; return; }
  local cpu1; cpu1=$(server_cpu)
  $PY - "$out" "$server" "$row" "$((cpu1 - cpu0))" >> "$results" <<'PYEOF'
import json, sys, os
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
# Server CPU time per I/O (µs): robust when other processes share the cores. The ticks
# cover ramp_time too, so count those I/Os as well (approximately).
ticks, hz = int(sys.argv[4]), os.sysconf("SC_CLK_TCK")
ios = side["total_ios"] * (1 + 2 / j["job_runtime"] * 1000) if j["job_runtime"] else 0
cpu = ticks / hz * 1e6 / ios if ios else 0
print(sys.argv[2], sys.argv[3], "ok", round(side["iops"]), round(side["bw_bytes"] / 2**20, 1), round(p99, 1), round(cpu, 1))
PYEOF
}

# copy_row ROW SERVER DIRECTION URI: issue 15's nbdcopy row; MiB/s and server CPU µs per MiB.
copy_row() {
  local row=$1 server=$2 dir=$3 u=$4
  sync                                   # no writeback of earlier rows during the copy
  cat "$img" "$src" > /dev/null          # both in the page cache
  local cpu0; cpu0=$(server_cpu)
  if [ "$dir" = out ]; then s=$(time_cmd nbdcopy "${COPY_FLAGS[@]}" "$u" null:)
  else s=$(time_cmd nbdcopy "${COPY_FLAGS[@]}" "$src" "$u"); fi
  local cpu1; cpu1=$(server_cpu)
  [ "$s" = fail ] && { echo "$server $row fail 0 0 0 0" >> "$results"; return; }
  echo "$server $row ok 0 $(awk -v s="$s" 'BEGIN{printf "%.1f", 1024 / s}') 0 \
    $(awk -v t=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", t / hz * 1e6 / 1024}')" >> "$results"
}

time_cmd() {  # prints seconds
  local t0 t1
  t0=$(date +%s.%N); "$@" >/dev/null 2>"$work/cmd.err" || { cat "$work/cmd.err" >&2; echo fail; return; }; t1=$(date +%s.%N)
  echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}'
}

for server in $SERVERS; do
  echo "== $server" >&2
  start_server "$server" unix
  for row in $ROWS; do
    case $row in
      randread-1) fio_row "$row" randread 4k 32 1 "$server" ;;
      randread-4) fio_row "$row" randread 4k 32 4 "$server" ;;
      randwrite)  fio_row "$row" randwrite 4k 32 1 "$server" ;;
      seqread)    fio_row "$row" read 1m 8 1 "$server" ;;
      seqwrite)   fio_row "$row" write 1m 8 1 "$server" ;;
      nbdcopy-out)
        s=$(time_cmd nbdcopy "$uri" null:)
        echo "$server $row ok 0 $(awk -v s="$s" 'BEGIN{printf "%.1f", 1024 / s}') 0 0" >> "$results" ;;
      nbdcopy-in)
        s=$(time_cmd nbdcopy "$src" "$uri")
        echo "$server $row ok 0 $(awk -v s="$s" 'BEGIN{printf "%.1f", 1024 / s}') 0 0" >> "$results" ;;
      copy-out) copy_row "$row" "$server" out "$uri" ;;
      copy-in)  copy_row "$row" "$server" in "$uri" ;;
      *) continue ;;
    esac
    echo "   $(tail -1 "$results")" >&2
  done
  stop_server
  if [[ " $ROWS " == *" copy-out-tcp "* || " $ROWS " == *" copy-in-tcp "* ]]; then
    start_server "$server" tcp
    for row in $ROWS; do
      case $row in
        copy-out-tcp) copy_row "$row" "$server" out "nbd://127.0.0.1:$port/disk" ;;
        copy-in-tcp)  copy_row "$row" "$server" in "nbd://127.0.0.1:$port/disk" ;;
        *) continue ;;
      esac
      echo "   $(tail -1 "$results")" >&2
    done
    stop_server
  fi
  if [[ " $ROWS " == *" connect "* ]]; then
    start_server "$server" tcp
    $PY - "nbd://127.0.0.1:$port/disk" "$CONNECTS" "$server" >> "$results" <<'PYEOF'
import nbd, sys, time, statistics
uri, n, server = sys.argv[1], int(sys.argv[2]), sys.argv[3]
times = []
for _ in range(n):
    h = nbd.NBD()
    t = time.perf_counter()
    h.connect_uri(uri)          # TCP connect + full handshake (NBD_OPT_GO)
    times.append(time.perf_counter() - t)
    h.shutdown()
    del h
print(server, "connect", "ok", 0, 0, round(statistics.median(times) * 1e6, 1), 0)
PYEOF
    echo "   $(tail -1 "$results")" >&2
    stop_server
  fi
done

$PY - "$results" "$SERVERS" "$ROWS" <<'PYEOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    s, row, status, iops, mib, p99, cpu = line.split()
    rows[(s, row)] = (status, float(iops), float(mib), float(p99), float(cpu))
servers = sys.argv[2].split()
desc = {"randread-1": "4k randread QD32 1 conn", "randread-4": "4k randread QD32 4 conn",
        "randwrite": "4k randwrite QD32", "seqread": "1M seq read QD8", "seqwrite": "1M seq write QD8",
        "nbdcopy-out": "nbdcopy export -> null:", "nbdcopy-in": "nbdcopy file -> export",
        "connect": "TCP connect+handshake (median)"}
desc.update({"copy-out": "copy 4x64x256K export -> null", "copy-in": "copy 4x64x256K file -> export",
             "copy-out-tcp": "same over TCP: export -> null", "copy-in-tcp": "same over TCP: file -> export"})

print()
hdr = f"{'workload':32}" + "".join(f"{s:>42}" for s in servers)
ratios = [r for r in ("qemu-nbd", "nbdkit", "blockd-base") if "blockd" in servers and r in servers]
hdr += "".join(f"{'blockd/' + r:>16}" for r in ratios)
print(hdr); print("-" * len(hdr))
def fmt(v, row):
    st, iops, mib, p99, cpu = v
    if st != "ok": return "failed"
    if row == "connect": return f"{p99:.0f} us"
    if row.startswith("nbdcopy"): return f"{mib:.0f} MiB/s"
    if row.startswith("copy"): return f"{mib:.0f} MiB/s {cpu:.0f}us/MiB"
    if iops >= 1000 and row.startswith("rand"):
        return f"{iops/1000:.1f}k p99 {p99:.0f}us {cpu:.1f}us/op"
    return f"{mib:.0f} MiB/s p99 {p99/1000:.0f}ms {cpu:.0f}us/op"
def metric(v, row):
    st, iops, mib, p99, cpu = v
    if st != "ok": return None
    if row == "connect": return 1.0 / p99 if p99 else None  # higher is better
    return iops if row.startswith("rand") else mib
for row in sys.argv[3].split():
    line = f"{desc.get(row, row):32}"
    for s in servers:
        v = rows.get((s, row)); line += f"{fmt(v, row) if v else '-':>42}"
    for r in ratios:
        a, b = rows.get(("blockd", row)), rows.get((r, row))
        ma, mb = (metric(a, row) if a else None), (metric(b, row) if b else None)
        line += f"{(f'{ma / mb:.2f}x' if ma and mb else '-'):>16}"
    print(line)
print("\n(ratios: higher is better for blockd; for connect, the inverse of the time;")
print(" us/op: server CPU time per I/O, us/MiB: per MiB copied — the figures to trust when")
print(" the machine is shared)")
PYEOF
