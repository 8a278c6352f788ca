#!/usr/bin/env bash
# Regenerates the seed corpora in Fuzz/Corpus/ from real clients and real images:
#   nbd/   client byte streams of nbdinfo, qemu-io, qemu-img, nbdcopy, libnbd and fio sessions
#          against blockd, captured by capture.py, plus a few hand-made option sequences;
#   qcow2/ small images made by qemu-img/qemu-io (512-byte clusters keep them to a few KiB),
#          each behind the harness's 8-byte prefix (open mode, seed);
#   qmp/   QMP sessions over the sandbox's images, and the raw stream of qmp_protocol_check.py.
# Needs a built blockd (swift build) and the tools scripts/test.sh installs. The output is
# committed; run this again when the harness's input format changes.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ=$(pwd)
BLOCKD=${BLOCKD:-$(cd .. && swift build --show-bin-path)/blockd}
PY=/usr/bin/python3              # libnbd's bindings are built for it
work=$(mktemp -d /tmp/blockd-corpus-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
rm -rf Corpus/nbd Corpus/qcow2 Corpus/qmp
mkdir -p Corpus/nbd Corpus/qcow2 Corpus/qmp

wait_socket() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1"; exit 1; }

# ---------------------------------------------------------------- NBD
# Exports like the harness's: "" (with qemu:dirty-bitmap:b0), "ro", "disk"; 256 KiB each.
qemu-img create -q -f qcow2 "$work/n0.qcow2" 256K
qemu-img bitmap --add "$work/n0.qcow2" b0
qemu-io -f qcow2 -c 'write -P 0x11 0 64k' "$work/n0.qcow2" >/dev/null
head -c 262144 /dev/urandom > "$work/disk.raw"
"$BLOCKD" --blockdev "driver=file,node-name=f0,filename=$work/n0.qcow2" --blockdev driver=qcow2,node-name=n0,file=f0 \
  --blockdev "driver=file,node-name=f1,filename=$work/disk.raw" --blockdev driver=raw,node-name=disk,file=f1 \
  --blockdev driver=null-co,node-name=ro,size=263680 \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
  --export type=nbd,id=e0,node-name=n0,name=,writable=on,bitmaps=b0 \
  --export type=nbd,id=e1,node-name=ro,name=ro \
  --export type=nbd,id=e2,node-name=disk,name=disk,writable=on 2>"$work/blockd.log" &
pids+=($!)
wait_socket "$work/nbd.sock"
CAPTURE_LIMIT=16384 python3 capture.py "$work/proxy.sock" "$work/nbd.sock" Corpus/nbd session &
pids+=($!)
wait_socket "$work/proxy.sock"
S="socket=$work/proxy.sock"
D="nbd+unix:///disk?$S"
nbdinfo --list "nbd+unix:///?$S" >/dev/null
nbdinfo --json "$D" >/dev/null
nbdinfo --map "$D" >/dev/null
nbdinfo --map=qemu:allocation-depth "$D" >/dev/null
nbdinfo --map=qemu:dirty-bitmap:b0 "nbd+unix:///?$S" >/dev/null
nbdinfo "nbd+unix:///ro?$S" >/dev/null
qemu-io -f raw -c 'read 0 4k' -c 'write -P 0x5a 4k 4k' -c 'write -z 8k 8k' -c 'discard 16k 4k' -c 'flush' \
  -c 'read -P 0x5a 4k 4k' -c 'write -z -u 64k 4k' -c 'write -f 128k 512' "$D" >/dev/null
qemu-io -f raw -c 'aio_write -P 1 0 512' -c 'aio_write -P 2 512 512' -c 'aio_flush' -c 'readv 0 512 512' "$D" >/dev/null
qemu-io -r -f raw -c 'read 0 64k' -c 'read 200k 56k' "nbd+unix:///ro?$S" >/dev/null
qemu-img info "$D" >/dev/null
qemu-img map --output=json "$D" >/dev/null
qemu-img map --output=json --image-opts "driver=nbd,server.type=unix,server.path=$work/proxy.sock,export=,x-dirty-bitmap=qemu:dirty-bitmap:b0" >/dev/null
head -c 16384 /dev/urandom > "$work/src.raw"
nbdcopy --request-size=4096 "$work/src.raw" "$D"
nbdcopy --request-size=65536 "$D" "$work/copy.raw"
$PY -m nbd -u "$D" -c '
h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)
h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
h.cache(65536, 0)
h.trim(4096, 12288)
h.flush()
h.pread(1024, 100)
' 2>/dev/null || true
$PY -m nbd -c '
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri("'"$D"'")
h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
h.block_status(262144, 0, lambda *a: 0)
'
$PY -m nbd -c '
h.set_opt_mode(True)
h.connect_uri("nbd+unix:///?'"$S"'")
h.opt_list(lambda *a: 0)
h.opt_list_meta_context(lambda *a: 0)
h.set_export_name("ro")
h.opt_info()
h.set_export_name("disk")
h.opt_go()
h.pread(512, 0)
h.shutdown()
'
fio --name=w --ioengine=nbd --uri="$D" --rw=randrw --bs=4k --size=64k --number_ios=16 --iodepth=4 \
  --output=/dev/null >/dev/null 2>&1 || true
