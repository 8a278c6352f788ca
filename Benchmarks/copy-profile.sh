#!/usr/bin/env bash
# Profiles one server during one nbdcopy row of issue 15 (bulk copies: 4 connections,
# 64 × 256 KiB in flight) and prints counts per MiB and per request, which stay comparable
# when the shared machine is busy (throughput does not). Run by hand; see README.md.
#
#   Benchmarks/copy-profile.sh SERVER ROW          SERVER: blockd | nbdkit | qsd | qemu-nbd
#                                                  ROW: raw-out | raw-in | qcow2-out | qcow2-in
#   MODE=count    (default) server CPU per GiB (total and per thread kind), nbdcopy's CPU per
#                 GiB, context switches and page faults per MiB (perf stat software events),
#                 MiB/s; REPEAT runs, fresh server each, medians
#   MODE=strace   syscalls per request (strace -c -f on the server; slows it down, one copy);
#                 STRACE_OUT=FILE keeps strace's table
#   MODE=record   perf record -g on the server (REPEAT copies); prints self time by thread
#                 kind, by category and the TOP=25 symbols; PERF_OUT=FILE keeps perf.data
#                 for `perf report -i FILE -G`
#   TRANSPORT=tcp over 127.0.0.1 instead of a unix socket
#   REPEAT=3 CONNECTIONS=4 THREADS=4 REQUESTS=64 REQUEST_SIZE=262144 SIZE=1G
#   DIR=/var/tmp/blockd-copyprof (images are kept there between runs; KEEP=0 removes them)
#   BLOCKD=.build/release/blockd (built if missing); BLOCKD_ARGS="--workers 4" (extra options)
#
# Rows (as the issue's table):
#   raw-out    nbdcopy RAW-EXPORT null:         (backup pull)
#   raw-in     nbdcopy FILE RAW-EXPORT          (restore into a raw image)
#   qcow2-out  nbdcopy QCOW2-EXPORT null:       (a fully allocated qcow2)
#   qcow2-in   nbdcopy FILE QCOW2-EXPORT        (into an empty qcow2: the allocation path)
#
# nbdcopy runs at most --threads connections, and --threads defaults to the number of
# cores: on a 2-core machine `--connections=4` alone gives 2 connections. THREADS=4 is
# passed so there really are 4.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER=${1:?usage: copy-profile.sh blockd|nbdkit|qsd|qemu-nbd raw-out|raw-in|qcow2-out|qcow2-in}
ROW=${2:?usage: copy-profile.sh SERVER ROW}
MODE=${MODE:-count}
TRANSPORT=${TRANSPORT:-unix}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-4}
THREADS=${THREADS:-$CONNECTIONS}
REQUESTS=${REQUESTS:-64}
REQUEST_SIZE=${REQUEST_SIZE:-262144}
SIZE=${SIZE:-1G}
DIR=${DIR:-/var/tmp/blockd-copyprof}
BLOCKD=${BLOCKD:-.build/release/blockd}
BLOCKD_ARGS=${BLOCKD_ARGS:-}
# Server and client run at this nice level. On a shared machine -20 (needs root) gives the
# benchmark nearly whole CPUs while other work still runs: throughput then reflects the
# servers rather than the neighbours. Empty = no change.
NICE=${NICE:-$([ "$(id -u)" = 0 ] && echo -20)}
N=(); [ -n "$NICE" ] && N=(nice -n "$NICE")
PY=/usr/bin/python3

case $SERVER in blockd|nbdkit|qsd|qemu-nbd) ;; *) echo "copy-profile.sh: unknown server $SERVER" >&2; exit 2 ;; esac
case $ROW in raw-out|raw-in|qcow2-out|qcow2-in) ;; *) echo "copy-profile.sh: unknown row $ROW" >&2; exit 2 ;; esac
if [ "$SERVER" = nbdkit ] && [[ $ROW == qcow2-* ]]; then
  echo "copy-profile.sh: nbdkit 1.32 has no qcow2 plugin" >&2; exit 2
