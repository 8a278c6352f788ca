#!/usr/bin/env bash
# NBD over TLS (TCP on 127.0.0.1, X.509, client certificates checked): blockd against
# qemu-nbd --tls-creds and nbdkit --tls=require, serving the same 1 GiB raw file one after the
# other, plus blockd without TLS for the cost of TLS. fio's nbd engine cannot do TLS, so the
# load comes from Benchmarks/nbdload.c (libnbd, one connection, QD requests in flight) and
# nbdcopy. Prints IOPS / MiB/s, p99 and server CPU time per I/O, and the ratios.
#
#   Benchmarks/tls.sh                      # all rows, 10 s each
#   RUNTIME=5 SERVERS="blockd nbdkit" ROWS=randread Benchmarks/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-10}
SERVERS=${SERVERS:-"blockd qemu-nbd nbdkit blockd-plain"}
ROWS=${ROWS:-"randread randread-4 seqread nbdcopy"}
PY=/usr/bin/python3

for tool in nbdcopy qemu-nbd nbdkit certtool psktool cc pkg-config $PY; do
  command -v "$tool" >/dev/null || { echo "tls.sh: $tool is missing (./scripts/test.sh installs it)" >&2; exit 1; }
done

echo "building blockd (release) and nbdload…" >&2
swift build -c release --product blockd >&2
BLOCKD="$(swift build -c release --show-bin-path)/blockd"

work=$(mktemp -d /tmp/tls-bench.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cc -O2 -o "$work/nbdload" Benchmarks/nbdload.c $(pkg-config --cflags --libs libnbd)
scripts/make-pki.sh "$work/k" >/dev/null
pki=$work/k/pki
img=$work/disk.img
echo "creating a 1 GiB image in $work…" >&2
head -c 1G /dev/urandom > "$img"
port=$((20000 + RANDOM % 20000))

start_server() {
  rm -f "$work/ready"
  case $1 in
    blockd) "$BLOCKD" serve "$img" --format raw --name disk --host 127.0.0.1 --port "$port" --tls-creds "$pki" \
              >/dev/null 2>"$work/$1.log" & ;;
    blockd-plain) "$BLOCKD" serve "$img" --format raw --name disk --host 127.0.0.1 --port "$port" \
              >/dev/null 2>"$work/$1.log" & ;;
    qemu-nbd) qemu-nbd -f raw -x disk -t -e 16 --cache=writeback -b 127.0.0.1 -p "$port" \
              --object "tls-creds-x509,id=tls0,endpoint=server,dir=$pki" --tls-creds tls0 "$img" 2>"$work/$1.log" & ;;
    nbdkit) nbdkit --foreground -e disk -i 127.0.0.1 -p "$port" --tls=require --tls-certificates="$pki" \
              --tls-verify-peer file "$img" 2>"$work/$1.log" & ;;
  esac
  server_pid=$!
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
  port=$((port + 1))
}

server_cpu() { awk '{print $14 + $15}' "/proc/$server_pid/stat" 2>/dev/null || echo 0; }

results=$work/results.txt
: > "$results"

load_row() {  # server row mode bs qd uri [connections]
  local server=$1 row=$2 mode=$3 bs=$4 qd=$5 uri=$6 conns=${7:-1}
  local cpu0 cpu1 i ok=1 pids=()
  cpu0=$(server_cpu)
  for i in $(seq "$conns"); do
    "$work/nbdload" "$uri" "$mode" "$bs" "$qd" "$RUNTIME" >"$work/load.$i" 2>"$work/load.err.$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  cpu1=$(server_cpu)
  for i in $(seq "$conns"); do [ -s "$work/load.$i" ] || { cat "$work/load.err.$i" >&2; ok=0; }; done
  [ $ok = 1 ] || { echo "$server $row fail 0 0 0 0" >> "$results"; return; }
  # per process: ops bytes seconds p50 p99 -> summed iops and MiB/s, worst p99, server CPU per op
  # (the CPU ticks include the 1 s warm-up)
  cat "$work"/load.[0-9]* | awk -v s="$server" -v r="$row" -v t=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" \
    '{ ops+=$1; bytes+=$2; sec=$3; iops+=$1/$3; mib+=$2/$3/1048576; if ($5>p99) p99=$5 }
     END { cpu=(ops>0)? t/hz*1e6/(ops*(1+1/sec)) : 0; printf "%s %s ok %d %.1f %d %.1f\n", s, r, iops, mib, p99, cpu }' >> "$results"
  rm -f "$work"/load.[0-9]*
}