sleep 0.5   # let the proxy write its last file (this script only; not a test)

# Hand-made streams: old-style EXPORT_NAME, ABORT, unknown and unsupported options, a bad
# request magic, an over-long write, extended headers, structured replies with meta contexts.
$PY - Corpus/nbd <<'EOF'
import struct, sys, os
out = sys.argv[1]
def opt(code, payload=b''): return struct.pack('>QII', 0x49484156454F5054, code, len(payload)) + payload
def req(t, off, ln, cookie=1, flags=0, payload=b''): return struct.pack('>IHHQQI', 0x25609513, flags, t, cookie, off, ln) + payload
def info(name, reqs=()): n = name.encode(); return struct.pack('>I', len(n)) + n + struct.pack('>H', len(reqs)) + b''.join(struct.pack('>H', r) for r in reqs)
def meta(name, queries): n = name.encode(); return struct.pack('>I', len(n)) + n + struct.pack('>I', len(queries)) + b''.join(struct.pack('>I', len(q)) + q.encode() for q in queries)
flags = struct.pack('>I', 3)
cases = {
  'export-name': flags + opt(1, b'disk') + req(0, 0, 4096) + req(1, 8192, 4, 2, 0, b'abcd') + req(2, 0, 0, 3),
  'export-name-zeroes': struct.pack('>I', 1) + opt(1, b'') + req(3, 0, 0) + req(2, 0, 0, 2),
  'abort': flags + opt(2),
  'unknown-options': flags + opt(99) + opt(4, b'x') + opt(5) + opt(3, b'junk') + opt(8, b'x') + opt(2),
  'structured-meta': flags + opt(8) + opt(9, meta('disk', ['base:', 'qemu:'])) + opt(10, meta('disk', ['base:allocation', 'qemu:allocation-depth']))
      + opt(7, info('disk', (1, 2, 3))) + req(7, 0, 262144, 1) + req(7, 4096, 4096, 2, 8) + req(0, 0, 8192, 3) + req(2, 0, 0, 4),
  'bitmap-default': flags + opt(8) + opt(10, meta('', ['qemu:dirty-bitmap:b0'])) + opt(7, info(''))
      + req(1, 0, 4096, 1, 0, b'\x01' * 4096) + req(7, 0, 262144, 2) + req(6, 65536, 65536, 3, 16) + req(4, 0, 4096, 4) + req(2, 0, 0, 5),
  'bad-magic': flags + opt(7, info('disk')) + req(0, 0, 512) + b'\xde\xad\xbe\xef' + b'\0' * 24,
  'huge-write': flags + opt(7, info('disk')) + req(1, 0, 64 << 20, 1) + b'\0' * 256,
  'out-of-range': flags + opt(7, info('ro')) + req(0, 262144, 4096) + req(1, 0, 512, 2, 0, b'\0' * 512) + req(0, 0xFFFFFFFFFFFFF000, 8192, 3)
      + req(5, 0, 1 << 20, 4) + req(9, 0, 0, 5) + req(0, 0, 0, 6, 0xff) + req(2, 0, 0, 7),
  'extended-headers': flags + opt(11) + opt(8) + opt(7, info('disk')) + struct.pack('>IHHQQQ', 0x21e41c71, 0, 0, 1, 0, 4096),
  'info-then-go': flags + opt(6, info('disk', (0, 1, 2, 3, 99))) + opt(6, info('nope')) + opt(7, info('ro', (3,))) + req(0, 0, 1536) + req(3, 0, 0, 2),
}
for name, data in cases.items():
    open(os.path.join(out, 'hand-' + name), 'wb').write(data)
