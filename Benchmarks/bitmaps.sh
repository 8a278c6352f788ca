#!/bin/sh
# Dirty bitmap benchmark, blockd vs qemu-storage-daemon (run by hand, release build):
#   swift build -c release && Benchmarks/bitmaps.sh
# 1) nbdinfo --map=qemu:dirty-bitmap:b0 on a 1 TiB qcow2 with N scattered dirty 64 KiB extents
#    (the bitmap is made persistent with qemu-img/qemu-io, so both daemons load the same bits);
# 2) RSS with ten such bitmaps (N=100000);
# 3) 4 KiB random writes (fio, nbd engine) with a persistent bitmap vs none.
set -eu
BLOCKD=${BLOCKD:-$(dirname "$0")/../.build/release/blockd}
QSD=${QSD:-qemu-storage-daemon}
T=$(mktemp -d); trap 'kill $PID 2>/dev/null || true; rm -rf "$T"' EXIT
PID=
start() { # $1 = daemon, $2 = image, $3 = bitmaps (colon list) or ""
    rm -f "$T/n.sock"
    if [ -n "$3" ]; then ex=",bitmaps.0=$3"; else ex=""; fi
    "$1" --blockdev driver=file,filename="$2",node-name=f --blockdev driver=qcow2,file=f,node-name=n0 \
         --nbd-server addr.type=unix,addr.path="$T/n.sock" --export type=nbd,id=e,node-name=n0,writable=on$ex 2>/dev/null &
    PID=$!
    while [ ! -S "$T/n.sock" ]; do sleep 0.05; done; sleep 0.2
}
stop() { kill $PID; wait $PID 2>/dev/null || true; PID=; }
# The daemon's user+system CPU so far, in ms (nbdinfo's own printing dominates the wall time).
cpu_ms() { awk -v hz=$(getconf CLK_TCK) '{ print int(($14 + $15) * 1000 / hz) }' /proc/$PID/stat; }
ms() { a=$(date +%s%N); "$@" >/dev/null; b=$(date +%s%N); echo $(( (b - a) / 1000000 )); }
make_image() { # $1 = path, $2 = extents, $3 = bitmaps
    qemu-img create -f qcow2 "$1" 1T >/dev/null
    python3 - "$1" "$2" "$3" <<'PY'
import random, subprocess, sys
path, n, nb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(nb):
    subprocess.run(["qemu-img", "bitmap", "--add", path, "b%d" % i], check=True)
random.seed(1)
cmds = []
for off in random.sample(range((1 << 40) // 65536), n):
    cmds += ["-c", "write -z %d 64k" % (off * 65536)]
for i in range(0, len(cmds), 20000):
    subprocess.run(["qemu-io"] + cmds[i:i + 20000] + [path], check=True, stdout=subprocess.DEVNULL)
PY
}
for n in 1000 100000; do
    make_image "$T/a.qcow2" $n 1
    for d in "$BLOCKD" "$QSD"; do
        cp --sparse=always "$T/a.qcow2" "$T/b.qcow2"
        start "$d" "$T/b.qcow2" b0
        c0=$(cpu_ms); best=999999
        for i in 1 2 3 4 5; do t=$(ms nbdinfo --map=qemu:dirty-bitmap:b0 "nbd+unix:///n0?socket=$T/n.sock"); [ $t -lt $best ] && best=$t; done
        c1=$(cpu_ms)
        echo "map $n extents: $(basename $d): best ${best} ms, server CPU $(( (c1 - c0) / 5 )) ms/map"
        stop
    done
done
make_image "$T/a.qcow2" 100000 10
for d in "$BLOCKD" "$QSD"; do
    cp --sparse=always "$T/a.qcow2" "$T/b.qcow2"
    start "$d" "$T/b.qcow2" ""
    echo "RSS with 10 bitmaps x 100000 extents: $(basename $d): $(awk '/VmRSS/ {print $2}' /proc/$PID/status) KiB"
    stop
done
if command -v fio >/dev/null; then
    for mode in none persistent; do
        qemu-img create -f qcow2 "$T/w.qcow2" 8G >/dev/null
        qemu-io -c "write -P 1 0 8G" "$T/w.qcow2" >/dev/null   # allocated: measure the bitmap, not allocation
        [ $mode = persistent ] && qemu-img bitmap --add "$T/w.qcow2" b0
        start "$BLOCKD" "$T/w.qcow2" ""
        fio --name=w --ioengine=nbd --uri="nbd+unix:///n0?socket=$T/n.sock" --rw=randwrite --bs=4k --iodepth=16 \
            --size=8G --time_based --runtime=${RUNTIME:-15} --numjobs=1 --group_reporting 2>/dev/null | grep -E "IOPS" | sed "s/^/$mode: /"
        stop
    done
fi
