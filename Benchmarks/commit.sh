#!/bin/sh
# Active commit of a 1 GiB top into its base while fio writes 4 KiB random blocks to the export,
# first at a fixed rate (--rate_iops), then flat out; blockd vs qemu-storage-daemon in one run.
# Reports time to BLOCK_JOB_READY (timeout 60 s), total time to BLOCK_JOB_COMPLETED, and the
# client's p99 write latency while the job ran.  Run by hand:  Benchmarks/commit.sh [SIZE] [IOPS]
# Env: BLOCKD (default .build/release/blockd), QSD (default qemu-storage-daemon).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
exec python3 - "$here" "${1:-1G}" "${2:-2000}" <<'PY'
import json, os, shutil, subprocess, sys, tempfile, time
here, size, iops = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, here + '/Tests/InteropTests/jobs'); from qmpmini import Q
import builtins
blockd = os.environ.get('BLOCKD', here + '/.build/release/blockd')
qsd = os.environ.get('QSD', shutil.which('qemu-storage-daemon') or '')
def quiet(*a, **k): pass
def run(daemon, rate):
    d = tempfile.mkdtemp(dir=os.environ.get('TMPDIR', '/var/tmp'))
    sh = lambda *a: subprocess.run(a, check=True, stdout=subprocess.DEVNULL)
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/base.qcow2', size)
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f'{d}/top.qcow2')
    sh('qemu-io', '-f', 'qcow2', '-c', f'write -P 7 0 {size}', f'{d}/top.qcow2')
    sock, nbd = f'{d}/qmp.sock', f'{d}/nbd.sock'
    p = subprocess.Popen([daemon, '--chardev', f'socket,path={sock},server=on,wait=off,id=c', '--monitor', 'chardev=c',
                          '--nbd-server', f'addr.type=unix,addr.path={nbd}'], stderr=subprocess.DEVNULL)
    old = builtins.print; builtins.print = quiet
    try:
        q = Q(sock)
        q.cmd('blockdev-add', driver='qcow2', node_name='top', file={'driver': 'file', 'filename': f'{d}/top.qcow2'})
        q.cmd('block-export-add', type='nbd', id='e', node_name='top', writable=True)
        fio = ['fio', '--name=w', '--ioengine=nbd', f'--uri=nbd+unix:///top?socket={nbd}', '--rw=randwrite',
               '--bs=4k', f'--size={size}', '--iodepth=16', '--time_based', '--runtime=120',
               '--output-format=json', '--percentile_list=99']
        if rate: fio.append(f'--rate_iops={rate}')
        f = subprocess.Popen(fio, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1)
        t0 = time.monotonic()
        q.cmd('block-commit', job_id='c', device='top')
        ready = None
        try:
            q.wait('BLOCK_JOB_READY', 60); ready = time.monotonic() - t0
            q.cmd('job-complete', id='c')
            q.wait('BLOCK_JOB_COMPLETED', 60)
        except Exception:
            q.cmd('job-cancel', id='c')
        total = time.monotonic() - t0
        f.send_signal(2)
        out, _ = f.communicate(timeout=30)
        w = json.loads(out[out.index('{'):])['jobs'][0]['write']
        p99 = w['clat_ns']['percentile'].get('99.000000', 0) / 1e6
        q.cmd('quit'); p.wait(20)
    finally:
        builtins.print = old
        if p.poll() is None: p.kill()
        shutil.rmtree(d, ignore_errors=True)
    return ready, total, p99, w['iops']
print(f'{"daemon":8} {"load":>10} {"ready s":>8} {"total s":>8} {"p99 ms":>8} {"iops":>8}')
for rate in (iops, 0):
    for name, daemon in (('blockd', blockd), ('qsd', qsd)):
        if not daemon: continue
        ready, total, p99, got = run(daemon, rate)
        load = f'{rate} iops' if rate else 'flat out'
        print(f'{name:8} {load:>10} {("%.1f" % ready) if ready else "never":>8} {total:8.1f} {p99:8.2f} {got:8.0f}', flush=True)
PY
