#!/bin/sh
# blockdev-mirror of a fully allocated raw image (default 1 GiB), blockd vs qemu-storage-daemon
# in one run, to a local raw target and to a second daemon of the same kind over NBD (unix
# socket; the source daemon's target is an `nbd` node on the destination daemon's export).
# Each case idle (background copy mode), then under a 4 KiB random writer at IOPS
# (write-blocking mode, so both daemons converge). Reports time to BLOCK_JOB_READY, the copy
# rate (image size / time to READY) in MiB/s, the client's p99 write latency, and blockd/QSD
# ratios; each figure is the best of two runs. The source image is written and synced before
# each run (its pages stay cached, the target's writes go to the page cache; READY includes the
# target's flush).  Run by hand:  Benchmarks/mirror.sh [SIZE] [IOPS]
# Env: BLOCKD (default .build/release/blockd), QSD (default qemu-storage-daemon).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
exec python3 - "$here" "${1:-1G}" "${2:-2000}" <<'PY'
import builtins, json, os, shutil, subprocess, sys, tempfile, time
here, size, iops = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, here + '/Tests/InteropTests/jobs'); from qmpmini import Q
blockd = os.environ.get('BLOCKD', here + '/.build/release/blockd')
qsd = os.environ.get('QSD', shutil.which('qemu-storage-daemon') or '')
units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
nbytes = int(size[:-1]) * units[size[-1].upper()] if size[-1].upper() in units else int(size)
def quiet(*a, **k): pass
def sh(*a): subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def start(daemon, d, tag):
    sock, nbd = f'{d}/{tag}-qmp.sock', f'{d}/{tag}-nbd.sock'
    p = subprocess.Popen([daemon, '--chardev', f'socket,path={sock},server=on,wait=off,id=c', '--monitor', 'chardev=c',
                          '--nbd-server', f'addr.type=unix,addr.path={nbd}'], stderr=subprocess.DEVNULL)
    return p, Q(sock), nbd

def run(daemon, remote, rate):
    d = tempfile.mkdtemp(dir=os.environ.get('TMPDIR', '/var/tmp'))
    procs = []
    old = builtins.print; builtins.print = quiet
    try:
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/src.raw', size)
        sh('qemu-io', '-f', 'raw', '-c', f'write -P 7 0 {size}', f'{d}/src.raw')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/dst.raw', size)
        os.sync()        # the image just written goes to disk now, not during the measurement
        p, q, nbd = start(daemon, d, 'src'); procs.append(p)
        q.cmd('blockdev-add', driver='raw', node_name='src', file={'driver': 'file', 'filename': f'{d}/src.raw'})
        q.cmd('block-export-add', type='nbd', id='e', node_name='src', writable=True)
        if remote:
            dp, dq, dnbd = start(daemon, d, 'dst'); procs.append(dp)
            dq.cmd('blockdev-add', driver='raw', node_name='dst', file={'driver': 'file', 'filename': f'{d}/dst.raw'})
            dq.cmd('block-export-add', type='nbd', id='e', node_name='dst', name='dst', writable=True)
            r = q.cmd('blockdev-add', driver='nbd', node_name='dst', export='dst', server={'type': 'unix', 'path': dnbd})
        else:
            r = q.cmd('blockdev-add', driver='raw', node_name='dst', file={'driver': 'file', 'filename': f'{d}/dst.raw'})
        assert 'return' in r, r
        f = None
        if rate:
            fio = ['fio', '--name=w', '--ioengine=nbd', f'--uri=nbd+unix:///src?socket={nbd}', '--rw=randwrite',
                   '--bs=4k', f'--size={size}', '--iodepth=16', '--time_based', '--runtime=300',
                   '--output-format=json', '--percentile_list=99', f'--rate_iops={rate}']
            f = subprocess.Popen(fio, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1)
        t0 = time.monotonic()
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full',
                  copy_mode='write-blocking' if rate else 'background')
        assert 'return' in r, r
        ready = None
        try:
            q.wait('BLOCK_JOB_READY', 120); ready = time.monotonic() - t0
        except Exception:
            pass
        q.cmd('job-cancel', id='m')
        q.wait_status('null', 60)
        p99 = None
        if f:
            f.send_signal(2)
            out, _ = f.communicate(timeout=60)
            w = json.loads(out[out.index('{'):])['jobs'][0]['write']
            p99 = w['clat_ns']['percentile'].get('99.000000', 0) / 1e6
        if remote: dq.cmd('quit')
        q.cmd('quit')
        for pr in procs: pr.wait(30)
    finally:
        builtins.print = old
        for pr in procs:
            if pr.poll() is None: pr.kill()
        shutil.rmtree(d, ignore_errors=True)
    return ready, p99

print(f'mirror of {size} (raw, fully allocated); load average {os.getloadavg()[0]:.1f}')
print(f'{"target":8} {"load":>10} {"daemon":8} {"ready s":>8} {"MiB/s":>8} {"p99 ms":>8}')
for remote in (False, True):
    for rate in (0, iops):
        res = {}
        for name, daemon in (('blockd', blockd), ('qsd', qsd)):
            if not daemon: continue
            # best of two: the disk is shared, and writeback of other work shifts one run
            runs = [run(daemon, remote, rate) for _ in range(2)]
            done = [r for r in runs if r[0]]
            ready, p99 = min(done) if done else runs[0]
            res[name] = (ready, p99)
            mibs = nbytes / (1 << 20) / ready if ready else 0
            print(f'{"nbd" if remote else "local":8} {(f"{rate} iops" if rate else "idle"):>10} {name:8} '
                  f'{("%.2f" % ready) if ready else "never":>8} {mibs:8.0f} {("%.2f" % p99) if p99 is not None else "-":>8}',
                  flush=True)
        if len(res) == 2 and res['blockd'][0] and res['qsd'][0]:
            line = f'{"":8} {"":>10} {"ratio":8} {res["qsd"][0] / res["blockd"][0]:7.2f}x faster'
            if rate and res['blockd'][1] and res['qsd'][1]:
                line += f', p99 qsd/blockd {res["qsd"][1] / res["blockd"][1]:.2f}'
            print(line, flush=True)
print(f'load average after: {os.getloadavg()[0]:.1f}')
PY