fi
for t in nbdcopy nbdinfo qemu-img perf; do
  command -v "$t" >/dev/null || { echo "copy-profile.sh: $t is missing" >&2; exit 1; }
done
[ "$MODE" = strace ] && { command -v strace >/dev/null || { echo "copy-profile.sh: strace is missing" >&2; exit 1; }; }
if [ "$SERVER" = blockd ] && [ ! -x "$BLOCKD" ]; then
  swift build -c release --product blockd >&2
fi

mkdir -p "$DIR"
RUN=$(mktemp -d /tmp/copyprof.XXXXXX)
SOCK=$RUN/nbd.sock
PORT=$((20000 + RANDOM % 20000))
PID=""
cleanup() {
  [ -n "$PID" ] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; } || true
  rm -rf "$RUN"
  [ "${KEEP:-1}" = 0 ] && rm -rf "$DIR"
  true
}
trap cleanup EXIT

# Images: random data (no holes, no zero detection), created once and kept.
if [ ! -f "$DIR/src-$SIZE.img" ]; then
  echo "creating $SIZE of random data in $DIR…" >&2
  head -c "$SIZE" /dev/urandom > "$DIR/src-$SIZE.img.tmp" && mv "$DIR/src-$SIZE.img.tmp" "$DIR/src-$SIZE.img"
fi
SRC=$DIR/src-$SIZE.img
BYTES=$(stat -c %s "$SRC")
case $ROW in
  raw-out|raw-in)
    [ -f "$DIR/disk-$SIZE.img" ] || cp "$SRC" "$DIR/disk-$SIZE.img"
    IMG=$DIR/disk-$SIZE.img; FMT=raw ;;
  qcow2-out)
    # Written in one sequential pass: host clusters are contiguous (two extents, split by
    # the L2 table in the middle), as after `qemu-img convert`.
    [ -f "$DIR/full-$SIZE.qcow2" ] || qemu-img convert -f raw -O qcow2 "$SRC" "$DIR/full-$SIZE.qcow2"
    IMG=$DIR/full-$SIZE.qcow2; FMT=qcow2 ;;
  qcow2-in)
    IMG=$RUN/empty.qcow2; FMT=qcow2 ;;
esac

if [ "$TRANSPORT" = tcp ]; then URI="nbd://127.0.0.1:$PORT/disk"; else URI="nbd+unix:///disk?socket=$SOCK"; fi

start_server() {
  rm -f "$SOCK"
  local addr
  if [ "$TRANSPORT" = tcp ]; then addr="addr.type=inet,addr.host=127.0.0.1,addr.port=$PORT"
  else addr="addr.type=unix,addr.path=$SOCK"; fi
  case $SERVER in
    blockd)
      # The same command line as qemu-storage-daemon's below (blockd accepts it).
      "${N[@]}" "$BLOCKD" \
        --blockdev "driver=file,node-name=file0,filename=$IMG" \
        --blockdev "driver=$FMT,node-name=disk0,file=file0" \
        --nbd-server "$addr" \
        --export "type=nbd,id=e0,node-name=disk0,name=disk,writable=on" $BLOCKD_ARGS >"$RUN/server.log" 2>&1 & ;;
    nbdkit)
      if [ "$TRANSPORT" = tcp ]; then "${N[@]}" nbdkit --foreground -e disk -i 127.0.0.1 -p "$PORT" file "$IMG" 2>"$RUN/server.log" &
      else "${N[@]}" nbdkit --foreground -e disk -U "$SOCK" file "$IMG" 2>"$RUN/server.log" &
      fi ;;
    qsd)
      "${N[@]}" qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$IMG,cache.direct=off,aio=threads" \
        --blockdev "driver=$FMT,node-name=disk0,file=file0" \
        --nbd-server "$addr" \
        --export "type=nbd,id=e0,node-name=disk0,name=disk,writable=on" >"$RUN/server.log" 2>&1 & ;;
    qemu-nbd)
      if [ "$TRANSPORT" = tcp ]; then
        "${N[@]}" qemu-nbd -t --shared=8 -f $FMT -x disk -b 127.0.0.1 -p "$PORT" --cache=writeback --aio=threads "$IMG" >"$RUN/server.log" 2>&1 &
      else
        "${N[@]}" qemu-nbd -t --shared=8 -f $FMT -x disk -k "$SOCK" --cache=writeback --aio=threads "$IMG" >"$RUN/server.log" 2>&1 &
      fi ;;
  esac
  PID=$!
  for _ in $(seq 400); do
    nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "copy-profile.sh: $SERVER did not start:" >&2; cat "$RUN/server.log" >&2; exit 1
}

