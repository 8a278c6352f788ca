#!/usr/bin/env bash
# Compressed writes: nbdcopy of a 1 GiB mostly-compressible raw image into an NBD export of a
# `compress` filter over an empty qcow2, blockd against qemu-storage-daemon, same graph:
#
#   --blockdev file → qcow2 → compress, --export type=nbd,node-name=<compress>,writable=on
#
# Run by hand (not in CI):
#
#   swift build -c release --product blockd && Benchmarks/compress.sh
#   TYPES="zlib" SERVERS="blockd" Benchmarks/compress.sh      # a subset
#
# The source is 14 × 64 MiB of text (random words), 64 MiB of random bytes (incompressible:
# stored uncompressed) and 64 MiB of zeroes (nbdcopy sends them as zero requests). Printed per
# server: copy throughput (MiB/s of the 1 GiB), server CPU seconds (user+system), final image
# size, and whether `qemu-img check` is clean.
set -euo pipefail
cd "$(dirname "$0")/.."

BLOCKD=${BLOCKD:-.build/release/blockd}
TYPES=${TYPES:-"zlib zstd"}
SERVERS=${SERVERS:-"blockd qsd"}
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/blockd-compress.XXXXXX")
SOCK=$DIR/nbd.sock
PID=""
trap 'stop_server; rm -rf "$DIR"' EXIT

for t in nbdcopy qemu-img qemu-storage-daemon python3; do
  command -v "$t" >/dev/null || { echo "compress.sh: $t is missing" >&2; exit 1; }
done
[ -x "$BLOCKD" ] || { echo "compress.sh: $BLOCKD not built (swift build -c release)" >&2; exit 1; }

stop_server() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
  fi
  rm -f "$SOCK"
}

start_server() {  # SERVER IMAGE
  local args=(--blockdev "driver=file,node-name=f0,filename=$2"
              --blockdev "driver=qcow2,node-name=q0,file=f0"
              --blockdev "driver=compress,node-name=c0,file=q0"
              --nbd-server "addr.type=unix,addr.path=$SOCK"
              --export "type=nbd,id=e0,node-name=c0,name=c,writable=on")
  case $1 in
    blockd) "$BLOCKD" "${args[@]}" >"$DIR/server.log" 2>&1 & PID=$! ;;
    qsd) qemu-storage-daemon "${args[@]}" >"$DIR/server.log" 2>&1 & PID=$! ;;
  esac
  for _ in $(seq 1 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "compress.sh: $1 did not create $SOCK" >&2; cat "$DIR/server.log" >&2; exit 1
}

cpu_seconds() {  # PID -> utime+stime in seconds
  python3 -c "
import os, sys
f = open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')', 1)[1].split()
print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))" "$1"
}

echo "making the 1 GiB source ..." >&2
python3 - "$DIR/source.raw" <<'EOF'
import random, sys
rng = random.Random(7)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
text = bytearray()
while len(text) < 64 << 20:
    text += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
text = bytes(text[:64 << 20])
with open(sys.argv[1], "wb") as f:
    for i in range(16):
        if i == 5: f.write(rng.randbytes(64 << 20))
        elif i == 11: f.write(bytes(64 << 20))
        else: f.write(text)
EOF
cat "$DIR/source.raw" >/dev/null

printf "%-5s %-8s %9s %8s %12s %7s\n" type server MiB/s cpu-s "image bytes" check
for type in $TYPES; do
  for s in $SERVERS; do
    img=$DIR/$s-$type.qcow2
    rm -f "$img"
    qemu-img create -q -f qcow2 -o compression_type="$type" "$img" 1G
    sync
    start_server "$s" "$img"
    c0=$(cpu_seconds "$PID")
    t0=$(date +%s.%N)
    check=clean
    if ! nbdcopy "$DIR/source.raw" "nbd+unix:///c?socket=$SOCK"; then
      check=COPY-FAILED
      echo "--- $s log:" >&2; cat "$DIR/server.log" >&2
    fi
    t1=$(date +%s.%N)
    c1=$(cpu_seconds "$PID" 2>/dev/null || echo 0)
    stop_server
    qemu-img check -q "$img" || check=FAILED
    qemu-img compare -q -f raw -F qcow2 "$DIR/source.raw" "$img" || check="$check,DIFFERS"
    python3 -c "import sys; t0,t1,c0,c1=map(float,sys.argv[1:5]); print('%-5s %-8s %9.0f %8.1f %12s %7s' % (sys.argv[5], sys.argv[6], 1024/(t1-t0), c1-c0, sys.argv[7], sys.argv[8]))" \
      "$t0" "$t1" "$c0" "$c1" "$type" "$s" "$(stat -c %s "$img")" "$check"
    rm -f "$img"
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
