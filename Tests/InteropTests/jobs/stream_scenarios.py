#!/usr/bin/env python3
"""block-stream scenarios, one per run, against blockd or qemu-storage-daemon.

Usage: stream_scenarios.py DAEMON SCENARIO
Exit 0 when the scenario passes, else 1 with the reason on stderr (a missing tool too).
The `events` scenario prints its normalised QMP transcript (the golden file beside this
script is qemu-storage-daemon 7.2's).

Every chain is made with qemu-img/qemu-io: layer i writes its own pattern over a region that
overlaps the layers below; one middle layer also writes zeroes over data below. The expected
content is a raw twin made with `qemu-img convert` before anything runs.
"""
import json, os, shutil, signal, subprocess, sys, tempfile, time
D = tempfile.mkdtemp(prefix='stream-')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmpmini
from qmpmini import Q, observe
LINES = []
qmpmini.print = lambda *a, **k: LINES.append(' '.join(str(x) for x in a).replace(D, '$D'))

for tool in ('qemu-img', 'qemu-io'):
    if not shutil.which(tool):
        sys.exit(f'missing {tool}')

DAEMON, SCENARIO = sys.argv[1], sys.argv[2]
K, M = 1024, 1 << 20
SIZE = 4 * M


def fail(msg):
    print('\n'.join(LINES[-30:]), file=sys.stderr)
    print(f'FAIL {SCENARIO}: {msg}', file=sys.stderr)
    sys.exit(1)


def sh(*a, check=True):
    r = subprocess.run(a, capture_output=True, text=True)
    if check and r.returncode != 0:
        fail(f'{" ".join(a)} -> {r.returncode}\n{r.stdout}{r.stderr}')
    return r


def layer_writes(i, n):
    """qemu-io commands for layer i of n: overlapping patterns, zeroes in layer 1 of 3+."""
    if i == 0:
        return [f'write -P 0x10 0 {SIZE}']
    step = SIZE // (n + 1)
    cmds = [f'write -P {0x10 + i} {i * step - 64 * K} {step + 192 * K}',
            f'write -P {0x20 + i} {SIZE - i * 320 * K} 64k']
    if i == 1 and n >= 3:
        cmds.append(f'write -z {SIZE // 2 + 128 * K} 256k')
    return cmds


def make_chain(n, size=None):
    """l0 (base) … l{n-1} (top); returns the raw twin's path."""
    global SIZE
    if size: SIZE = size
    for i in range(n):
        f = f'{D}/l{i}.qcow2'
        if i == 0:
            sh('qemu-img', 'create', '-q', '-f', 'qcow2', f, str(SIZE))
        else:
            sh('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', f'l{i-1}.qcow2', '-F', 'qcow2', f)
        for c in layer_writes(i, n):
            sh('qemu-io', '-f', 'qcow2', '-c', c, f)
    sh('qemu-img', 'convert', '-O', 'raw', f'{D}/l{n-1}.qcow2', f'{D}/expected.raw')
    return f'{D}/expected.raw'