stop_server() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=""
}

# Per-thread CPU nanoseconds (schedstat), by thread kind (the name without its number).
thread_ns() {
  for t in /proc/"$PID"/task/*; do
    local comm ns
    comm=$(cat "$t/comm" 2>/dev/null) || continue
    ns=$(cut -d' ' -f1 "$t/schedstat" 2>/dev/null) || continue
    # Event-loop threads keep their number (to see the balance between loops).
    case $comm in *loop*) echo "${t##*/} $(echo "$comm" | tr ' ' _) $ns" ;;
      *) echo "${t##*/} $(echo "$comm" | sed -E 's/[-_ ]?[0-9]+$//' | tr ' ' _) $ns" ;; esac
  done
}
proc_stat() {  # utime+stime ticks and minor faults of the whole process (dead threads included)
  sed -E 's/^.*\) //' "/proc/$PID/stat" | awk '{print $12 + $13, $8}'
}

copy_cmd() {
  local c=("${N[@]}" nbdcopy --connections="$CONNECTIONS" --threads="$THREADS" --requests="$REQUESTS"
           --request-size="$REQUEST_SIZE")
  case $ROW in
    raw-out|qcow2-out) c+=("$URI" null:) ;;
    raw-in|qcow2-in)   c+=("$SRC" "$URI") ;;
  esac
  printf '%s\n' "${c[@]}"
}
copy_once() { mapfile -t cmd < <(copy_cmd); "${cmd[@]}"; }
# Runs the copy and appends the client's CPU seconds (user+sys) to $1.
copy_timed() {
  mapfile -t cmd < <(copy_cmd)
  $PY -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "a").write(f"{u.ru_utime + u.ru_stime}\n")
sys.exit(r.returncode)' "$1" "${cmd[@]}"
}

prepare() {
  # Every run starts with the data in the page cache and no writeback of an earlier run
  # pending (a restore dirties the whole image).
  sync
  if [ "$ROW" = qcow2-in ]; then rm -f "$IMG"; qemu-img create -q -f qcow2 "$IMG" "$BYTES"; fi
  cat "$SRC" > /dev/null
  [ "$ROW" != qcow2-in ] && cat "$IMG" > /dev/null
  true
}

HZ=$(getconf CLK_TCK)
MIB=$((BYTES / 1048576))
NREQ=$((BYTES / REQUEST_SIZE))
echo "copy-profile: $SERVER $ROW $TRANSPORT, $MIB MiB, nbdcopy --connections=$CONNECTIONS --threads=$THREADS --requests=$REQUESTS --request-size=$REQUEST_SIZE, MODE=$MODE, nice ${NICE:-0}, load $(cut -d' ' -f1-3 /proc/loadavg)"

case $MODE in
  count)
    : > "$RUN/times"; : > "$RUN/cpu"; : > "$RUN/threads"; : > "$RUN/client"
    for i in $(seq "$REPEAT"); do
      prepare
      start_server
      read -r c0 f0 < <(proc_stat)
      thread_ns > "$RUN/t0"
      perf stat -x, -e task-clock,context-switches,cpu-migrations,page-faults -p "$PID" -o "$RUN/perf.$i" &
      ppid=$!
      sleep 0.1
      t0=$(date +%s.%N); copy_timed "$RUN/client"; t1=$(date +%s.%N)
      read -r c1 f1 < <(proc_stat)
      thread_ns > "$RUN/t1"
      kill -INT "$ppid"; wait "$ppid" 2>/dev/null || true
      echo "$t0 $t1" >> "$RUN/times"
      echo "$((c1 - c0)) $((f1 - f0))" >> "$RUN/cpu"
      # CPU per thread kind during the copy (threads born during it count from 0).
      awk 'NR == FNR { a[$1] = $3; next } { d[$2] += $3 - ($1 in a ? a[$1] : 0) } END { for (k in d) printf "%s %.0f\n", k, d[k] }' \
        "$RUN/t0" "$RUN/t1" >> "$RUN/threads"
      stop_server
    done
    $PY - "$RUN" "$REPEAT" "$MIB" "$HZ" "$NREQ" "$(cut -d' ' -f1 /proc/loadavg)" <<'PYEOF'
