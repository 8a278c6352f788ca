#!/usr/bin/env bash
# block-stream benchmark, by hand: stream a 1 GiB fully allocated base into an empty top,
# blockd vs qemu-storage-daemon in one run; then fio 4 KiB random reads on the export before,
# during and after a (rate-limited) stream.  Usage: Benchmarks/stream.sh [path/to/blockd]
set -euo pipefail
BLOCKD=${1:-$(dirname "$0")/../.build/release/blockd}
SIZE=${SIZE:-1G}
D=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$D"' EXIT
cat > "$D/qmp.py" <<'PY'
import socket, sys, json, time
s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try: s.connect(sys.argv[1]); break
    except OSError: time.sleep(0.05)
f = s.makefile('rwb'); f.readline()
def cmd(m):
    f.write((json.dumps(m) + '\n').encode()); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'event' not in r: return r
for line in sys.stdin.read().split('\n'):
    if not line.strip(): continue
    if line.startswith('WAIT '):
        ev = line.split()[1]
        while True:
            r = json.loads(f.readline())
            if r.get('event') == ev: break
        print(time.monotonic()); continue
    if line.startswith('NOW'): print(time.monotonic()); continue
    r = cmd(json.loads(line))
    if 'error' in r: print(r, file=sys.stderr)
PY
qmp() { python3 "$D/qmp.py" "$1"; }  # socket; JSON lines (or WAIT EVENT / NOW) on stdin
make_chain() {
  qemu-img create -q -f qcow2 "$D/base.qcow2" "$SIZE"
  qemu-io -f qcow2 -c "write -P 7 0 $SIZE" "$D/base.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$D/top.qcow2"
}
run_stream() { # daemon-binary label
  make_chain; sync
  rm -f "$D/q.sock"
  "$1" --chardev socket,path="$D/q.sock",server=on,wait=off,id=c --monitor chardev=c \
       --nbd-server addr.type=unix,addr.path="$D/nbd.sock" >/dev/null 2>&1 &
  local pid=$!
  local t
  t=$(qmp "$D/q.sock" <<EOF2
{"execute":"qmp_capabilities"}
{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"}}}
NOW
{"execute":"block-stream","arguments":{"job-id":"s","device":"top"}}
WAIT BLOCK_JOB_COMPLETED
EOF2
)
  kill $pid; wait $pid 2>/dev/null || true
  python3 -c "import sys; a,b=map(float,sys.argv[1:3]); print(f'$2: {b-a:.2f} s, {1024/(b-a):.0f} MiB/s')" $t
}
fio_iops() { # uri label [runtime]
  # fio's nbd engine prints "fio: connected to NBD server" before the JSON: skip to the '{'.
  fio --name=r --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 --runtime=${3:-${FIO_TIME:-5}} --time_based \
      --size=$SIZE --output-format=json 2>/dev/null | python3 -c "
import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index('{'):])['jobs'][0]['read']
print(f'$2: {j[\"iops\"]:8.0f} IOPS, p99 {j[\"clat_ns\"][\"percentile\"][\"99.000000\"]/1000:6.0f} us')"
}
fio_phase() { # daemon-binary label
  make_chain; sync
  rm -f "$D/q.sock" "$D/nbd.sock"
  "$1" --chardev socket,path="$D/q.sock",server=on,wait=off,id=c --monitor chardev=c \
       --nbd-server addr.type=unix,addr.path="$D/nbd.sock" >/dev/null 2>&1 &
  local pid=$!
  qmp "$D/q.sock" <<EOF2
{"execute":"qmp_capabilities"}
{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"}}}
{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"top","writable":true}}
EOF2
  local uri="nbd+unix:///top?socket=$D/nbd.sock"
  fio_iops "$uri" "$2 idle  "
  # During: fio runs 3 s with a 100 ms IOPS log; the stream starts 0.5 s in; the IOPS of the
  # log intervals that lie inside the stream's start..end window are averaged.
  rm -f "$D"/iops*.log
  (cd "$D" && fio --name=r --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 --runtime=3 --time_based \
      --size=$SIZE --write_iops_log=iops --log_avg_msec=100 >/dev/null 2>&1) &
  local fp=$!
  python3 -c "import time; print(time.monotonic())" > "$D/fio0"
  sleep 0.5
  qmp "$D/q.sock" > "$D/times" <<EOF2
{"execute":"qmp_capabilities"}
NOW
{"execute":"block-stream","arguments":{"job-id":"s","device":"top","speed":${DURING_SPEED:-0}}}
WAIT BLOCK_JOB_COMPLETED
EOF2
  wait $fp
  python3 - "$D" "$2" <<'PY'
import glob, sys
d, label = sys.argv[1], sys.argv[2]
t0 = float(open(f'{d}/fio0').read()); a, b = map(float, open(f'{d}/times').read().split())
# fio starts its clock a little after launch; the error is a fraction of one 100 ms interval.
vals = [int(l.split(',')[1]) for f in glob.glob(f'{d}/iops*.log') for l in open(f)
        if a - t0 <= int(l.split(',')[0]) / 1000 - 0.1 and int(l.split(',')[0]) / 1000 <= b - t0]
print(f'{label} during: {sum(vals) / max(len(vals), 1):8.0f} IOPS (mean of {len(vals)} 100 ms intervals inside the stream)')
print(f'{label} stream under fio load: {b - a:.2f} s, {1024 / (b - a):.0f} MiB/s')
PY
  fio_iops "$uri" "$2 after "
  kill $pid; wait $pid 2>/dev/null || true
}
echo "== stream $SIZE fully allocated base into an empty top (no client I/O)"
run_stream qemu-storage-daemon "qsd   "
run_stream "$BLOCKD" "blockd"
echo "== fio 4k randread, iodepth 32, on the export: idle, during an unthrottled stream, after"
fio_phase qemu-storage-daemon "qsd   "
fio_phase "$BLOCKD" "blockd"