class Daemon:
    def __init__(self):
        self.sock, self.nbd = f'{D}/qmp.sock', f'{D}/nbd.sock'
        self.log = open(f'{D}/daemon.log', 'w')
        self.p = subprocess.Popen([DAEMON, '--chardev', f'socket,path={self.sock},server=on,wait=off,id=c',
                                   '--monitor', 'chardev=c', '--nbd-server', f'addr.type=unix,addr.path={self.nbd}'],
                                  stdout=self.log, stderr=self.log)
        self.q = Q(self.sock)

    def cmd(self, _name, **args):
        return self.q.cmd(_name, **args)

    def ok(self, _name, **args):
        r = self.q.cmd(_name, **args)
        if 'return' not in r: fail(f'{_name} {args}: {r}')
        return r['return']

    def err(self, _name, **args):
        r = self.q.cmd(_name, **args)
        if 'error' not in r: fail(f'{_name} {args} should fail: {r}')
        return r['error']['desc']

    def add_chain(self, n, backing=None):
        """blockdev-add l0..l{n-1} bottom-up; `backing` maps a layer to another node name."""
        backing = backing or {}
        for i in range(n):
            args = dict(driver='qcow2', node_name=f'l{i}',
                        file={'driver': 'file', 'filename': f'{D}/l{i}.qcow2'})
            args['backing'] = backing.get(i, f'l{i-1}' if i else None)
            self.ok('blockdev-add', **args)

    def export(self, node):
        self.ok('block-export-add', type='nbd', id='e', node_name=node, writable=True)
        return f'nbd+unix:///{node}?socket={self.nbd}'

    def wait(self, event, t=30):
        try:
            return self.q.wait(event, t)
        except Exception as e:
            fail(f'no {event}: {e}')

    def progressed(self, at_least=1):
        """Waits until the job has copied at least `at_least` bytes; fails if it ended first."""
        deadline = time.monotonic() + 10
        while True:
            jobs = self.ok('query-block-jobs')
            if not jobs: fail(f'the job ended before copying {at_least} bytes')
            if jobs[0]['offset'] >= at_least: return jobs[0]
            if time.monotonic() > deadline: fail(f'the job copied only {jobs[0]["offset"]} bytes in 10 s')
            time.sleep(0.02)

    def quit(self):
        self.cmd('quit')
        try: self.p.wait(10)
        except subprocess.TimeoutExpired: self.p.kill(); fail('daemon did not quit')

    def kill9(self):
        self.p.send_signal(signal.SIGKILL); self.p.wait(10)


def compare(a, b, fa='raw'):
    r = sh('qemu-img', 'compare', '-f', fa, '-F', 'raw', a, b, check=False)
    if r.returncode != 0: fail(f'compare {a} {b}: {r.stdout}{r.stderr}')


def chain_files(top):
    """File names of the chain as qemu-img info --backing-chain reports it."""
    # -U: the daemon may still hold the chain (its image locks refuse a plain open, as QEMU's).
    out = json.loads(sh('qemu-img', 'info', '-U', '--output=json', '--backing-chain', top).stdout)
    return [os.path.basename(i['filename']) for i in out]


def expect_chain(top, names):
    got = chain_files(f'{D}/{top}')
    if got != names: fail(f'chain of {top}: {got}, expected {names}')


def check_all(n, leaks_ok=False):
    for i in range(n):
        if os.path.exists(f'{D}/l{i}.qcow2'):
            r = sh('qemu-img', 'check', f'{D}/l{i}.qcow2', check=False)
            # Exit 3: leaked clusters only ("no harm to data"), what QEMU itself leaves after
            # a crash between a refcount update and the L2 update.
            if r.returncode != 0 and not (leaks_ok and r.returncode == 3):
                fail(f'qemu-img check l{i}.qcow2: {r.returncode}\n{r.stdout}{r.stderr}')


def stream_and_check(n, expected_chain, **stream_args):
    raw = make_chain(n)
    d = Daemon()
    if 'base' in stream_args:
        # The chain opened from the images' headers, as `base` (a file name) is meant for.
        d.ok('blockdev-add', driver='qcow2', node_name=f'l{n-1}',
             file={'driver': 'file', 'filename': f'{D}/l{n-1}.qcow2'})
    else:
        d.add_chain(n)
    uri = d.export(f'l{n-1}')
    d.ok('block-stream', job_id='s', device=f'l{n-1}', **stream_args)
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data']: fail(ev)
    compare(uri, raw)
    d.quit()
    expect_chain(f'l{n-1}.qcow2', expected_chain)
    check_all(n)
    compare(f'{D}/l{n-1}.qcow2', raw, 'qcow2')