import sys, statistics, collections
run, rep, mib, hz, nreq, load = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
times = [float(b) - float(a) for a, b in (l.split() for l in open(f"{run}/times"))]
cpu = [tuple(map(int, l.split())) for l in open(f"{run}/cpu")]
perf = collections.defaultdict(list)
for i in range(1, rep + 1):
    for line in open(f"{run}/perf.{i}"):
        parts = line.strip().split(",")
        if len(parts) < 3 or not parts[0] or parts[0].startswith("<"): continue
        perf[parts[2]].append(float(parts[0]))
threads = collections.defaultdict(int)
for l in open(f"{run}/threads"):
    k, v = l.rsplit(" ", 1); threads[k] += int(v)
task_ns = sum(perf["task-clock"]) * 1e6  # msec -> ns, all runs
total_ticks = sum(c for c, _ in cpu)
rates = sorted(mib / t for t in times)
med = statistics.median
print(f"  MiB/s            {med(rates):8.0f}   (runs: {' '.join(f'{r:.0f}' for r in rates)})")
print(f"  CPU ms per GiB   {total_ticks / rep / hz * 1000 * 1024 / mib:8.0f}   (server utime+stime; task-clock {med(perf['task-clock']) * 1024 / mib:.0f} ms)")
# Shares of the CPU the threads alive at the end used (schedstat); threads that exited
# during the copy (nbdkit's per-connection threads) are missing from it.
alive = sum(threads.values())
kinds = ", ".join(f"{k} {100 * v / max(alive, 1):.0f}%" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v > alive / 200)
if alive < task_ns / 2: kinds = f"(most CPU was used by threads that exited) {kinds}"
print(f"  CPU by thread    {kinds}")
client = [float(l) for l in open(f"{run}/client")]
print(f"  client CPU/GiB   {med(client) * 1000 * 1024 / mib:8.0f}   (nbdcopy user+sys, ms)")
print(f"  ctx switches/MiB {med(perf['context-switches']) / mib:8.1f}   ({med(perf['context-switches']) / nreq:.2f} per request)")
print(f"  migrations/MiB   {med(perf['cpu-migrations']) / mib:8.2f}")
print(f"  page faults/MiB  {med(perf['page-faults']) / mib:8.2f}   ({med(perf['page-faults']) / nreq:.3f} per request)")
print(f"  load average     {load}")
PYEOF
    ;;
  strace)
    prepare
    start_server
    strace -c -f -q -p "$PID" -o "$RUN/strace.txt" &
    spid=$!
    sleep 1
    copy_once
    sleep 0.2
    kill -INT "$spid"; wait "$spid" 2>/dev/null || true
    if [ -n "${STRACE_OUT:-}" ]; then cp "$RUN/strace.txt" "$STRACE_OUT"; fi
    stop_server
    $PY - "$RUN/strace.txt" "$NREQ" <<'PYEOF'
import sys
path, nreq = sys.argv[1], int(sys.argv[2])
rows = []
for line in open(path):
    p = line.split()
    if len(p) >= 5 and p[0][0].isdigit() and p[-1] not in ("total",):
        calls = int(p[3]); errors = int(p[4]) if len(p) == 6 else 0
        rows.append((p[-1], calls, errors, float(p[1])))
total = sum(r[1] for r in rows)
print(f"  requests {nreq}; syscalls per request {total / nreq:.2f} (strace -c -f; the wait of sleeping calls is not CPU)")
for name, calls, errors, secs in sorted(rows, key=lambda r: -r[1])[:14]:
    err = f"  ({errors / nreq:.2f} failed)" if errors else ""
    print(f"    {name:18} {calls / nreq:7.2f} per request{err}")
