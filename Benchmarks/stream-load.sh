#!/usr/bin/env bash
# block-stream under client load, A/B in one run: each variant (a daemon binary, with optional
# environment) streams a 1 GiB fully allocated base into an empty top while fio reads the
# export (4 KiB random reads, QD32). Per round and variant it prints the stream's MiB/s, the
# client's IOPS without the stream ("idle": the mean of the 2 s before it, top empty, and the
# 2 s after it, top full) and during it, and their ratio; the
# variants take turns (ROUNDS rounds) and medians close the table. Run by hand; see README.md.
#
#   Benchmarks/stream-load.sh                                  # qsd vs .build/release/blockd
#   ROUNDS=5 Benchmarks/stream-load.sh 'qsd|qemu-storage-daemon' 'new|.build/release/blockd' \
#       'old|/tmp/blockd-old'
#   TRACE=1 Benchmarks/stream-load.sh 'blockd|.build/release/blockd'   # + the job thread's sleeps
#
# TRACE=1 attaches `strace --seccomp-bpf -e clock_nanosleep` to blockd during the stream and
# prints how many chunks slept, for how long in all, and the work between sleeps: what the
# yield heuristic in Sources/BlockJobs/StreamJob.swift did.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
# Daemon and fio at this nice level (root: -20), so other work on a shared machine takes
# less of the CPUs from the measurement; empty = unchanged.
NICE=${NICE:-$([ "$(id -u)" = 0 ] && echo -20)}
N=(); [ -n "$NICE" ] && N=(nice -n "$NICE")
SIZE=${SIZE:-1G}
[ $# -gt 0 ] || set -- 'qsd|qemu-storage-daemon' "blockd|$(pwd)/.build/release/blockd"
for t in fio qemu-img qemu-io python3; do command -v "$t" >/dev/null || { echo "stream-load.sh: $t is missing" >&2; exit 1; }; done
D=$(mktemp -d /tmp/stream-load.XXXXXX)
PID=""
fp=""
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; fi
  if [ -n "$fp" ]; then kill "$fp" 2>/dev/null || true; fi
  rm -rf "$D"
}
trap cleanup EXIT

cat > "$D/qmp.py" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try: s.connect(sys.argv[1]); break
    except OSError: time.sleep(0.05)
f = s.makefile("rwb"); f.readline()
def cmd(m):
    f.write((json.dumps(m) + "\n").encode()); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" not in r: return r
cmd({"execute": "qmp_capabilities"})
if sys.argv[2] == "setup":
    for c in ({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": sys.argv[3]}}},
              {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "top", "writable": True}}):
        r = cmd(c)
        if "error" in r: sys.exit(f"stream-load.sh: {r}")
else:
    t0 = time.monotonic()
    r = cmd({"execute": "block-stream", "arguments": {"job-id": "s", "device": "top"}})
    if "error" in r: sys.exit(f"stream-load.sh: {r}")
    while True:
        r = json.loads(f.readline())
        if r.get("event") == "BLOCK_JOB_COMPLETED": break
    if "error" in r["data"]: sys.exit(f"stream-load.sh: stream failed: {r['data']}")
    print(t0, time.monotonic())
PY

