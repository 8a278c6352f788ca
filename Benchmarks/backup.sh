#!/usr/bin/env bash
# Point-in-time backup benchmark, blockd vs qemu-storage-daemon in one run (docs/backup.md):
#  1. fio 4 KiB random writes (iodepth 32) on the disk's export, no backup: IOPS and p99;
#  2. the same fio while a pull-mode full backup of the 1 GiB disk runs (transaction: new
#     bitmap + blockdev-backup sync=none, snapshot-access, nbdcopy of the snapshot to null:):
#     the pull's throughput (nbdcopy's time; the QMP start, python included, shown apart),
#     and fio's IOPS and p99 while nbdcopy runs;
#  3. push mode: blockdev-backup sync=full to a local qcow2, no client I/O.
# Usage: Benchmarks/backup.sh [path/to/blockd]     (SIZE=1G, FIO_TIME=…, PHASES="idle pull push" to change)
set -euo pipefail
BLOCKD=${1:-$(dirname "$0")/../.build/release/blockd}
SIZE=${SIZE:-1G}
D=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$D"' EXIT
cat > "$D/qmp.py" <<'PY'
import socket, sys, json, time
s = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try: s.connect(sys.argv[1]); break
    except OSError: time.sleep(0.05)
f = s.makefile('rwb'); f.readline()
seen = []   # events that arrived while waiting for a reply
def cmd(m):
    f.write((json.dumps(m) + '\n').encode()); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'event' not in r: return r
        seen.append(r['event'])
cmd({'execute': 'qmp_capabilities'})   # every run of this script is a new monitor connection
for line in sys.stdin.read().split('\n'):
    if not line.strip(): continue
    if line.startswith('WAIT '):
        ev = line.split()[1]
        while ev not in seen:
            seen.append(json.loads(f.readline()).get('event'))
        seen.remove(ev)
        print(time.monotonic()); continue
    if line.startswith('NOW'): print(time.monotonic()); continue
    r = cmd(json.loads(line))
    if 'error' in r: print(r, file=sys.stderr); sys.exit(1)
PY
qmp() { python3 "$D/qmp.py" "$D/q.sock"; }   # JSON lines (or WAIT EVENT / NOW) on stdin
now() { python3 -c "import time; print(time.monotonic())"; }

