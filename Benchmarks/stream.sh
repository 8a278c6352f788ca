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
fio_iops() { # uri label
  fio --name=r --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 --runtime=${FIO_TIME:-5} --time_based --size=$SIZE \
      --output-format=json 2>/dev/null | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]['read']; print(f'$2: {j[\"iops\"]:.0f} IOPS, p99 {j[\"clat_ns\"][\"percentile\"][\"99.000000\"]/1000:.0f} us')"
}
echo "== stream $SIZE fully allocated base into an empty top"
run_stream qemu-storage-daemon "qsd   "
run_stream "$BLOCKD" "blockd"
echo "== fio 4k randread on blockd's export: idle, during stream, after"
make_chain; sync
rm -f "$D/q.sock"
"$BLOCKD" --chardev socket,path="$D/q.sock",server=on,wait=off,id=c --monitor chardev=c \
     --nbd-server addr.type=unix,addr.path="$D/nbd.sock" >/dev/null 2>&1 &
BP=$!
qmp "$D/q.sock" <<EOF2
{"execute":"qmp_capabilities"}
{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"}}}
{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"top","writable":true}}
EOF2
URI="nbd+unix:///top?socket=$D/nbd.sock"
fio_iops "$URI" "idle  "
qmp "$D/q.sock" <<EOF2 &
{"execute":"qmp_capabilities"}
{"execute":"block-stream","arguments":{"job-id":"s","device":"top","speed":${DURING_SPEED:-134217728}}}
WAIT BLOCK_JOB_COMPLETED
EOF2
SP=$!
sleep 0.3
fio_iops "$URI" "during"
wait $SP
fio_iops "$URI" "after "
kill $BP
