#!/usr/bin/env bash
# Hostile-client floods against blockd (release build) and qemu-storage-daemon, in one run:
# a client pipelines requests and never reads a reply, and we watch the server's RSS and how
# long a second client waits for one 4 KiB read meanwhile (Benchmarks/nbd-flood.py).
#
#   Benchmarks/flood-rss.sh                      # 4,000 x 1 MiB reads, 200,000 zero-length reads
#   SERVERS=blockd Benchmarks/flood-rss.sh
#   BLOCKD=/path/to/other/blockd Benchmarks/flood-rss.sh   # e.g. an older build
#
# Each server is started afresh for each flood, serving the same 1 GiB raw file read-only.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS=${SERVERS:-"blockd qemu-storage-daemon"}
KINDS=${KINDS:-"large zero"}
HOLD=${HOLD:-3}
PY=/usr/bin/python3

for tool in qemu-storage-daemon $PY; do
  command -v "$tool" >/dev/null || { echo "flood-rss.sh: $tool is missing (./scripts/test.sh installs it)" >&2; exit 1; }
done

if [ -z "${BLOCKD:-}" ]; then
  echo "building blockd (release)…" >&2
  swift build -c release --product blockd >&2
  BLOCKD="$(swift build -c release --show-bin-path)/blockd"
fi

work=$(mktemp -d /tmp/flood-rss.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.img
head -c 256M /dev/urandom > "$img"
truncate -s 1G "$img"
sock=$work/nbd.sock

start_server() {
  rm -f "$sock"
  case $1 in
    blockd) "$BLOCKD" serve "$img" --format raw --name disk --read-only --socket "$sock" >/dev/null 2>"$work/$1.log" & ;;
    qemu-storage-daemon)
      qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$img",read-only=on \
        --nbd-server addr.type=unix,addr.path="$sock" \
        --export type=nbd,id=e0,node-name=f0,name=disk,writable=off 2>"$work/$1.log" & ;;
  esac
  server_pid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-22s %-6s %10s %10s %10s %12s %14s %14s\n' server flood sent rss-before rss-peak growth probe-idle probe-during
for kind in $KINDS; do
  for server in $SERVERS; do
    start_server "$server"
    line=$($PY Benchmarks/nbd-flood.py --socket "$sock" --export disk --pid "$server_pid" --kind "$kind" --hold "$HOLD")
    stop_server
    eval "$(echo "$line" | tr ' ' '\n' | sed 's/^/r_/')"
    printf '%-22s %-6s %10s %8s MiB %8s MiB %8s MiB %11s ms %11s ms\n' "$server" "$kind" "$r_requests_sent" \
      "$r_rss_before_mib" "$r_rss_peak_mib" "$r_growth_mib" "$r_probe_idle_ms" "$r_probe_during_ms"
  done
done
