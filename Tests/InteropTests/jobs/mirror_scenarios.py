#!/usr/bin/env python3
"""blockdev-mirror scenarios, run the same way against blockd and qemu-storage-daemon.
Usage: mirror_scenarios.py DAEMON SCENARIO [DEST]    (exit 77 naming a missing tool)
DEST (remote scenarios): the destination server binary: blockd, qemu-storage-daemon or qemu-nbd.
Prints 'EVENT …' / 'CMD …' lines (the transcript) and 'OK' at the end; asserts on the result.
Scenarios: file, top, none, cancel-ready, cancel-running, pause, speed, fio, bitmap, remote,
           remote-cancel, bad, small, perm"""
import json, os, shutil, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(__file__)); from qmpmini import Q, wait_until, observe, fio_writer
for tool in ('qemu-img', 'qemu-io'):
    if not shutil.which(tool): print(f'missing {tool}'); sys.exit(77)
daemon, scenario = sys.argv[1], sys.argv[2]
dest = sys.argv[3] if len(sys.argv) > 3 else None
is_qsd = 'qemu-storage-daemon' in daemon
d = tempfile.mkdtemp()
M = 1 << 20
SIZE = 32 * M
procs = []
def sh(*a): subprocess.run(a, check=True, stdout=subprocess.DEVNULL)


def ready_while_writing(q, log, timeout):
    """Waits for BLOCK_JOB_READY, then for fio (logging to `log`) to write more while READY."""
    q.wait('BLOCK_JOB_READY', timeout)
    size = os.path.getsize(log)
    wait_until(lambda: os.path.getsize(log) > size, 10, 'more fio writes while READY')
def img(name, fmt='qcow2', backing=None, size='32M'):
    a = ['qemu-img', 'create', '-q', '-f', fmt]
    if backing: a += ['-b', backing, '-F', 'qcow2']
    sh(*a, f'{d}/{name}', size)
def io(name, cmd, fmt='qcow2'): sh('qemu-io', '-f', fmt, '-c', cmd, f'{d}/{name}')

def start(binary=daemon, tag='src'):
    sock, nbd = f'{d}/{tag}-qmp.sock', f'{d}/{tag}-nbd.sock'
    p = subprocess.Popen([binary, '--chardev', f'socket,path={sock},server=on,wait=off,id=c', '--monitor', 'chardev=c',
                          '--nbd-server', f'addr.type=unix,addr.path={nbd}'], stderr=open(f'{d}/{tag}.log', 'a'))
    procs.append(p)
    return p, Q(sock), nbd

def add(q, name, path, fmt='qcow2', **extra):
    r = q.cmd('blockdev-add', driver=fmt, node_name=name, file={'driver': 'file', 'filename': path}, **extra)
    assert 'return' in r, r

def export(q, node, writable=True, **extra):
    r = q.cmd('block-export-add', type='nbd', id=f'e-{node}', node_name=node, writable=writable, **extra)
    assert 'return' in r, r

def client_write(uri, cmd, expected):
    subprocess.run(['qemu-io', '-f', 'raw', '-c', cmd, uri], check=True, stdout=subprocess.DEVNULL)
    sh('qemu-io', '-f', 'raw', '-c', cmd, expected)

def compare(a, b, fa=None, fb='raw'):
    args = ['qemu-img', 'compare']
    if fa: args += ['-f', fa]
    subprocess.run(args + ['-F', fb, a, b], check=True, stdout=subprocess.DEVNULL)

def check(name): sh('qemu-img', 'check', f'{d}/{name}')

def progressed(q, at_least=1):
    wait_until(lambda: (q.job_offset() or 0) >= at_least, 10, f'the job to copy {at_least} bytes')

def source_image():
    """A 32 MiB qcow2 with data, zeroes and holes, plus its raw copy as the expected content."""
    img('src.qcow2')
    io('src.qcow2', 'write -P 1 0 6M')
    io('src.qcow2', 'write -P 2 10M 3M')
    io('src.qcow2', 'write -z 11M 512k')
    io('src.qcow2', 'write -P 3 30M 2M')
    sh('qemu-img', 'convert', '-O', 'raw', f'{d}/src.qcow2', f'{d}/expected.raw')