for server in $SERVERS; do
  echo "== $server" >&2
  start_server "$server"
  if [ "$server" = blockd-plain ]; then uri="nbd://127.0.0.1:$port/disk"
  else uri="nbds://127.0.0.1:$port/disk?tls-certificates=$pki"; fi
  for row in $ROWS; do
    case $row in
      randread) load_row "$server" "$row" randread 4096 32 "$uri" ;;
      randread-4) load_row "$server" "$row" randread 4096 32 "$uri" 4 ;;
      seqread)  load_row "$server" "$row" read 1048576 8 "$uri" ;;
      nbdcopy)
        cpu0=$(server_cpu); t0=$(date +%s.%N)
        if nbdcopy "$uri" null: 2>"$work/cmd.err"; then
          t1=$(date +%s.%N); cpu1=$(server_cpu)
          awk -v s="$server" -v a="$t0" -v b="$t1" -v t=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" \
            'BEGIN { printf "%s nbdcopy ok 0 %.1f 0 %.1f\n", s, 1024 / (b - a), t / hz * 1e6 / 1024 }' >> "$results"
        else
          cat "$work/cmd.err" >&2; echo "$server nbdcopy fail 0 0 0 0" >> "$results"
        fi ;;
    esac
    echo "   $(tail -1 "$results")" >&2
  done
  stop_server
done

$PY - "$results" "$SERVERS" "$ROWS" <<'PYEOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    s, row, status, iops, mib, p99, cpu = line.split()
    rows[(s, row)] = (status, float(iops), float(mib), float(p99), float(cpu))
servers = sys.argv[2].split()
desc = {"randread": "4k randread QD32 (nbdload)", "randread-4": "4k randread QD32 x4 conns",
        "seqread": "1M seq read QD8 (nbdload)",
        "nbdcopy": "nbdcopy export -> null:"}
print()
hdr = f"{'workload (TLS unless -plain)':30}" + "".join(f"{s:>30}" for s in servers)
ratios = [r for r in ("qemu-nbd", "nbdkit", "blockd-plain") if "blockd" in servers and r in servers]
hdr += "".join(f"{'blockd/' + r:>20}" for r in ratios)
print(hdr); print("-" * len(hdr))
def fmt(v, row):
    st, iops, mib, p99, cpu = v
    if st != "ok": return "failed"
    if row == "nbdcopy": return f"{mib:.0f} MiB/s {cpu:.0f}us/MiB"
    if row.startswith("randread"): return f"{iops/1000:.1f}k p99 {p99:.0f}us {cpu:.1f}us/op"
    return f"{mib:.0f} MiB/s p99 {p99/1000:.1f}ms {cpu:.0f}us/op"
def metric(v, row):
    st, iops, mib, p99, cpu = v
    if st != "ok": return None
    return iops if row.startswith("randread") else mib
for row in sys.argv[3].split():
    line = f"{desc.get(row, row):30}"
    for s in servers:
        v = rows.get((s, row)); line += f"{fmt(v, row) if v else '-':>30}"
    for r in ratios:
        a, b = rows.get(("blockd", row)), rows.get((r, row))
        ma, mb = (metric(a, row) if a else None), (metric(b, row) if b else None)
        line += f"{(f'{ma / mb:.2f}x' if ma and mb else '-'):>20}"
    print(line)
print("\n(blockd/blockd-plain is what TLS leaves of blockd's plain-TCP figure; us/op: server CPU per I/O)")
PYEOF
