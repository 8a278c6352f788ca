#!/usr/bin/env python3
"""block-commit scenarios, run the same way against blockd and qemu-storage-daemon.
Usage: commit_scenarios.py DAEMON SCENARIO      (fails, naming it, when a tool is missing)
Prints 'EVENT …' / 'CMD …' lines (the transcript) and 'OK' at the end; asserts on the result.
Scenarios: intermediate, active, cancel-ready, cancel-running, pause, fio, bitmap, converge, bad, kill"""
import json, os, shutil, signal, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(__file__)); from qmpmini import Q, wait_until, observe
for tool in ('qemu-img', 'qemu-io'):
    if not shutil.which(tool): sys.exit(f'missing {tool}')
daemon, scenario = sys.argv[1], sys.argv[2]
is_qsd = 'qemu-storage-daemon' in daemon
d = tempfile.mkdtemp()
M = 1 << 20
def sh(*a): subprocess.run(a, check=True, stdout=subprocess.DEVNULL)
def img(name, backing=None, size='32M'):
    a = ['qemu-img', 'create', '-q', '-f', 'qcow2']
    if backing: a += ['-b', backing, '-F', 'qcow2']
    sh(*a, f'{d}/{name}', size)
def io(name, cmd): sh('qemu-io', '-f', 'qcow2', '-c', cmd, f'{d}/{name}')

# A chain of up to five layers with overlapping patterns: l0 <- l1 <- ... <- top
def chain(n):
    img('l0.qcow2')
    io('l0.qcow2', 'write -P 1 0 24M')
    for i in range(1, n):
        img(f'l{i}.qcow2', f'l{i-1}.qcow2')
        io(f'l{i}.qcow2', f'write -P {10 + i} {i * 3}M 5M')
        io(f'l{i}.qcow2', f'write -z {i * 3 + 6}M 1M')
    return [f'l{i}.qcow2' for i in range(n)]

def start():
    sock, nbd = f'{d}/qmp.sock', f'{d}/nbd.sock'
    p = subprocess.Popen([daemon, '--chardev', f'socket,path={sock},server=on,wait=off,id=c', '--monitor', 'chardev=c',
                          '--nbd-server', f'addr.type=unix,addr.path={nbd}'], stderr=open(f'{d}/daemon.log', 'a'))
    return p, Q(sock), f'nbd+unix:///top?socket={nbd}'

def add_top(q, name):
    r = q.cmd('blockdev-add', driver='qcow2', node_name='top', file={'driver': 'file', 'filename': f'{d}/{name}'})
    assert 'return' in r, r
    r = q.cmd('block-export-add', type='nbd', id='e', node_name='top', writable=True)
    assert 'return' in r, r

def client_write(uri, cmd, expected):
    subprocess.run(['qemu-io', '-f', 'raw', '-c', cmd, uri], check=True, stdout=subprocess.DEVNULL)
    sh('qemu-io', '-f', 'raw', '-c', cmd, expected)

def check_all(names):
    for n in names: sh('qemu-img', 'check', f'{d}/{n}')

def chain_of(name):
    out = subprocess.run(['qemu-img', 'info', '--backing-chain', '--output=json', f'{d}/{name}'],
                         capture_output=True, text=True, check=True).stdout
    return [os.path.basename(i['filename']) for i in json.loads(out)]

def progressed(q, at_least=1):
    """Waits until the job has copied at least `at_least` bytes."""
    wait_until(lambda: (q.job_offset() or 0) >= at_least, 10, f'the job to copy {at_least} bytes')

def fio_logged(log, more_than=0):
    """Waits until fio's --write_iolog has grown past `more_than` bytes (fio issued writes)."""
    wait_until(lambda: os.path.exists(log) and os.path.getsize(log) > more_than, 10, 'fio writes')
    return os.path.getsize(log)

def compare(a, raw):
    subprocess.run(['qemu-img', 'compare', '-F', 'raw', a, raw], check=True, stdout=subprocess.DEVNULL)