: > "$D/results"
for round in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    IFS='|' read -r -a parts <<<"$spec"
    label=${parts[0]}; bin=${parts[1]}; envs=("${parts[@]:2}")
    rm -f "$D"/*.qcow2 "$D"/iops*.log "$D/q.sock" "$D/nbd.sock"
    qemu-img create -q -f qcow2 "$D/base.qcow2" "$SIZE"
    qemu-io -f qcow2 -c "write -P 7 0 $SIZE" "$D/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$D/top.qcow2"
    sync
    cat "$D/base.qcow2" > /dev/null
    env "${envs[@]}" "${N[@]}" "$bin" --chardev socket,path="$D/q.sock",server=on,wait=off,id=c --monitor chardev=c \
      --nbd-server addr.type=unix,addr.path="$D/nbd.sock" >"$D/daemon.log" 2>&1 &
    PID=$!
    python3 "$D/qmp.py" "$D/q.sock" setup "$D/top.qcow2"
    python3 -c 'import time; print(time.monotonic())' > "$D/fio0"
    "${N[@]}" fio --name=r --ioengine=nbd --uri="nbd+unix:///top?socket=$D/nbd.sock" --rw=randread --bs=4k \
      --iodepth=32 --runtime=60 --time_based --size="$SIZE" --write_iops_log="$D/iops" --log_avg_msec=100 \
      >/dev/null 2>"$D/fio.err" &
    fp=$!
    sleep 4
    if [ "${TRACE:-0}" = 1 ] && [[ "$bin" != *qemu-storage-daemon* ]]; then
      strace -f --seccomp-bpf -e trace=clock_nanosleep,nanosleep -tt -T -o "$D/sleeps.txt" -p "$PID" 2>/dev/null &
      sp=$!; sleep 0.3
    fi
    python3 "$D/qmp.py" "$D/q.sock" stream > "$D/times"
    [ -n "${sp:-}" ] && { kill -INT "$sp"; wait "$sp" 2>/dev/null || true; sp=""; }
    sleep 2.5                              # the "after" window
    kill -INT "$fp" 2>/dev/null || true    # fio stops and writes its logs
    wait "$fp" 2>/dev/null || true
    fp=""
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    python3 - "$D" "$label" "$round" "$(cut -d' ' -f1 /proc/loadavg)" "${TRACE:-0}" >> "$D/results" <<'PY'
import glob, re, statistics, sys
d, label, rnd, load, trace = sys.argv[1:6]
t0 = float(open(f"{d}/fio0").read()); a, b = map(float, open(f"{d}/times").read().split())
pts = [(int(l.split(",")[0]) / 1000, int(l.split(",")[1])) for f in glob.glob(f"{d}/iops*.log") for l in open(f)]
# fio's clock starts a little after launch: an error of a fraction of one 100 ms interval.
# Reference: the mean of the 2 s before the stream (top empty: reads fall through to base)
# and the 2 s after it (top full): the chain the clients read through changes meanwhile.
before = [v for t, v in pts if a - t0 - 2.0 <= t - 0.1 and t <= a - t0]
during = [v for t, v in pts if a - t0 <= t - 0.1 and t <= b - t0]
after = [v for t, v in pts if b - t0 + 0.2 <= t - 0.1 and t <= b - t0 + 2.2]
mean = lambda x: sum(x) / len(x) if x else 0
mib = 1024 / (b - a)
ti, td = (mean(before) + mean(after)) / 2, mean(during)
extra = ""
if trace == "1":
    try:
        rows = []
        for l in open(f"{d}/sleeps.txt"):
            m = re.search(r"(\d+):(\d+):([\d.]+) clock_nanosleep.*<([\d.]+)>", l)
            if m: rows.append((int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]), float(m[4])))
        if rows:
            slept = sum(x for _, x in rows)
            gaps = [rows[i + 1][0] - rows[i][0] - rows[i][1] for i in range(len(rows) - 1)] or [0]
            extra = (f" | {len(rows)} sleeps for {int(1024 / 0.5)} chunks, slept {slept:.2f} s of {b - a:.2f} s"
                     f" ({100 * slept / (b - a):.0f}%), work between sleeps median {statistics.median(gaps) * 1000:.2f} ms")
    except OSError: pass
print(label, rnd, f"{mib:.0f}", f"{ti:.0f}", f"{td:.0f}", f"{(td / ti if ti else 0):.2f}", load,
      f"| before {mean(before):.0f} after {mean(after):.0f} IOPS{extra}")
PY
    echo "  $(tail -1 "$D/results")" >&2
  done
done
python3 - "$D/results" "$@" <<'PY'
import statistics, sys, collections
rows = collections.defaultdict(list)
for l in open(sys.argv[1]):
    p = l.split(" | ")[0].split()
    rows[p[0]].append(tuple(map(float, p[2:7])))
print(f"\n{'variant':12}{'stream MiB/s':>14}{'idle IOPS':>11}{'during':>9}{'kept':>7}{'load':>7}   (medians)")
for spec in sys.argv[2:]:
    l = spec.split("|")[0]; v = rows[l]; med = lambda i: statistics.median(x[i] for x in v)
    print(f"{l:12}{med(0):14.0f}{med(1):11.0f}{med(2):9.0f}{100 * med(3):6.0f}%{med(4):7.1f}")
PY