# ---------------------------------------------------------------- chains
def chain2_full(): stream_and_check(2, ['l1.qcow2'])
def chain2_base_node(): stream_and_check(2, ['l1.qcow2', 'l0.qcow2'], base_node='l0')
def chain3_full(): stream_and_check(3, ['l2.qcow2'])
def chain3_base_node(): stream_and_check(3, ['l2.qcow2', 'l0.qcow2'], base_node='l0')
def chain3_base_file(): stream_and_check(3, ['l2.qcow2', 'l0.qcow2'], base=f'{D}/l0.qcow2')
def chain5_full(): stream_and_check(5, ['l4.qcow2'])
def chain5_base_node(): stream_and_check(5, ['l4.qcow2', 'l2.qcow2', 'l1.qcow2', 'l0.qcow2'], base_node='l2')
def chain5_base_file(): stream_and_check(5, ['l4.qcow2', 'l1.qcow2', 'l0.qcow2'], base=f'{D}/l1.qcow2')


# ---------------------------------------------------------------- under client writes
def qemu_io_writes_into_copied_regions():
    """Writes land in the range being copied at that moment (speed widens the window)."""
    raw = make_chain(3, 16 * M)
    d = Daemon()
    d.add_chain(3)
    uri = d.export('l2')
    d.ok('block-stream', job_id='s', device='l2', base_node='l0', speed=2 * M)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 3.2:
        # Where the job is now, and just ahead of it.
        jobs = d.ok('query-block-jobs')
        if not jobs: break
        off = (jobs[0]['offset'] // (64 * K)) * 64 * K + (i % 4) * 96 * K + 512 * (i % 7)
        if off + 8 * K > 16 * M: off = 16 * M - 8 * K
        c = f'write -P {0x40 + i % 64} {off} 8k'
        sh('qemu-io', '-f', 'raw', '-c', c, uri)
        sh('qemu-io', '-f', 'raw', '-c', c, raw)
        i += 1
    d.cmd('block-job-set-speed', device='s', speed=0)
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data']: fail(ev)
    compare(uri, raw)
    d.quit()
    expect_chain('l2.qcow2', ['l2.qcow2', 'l0.qcow2'])
    check_all(3)
    compare(f'{D}/l2.qcow2', raw, 'qcow2')
    if i < 5: fail(f'only {i} writes during the job')


def fio_verify_during_stream():
    """fio writes with --verify to the export during the whole job; its data survives."""
    if not shutil.which('fio'): sys.exit('missing fio')
    raw = make_chain(3, 16 * M)
    d = Daemon()
    d.add_chain(3)
    uri = d.export('l2')
    d.ok('block-stream', job_id='s', device='l2', speed=6 * M)
    base = ['fio', '--name=v', '--ioengine=nbd', f'--uri={uri}', '--bs=4k', '--offset=2M', '--size=8M',
            '--verify=crc32c', '--verify_fatal=1', '--iodepth=4', '--randrepeat=1']
    runs = 0
    while True:
        jobs = d.ok('query-block-jobs')
        if not jobs: break
        r = sh(*base, '--rw=randwrite', '--number_ios=600', f'--randseed={runs + 1}', '--do_verify=1', check=False)
        if r.returncode != 0: fail(f'fio: {r.stdout}{r.stderr}')
        runs += 1
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data']: fail(ev)
    if runs < 2: fail(f'fio ran only {runs} times during the job')
    # Every block fio wrote in its last run reads back intact after the stream.
    r = sh(*base, '--rw=randwrite', '--number_ios=600', f'--randseed={runs}', '--verify_only', check=False)
    if r.returncode != 0 or 'verify' in r.stderr.lower(): fail(f'fio verify after stream: {r.stdout}{r.stderr}')
    d.quit()
    expect_chain('l2.qcow2', ['l2.qcow2'])
    check_all(3)
    # Outside fio's region the data is the chain's.
    for off, ln in ((0, 2 * M), (10 * M, 6 * M)):
        a = sh('qemu-io', '-f', 'qcow2', '-c', f'read -v {off} 64k', f'{D}/l2.qcow2').stdout
        b = sh('qemu-io', '-f', 'raw', '-c', f'read -v {off} 64k', raw).stdout
        if a.split('read ')[0] != b.split('read ')[0]: fail(f'data at {off} changed')


# ---------------------------------------------------------------- verbs and events
def events():
    """A scripted session; prints the normalised transcript (timestamps masked)."""
    make_chain(3, 8 * M)
    d = Daemon()
    d.add_chain(3)
    d.cmd('block-stream', job_id='s', device='l2', base_node='l0', speed=1,
          auto_finalize=False, auto_dismiss=False)
    d.wait('JOB_STATUS_CHANGE'); d.wait('JOB_STATUS_CHANGE')   # created, running
    d.cmd('job-pause', id='s')
    d.wait('JOB_STATUS_CHANGE')                                   # paused
    d.cmd('job-pause', id='s')
    d.cmd('job-resume', id='s')
    d.wait('JOB_STATUS_CHANGE')                                   # running
    d.cmd('job-finalize', id='s')
    d.cmd('job-dismiss', id='s')
    d.cmd('block-job-set-speed', device='s', speed=0)
    d.wait('BLOCK_JOB_PENDING')
    d.cmd('job-dismiss', id='s')
    d.cmd('job-finalize', id='s')
    d.wait('BLOCK_JOB_COMPLETED'); d.wait('JOB_STATUS_CHANGE')
    d.cmd('job-resume', id='s')
    d.cmd('job-dismiss', id='s')
    d.wait('JOB_STATUS_CHANGE')
    d.cmd('query-jobs')
    d.cmd('block-job-cancel', device='s')
    d.cmd('job-cancel', id='nope')
    d.quit()
    # Command answers in order, then the events in the order they came (their interleaving
    # with the answers is a race in both daemons).
    for l in LINES:
        if l.startswith('CMD'): print(l)
    for l in LINES:
        if l.startswith('EVENT'): print(l)


def pause_resume_set_speed():
    raw = make_chain(3, 8 * M)
    d = Daemon()
    d.add_chain(3)
    uri = d.export('l2')
    d.ok('block-stream', job_id='s', device='l2', speed=2 * M)
    d.progressed()
    d.ok('block-job-pause', device='s')
    d.wait('JOB_STATUS_CHANGE')                                   # paused: parked at its checkpoint
    a = d.ok('query-block-jobs')[0]
    observe(0.5)                                                  # a paused job must not progress
    b = d.ok('query-block-jobs')[0]
    if not (a['paused'] and a['offset'] == b['offset'] and a['offset'] < b['len']): fail(f'not paused: {a} {b}')
    if d.err('block-job-pause', device='s') != 'Job is already paused': fail('double pause')
    d.ok('block-job-resume', device='s')
    d.ok('block-job-set-speed', device='s', speed=0)
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data'] or ev['data']['speed'] != 0: fail(ev)
    compare(uri, raw)
    d.quit()
    expect_chain('l2.qcow2', ['l2.qcow2'])
    check_all(3)


def cancel_keeps_chain():
    raw = make_chain(3, 8 * M)
    d = Daemon()
    d.add_chain(3)
    uri = d.export('l2')
    d.ok('block-stream', job_id='s', device='l2', base_node='l0', speed=2 * M)
    d.progressed()
    d.ok('block-job-cancel', device='s')
    ev = d.wait('BLOCK_JOB_CANCELLED')
    if not (0 < ev['data']['offset'] < ev['data']['len']): fail(f'cancel offset: {ev}')
    compare(uri, raw)
    # The chain is usable and unfrozen: a new job on it works.
    d.ok('block-stream', job_id='t', device='l2', base_node='l1')
    d.wait('BLOCK_JOB_COMPLETED')
    d.quit()
    expect_chain('l2.qcow2', ['l2.qcow2', 'l1.qcow2', 'l0.qcow2'])
    check_all(3)
    compare(f'{D}/l2.qcow2', raw, 'qcow2')


def finalize_and_dismiss_by_hand():
    raw = make_chain(3)
    d = Daemon()
    d.add_chain(3)
    uri = d.export('l2')
    d.ok('block-stream', job_id='s', device='l2', auto_finalize=False, auto_dismiss=False)
    d.wait('BLOCK_JOB_PENDING')
    # Pending: the graph is not changed yet.
    if d.err('blockdev-del', node_name='l1') == '': fail('l1 deletable while pending')
    expect_chain('l2.qcow2', ['l2.qcow2', 'l1.qcow2', 'l0.qcow2'])
    d.ok('job-finalize', id='s')
    d.wait('BLOCK_JOB_COMPLETED')
    st = [j['status'] for j in d.ok('query-jobs')]
    if st != ['concluded']: fail(f'after finalize: {st}')
    d.ok('job-dismiss', id='s')
    if d.ok('query-jobs') != []: fail('dismissed job still listed')
    compare(uri, raw)
    d.quit()
    expect_chain('l2.qcow2', ['l2.qcow2'])
    check_all(3)


# ---------------------------------------------------------------- errors
def errors_change_nothing():
    raw = make_chain(3, 8 * M)
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{D}/other.qcow2', str(SIZE))
    d = Daemon()
    d.add_chain(3)
    d.ok('blockdev-add', driver='qcow2', node_name='other', file={'driver': 'file', 'filename': f'{D}/other.qcow2'})
    uri = d.export('l2')
    for base_args, want in (({'base_node': 'other'}, "Node 'other' is not a backing image of 'l2'"),
                            ({'base': f'{D}/other.qcow2'}, f"Can't find '{D}/other.qcow2' in the backing chain"),
                            ({'base_node': 'l2'}, "Node 'l2' is not a backing image of 'l2'")):
        got = d.err('block-stream', job_id='x', device='l2', **base_args)
        if got != want: fail(f'{base_args}: {got!r}, expected {want!r}')
    got = d.err('block-stream', job_id='x', device='other')
    if 'no backing file' not in got: fail(f'no backing: {got}')
    d.ok('block-stream', job_id='s', device='l2', base_node='l0', speed=1 * M)
    got = d.err('blockdev-del', node_name='l1')
    if got != "Node 'l1' is busy: block device is in use by block job: stream": fail(f'del frozen: {got}')
    got = d.err('block-stream', job_id='t', device='l2')
    if 'is busy' not in got and 'frozen' not in got: fail(f'second job: {got}')
    got = d.err('block-stream', job_id='t', device='l1', base_node='l0')
    if 'is busy' not in got and 'frozen' not in got: fail(f'second job below: {got}')
    got = d.err('block-stream', job_id='s', device='other')
    got = d.err('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'l2', 'file': '#x', 'backing': 'l0'}])
    if [j['device'] for j in d.ok('query-block-jobs')] != ['s']: fail('job list changed')
    d.ok('block-job-cancel', device='s')
    d.wait('BLOCK_JOB_CANCELLED')
    compare(uri, raw)
    d.quit()
    expect_chain('l2.qcow2', ['l2.qcow2', 'l1.qcow2', 'l0.qcow2'])
    check_all(3)
    compare(f'{D}/l2.qcow2', raw, 'qcow2')


def reopen_refuses_frozen_link():
    raw = make_chain(3, 8 * M)
    d = Daemon()
    for i in range(3):
        d.ok('blockdev-add', driver='file', node_name=f'f{i}', filename=f'{D}/l{i}.qcow2')
        d.ok('blockdev-add', driver='qcow2', node_name=f'l{i}', file=f'f{i}', backing=f'l{i-1}' if i else None)
    uri = d.export('l2')
    d.ok('block-stream', job_id='s', device='l2', base_node='l0', speed=1 * M)
    got = d.err('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'l2', 'file': 'f2', 'backing': 'l0'}])
    if got != "Cannot change frozen 'backing' link from 'l2' to 'l1'": fail(got)
    got = d.err('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'l2', 'file': 'f2', 'backing': None}])
    if got != "Cannot change frozen 'backing' link from 'l2' to 'l1'": fail(got)
    got = d.err('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'l0', 'file': 'f0', 'backing': 'l2'}])
    if 'cycle' not in got: fail(got)
    d.ok('block-job-set-speed', device='s', speed=0)
    d.wait('BLOCK_JOB_COMPLETED')
    compare(uri, raw)
    d.quit()
    expect_chain('l2.qcow2', ['l2.qcow2', 'l0.qcow2'])


# ---------------------------------------------------------------- filters in the chain
def add_filter(d, kind, name, file):
    if kind == 'throttle':
        if 'tg' not in getattr(d, 'groups', ()):
            d.ok('object-add', qom_type='throttle-group', id='tg', limits={'bps-total': 256 * M})
            d.groups = ('tg',)
        d.ok('blockdev-add', driver='throttle', node_name=name, file=file, throttle_group='tg')
    else:
        d.ok('blockdev-add', driver=kind, node_name=name, file=file)


def filter_at(kind, where):
    """A filter above top, between l2 and l1, or directly above base l0; stream to l0."""
    raw = make_chain(4)
    d = Daemon()
    if where == 'above_top':
        d.add_chain(4)
        add_filter(d, kind, 'F', 'l3')
        device, expect = 'F', ['l3.qcow2', 'l0.qcow2']
    elif where == 'between_layers':
        d.add_chain(2)
        add_filter(d, kind, 'F', 'l1')
        d.ok('blockdev-add', driver='qcow2', node_name='l2', file={'driver': 'file', 'filename': f'{D}/l2.qcow2'}, backing='F')
        d.ok('blockdev-add', driver='qcow2', node_name='l3', file={'driver': 'file', 'filename': f'{D}/l3.qcow2'}, backing='l2')
        device, expect = 'l3', ['l3.qcow2', 'l0.qcow2']
    else:
        d.add_chain(1)
        add_filter(d, kind, 'F', 'l0')
        d.add_chain(0)
        for i in (1, 2, 3):
            d.ok('blockdev-add', driver='qcow2', node_name=f'l{i}', file={'driver': 'file', 'filename': f'{D}/l{i}.qcow2'},
                 backing='F' if i == 1 else f'l{i-1}')
        device, expect = 'l3', ['l3.qcow2', 'l0.qcow2']
    uri = d.export(device)
    d.ok('block-stream', job_id='s', device=device, base_node='l0')
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data']: fail(ev)
    compare(uri, raw)
    nodes = {n['node-name']: n for n in d.ok('query-named-block-nodes', flat=True)}
    if where == 'above_top' and 'error' not in d.cmd('blockdev-del', node_name='l3'): fail('filter above top moved')
    d.quit()
    expect_chain('l3.qcow2', expect)
    check_all(4)
    compare(f'{D}/l3.qcow2', raw, 'qcow2')


def cor_above_top(): filter_at('copy-on-read', 'above_top')
def cor_between_layers(): filter_at('copy-on-read', 'between_layers')
def cor_above_base(): filter_at('copy-on-read', 'above_base')
def throttle_above_top(): filter_at('throttle', 'above_top')
def throttle_between_layers(): filter_at('throttle', 'between_layers')
def throttle_above_base(): filter_at('throttle', 'above_base')


def user_changes_filter(case):
    """The seed discussion's cases: the user changes the graph below above_base mid-job."""
    raw = make_chain(3, 8 * M)
    d = Daemon()
    for i in range(3):
        d.ok('blockdev-add', driver='file', node_name=f'f{i}', filename=f'{D}/l{i}.qcow2')
    d.ok('blockdev-add', driver='qcow2', node_name='l0', file='f0')
    d.ok('blockdev-add', driver='null-filter', node_name='F1', file='l0')
    d.ok('blockdev-add', driver='qcow2', node_name='l1', file='f1', backing='F1')
    d.ok('blockdev-add', driver='qcow2', node_name='l2', file='f2', backing='l1')
    uri = d.export('l2')
    base = 'l0' if case in ('insert_above_base', 'replace_base') else 'F1'
    d.ok('block-stream', job_id='s', device='l2', base_node=base, speed=2 * M)
    d.progressed()                         # the user changes the graph in the middle of the job
    d.ok('job-pause', id='s'); d.wait('JOB_STATUS_CHANGE')
    if case == 'remove_filter_base':       # Kevin's case 1: base-node=F1, F1 dropped -> l0 is the new backing
        d.ok('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'l1', 'file': 'f1', 'backing': 'l0'}])
        want = ['l2', 'l0']
    elif case == 'insert_above_filter_base':  # case 2: F1b inserted between F1 and l1 is kept
        d.ok('object-add', qom_type='throttle-group', id='tg', limits={'iops-total': 100000})
        d.ok('blockdev-add', driver='throttle', node_name='F1b', file='F1', throttle_group='tg')
        d.ok('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'l1', 'file': 'f1', 'backing': 'F1b'}])
        want = ['l2', 'F1b', 'F1', 'l0']
    elif case == 'insert_above_base':      # base-node=l0, a filter inserted directly above base is kept
        d.ok('blockdev-add', driver='copy-on-read', node_name='C', file='l0')
        d.ok('blockdev-reopen', options=[{'driver': 'null-filter', 'node-name': 'F1', 'file': 'C'}])
        want = ['l2', 'C', 'l0']
    else:                                  # replace_base: F1 now points at a copy of l0
        sh('qemu-img', 'convert', '-U', '-O', 'qcow2', f'{D}/l0.qcow2', f'{D}/l0copy.qcow2')
        d.ok('blockdev-add', driver='qcow2', node_name='l0copy', file={'driver': 'file', 'filename': f'{D}/l0copy.qcow2'})
        d.ok('blockdev-reopen', options=[{'driver': 'null-filter', 'node-name': 'F1', 'file': 'l0copy'}])
        want = ['l2', 'l0copy']
    d.ok('job-resume', id='s')
    d.ok('block-job-set-speed', device='s', speed=0)
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data']: fail(ev)
    compare(uri, raw)
    # The runtime chain: nodes in it cannot be deleted, the others can.
    for n in ('l1', 'F1', 'F1b', 'C', 'l0copy'):
        if n in want or n not in {x['node-name'] for x in d.ok('query-named-block-nodes', flat=True)}: continue
        r = d.cmd('blockdev-del', node_name=n)
        if 'error' in r: fail(f'{n} should be out of the chain: {r}')
    for n in want[1:]:
        if 'error' not in d.cmd('blockdev-del', node_name=n): fail(f'{n} should be in the chain')
    d.quit()
    files = chain_files(f'{D}/l2.qcow2')
    want_files = ['l2.qcow2', want[-1] + '.qcow2']
    if files != want_files: fail(f'header chain {files}, expected {want_files}')
    check_all(3)
    compare(f'{D}/l2.qcow2', raw, 'qcow2')


def remove_filter_base(): user_changes_filter('remove_filter_base')
def insert_above_filter_base(): user_changes_filter('insert_above_filter_base')
def insert_above_base(): user_changes_filter('insert_above_base')
def replace_base(): user_changes_filter('replace_base')


# ---------------------------------------------------------------- bitmaps, crash, filters alone
def bitmap_sees_only_client_writes():
    raw = make_chain(3, 8 * M)
    d = Daemon()
    d.add_chain(3)
    d.ok('block-dirty-bitmap-add', node='l2', name='b', granularity=64 * K)
    uri = d.export('l2')
    d.ok('block-stream', job_id='s', device='l2', speed=4 * M)
    for off in (1 * M, 3 * M + 64 * K, 6 * M):
        c = f'write -P 0x77 {off} 64k'
        sh('qemu-io', '-f', 'raw', '-c', c, uri)
        sh('qemu-io', '-f', 'raw', '-c', c, raw)
    d.ok('block-job-set-speed', device='s', speed=0)
    d.wait('BLOCK_JOB_COMPLETED')
    nodes = {n['node-name']: n for n in d.ok('query-named-block-nodes', flat=True)}
    bm = [b for b in nodes['l2'].get('dirty-bitmaps', []) if b['name'] == 'b']
    if not bm or bm[0]['count'] != 3 * 64 * K: fail(f'bitmap: {bm}')
    compare(uri, raw)
    d.quit()


def kill9_during_stream():
    raw = make_chain(3, 16 * M)
    d = Daemon()
    d.add_chain(3)
    d.ok('block-stream', job_id='s', device='l2', speed=8 * M)
    d.progressed(2 * M)                    # killed in the middle of the copy
    d.kill9()
    check_all(3, leaks_ok=True)
    expect_chain('l2.qcow2', ['l2.qcow2', 'l1.qcow2', 'l0.qcow2'])
    compare(f'{D}/l2.qcow2', raw, 'qcow2')


def copy_on_read_populates_top():
    raw = make_chain(2)
    d = Daemon()
    d.add_chain(2)
    d.ok('block-dirty-bitmap-add', node='l1', name='b')
    d.ok('blockdev-add', driver='copy-on-read', node_name='C', file='l1')
    uri = d.export('C')
    compare(uri, raw)
    nodes = {n['node-name']: n for n in d.ok('query-named-block-nodes', flat=True)}
    bm = nodes['l1'].get('dirty-bitmaps', [])
    if not bm or bm[0]['count'] != 0: fail(f'copy-on-read dirtied the bitmap: {bm}')
    d.quit()
    m = json.loads(sh('qemu-img', 'map', '--output=json', f'{D}/l1.qcow2').stdout)
    below = [e for e in m if e['data'] and e['depth'] != 0]
    if below: fail(f'data still below top after reading through copy-on-read: {below}')
    check_all(2)
    compare(f'{D}/l1.qcow2', raw, 'qcow2')


def throttle_limits():
    make_chain(1)
    d = Daemon()
    d.add_chain(1)
    d.ok('object-add', qom_type='throttle-group', id='tg', limits={'iops-total': 100})
    d.ok('blockdev-add', driver='throttle', node_name='T', file='l0', throttle_group='tg')
    d.ok('block-export-add', type='nbd', id='e', node_name='T')
    d.ok('block-export-add', type='nbd', id='e0', node_name='l0')
    reads = sum((['-c', f'read -q {i * 4 * K} 4k'] for i in range(300)), [])
    def timed(name):
        t = time.monotonic()
        sh('qemu-io', '-r', '-f', 'raw', *reads, f'nbd+unix:///{name}?socket={D}/nbd.sock')
        return time.monotonic() - t
    free, limited = timed('l0'), timed('T')
    # 300 requests at 100 IOPS with a one-second burst: about 2 s (QEMU's burst is similar).
    if not (1.5 < limited < 6) or free > 1.5: fail(f'throttled {limited:.2f} s, unthrottled {free:.2f} s')
    # A faster group, switched with blockdev-reopen, takes effect.
    d.ok('object-add', qom_type='throttle-group', id='fast', limits={'iops-total': 100000})
    d.ok('blockdev-reopen', options=[{'driver': 'throttle', 'node-name': 'T', 'file': 'l0', 'throttle-group': 'fast'}])
    if timed('T') > 1.5: fail('group change did not take effect')
    d.quit()


try:
    globals()[SCENARIO]()
finally:
    if os.environ.get('KEEP') is None:
        shutil.rmtree(D, ignore_errors=True)
print('OK', SCENARIO, file=sys.stderr)