make_images() {
  rm -f "$D"/*.qcow2
  qemu-img create -q -f qcow2 "$D/disk.qcow2" "$SIZE"
  qemu-io -f qcow2 -c "write -P 7 0 $SIZE" "$D/disk.qcow2" >/dev/null
  qemu-img create -q -f qcow2 "$D/fl.qcow2" "$SIZE"
  qemu-img create -q -f qcow2 "$D/target.qcow2" "$SIZE"
  # Every daemon starts from the same page cache: the disk cached, nothing else dirty.
  sync; cat "$D/disk.qcow2" > /dev/null
}

start_daemon() { # binary
  rm -f "$D/q.sock" "$D/nbd.sock"
  "$1" --chardev socket,path="$D/q.sock",server=on,wait=off,id=c --monitor chardev=c \
       --nbd-server addr.type=unix,addr.path="$D/nbd.sock" >"$D/daemon.log" 2>&1 &
  DPID=$!
  qmp <<EOF
{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"disk0","file":{"driver":"file","filename":"$D/disk.qcow2"}}}
{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"fl","file":{"driver":"file","filename":"$D/fl.qcow2"}}}
{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"tgt","file":{"driver":"file","filename":"$D/target.qcow2"}}}
{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"disk0","writable":true}}
EOF
}
stop_daemon() { kill "$DPID"; wait "$DPID" 2>/dev/null || true; }

FIO_TIME=${FIO_TIME:-8}
fio_writes() { # runtime  → fio with a per-I/O latency log and a 100 ms IOPS log in $D
  rm -f "$D"/lat*.log "$D"/iops*.log
  (cd "$D" && fio --name=w --ioengine=nbd --uri="nbd+unix:///disk0?socket=$D/nbd.sock" --rw=randwrite --bs=4k \
      --iodepth=32 --runtime="$1" --time_based --size="$SIZE" --randrepeat=0 \
      --write_lat_log=lat --write_iops_log=iops --log_avg_msec=100 --output-format=json >"$D/fio.json" 2>/dev/null)
}

# fio's IOPS and p99 completion latency between two monotonic times (fio started at $3).
window_stats() { # from to fio-start label
  python3 - "$D" "$1" "$2" "$3" "$4" <<'PY'
import glob, sys
d, a, b, t0, label = sys.argv[1], *map(float, sys.argv[2:5]), sys.argv[5]
lo, hi = (a - t0) * 1000, (b - t0) * 1000
iops = [int(l.split(',')[1]) for f in glob.glob(f'{d}/iops*iops*.log') for l in open(f)
        if lo <= int(l.split(',')[0]) - 100 and int(l.split(',')[0]) <= hi]
lat = sorted(int(l.split(',')[1]) for f in glob.glob(f'{d}/lat*clat*.log') for l in open(f)
             if lo <= int(l.split(',')[0]) <= hi)
p99 = lat[int(len(lat) * 0.99)] / 1000 if lat else 0
print(f'{label}: {sum(iops) / max(len(iops), 1):8.0f} IOPS, p99 {p99:6.0f} us  ({len(iops)} x 100 ms)')
PY
}

idle_phase() { # binary label
  make_images; start_daemon "$1"
  local t0; t0=$(now)
  fio_writes "$FIO_TIME"
  local t1; t1=$(now)
  window_stats "$(python3 -c "print($t0 + 1)")" "$t1" "$t0" "$2 fio writes, no backup   "
  stop_daemon
}

pull_phase() { # binary label
  make_images; start_daemon "$1"
  local t0; t0=$(now)
  fio_writes "$FIO_TIME" &
  local fp=$!
  sleep 1
  local a; a=$(now)
  qmp <<EOF
{"execute":"transaction","arguments":{"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"disk0","name":"b1"}},{"type":"blockdev-backup","data":{"job-id":"fleece","device":"disk0","target":"fl","sync":"none","filter-node-name":"fl-cbw"}}]}}
{"execute":"blockdev-add","arguments":{"driver":"snapshot-access","node-name":"snap","file":"fl-cbw"}}
{"execute":"block-export-add","arguments":{"type":"nbd","id":"bk","node-name":"snap","name":"bk"}}
EOF
  local m; m=$(now)
  nbdcopy "nbd+unix:///bk?socket=$D/nbd.sock" null:
  local b; b=$(now)
  { qmp <<EOF
{"execute":"block-export-del","arguments":{"id":"bk"}}
{"execute":"blockdev-del","arguments":{"node-name":"snap"}}
{"execute":"block-job-cancel","arguments":{"device":"fleece"}}
WAIT BLOCK_JOB_CANCELLED
{"execute":"blockdev-del","arguments":{"node-name":"fl"}}
EOF
  } >/dev/null
  wait $fp
  python3 -c "import sys; a,m,b=map(float,sys.argv[1:4]); print(f'$2 pull backup under fio:     {b-m:5.2f} s, {($SIZE_MIB)/(b-m):6.0f} MiB/s  (start over QMP {m-a:4.2f} s)')" "$a" "$m" "$b"
  window_stats "$m" "$b" "$t0" "$2 fio writes during backup"
  [ "$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]) < $FIO_TIME - 1)" "$t0" "$b")" = True ] ||
    echo "   (the backup outlasted fio: raise FIO_TIME)"
  stop_daemon
}

push_phase() { # binary label
  make_images; start_daemon "$1"
  local t
  t=$(qmp <<EOF
NOW
{"execute":"blockdev-backup","arguments":{"job-id":"push","device":"disk0","target":"tgt","sync":"full"}}
WAIT BLOCK_JOB_COMPLETED
EOF
)
  python3 -c "import sys; a,b=map(float,sys.argv[1:3]); print(f'$2 push backup sync=full:       {b-a:5.2f} s, {($SIZE_MIB)/(b-a):6.0f} MiB/s')" $t
  stop_daemon
  qemu-img compare -q "$D/disk.qcow2" "$D/target.qcow2" || echo "   $2: push target differs from the disk!"
}

SIZE_MIB=$(python3 -c "
s='$SIZE'; u={'K':1/1024,'M':1,'G':1024,'T':1024*1024}
print(int(float(s[:-1])*u[s[-1]]) if s[-1] in u else int(s)//(1<<20))")
echo "== $(uptime)"
echo "== $SIZE qcow2 disk, fio 4k randwrite iodepth 32 on its export; backup: nbdcopy of the snapshot to null:"
for phase in ${PHASES:-idle pull push}; do
  "${phase}_phase" qemu-storage-daemon "qsd   "
  "${phase}_phase" "$BLOCKD" "blockd"
done
echo "== $(uptime)"