def finish(q, job='m'):
    q.cmd('job-complete', id=job)
    ev = q.wait('BLOCK_JOB_COMPLETED', 60)
    assert 'error' not in ev['data'], ev
    q.wait_status('null')

def start_dest(kind, path):
    """A destination server exporting `path` (raw) writable as 'dst'; returns (proc, qmp or None, uri-ish server dict)."""
    sock = f'{d}/dst-nbd.sock'
    if 'qemu-nbd' in kind:
        p = subprocess.Popen([kind, '-f', 'raw', '-x', 'dst', '-k', sock, '-t', '--cache=none', path],
                             stderr=open(f'{d}/dst.log', 'a'))
        procs.append(p)
        wait_until(lambda: os.path.exists(sock), 10, 'qemu-nbd to listen')
        return p, None
    p, q, nbd = start(kind, 'dst')
    r = q.cmd('blockdev-add', driver='raw', node_name='dst', file={'driver': 'file', 'filename': path})
    assert 'return' in r, r
    r = q.cmd('block-export-add', type='nbd', id='e-dst', node_name='dst', name='dst', writable=True)
    assert 'return' in r, r
    return p, q

def remote_node(q, name='rt', export='dst'):
    r = q.cmd('blockdev-add', driver='nbd', node_name=name, export=export,
              server={'type': 'unix', 'path': f'{d}/dst-nbd.sock'})
    assert 'return' in r, r