EOF

# ---------------------------------------------------------------- qcow2
# Each image behind an 8-byte prefix: byte 0 the mode (see QCOW2Fuzz.swift), then a seed.
Q="$work/q"; mkdir -p "$Q"
img() { qemu-img create -q -f qcow2 -o "cluster_size=512${1:+,$1}" "$Q/$2" "${3:-256K}"; }
io() { qemu-io -f qcow2 "${@:2}" "$Q/$1" >/dev/null; }
img "" plain.qcow2;          io plain.qcow2 -c 'write -P 1 0 8k' -c 'write -z 16k 4k' -c 'write -P 2 200k 1k' -c 'discard 4k 1k'
img "compat=0.10" v2.qcow2;  io v2.qcow2 -c 'write -P 3 1k 3k'
img "lazy_refcounts=on" lazy.qcow2; io lazy.qcow2 -c 'write -P 4 0 2k'
img "refcount_bits=1" rc1.qcow2; io rc1.qcow2 -c 'write -P 5 0 4k'
img "refcount_bits=64" rc64.qcow2; io rc64.qcow2 -c 'write -P 6 64k 4k'
img "extended_l2=on,cluster_size=16k" ext.qcow2 1M; io ext.qcow2 -c 'write -P 7 4k 2k' -c 'write -z 8k 2k'
img "" bitmaps.qcow2; qemu-img bitmap --add "$Q/bitmaps.qcow2" b0; qemu-img bitmap --add -g 4096 "$Q/bitmaps.qcow2" b1
io bitmaps.qcow2 -c 'write -P 8 0 4k' -c 'write -P 9 100k 8k'; qemu-img bitmap --disable "$Q/bitmaps.qcow2" b1
img "" src.qcow2; io src.qcow2 -c 'write -P 10 0 16k' -c 'write -P 11 128k 4k'
qemu-img convert -c -O qcow2 -o cluster_size=512 "$Q/src.qcow2" "$Q/zlib.qcow2"
qemu-img convert -c -O qcow2 -o cluster_size=512,compression_type=zstd "$Q/src.qcow2" "$Q/zstd.qcow2"
img "" backing.qcow2; qemu-img create -q -f qcow2 -o cluster_size=512 -b backing.qcow2 -F qcow2 "$Q/overlay.qcow2"
io overlay.qcow2 -c 'write -P 12 1k 1k'
img "cluster_size=4096" c4k.qcow2 1M; io c4k.qcow2 -c 'write -P 13 0 6k'
img "cluster_size=4096" large.qcow2 1G; io large.qcow2 -c 'write -P 14 1000M 4k'
# Images stay under the fuzzer's -max_len (64 KiB, see scripts/fuzz.sh).
find "$Q" -size +60k -delete
modes=(00 21 42 84 c8 f0 53 a6)
i=0
for f in "$Q"/*.qcow2; do
  name=$(basename "$f" .qcow2)
  for m in "${modes[@]:$((i % 8)):3}"; do
    { printf "\\x$m"; printf '%07x' $((i * 7919 + 1)) | head -c 7; cat "$f"; } > "Corpus/qcow2/$name-$m"
  done
  i=$((i + 1))
done

# ---------------------------------------------------------------- QMP
# Sessions over the sandbox's files (the harness moves every path into its sandbox).
cat > Corpus/qmp/chain-and-bitmaps <<'EOF'
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "top.qcow2"}}}
{"execute": "query-named-block-nodes", "arguments": {"flat": true}}
{"execute": "block-dirty-bitmap-add", "arguments": {"node": "top", "name": "b1", "granularity": 4096, "persistent": true}}
{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "top", "target": "b1", "bitmaps": ["b0"]}}
{"execute": "block-dirty-bitmap-disable", "arguments": {"node": "top", "name": "b0"}}
{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "top", "name": "t"}}, {"type": "block-dirty-bitmap-clear", "data": {"node": "top", "name": "b1"}}]}}
{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "top", "name": "b0"}}
{"execute": "blockdev-del", "arguments": {"node-name": "top"}}
EOF
cat > Corpus/qmp/stream <<'EOF'
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "base", "file": {"driver": "file", "filename": "base.qcow2"}}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "backing": "base", "file": {"driver": "file", "filename": "top.qcow2"}}}
{"execute": "block-stream", "arguments": {"job-id": "s", "device": "top", "speed": 1048576, "auto-finalize": false}}
{"execute": "job-pause", "arguments": {"id": "s"}}
{"execute": "query-block-jobs"}
{"execute": "job-resume", "arguments": {"id": "s"}}
{"execute": "block-job-set-speed", "arguments": {"device": "s", "speed": 0}}
{"execute": "query-jobs"}
{"execute": "job-finalize", "arguments": {"id": "s"}}
{"execute": "job-dismiss", "arguments": {"id": "s"}}
EOF
cat > Corpus/qmp/commit <<'EOF'
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "top.qcow2"}}}
{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "top", "writable": true, "bitmaps": ["b0"]}}
{"execute": "block-commit", "arguments": {"job-id": "c", "device": "top", "speed": 65536}}
{"execute": "block-job-cancel", "arguments": {"device": "c"}}
{"execute": "query-block-exports"}
{"execute": "block-export-del", "arguments": {"id": "e", "mode": "hard"}}
{"execute": "nbd-server-stop"}
EOF
cat > Corpus/qmp/filters-reopen <<'EOF'
{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "raw.img"}}
{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": "f"}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg", "limits": {"iops-total": 1000}}}
{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "t", "file": "r", "throttle-group": "tg"}}
{"execute": "blockdev-add", "arguments": {"driver": "copy-on-read", "node-name": "c", "file": "t"}}
{"execute": "blockdev-add", "arguments": {"driver": "null-filter", "node-name": "n", "file": "c"}}
{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r", "file": "f", "read-only": true}]}}
{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "z", "size": 1048576, "read-zeroes": true}}
{"execute": "query-block"}
{"execute": "blockdev-del", "arguments": {"node-name": "n"}}
{"execute": "object-del", "arguments": {"id": "tg"}}
EOF
cat > Corpus/qmp/errors <<'EOF'
{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x"}}
{"execute": "blockdev-add", "arguments": {"driver": "nope", "node-name": "x"}}
{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "size": "big"}}
{"execute": "blockdev-del", "arguments": {"node-name": "missing"}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "x"}}
{"execute": "block-stream", "arguments": {"job-id": "", "device": "x"}}
{"execute": "job-cancel", "arguments": {"id": "nope"}}
{"execute": "no-such-command", "id": 7}
{"execute": "query-version", "arguments": {"a": 1}}
{"id": [1, {"x": null}], "execute": "query-commands"}
EOF
# A real client's raw stream, malformed input included.
"$BLOCKD" --qmp "$work/qmp.sock" 2>/dev/null &
pids+=($!)
wait_socket "$work/qmp.sock"
python3 capture.py "$work/qmp-proxy.sock" "$work/qmp.sock" Corpus/qmp protocol-check &
pids+=($!)
wait_socket "$work/qmp-proxy.sock"
python3 ../Tests/InteropTests/qmp/qmp_protocol_check.py "$work/qmp-proxy.sock" >/dev/null || true
sleep 0.5   # let the proxy write its last file (this script only; not a test)
# The harness takes at most 64 KiB of QMP (one big-request session is bigger): drop those.
find Corpus/qmp -size +64k -delete
echo "corpus: $(ls Corpus/nbd | wc -l) nbd, $(ls Corpus/qcow2 | wc -l) qcow2, $(ls Corpus/qmp | wc -l) qmp; $(du -sh Corpus | cut -f1)"
