#!/usr/bin/env bash
# Crash leaks: kill -9 a server while fio writes through it, ROUNDS times on one qcow2 image
# (64 KiB clusters, never repaired in between), and count the leaked clusters `qemu-img
# check` reports after each crash, for blockd and qemu-storage-daemon run the same way.
# Run by hand (not in CI):
#
#   swift build -c release && Benchmarks/crash-leaks.sh
#   ROUNDS=10 SERVERS=blockd Benchmarks/crash-leaks.sh
#
# Workload per round: fio 4 KiB random writes, QD16, an fsync every 32 writes (so metadata
# is written back while writes are in flight), over a 1 GiB image; kill -9 after a random
# 0.3-1.3 s. Prints, per server: total leaked clusters, the largest leak of one crash, the
# clusters in use at the end (a faster server allocates more in the same time) and the file size.
set -euo pipefail
cd "$(dirname "$0")/.."

BLOCKD=${BLOCKD:-.build/release/blockd}
ROUNDS=${ROUNDS:-30}
SERVERS=${SERVERS:-"blockd qsd"}
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/blockd-leaks.XXXXXX")
SOCK=$DIR/nbd.sock
PID=""
trap 'if [ -n "$PID" ]; then kill -9 "$PID" 2>/dev/null || true; fi; rm -rf "$DIR"' EXIT

for t in fio qemu-img qemu-storage-daemon; do
  command -v "$t" >/dev/null || { echo "crash-leaks.sh: $t is missing" >&2; exit 1; }
done
[ -x "$BLOCKD" ] || { echo "crash-leaks.sh: $BLOCKD not built (swift build -c release)" >&2; exit 1; }

wait_socket() {
  for _ in $(seq 1 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "crash-leaks.sh: server did not create $SOCK" >&2; cat "$DIR/server.log" >&2; exit 1
}

leaks() {
  # "N leaked clusters were found on the image." (absent when there are none); exit 2 = corrupt.
  local out rc=0
  out=$(qemu-img check "$1" 2>&1) || rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then echo "crash-leaks.sh: qemu-img check: $rc" >&2; echo "$out" >&2; exit 1; fi
  echo "$out" | sed -n 's/^\([0-9]*\) leaked clusters were found.*/\1/p' | grep . || echo 0
}

for server in $SERVERS; do
  image=$DIR/$server.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$image" 1G
  before=0
  worst=0
  for round in $(seq 1 "$ROUNDS"); do
    rm -f "$SOCK"
    case $server in
      blockd)
        "$BLOCKD" --blockdev "driver=file,node-name=f0,filename=$image" \
          --blockdev "driver=qcow2,node-name=d0,file=f0" \
          --nbd-server "addr.type=unix,addr.path=$SOCK" \
          --export "type=nbd,id=e0,node-name=d0,name=disk,writable=on" >"$DIR/server.log" 2>&1 &
        PID=$! ;;
      qsd)
        qemu-storage-daemon --blockdev "driver=file,node-name=f0,filename=$image" \
          --blockdev "driver=qcow2,node-name=d0,file=f0" \
          --nbd-server "addr.type=unix,addr.path=$SOCK" \
          --export "type=nbd,id=e0,node-name=d0,name=disk,writable=on" >"$DIR/server.log" 2>&1 &
        PID=$! ;;
    esac
    wait_socket
    # fio in a process group of its own: its job processes go down with it.
    setsid fio --name=w --ioengine=nbd --uri="nbd+unix:///disk?socket=$SOCK" --rw=randwrite --bs=4k \
        --iodepth=16 --size=1G --fsync=32 --time_based --runtime=30 --norandommap --randrepeat=0 \
        >"$DIR/fio.out" 2>&1 &
    FIO=$!
    sleep "$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 0.3 + r / 32768 }')"
    kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    kill -9 -- -"$FIO" 2>/dev/null || true; wait "$FIO" 2>/dev/null || true
    now=$(leaks "$image")
    delta=$((now - before))
    [ $delta -gt $worst ] && worst=$delta
    before=$now
  done
  size=$(stat -c %s "$image")
  used=$(qemu-img check "$image" 2>&1 | sed -n 's#^\([0-9]*\)/[0-9]* = .* allocated.*#\1#p' || true)
  printf '%-7s rounds %3d  leaked clusters %5d (%d MiB)  worst crash %3d  in use %6s  file %d MiB\n' \
    "$server" "$ROUNDS" "$before" $((before * 64 / 1024)) "$worst" "${used:-?}" $((size >> 20))
done