PYEOF
    ;;
  record)
    prepare
    start_server
    perf record -q -F 1999 -g -p "$PID" -o "$RUN/perf.data" 2>/dev/null &
    rpid=$!
    sleep 0.5
    for i in $(seq "$REPEAT"); do copy_once; done
    kill -INT "$rpid"; wait "$rpid" 2>/dev/null || true
    stop_server
    # Self time per (thread kind, symbol), and by broad category.
    perf report -i "$RUN/perf.data" --no-children --sort comm,dso,sym --stdio -g none --percent-limit 0 2>/dev/null |
      $PY -c '
import sys, re, collections
rules = [("kernel copy to user (pread, recv)", r"copy_page_to_iter|_copy_to_iter|copy_user_generic|rep_movs"),
         ("kernel copy from user (send, pwrite)", r"_copy_from_iter|copy_page_from_iter|copy_folio_from_iter|skb_copy_datagram_from_iter"),
         ("filesystem, page cache", r"ext4|filemap_|folio|xas_|mark_buffer|jbd2|block_write|generic_perform_write|rwsem"),
         ("socket buffers (skb alloc/free)", r"skb|sock_|unix_stream|__alloc_pages|get_page_from_freelist|free_unref|__free_pages|free_frozen|slab|kmem_cache|kmalloc|kfree|memcg|obj_cgroup|tcp_"),
         ("user memcpy/memmove", r"memcpy|memmove"),
         ("memset, zero checks, page clearing", r"memset|isAllZero|clear_page"),
         ("malloc/free, refcounting", r"malloc|free|_int_|memalign|swift_allocObject|swift_release|swift_retain|swift_slowAlloc|swift_bridgeObject"),
         ("user-space locks (spinning)", r"lockSlow|lll_lock|pthread_mutex"),
         ("wakeups, futex, scheduler", r"futex|schedule|_raw_spin|try_to_wake_up|finish_task_switch|native_queued|update_|enqueue_|dequeue_|select_task|pick_next|ttwu|pthread_cond"),
         ("page faults, mmap", r"page_fault|handle_mm_fault|do_anonymous|filemap_map|zap_|unmap|mmap|vma|do_user_addr_fault|lru"),
         ("epoll/eventfd", r"epoll|eventfd|ep_"),
         ("syscall entry/exit", r"entry_SYSCALL|syscall_return|do_syscall|syscall_exit|__x64_sys|srso|retbleed|clear_bhb")]
cats = collections.Counter(); kinds = collections.Counter(); syms = collections.Counter()
for line in sys.stdin:
    m = re.match(r"\s*([0-9.]+)%\s+(\S+)\s+(\S+)\s+\[(.)\]\s+(.*\S)", line)
    if not m: continue
    pct, comm, dso, space, sym = float(m[1]), m[2], m[3], m[4], m[5]
    kind = re.sub(r"[-_]?[0-9]+$", "", comm)
    kinds[kind] += pct; syms[(kind, sym)] += pct
    for name, rx in rules:
        if re.search(rx, sym): cats[name] += pct; break
    else: cats["other (" + ("kernel" if space == "k" else "user") + ")"] += pct
print("  self time by thread kind: " + ", ".join(f"{k} {v:.0f}%" for k, v in kinds.most_common()))
print("  by category:")
for k, v in cats.most_common(): print(f"    {k:38} {v:5.1f}%")
print("  top symbols (thread kind, self %):")
for (k, s), v in syms.most_common(int(sys.argv[1]) if len(sys.argv) > 1 else 25): print(f"    {v:5.1f}%  {k:16} {s[:90]}")
' "${TOP:-25}"
    if [ -n "${PERF_OUT:-}" ]; then cp "$RUN/perf.data" "$PERF_OUT"; fi
    ;;
  *) echo "copy-profile.sh: unknown MODE $MODE" >&2; exit 2 ;;
esac