p = None
try:
    if scenario == 'intermediate':
        names = chain(5)
        top = names[-1]
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/{top}', f'{d}/expected.raw')
        p, q, uri = start()
        add_top(q, top)
        client_write(uri, 'write -P 77 5M 64k', f'{d}/expected.raw')
        r = q.cmd('block-commit', job_id='c', device='top', top=f'{d}/l3.qcow2', base=f'{d}/l1.qcow2')
        assert 'return' in r, r
        ev = q.wait('BLOCK_JOB_COMPLETED', 30)
        assert 'error' not in ev['data'], ev
        q.wait_status('null')
        compare(uri, f'{d}/expected.raw')
        q.cmd('quit'); p.wait(10)
        assert chain_of(top) == ['l4.qcow2', 'l1.qcow2', 'l0.qcow2'], chain_of(top)
        check_all(names)
        compare(f'{d}/{top}', f'{d}/expected.raw')
    elif scenario in ('active', 'cancel-ready'):
        names = chain(3)
        top = names[-1]
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/{top}', f'{d}/expected.raw')
        p, q, uri = start()
        add_top(q, top)
        r = q.cmd('block-commit', job_id='c', device='top', speed=8 * M)
        assert 'return' in r, r
        for i in range(6):
            client_write(uri, f'write -P {100 + i} {i * 5 + 1}M 12k', f'{d}/expected.raw')
        q.cmd('block-job-set-speed', device='c', speed=0)
        q.wait('BLOCK_JOB_READY', 30)
        client_write(uri, 'write -P 200 2M 4k', f'{d}/expected.raw')
        if scenario == 'active':
            q.cmd('job-complete', id='c')
            ev = q.wait('BLOCK_JOB_COMPLETED', 30)
            assert 'error' not in ev['data'], ev
            q.wait_status('null')
            client_write(uri, 'write -P 201 3M 4k', f'{d}/expected.raw')
            compare(uri, f'{d}/expected.raw')
            q.cmd('query-block-exports')
            q.cmd('quit'); p.wait(10)
            check_all(names)
            compare(f'{d}/l0.qcow2', f'{d}/expected.raw')
            assert chain_of('l0.qcow2') == ['l0.qcow2']
        else:
            q.cmd('block-job-cancel', device='c')
            ev = q.wait('BLOCK_JOB_COMPLETED', 30)
            q.wait_status('null')
            client_write(uri, 'write -P 202 3M 4k', f'{d}/expected.raw')
            compare(uri, f'{d}/expected.raw')
            q.cmd('quit'); p.wait(10)
            check_all(names)
            compare(f'{d}/{top}', f'{d}/expected.raw')
            assert chain_of(top) == ['l2.qcow2', 'l1.qcow2', 'l0.qcow2']
    elif scenario == 'fio':
        # fio writes (with verify headers) from before the job starts until after job-complete;
        # at the end it reads everything back through the export, which then serves base.
        if not shutil.which('fio'): sys.exit('missing fio')
        names = chain(3)
        p, q, uri = start()
        add_top(q, 'l2.qcow2')
        log = f'{d}/fio.iolog'
        fio = subprocess.Popen(['fio', '--name=w', '--ioengine=nbd', f'--uri={uri}', '--rw=randwrite', '--bs=4k',
                                '--size=16M', '--iodepth=8', '--rate_iops=1200', '--verify=crc32c',
                                '--verify_fatal=1', '--verify_state_save=0', '--randrepeat=1', '--output-format=terse',
                                f'--write_iolog={log}'],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fio_logged(log)                       # fio is writing before the job starts
        r = q.cmd('block-commit', job_id='c', device='top', speed=4 * M)
        assert 'return' in r, r
        progressed(q, 1 * M)                  # the job copies under the writes
        q.cmd('block-job-set-speed', device='c', speed=0)
        q.wait('BLOCK_JOB_READY', 30)
        fio_logged(log, fio_logged(log) + 4096)   # more writes land while READY (the log grows in 4 KiB flushes)
        q.cmd('job-complete', id='c')
        ev = q.wait('BLOCK_JOB_COMPLETED', 30)
        assert 'error' not in ev['data'], ev
        out, _ = fio.communicate(timeout=60)
        assert fio.returncode == 0, out
        q.cmd('query-block-exports')
        q.cmd('quit'); p.wait(10)
        check_all(names)
        assert chain_of('l0.qcow2') == ['l0.qcow2']
    elif scenario == 'bitmap':
        # A persistent bitmap on top with dirty extents, client writes during an active commit:
        # afterwards base's bitmap holds exactly the union, survives a restart, and a map of
        # qemu:dirty-bitmap:b over the export (what an incremental backup pulls) shows it.
        if is_qsd: sys.exit('bitmap: a blockd-only scenario (QSD 7.2 leaves the bitmap on top)')
        if not shutil.which('nbdinfo'): sys.exit('missing nbdinfo')
        names = chain(3)
        sh('qemu-img', 'bitmap', '--add', f'{d}/l2.qcow2', 'b')
        io('l2.qcow2', 'write -P 50 1M 64k')
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/l2.qcow2', f'{d}/expected.raw')
        p, q, uri = start()
        add_top(q, 'l2.qcow2')
        r = q.cmd('block-commit', job_id='c', device='top', speed=4 * M)
        assert 'return' in r, r
        client_write(uri, 'write -P 51 5M 4k', f'{d}/expected.raw')
        client_write(uri, 'write -P 52 20M 8k', f'{d}/expected.raw')
        q.cmd('block-job-set-speed', device='c', speed=0)
        q.wait('BLOCK_JOB_READY', 30)
        client_write(uri, 'write -P 53 7M 4k', f'{d}/expected.raw')
        q.cmd('job-complete', id='c')
        q.wait('BLOCK_JOB_COMPLETED', 30)
        nodes = q.cmd('query-named-block-nodes', flat=True)['return']
        base = [n for n in nodes if n['image']['filename'].endswith('l0.qcow2') and n['drv'] == 'qcow2'][0]
        bm = {b['name']: b for b in base.get('dirty-bitmaps', [])}
        assert bm['b']['count'] == 4 * 65536 and bm['b']['persistent'], bm
        q.cmd('quit'); p.wait(10)
        check_all(names)
        compare(f'{d}/l0.qcow2', f'{d}/expected.raw')
        info = subprocess.run(['qemu-img', 'info', '--output=json', f'{d}/l0.qcow2'], capture_output=True, text=True).stdout
        assert '"name": "b"' in info, info
        # restart on base alone and map the bitmap over NBD
        p, q, uri = start()
        q.cmd('blockdev-add', driver='qcow2', node_name='top', file={'driver': 'file', 'filename': f'{d}/l0.qcow2'})
        r = q.cmd('block-export-add', type='nbd', id='e', node_name='top', writable=True, bitmaps=['b'])
        assert 'return' in r, r
        out = subprocess.run(['nbdinfo', '--map=qemu:dirty-bitmap:b', '--json', uri], capture_output=True, text=True, check=True).stdout
        dirty = [(e['offset'], e['length']) for e in json.loads(out) if e['type'] & 1]
        print('DIRTY', dirty)
        assert dirty == [(1 * M, 65536), (5 * M, 65536), (7 * M, 65536), (20 * M, 65536)], dirty
        q.cmd('quit'); p.wait(10)
    elif scenario == 'converge':
        # fio writes flat out over 4 MiB while the job may copy only 2 MiB/s: the background
        # copy cannot catch up; blockd switches to write-blocking and must reach READY.
        if not shutil.which('fio'): sys.exit('missing fio')
        names = chain(2)
        p, q, uri = start()
        add_top(q, 'l1.qcow2')
        log = f'{d}/fio.iolog'
        fio = subprocess.Popen(['fio', '--name=w', '--ioengine=nbd', f'--uri={uri}', '--rw=randwrite', '--bs=4k',
                                '--offset=8M', '--size=4M', '--iodepth=8', '--time_based', '--runtime=14',
                                '--verify=crc32c', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse',
                                f'--write_iolog={log}'],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fio_logged(log)                       # fio is writing flat out before the job starts
        t0 = time.monotonic()
        r = q.cmd('block-commit', job_id='c', device='top', speed=2 * M)
        assert 'return' in r, r
        ready = None
        while time.monotonic() - t0 < 12 and ready is None:      # a deadline: polls the condition
            time.sleep(0.25)
            if any(e['event'] == 'BLOCK_JOB_READY' for e in q.events) or \
               q.cmd('query-block-jobs')['return'][0]['ready']:
                ready = time.monotonic() - t0
        print('READY-AFTER', ready)
        if ready is not None:
            q.cmd('job-complete', id='c')
            q.wait('BLOCK_JOB_COMPLETED', 30)
        else:
            q.cmd('job-cancel', id='c')
            q.wait('BLOCK_JOB_CANCELLED', 30)
        out, _ = fio.communicate(timeout=60)
        assert fio.returncode == 0, out
        q.cmd('quit'); p.wait(10)
        check_all(names)
        if not is_qsd: assert ready is not None, 'never ready'
    elif scenario == 'cancel-running':
        names = chain(3)
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/l2.qcow2', f'{d}/expected.raw')
        p, q, uri = start()
        add_top(q, 'l2.qcow2')
        r = q.cmd('block-commit', job_id='c', device='top', speed=1 * M)
        assert 'return' in r, r
        progressed(q)
        q.cmd('job-cancel', id='c')
        q.wait('BLOCK_JOB_CANCELLED', 30)
        q.wait_status('null')
        compare(uri, f'{d}/expected.raw')
        q.cmd('quit'); p.wait(10)
        check_all(names)
        compare(f'{d}/l2.qcow2', f'{d}/expected.raw')
    elif scenario == 'pause':
        names = chain(3)
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/l2.qcow2', f'{d}/expected.raw')
        p, q, uri = start()
        add_top(q, 'l2.qcow2')
        r = q.cmd('block-commit', job_id='c', device='top', top_node='top', speed=2 * M,
                  auto_finalize=False, auto_dismiss=False)
        progressed(q)
        q.cmd('job-pause', id='c')
        q.wait_status('paused')
        j1 = q.cmd('query-block-jobs')['return'][0]
        observe(0.5)                          # a paused job must not progress
        j2 = q.cmd('query-block-jobs')['return'][0]
        assert j1['offset'] == j2['offset'] and j2['paused'], (j1, j2)
        q.cmd('job-resume', id='c')
        q.cmd('block-job-set-speed', device='c', speed=0)
        q.wait('BLOCK_JOB_READY', 30)
        q.cmd('job-complete', id='c')
        q.wait('BLOCK_JOB_PENDING', 30)
        q.cmd('job-finalize', id='c')
        q.wait('BLOCK_JOB_COMPLETED', 30)
        q.cmd('job-dismiss', id='c')
        compare(uri, f'{d}/expected.raw')
        q.cmd('quit'); p.wait(10)
        check_all(names)
        compare(f'{d}/l0.qcow2', f'{d}/expected.raw')
    elif scenario == 'kill':
        names = chain(4)
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/l3.qcow2', f'{d}/expected.raw')
        p, q, uri = start()
        add_top(q, 'l3.qcow2')
        q.cmd('block-commit', job_id='c', device='top', top=f'{d}/l2.qcow2', speed=4 * M)
        progressed(q, 1 * M)                  # killed in the middle of the copy
        p.send_signal(signal.SIGKILL); p.wait(10)
        check_all(names)
        compare(f'{d}/l3.qcow2', f'{d}/expected.raw')
    elif scenario == 'bad':
        names = chain(4)
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/l2.qcow2', f'{d}/expected.raw')
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/other.qcow2', '32M')
        p, q, uri = start()
        q.cmd('blockdev-add', driver='qcow2', node_name='other', file={'driver': 'file', 'filename': f'{d}/other.qcow2'})
        q.cmd('blockdev-add', driver='qcow2', node_name='ro', read_only=True,
              file={'driver': 'file', 'filename': f'{d}/l0.qcow2'})
        q.cmd('blockdev-add', driver='qcow2', node_name='mid', backing='ro',
              file={'driver': 'file', 'filename': f'{d}/l1.qcow2'})
        q.cmd('blockdev-add', driver='qcow2', node_name='top', backing='mid',
              file={'driver': 'file', 'filename': f'{d}/l2.qcow2'})
        q.cmd('block-export-add', type='nbd', id='e', node_name='top', writable=True)
        bad = [dict(job_id='b1', device='top', top_node='other'),
               dict(job_id='b2', device='top', top_node='mid', base_node='top'),
               dict(job_id='b3', device='top', base_node='other'),
               dict(job_id='b4', device='nope'),
               dict(job_id='b5', device='top', top=f'{d}/nope.qcow2'),
               dict(job_id='b6', device='top', top_node='mid', base_node='mid'),
               dict(job_id='b7', device='top', base_node='ro', top='x', top_node='mid')]
        errs = [q.cmd('block-commit', **a) for a in bad]
        r = q.cmd('block-commit', job_id='c0', device='top', top_node='mid', base_node='ro', speed=1024)
        assert 'return' in r, r
        errs.append(q.cmd('block-commit', job_id='b8', device='top', top_node='mid', base_node='ro'))
        errs.append(q.cmd('block-commit', job_id='b9', device='top'))
        errs.append(q.cmd('block-stream', job_id='b10', device='top', base_node='ro'))
        errs.append(q.cmd('blockdev-del', node_name='mid'))
        for e in errs: print('ERR', json.dumps(e))
        q.cmd('job-cancel', id='c0'); q.wait('BLOCK_JOB_CANCELLED', 10)
        r = q.cmd('block-commit', job_id='c1', device='top', top_node='mid', base_node='ro')
        print('RO-BASE', json.dumps(r))
        if 'return' in r:
            q.wait('BLOCK_JOB_COMPLETED', 30)
        for e in errs: assert 'error' in e, e
        compare(uri, f'{d}/expected.raw')
        q.cmd('quit'); p.wait(10)
        check_all(['l0.qcow2', 'l1.qcow2', 'l2.qcow2'])
        compare(f'{d}/l2.qcow2', f'{d}/expected.raw')
    else:
        print('unknown scenario'); sys.exit(2)
finally:
    if p is not None and p.poll() is None: p.kill()
print('OK', d)
# Only a failure keeps its directory (for a look); every run writes ~150 MB of images.
shutil.rmtree(d, ignore_errors=True)