try:
    if scenario == 'file':
        # raw file → raw file, sync=full, qemu-io writes while the job copies and while READY.
        source_image()
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/src.qcow2', f'{d}/src.raw')
        img('dst.raw', 'raw')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.raw', 'raw')
        add(q, 'dst', f'{d}/dst.raw', 'raw')
        export(q, 'src')
        uri = f'nbd+unix:///src?socket={nbd}'
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full', speed=8 * M)
        assert 'return' in r, r
        for i in range(5):
            client_write(uri, f'write -P {100 + i} {i * 6 + 1}M 12k', f'{d}/expected.raw')
        q.cmd('block-job-set-speed', device='m', speed=0)
        q.wait('BLOCK_JOB_READY', 30)
        jobs = q.cmd('query-block-jobs')['return']
        assert jobs[0]['ready'] and jobs[0]['type'] == 'mirror' and jobs[0]['status'] == 'ready', jobs
        client_write(uri, 'write -P 200 2M 4k', f'{d}/expected.raw')
        finish(q)
        client_write(uri, 'write -P 201 3M 4k', f'{d}/expected.raw')   # now lands on dst
        compare(uri, f'{d}/expected.raw', 'raw')
        q.cmd('query-block-exports')
        q.cmd('quit'); p.wait(10)
        compare(f'{d}/dst.raw', f'{d}/expected.raw', 'raw')
        # the source stopped at the switch: it lacks the write made after job-complete
        r = subprocess.run(['qemu-img', 'compare', '-q', '-F', 'raw', f'{d}/src.raw', f'{d}/expected.raw'])
        assert r.returncode == 1, 'the source received a write after the switch'
    elif scenario == 'top':
        # qcow2 top over a backing file; the target is a new overlay of the same base.
        img('base.qcow2'); io('base.qcow2', 'write -P 9 0 32M')
        img('top.qcow2', backing=f'{d}/base.qcow2'); io('top.qcow2', 'write -P 4 4M 3M'); io('top.qcow2', 'write -z 20M 1M')
        img('new.qcow2', backing=f'{d}/base.qcow2')
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/top.qcow2', f'{d}/expected.raw')
        p, q, nbd = start()
        add(q, 'base', f'{d}/base.qcow2', read_only=True)
        add(q, 'top', f'{d}/top.qcow2', backing='base')
        add(q, 'new', f'{d}/new.qcow2', backing='base')
        export(q, 'top')
        uri = f'nbd+unix:///top?socket={nbd}'
        r = q.cmd('blockdev-mirror', job_id='m', device='top', target='new', sync='top')
        assert 'return' in r, r
        client_write(uri, 'write -P 70 8M 64k', f'{d}/expected.raw')
        q.wait('BLOCK_JOB_READY', 30)
        client_write(uri, 'write -P 71 9M 4k', f'{d}/expected.raw')
        finish(q)
        client_write(uri, 'write -P 72 12M 4k', f'{d}/expected.raw')
        compare(uri, f'{d}/expected.raw', 'raw')
        q.cmd('quit'); p.wait(10)
        check('new.qcow2'); check('top.qcow2')
        compare(f'{d}/new.qcow2', f'{d}/expected.raw')
        # sync=top copied only the top layer: base data stayed in base, not in new
        m = json.loads(subprocess.run(['qemu-img', 'map', '--output=json', f'{d}/new.qcow2'], capture_output=True, text=True).stdout)
        assert not any(e['depth'] == 0 and e['data'] and e['start'] >= 24 * M for e in m), m
    elif scenario == 'none':
        # sync=none: the target starts as a copy (made offline); only new writes are copied.
        source_image()
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/src.qcow2', f'{d}/dst.raw')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.raw', 'raw')
        export(q, 'src')
        uri = f'nbd+unix:///src?socket={nbd}'
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='none')
        assert 'return' in r, r
        q.wait('BLOCK_JOB_READY', 30)
        client_write(uri, 'write -P 80 15M 128k', f'{d}/expected.raw')
        client_write(uri, 'write -z 0 64k', f'{d}/expected.raw')
        finish(q)
        q.cmd('quit'); p.wait(10)
        compare(f'{d}/dst.raw', f'{d}/expected.raw', 'raw')
    elif scenario in ('cancel-ready', 'cancel-running'):
        source_image()
        img('dst.qcow2')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        export(q, 'src')
        uri = f'nbd+unix:///src?socket={nbd}'
        if scenario == 'cancel-ready':
            r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full')
            assert 'return' in r, r
            q.wait('BLOCK_JOB_READY', 30)
            client_write(uri, 'write -P 90 1M 4k', f'{d}/expected.raw')
            q.cmd('block-job-cancel', device='m')
            ev = q.wait('BLOCK_JOB_COMPLETED', 30)      # a ready mirror cancelled: COMPLETED, no switch
            assert 'error' not in ev['data'], ev
            q.wait_status('null')
            client_write(uri, 'write -P 91 2M 4k', f'{d}/expected.raw')
            compare(uri, f'{d}/expected.raw', 'raw')
            r = q.cmd('blockdev-del', node_name='dst')   # the job let go of the target
            assert 'return' in r, r
            q.cmd('quit'); p.wait(10)
            check('src.qcow2'); check('dst.qcow2')
            compare(f'{d}/src.qcow2', f'{d}/expected.raw')
        else:
            r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full', speed=1 * M)
            assert 'return' in r, r
            progressed(q)
            q.cmd('block-job-cancel', device='m')
            q.wait('BLOCK_JOB_CANCELLED', 30)
            q.wait_status('null')
            client_write(uri, 'write -P 92 2M 4k', f'{d}/expected.raw')
            compare(uri, f'{d}/expected.raw', 'raw')
            q.cmd('quit'); p.wait(10)
            check('src.qcow2'); check('dst.qcow2')
            compare(f'{d}/src.qcow2', f'{d}/expected.raw')
    elif scenario == 'pause':
        source_image()
        img('dst.qcow2')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        export(q, 'src')
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full', speed=2 * M,
                  auto_finalize=False, auto_dismiss=False)
        assert 'return' in r, r
        progressed(q)
        q.cmd('job-pause', id='m')
        q.wait_status('paused')
        j1 = q.cmd('query-block-jobs')['return'][0]
        observe(0.5)                          # a paused job must not progress
        j2 = q.cmd('query-block-jobs')['return'][0]
        assert j1['offset'] == j2['offset'] and j2['paused'], (j1, j2)
        q.cmd('job-resume', id='m')
        q.cmd('block-job-set-speed', device='m', speed=0)
        q.wait('BLOCK_JOB_READY', 30)
        q.wait_status('ready')
        q.cmd('job-pause', id='m')
        q.wait_status('standby')
        q.cmd('job-resume', id='m')
        q.wait_status('ready')
        q.cmd('job-complete', id='m')
        q.wait('BLOCK_JOB_PENDING', 30)
        q.cmd('job-finalize', id='m')
        q.wait('BLOCK_JOB_COMPLETED', 30)
        q.cmd('job-dismiss', id='m')
        q.cmd('quit'); p.wait(10)
        check('dst.qcow2')
        compare(f'{d}/dst.qcow2', f'{d}/expected.raw')
    elif scenario == 'speed':
        # 16 MiB of data at 4 MiB/s takes about 4 s: READY no sooner than 3 s.
        img('src.qcow2'); io('src.qcow2', 'write -P 5 0 16M')
        img('dst.qcow2')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        t0 = time.monotonic()
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full', speed=4 * M)
        assert 'return' in r, r
        q.wait('BLOCK_JOB_READY', 30)
        took = time.monotonic() - t0
        print('READY-AFTER', round(took, 1))
        assert took >= 3.0, took
        q.cmd('block-job-cancel', device='m')
        q.wait('BLOCK_JOB_COMPLETED', 30)
        q.cmd('quit'); p.wait(10)
    elif scenario == 'fio':
        # fio writes with verify from before the job until after job-complete, then reads back.
        if not shutil.which('fio'): print('missing fio'); sys.exit(77)
        source_image()
        img('dst.qcow2')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        export(q, 'src')
        uri = f'nbd+unix:///src?socket={nbd}'
        log = f'{d}/fio.iolog'
        fio = fio_writer(uri, log, '--size=16M', '--iodepth=8', '--rate_iops=1200', '--randrepeat=1')
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full', speed=4 * M)
        assert 'return' in r, r
        progressed(q, 1 * M)
        q.cmd('block-job-set-speed', device='m', speed=0)
        ready_while_writing(q, log, 30)
        finish(q)
        out, _ = fio.communicate(timeout=90)
        assert fio.returncode == 0, out
        # the export now serves dst; everything fio wrote verified through it
        sh('qemu-img', 'convert', '-f', 'raw', '-O', 'raw', uri, f'{d}/final.raw')
        q.cmd('quit'); p.wait(10)
        check('dst.qcow2')
        compare(f'{d}/dst.qcow2', f'{d}/final.raw')
    elif scenario == 'bitmap':
        # blockd: a persistent bitmap on the source follows the disk to the target at the switch.
        if is_qsd: sys.exit('bitmap: a blockd-only scenario (QSD 7.2 leaves the bitmap on the source)')
        if not shutil.which('nbdinfo'): print('missing nbdinfo'); sys.exit(77)
        source_image()
        sh('qemu-img', 'bitmap', '--add', f'{d}/src.qcow2', 'b')
        io('src.qcow2', 'write -P 50 1M 64k')
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/src.qcow2', f'{d}/expected.raw')
        img('dst.qcow2')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        export(q, 'src')
        uri = f'nbd+unix:///src?socket={nbd}'
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full')
        assert 'return' in r, r
        client_write(uri, 'write -P 51 5M 4k', f'{d}/expected.raw')
        q.wait('BLOCK_JOB_READY', 30)
        client_write(uri, 'write -P 53 7M 4k', f'{d}/expected.raw')
        finish(q)
        client_write(uri, 'write -P 54 20M 4k', f'{d}/expected.raw')     # recorded on dst now
        q.cmd('quit'); p.wait(10)
        check('dst.qcow2')
        compare(f'{d}/dst.qcow2', f'{d}/expected.raw')
        p, q, nbd = start()
        add(q, 'dst', f'{d}/dst.qcow2')
        export(q, 'dst', bitmaps=['b'])
        out = subprocess.run(['nbdinfo', '--map=qemu:dirty-bitmap:b', '--json', f'nbd+unix:///dst?socket={nbd}'],
                             capture_output=True, text=True, check=True).stdout
        dirty = [(e['offset'], e['length']) for e in json.loads(out) if e['type'] & 1]
        print('DIRTY', dirty)
        assert dirty == [(1 * M, 65536), (5 * M, 65536), (7 * M, 65536), (20 * M, 65536)], dirty
        q.cmd('quit'); p.wait(10)
    elif scenario in ('remote', 'remote-cancel'):
        # The target is an nbd node on a second server (DEST); writes go on during the job.
        source_image()
        img('dst.raw', 'raw')
        dp, dq = start_dest(dest, f'{d}/dst.raw')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        export(q, 'src')
        remote_node(q)
        uri = f'nbd+unix:///src?socket={nbd}'
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='rt', sync='full', copy_mode='write-blocking')
        assert 'return' in r, r
        client_write(uri, 'write -P 60 3M 64k', f'{d}/expected.raw')
        q.wait('BLOCK_JOB_READY', 60)
        client_write(uri, 'write -P 61 4M 4k', f'{d}/expected.raw')
        if scenario == 'remote':
            finish(q)
            client_write(uri, 'write -P 62 5M 4k', f'{d}/expected.raw')
            compare(uri, f'{d}/expected.raw', 'raw')
        else:
            q.cmd('block-job-cancel', device='m')
            q.wait('BLOCK_JOB_COMPLETED', 30)
            q.wait_status('null')
            r = q.cmd('blockdev-del', node_name='rt'); assert 'return' in r, r
        q.cmd('quit'); p.wait(10)
        if dq: dq.cmd('quit'); dp.wait(10)
        else: dp.terminate(); dp.wait(10)
        if scenario == 'remote':
            compare(f'{d}/dst.raw', f'{d}/expected.raw', 'raw')
        else:
            sh('qemu-img', 'convert', '-O', 'raw', f'{d}/src.qcow2', f'{d}/now.raw')
            compare(f'{d}/dst.raw', f'{d}/now.raw', 'raw')     # mirrored up to the cancel
            compare(f'{d}/src.qcow2', f'{d}/expected.raw')
    elif scenario in ('remote-full', 'remote-top', 'remote-none'):
        # Every sync mode to a remote target while fio writes with verify during the whole job.
        # full: the target is a raw image on DEST; top: DEST exports a qcow2 overlay over its own
        # copy of the base (as libvirt's shallow migration does), and the mirror copies only the
        # top layer; none: DEST holds a copy already.
        if not shutil.which('fio'): print('missing fio'); sys.exit(77)
        sync = scenario.split('-')[1]
        img('base.qcow2'); io('base.qcow2', 'write -P 9 0 32M')
        img('src.qcow2', backing=f'{d}/base.qcow2'); io('src.qcow2', 'write -P 4 4M 3M'); io('src.qcow2', 'write -z 20M 1M')
        if sync == 'top':
            img('dst.qcow2', backing=f'{d}/base.qcow2')
            dest_file = f'{d}/dst.qcow2'
        elif sync == 'none':
            sh('qemu-img', 'convert', '-O', 'raw', f'{d}/src.qcow2', f'{d}/dst.raw')
            dest_file = f'{d}/dst.raw'
        else:
            img('dst.raw', 'raw')
            dest_file = f'{d}/dst.raw'
        dp, dq, dnbd = start(dest, 'dst')
        if sync == 'top':
            sh('cp', f'{d}/base.qcow2', f'{d}/dbase.qcow2')
            sh('qemu-img', 'rebase', '-u', '-b', f'{d}/dbase.qcow2', '-F', 'qcow2', dest_file)
            r = dq.cmd('blockdev-add', driver='qcow2', node_name='dst', file={'driver': 'file', 'filename': dest_file})
        else:
            r = dq.cmd('blockdev-add', driver='file', node_name='dst', filename=dest_file)
        assert 'return' in r, r
        r = dq.cmd('block-export-add', type='nbd', id='e-dst', node_name='dst', name='dst', writable=True); assert 'return' in r, r
        p, q, nbd = start()
        add(q, 'base', f'{d}/base.qcow2', read_only=True)
        add(q, 'src', f'{d}/src.qcow2', backing='base')
        export(q, 'src')
        nbd_node = {'driver': 'nbd', 'export': 'dst', 'server': {'type': 'unix', 'path': f'{d}/dst-nbd.sock'}}
        r = q.cmd('blockdev-add', node_name='rt', **nbd_node)
        assert 'return' in r, r
        uri = f'nbd+unix:///src?socket={nbd}'
        log = f'{d}/fio.iolog'
        fio = fio_writer(uri, log, '--offset=2M', '--size=24M', '--iodepth=8', '--rate_iops=300',
                         '--time_based', '--runtime=8')
        # full in write-blocking mode, the others in background mode (both converge here)
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='rt', sync=sync,
                  copy_mode='write-blocking' if sync == 'full' else 'background')
        assert 'return' in r, r
        ready_while_writing(q, log, 60)
        finish(q)
        out, _ = fio.communicate(timeout=90)
        assert fio.returncode == 0, out
        sh('qemu-img', 'convert', '-f', 'raw', '-O', 'raw', uri, f'{d}/final.raw')
        q.cmd('quit'); p.wait(10)
        dq.cmd('quit'); dp.wait(10)
        if sync == 'top':
            check('dst.qcow2')
            compare(f'{d}/dst.qcow2', f'{d}/final.raw')
            # only the top layer travelled: the destination's overlay did not get the base's data
            m = json.loads(subprocess.run(['qemu-img', 'map', '--output=json', f'{d}/dst.qcow2'],
                                          capture_output=True, text=True).stdout)
            assert not any(e['depth'] == 0 and e['data'] and e['start'] >= 28 * M for e in m), m
        else:
            compare(dest_file, f'{d}/final.raw', 'raw')
    elif scenario == 'bad':
        source_image()
        img('dst.qcow2'); img('big.qcow2', size='64M'); img('big2.qcow2', size='64M')
        img('base.qcow2'); img('top.qcow2', backing=f'{d}/base.qcow2')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        add(q, 'ro', f'{d}/big.qcow2', read_only=True)
        add(q, 'base', f'{d}/base.qcow2')
        add(q, 'top', f'{d}/top.qcow2', backing='base')
        export(q, 'src')
        bad = [dict(job_id='b1', device='nope', target='dst', sync='full'),
               dict(job_id='b2', device='src', target='nope', sync='full'),
               dict(job_id='b3', device='src', target='src', sync='full'),
               dict(job_id='b4', device='src', target='dst', sync='full', granularity=100),
               dict(job_id='b5', device='src', target='dst', sync='full', granularity=3 * 65536),
               dict(job_id='b6', device='src', target='dst', sync='full', granularity=1 << 27),
               dict(job_id='b7', device='src', target='dst', sync='incremental'),
               dict(job_id='b8', device='src', target='dst', sync='sideways'),
               dict(job_id='b9', device='src', target='dst', sync='full', buf_size=-1),
               dict(job_id='b10', device='src', target='dst', sync='full', replaces='nope'),
               dict(job_id='b11', device='src', target='dst', sync='full', replaces='dst'),
               dict(job_id='b12', device='base', target='dst', sync='full'),
               dict(job_id='b13', device='src', target='ro', sync='full'),
               dict(job_id='b14', device='top', target='base', sync='full'),
               dict(job_id='1bad', device='src', target='dst', sync='full'),
               dict(job_id='b15', device='src', target='dst', sync='full', copy_mode='sometimes'),
               dict(job_id='b16', device='src', target='dst', sync='full', unmap=False),
               dict(job_id='b17', device='src', target='dst', sync='full', speed=-1),
               dict(device='src', target='dst', sync='full')]
        errs = [q.cmd('blockdev-mirror', **a) for a in bad]
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full', speed=1024)
        assert 'return' in r, r
        errs.append(q.cmd('blockdev-mirror', job_id='m', device='src', target='ro', sync='full'))
        errs.append(q.cmd('blockdev-mirror', job_id='b20', device='src', target='ro', sync='full'))
        errs.append(q.cmd('blockdev-mirror', job_id='b21', device='top', target='dst', sync='full'))
        errs.append(q.cmd('blockdev-mirror', job_id='b22', device='dst', target='top', sync='full'))
        errs.append(q.cmd('block-commit', job_id='b23', device='src'))
        add(q, 'busy', f'{d}/big2.qcow2')
        export(q, 'busy')
        errs.append(q.cmd('blockdev-mirror', job_id='b24', device='top', target='busy', sync='full'))
        errs.append(q.cmd('block-export-add', type='nbd', id='e-dst', node_name='dst', writable=False))
        errs.append(q.cmd('blockdev-del', node_name='dst'))
        errs.append(q.cmd('job-complete', id='m'))
        for e in errs: print('ERR', json.dumps(e))
        for e in errs: assert 'error' in e, e
        q.cmd('job-cancel', id='m'); q.wait('BLOCK_JOB_CANCELLED', 10)
        q.wait_status('null')
        compare(f'nbd+unix:///src?socket={nbd}', f'{d}/expected.raw', 'raw')
        q.cmd('quit'); p.wait(10)
        check('src.qcow2')
        compare(f'{d}/src.qcow2', f'{d}/expected.raw')
    elif scenario == 'filter':
        # filter-node-name: QEMU's mirror_top is a named node above the source during the job;
        # clients write through it; it is gone after the switch.
        source_image()
        img('dst.qcow2')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        export(q, 'src')
        uri = f'nbd+unix:///src?socket={nbd}'
        def nodes():
            return sorted((n['node-name'], n['drv']) for n in q.cmd('query-named-block-nodes')['return']
                          if not n['node-name'].startswith('#'))
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full', filter_node_name='mt')
        assert 'return' in r, r
        print('SEEN', nodes())
        print('SEEN', q.cmd('query-block-exports')['return'])
        r = q.cmd('blockdev-mirror', job_id='m2', device='src', target='dst', sync='full', filter_node_name='mt')
        print('SEEN', r)
        client_write(uri, 'write -P 40 1M 4k', f'{d}/expected.raw')
        q.wait('BLOCK_JOB_READY', 30)
        client_write(uri, 'write -P 41 2M 4k', f'{d}/expected.raw')
        finish(q)
        print('SEEN', nodes())
        print('SEEN', q.cmd('query-block-exports')['return'])
        client_write(uri, 'write -P 42 3M 4k', f'{d}/expected.raw')
        compare(uri, f'{d}/expected.raw', 'raw')
        q.cmd('quit'); p.wait(10)
        compare(f'{d}/dst.qcow2', f'{d}/expected.raw')
    elif scenario == 'small':
        # A target of another size: the job starts and fails as QEMU's does.
        source_image()
        img('dst.qcow2', size='16M')
        p, q, nbd = start()
        add(q, 'src', f'{d}/src.qcow2')
        add(q, 'dst', f'{d}/dst.qcow2')
        r = q.cmd('blockdev-mirror', job_id='m', device='src', target='dst', sync='full')
        assert 'return' in r, r
        ev = q.wait('BLOCK_JOB_COMPLETED', 30)
        assert ev['data'].get('error') == 'Source and target image have different sizes', ev
        q.wait_status('null')
        q.cmd('quit'); p.wait(10)
        check('dst.qcow2')
    else:
        print('unknown scenario'); sys.exit(2)
finally:
    for pr in procs:
        if pr.poll() is None: pr.kill()
print('OK', d)
