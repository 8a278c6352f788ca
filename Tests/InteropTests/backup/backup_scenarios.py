#!/usr/bin/python3
"""Point-in-time backup scenarios (copy-before-write, snapshot-access, blockdev-backup), one per
run, against blockd or qemu-storage-daemon.

Usage: backup_scenarios.py DAEMON SCENARIO
Exit 0 when the scenario passes, 77 when a tool is missing, else 1 with the reason on stderr.
Scenarios that print a transcript (`reference`, `errors`, `bitmap_modes`, `cbw_errors`,
`image_fleecing`) print it normalised on stdout; the golden files beside this script are
qemu-storage-daemon 7.2's.

Runs under /usr/bin/python3: libnbd's Python bindings (`import nbd`) pull the backups.
"""
import hashlib, json, os, re, shutil, signal, subprocess, sys, tempfile, threading, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'jobs'))
import qmpmini
from qmpmini import Q

for tool in ('qemu-img', 'qemu-io'):
    if not shutil.which(tool):
        print('missing', tool, file=sys.stderr); sys.exit(77)
try:
    import nbd
except ImportError:
    print('missing python3 module nbd (libnbd)', file=sys.stderr); sys.exit(77)

DAEMON, SCENARIO = sys.argv[1], sys.argv[2]
IS_QSD = 'qemu-storage-daemon' in DAEMON
D = tempfile.mkdtemp(prefix='backup-')
K, M = 1024, 1 << 20
LINES = []
LOCK = threading.Lock()


QUIET = threading.local()


def log(*a):
    # Quiet queries leave their answer out, not the events read meanwhile.
    if getattr(QUIET, 'on', False) and a and a[0] == 'CMD': return
    with LOCK:
        LINES.append(' '.join(str(x) for x in a).replace(D, '$D'))


qmpmini.print = log


def fail(msg):
    print('\n'.join(LINES[-40:]), file=sys.stderr)
    print(f'FAIL {SCENARIO}: {msg}', file=sys.stderr)
    for d in DAEMONS:
        d.kill()
    sys.exit(1)


def sh(*a, check=True, stdin=None):
    r = subprocess.run([str(x) for x in a], capture_output=True, text=True, stdin=stdin)
    if check and r.returncode != 0:
        fail(f'{" ".join(str(x) for x in a)} -> {r.returncode}\n{r.stdout}{r.stderr}')
    return r


def image(name, size, fmt='qcow2', backing=None, pattern=None):
    path = f'{D}/{name}'
    args = ['qemu-img', 'create', '-q', '-f', fmt]
    if backing:
        args += ['-b', backing, '-F', 'qcow2']
    sh(*args, path, str(size))
    if pattern is not None:
        sh('qemu-io', '-f', fmt, '-c', f'write -P {pattern} 0 {size}', path)
    return path


DAEMONS = []


class Daemon:
    def __init__(self, extra=()):
        self.sock, self.nbd = f'{D}/qmp.sock', f'{D}/nbd.sock'
        for p in (self.sock, self.nbd):
            if os.path.exists(p): os.unlink(p)
        self.log = open(f'{D}/daemon.log', 'a')
        self.p = subprocess.Popen([DAEMON, '--chardev', f'socket,path={self.sock},server=on,wait=off,id=c',
                                   '--monitor', 'chardev=c', '--nbd-server', f'addr.type=unix,addr.path={self.nbd}',
                                   *extra], stdout=self.log, stderr=self.log)
        DAEMONS.append(self)
        self.q = Q(self.sock)

    def uri(self, export):
        return f'nbd+unix:///{export}?socket={self.nbd}'

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

    def wait(self, event, t=60):
        try:
            return self.q.wait(event, t)
        except Exception as e:
            fail(f'no {event}: {e!r}')

    def add_qcow2(self, node, path, **extra):
        self.ok('blockdev-add', driver='qcow2', node_name=node, file={'driver': 'file', 'filename': path}, **extra)

    def quiet(self, _name, **args):
        """A query left out of the transcript."""
        QUIET.on = True
        try:
            return self.ok(_name, **args)
        finally:
            QUIET.on = False

    def graph(self):
        """Nodes (name, driver), exports and jobs: what a refused command must not change."""
        nodes = sorted((n['node-name'], n['drv']) for n in self.quiet('query-named-block-nodes', flat=True)
                       if not n['node-name'].startswith('#'))
        exports = sorted((e['id'], e['node-name']) for e in self.quiet('query-block-exports'))
        jobs = sorted(j['device'] for j in self.quiet('query-block-jobs'))
        return nodes, exports, jobs

    def bitmaps(self, node):
        for n in self.quiet('query-named-block-nodes', flat=True):
            if n['node-name'] == node:
                return {b['name']: b for b in n.get('dirty-bitmaps', []) if 'name' in b}
        return {}

    def quit(self):
        self.cmd('quit')
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill(); fail('daemon did not quit')

    def kill(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL); self.p.wait(10)


def connect(uri, contexts=()):
    h = nbd.NBD()
    for c in contexts: h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def read_all(uri, size, chunk=4 * M):
    h = connect(uri)
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    h.shutdown()
    return bytes(out)


def dirty_extents(h, context, size):
    """[(offset, length)] the export reports dirty (bit 0) in `context`."""
    out = []
    pos = 0
    while pos < size:
        got = []
        def cb(meta, off, entries, err):
            if meta == context: got.append((off, entries))
            return 0
        h.block_status(min(size - pos, 1 << 30), pos, cb)
        if not got: fail(f'no extents for {context} at {pos}')
        off, entries = got[0]
        at = off
        for i in range(0, len(entries), 2):
            ln, fl = entries[i], entries[i + 1]
            if fl & 1:
                if out and out[-1][0] + out[-1][1] == at: out[-1] = (out[-1][0], out[-1][1] + ln)
                else: out.append((at, ln))
            at += ln
        pos = at
    return out


def sha(data):
    return hashlib.sha256(data).hexdigest()[:16]


def events_only(lines, keep_cmds=True):
    """The transcript in a race-free form: command answers in order, then events in order.
    qemu-storage-daemon pauses every job for each drained section (a transaction, a new parent
    of a node the job holds) and says so (JOB_STATUS_CHANGE paused, running); blockd's jobs
    do not stop for a drain. Those pairs are left out; nothing here pauses a job on purpose."""
    # query-named-block-nodes answers carry sizes and QEMU's anonymous internal bitmaps:
    # scenarios check what they need from them instead.
    out = [l for l in lines if l.startswith('CMD') and not l.startswith('CMD query-named-block-nodes')] if keep_cmds else []
    pending = {}
    for l in lines:
        if not l.startswith('EVENT'): continue
        e = json.loads(l[6:])
        if e['event'] == 'JOB_STATUS_CHANGE':
            jid, st = e['data']['id'], e['data']['status']
            if st == 'paused': pending[jid] = True; continue
            if st == 'running' and pending.pop(jid, False): continue
        out.append(l)
    return [re.sub(r'#block\d+', '#blockN', l) for l in out]


# ---------------------------------------------------------------- the pull-mode flow
def pull_start(d, disk, target, bitmaps=(), disable=None, job='fleece', cbw='fl-cbw', snap='snap'):
    """The pull-mode start of docs/backup.md: in one transaction a new checkpoint bitmap (and
    the previous one frozen) and the copy-before-write filter (blockdev-backup sync=none); then
    snapshot-access over the filter."""
    actions = [{'type': 'block-dirty-bitmap-add', 'data': {'node': disk, 'name': b, 'persistent': p}}
               for b, p in bitmaps]
    if disable:
        actions.append({'type': 'block-dirty-bitmap-disable', 'data': {'node': disk, 'name': disable}})
    actions.append({'type': 'blockdev-backup', 'data': {'job-id': job, 'device': disk, 'target': target,
                                                        'sync': 'none', 'filter-node-name': cbw}})
    d.ok('transaction', actions=actions)
    d.ok('blockdev-add', driver='snapshot-access', node_name=snap, file=cbw)


def pull_finish(d, target, export='bk', job='fleece', snap='snap'):
    d.ok('block-export-del', id=export)
    d.wait('BLOCK_EXPORT_DELETED')
    d.ok('blockdev-del', node_name=snap)
    d.ok('block-job-cancel', device=job)
    d.wait('BLOCK_JOB_CANCELLED')
    d.ok('blockdev-del', node_name=target)


# ---------------------------------------------------------------- point in time
def point_in_time():
    """Pattern A over the disk; the pull starts; fio (verify) rewrites the first half and
    qemu-io writes land in the range being read at that moment. The backup is exactly A; after
    teardown the disk is the writes over A, and only the disk's nodes are left."""
    if not shutil.which('fio'): print('missing fio', file=sys.stderr); sys.exit(77)
    size = 64 * M
    disk = image('disk.qcow2', size, pattern=0xa5)
    fl = image('fl.qcow2', size)
    d = Daemon()
    d.add_qcow2('disk0', disk)
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    before = d.graph()
    d.add_qcow2('fl', fl)
    pull_start(d, 'disk0', 'fl', bitmaps=[('b1', False)])
    d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk')
    live = d.uri('disk0')
    stop = threading.Event()
    fio_runs = []

    def fio_loop():
        base = ['fio', '--name=b', '--ioengine=nbd', f'--uri={live}', '--rw=randwrite', '--bs=4k', '--offset=0',
                f'--size={size // 2}', '--iodepth=8', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1']
        while not stop.is_set() or not fio_runs:
            seed = len(fio_runs) + 1
            r = sh(*base, f'--randseed={seed}', check=False)
            if r.returncode != 0: fail(f'fio: {r.stdout}{r.stderr}')
            fio_runs.append(seed)

    fio = threading.Thread(target=fio_loop)
    fio.start()
    # The second half first (qemu-io aims there), then the first half (fio's region).
    h = connect(d.uri('bk'))
    writes = []
    order = list(range(size // 2, size, M)) + list(range(0, size // 2, M))
    for i, off in enumerate(order):
        if off == 0:
            # fio has rewritten its whole region at least once since the backup started.
            deadline = time.monotonic() + 120
            while not fio_runs and time.monotonic() < deadline: time.sleep(0.01)
            if not fio_runs: fail('fio did not finish a run')
        buf = nbd.Buffer(M)
        cookie = h.aio_pread(buf, off)
        if off >= size // 2:
            # While the read of this MiB is in flight: a write into it, unaligned.
            w = (off + (i * 37 % 15) * 64 * K + 512 * (i % 7), 8 * K + 4 * K * (i % 3), 0x30 + i % 64)
            sh('qemu-io', '-f', 'raw', '-c', f'write -P {w[2]} {w[0]} {w[1]}', live)
            writes.append(w)
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        data = buf.to_bytearray()
        if data != bytes([0xa5]) * M:
            bad = next(j for j in range(M) if data[j] != 0xa5)
            fail(f'backup at {off + bad}: {data[bad]:#x}, expected 0xa5 (run {i})')
    h.shutdown()
    stop.set()
    fio.join()
    if len(fio_runs) < 2: fail(f'fio ran {len(fio_runs)} times during the backup')
    pull_finish(d, 'fl')
    after = d.graph()
    if after != before: fail(f'graph after teardown {after}, before {before}')
    # fio's last run wrote every block of the first half once: it verifies all of it.
    r = sh('fio', '--name=b', '--ioengine=nbd', f'--uri={live}', '--rw=randwrite', '--bs=4k', '--offset=0',
           f'--size={size // 2}', '--iodepth=8', '--verify=crc32c', '--verify_fatal=1', '--verify_only',
           f'--randseed={fio_runs[-1]}', check=False)
    if r.returncode != 0: fail(f'fio verify after teardown: {r.stdout}{r.stderr}')
    # The second half: A with the qemu-io writes over it, in order.
    expected = bytearray([0xa5]) * (size // 2)
    for off, ln, pat in writes:
        expected[off - size // 2: off - size // 2 + ln] = bytes([pat]) * ln
    h = connect(live)
    got = h.pread(size // 2, size // 2)
    h.shutdown()
    if got != bytes(expected):
        bad = next(j for j in range(size // 2) if got[j] != expected[j])
        fail(f'disk at {size // 2 + bad}: {got[bad]:#x}, expected {expected[bad]:#x}')
    if d.bitmaps('disk0')['b1']['count'] == 0: fail('b1 recorded nothing')
    d.quit()
    r = sh('qemu-img', 'check', disk, check=False)
    if r.returncode != 0: fail(f'qemu-img check: {r.stdout}{r.stderr}')
    print(f'OK: {len(order)} MiB read, {len(writes)} writes into ranges being read, {len(fio_runs)} fio runs')


# ---------------------------------------------------------------- reference transcript
def reference():
    """A scripted pull-mode backup and a push-mode incremental one, with the events in order;
    prints the transcript and the backups' checksums (normalised)."""
    size = 16 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    fl = image('fl.qcow2', size)
    tgt = image('t.qcow2', size)
    d = Daemon()
    d.add_qcow2('disk0', disk)
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    d.ok('block-dirty-bitmap-add', node='disk0', name='b0')
    sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x22 1M 2M', '-c', 'write -P 0x23 9M 64k', d.uri('disk0'))
    # pull mode: b1 starts, b0 frozen, the filter goes in
    d.add_qcow2('fl', fl)
    pull_start(d, 'disk0', 'fl', bitmaps=[('b1', False)], disable='b0')
    d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk', bitmaps=[{'node': 'disk0', 'name': 'b0'}])
    d.cmd('query-block-exports')
    sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x33 1M 64k', '-c', 'write -P 0x34 12M 128k', d.uri('disk0'))
    d.cmd('query-block-jobs')
    h = connect(d.uri('bk'), ['qemu:dirty-bitmap:b0'])
    extents = dirty_extents(h, 'qemu:dirty-bitmap:b0', size)
    full = h.pread(size, 0)
    h.shutdown()
    log('PULL dirty', extents, 'snapshot', sha(full))
    for n in d.ok('query-named-block-nodes', flat=True):
        if n['node-name'] == 'disk0':
            log('BITMAPS', sorted((b['name'], b['count'], b['recording'], b['busy'])
                                  for b in n.get('dirty-bitmaps', []) if 'name' in b))
    pull_finish(d, 'fl')
    d.ok('block-dirty-bitmap-remove', node='disk0', name='b0')
    d.cmd('query-named-block-nodes', flat=True)
    # push mode: an incremental backup of b1 into a qcow2 target
    d.add_qcow2('tgt', tgt)
    d.cmd('blockdev-backup', job_id='push', device='disk0', target='tgt', sync='incremental', bitmap='b1')
    d.wait('BLOCK_JOB_COMPLETED')
    d.wait('JOB_STATUS_CHANGE')
    d.cmd('query-block-jobs')
    log('BITMAPS', sorted((k, v['count'], v['recording'], v['busy']) for k, v in d.bitmaps('disk0').items()))
    d.ok('blockdev-del', node_name='tgt')
    d.ok('block-export-del', id='e0')
    d.wait('BLOCK_EXPORT_DELETED')
    d.quit()
    # The push target holds exactly b1's clusters with their data at the job's start.
    r = sh('qemu-img', 'map', '--output=json', tgt)
    data = [(e['start'], e['length']) for e in json.loads(r.stdout) if e['data']]
    log('PUSH target extents', data)
    log('PUSH target reads back', sh('qemu-io', '-c', 'read -P 0x33 1M 64k', '-c', 'read -P 0x34 12M 128k', tgt).returncode)
    for l in events_only(LINES):
        print(l)
    for l in LINES:
        if l.startswith(('PULL', 'PUSH', 'BITMAPS')): print(l)


# ---------------------------------------------------------------- errors
def errors():
    """Refused backups: a clear QMP error each, and the graph as it was."""
    size = 16 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    image('t.qcow2', size)
    image('t2.qcow2', size)
    image('small.qcow2', size // 2)
    d = Daemon()
    d.add_qcow2('disk0', disk)
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    for n in ('t', 't2', 'small'):
        d.add_qcow2(n, f'{D}/{n}.qcow2')
    d.ok('block-dirty-bitmap-add', node='disk0', name='b0')
    before = d.graph()

    def refused(_name, **args):
        d.err(_name, **args)
        if d.graph() != before: fail(f'{_name} {args} changed the graph: {d.graph()} != {before}')

    refused('blockdev-backup', job_id='j', device='disk0', target='small', sync='full')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='incremental')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='incremental', bitmap='nope')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='bitmap', bitmap='b0')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='full', bitmap_mode='always')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='none', bitmap='b0', bitmap_mode='always')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='full', bitmap='b0', bitmap_mode='never')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='incremental', bitmap='b0', bitmap_mode='never')
    refused('blockdev-backup', job_id='j', device='disk0', target='disk0', sync='full')
    refused('blockdev-backup', job_id='j', device='nodisk', target='t', sync='full')
    refused('blockdev-backup', job_id='j', device='disk0', target='notgt', sync='full')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='full', x_perf={'max-workers': 0})
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='full', x_perf={'max-chunk': -1})
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='full', x_perf={'max-chunk': 4096})
    refused('blockdev-backup', job_id='1j', device='disk0', target='t', sync='full')
    refused('blockdev-backup', job_id='j', device='disk0', target='t', sync='fast')
    refused('transaction', actions=[{'type': 'block-dirty-bitmap-add', 'data': {'node': 'disk0', 'name': 'b1'}},
                                    {'type': 'blockdev-backup', 'data': {'job-id': 'j', 'device': 'disk0', 'target': 't', 'sync': 'full'}},
                                    {'type': 'abort', 'data': {}}])
    refused('transaction', actions=[{'type': 'blockdev-backup', 'data': {'job-id': 'j', 'device': 'disk0', 'target': 't', 'sync': 'full', 'speed': 1}},
                                    {'type': 'blockdev-backup', 'data': {'job-id': 'j2', 'device': 'disk0', 'target': 't', 'sync': 'full'}}])
    # A running backup: its target and its filter are the job's.
    d.ok('blockdev-backup', job_id='j', device='disk0', target='t', sync='full', speed=1, filter_node_name='cbw0')
    running = d.graph()
    before = running
    refused('blockdev-backup', job_id='j2', device='disk0', target='t', sync='full')
    refused('blockdev-backup', job_id='j2', device='cbw0', target='t2', sync='full')
    refused('blockdev-backup', job_id='j', device='disk0', target='t2', sync='full')
    refused('blockdev-del', node_name='cbw0')
    refused('blockdev-del', node_name='t')
    # The job copies its first MiB at once, then sleeps (speed 1): wait for that copy, so the
    # cancel's offset does not depend on how soon the job thread ran (QEMU's always is 1 MiB).
    deadline = time.monotonic() + 30
    while d.quiet('query-block-jobs')[0]['offset'] < M and time.monotonic() < deadline: time.sleep(0.01)
    d.ok('block-job-cancel', device='j')
    d.wait('BLOCK_JOB_CANCELLED')
    d.ok('block-export-del', id='e0')
    d.wait('BLOCK_EXPORT_DELETED')
    d.quit()
    for l in events_only(LINES):
        print(l)


def blockd_only_errors():
    """What blockd refuses and QEMU 7.2 lets through: a second backup (filter) on a node that
    has one, a fleecing target smaller than the disk. Clear errors, graph unchanged."""
    size = 16 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    image('t.qcow2', size)
    image('t2.qcow2', size)
    image('small.qcow2', size // 2)
    d = Daemon()
    d.add_qcow2('disk0', disk)
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    for n in ('t', 't2', 'small'):
        d.add_qcow2(n, f'{D}/{n}.qcow2')
    before = d.graph()
    e = d.err('blockdev-add', driver='copy-before-write', node_name='c', file='disk0', target='small')
    if 'smaller' not in e: fail(e)
    if d.graph() != before: fail('graph changed')
    d.ok('blockdev-backup', job_id='j', device='disk0', target='t', sync='full', speed=1, filter_node_name='cbw0')
    before = d.graph()
    e = d.err('blockdev-backup', job_id='j2', device='disk0', target='t2', sync='full')
    if "copy-before-write filter 'cbw0' is already above it" not in e: fail(e)
    e = d.err('blockdev-add', driver='copy-before-write', node_name='c', file='disk0', target='t2')
    if "copy-before-write filter 'cbw0' is already above it" not in e: fail(e)
    if d.graph() != before: fail(f'graph changed: {d.graph()} != {before}')
    d.ok('block-job-cancel', device='j')
    d.wait('BLOCK_JOB_CANCELLED')
    d.quit()
    print('OK')



def inserted_filter():
    """copy-before-write added with blockdev-add goes in above its file: a throttle node that
    is exported (the disk's parent) moves to it; QEMU's way, blockdev-reopen of that parent
    naming the filter as its file, is then accepted and changes nothing; pointing the parent
    back at the disk past the filter while a snapshot reads it is refused (its writes would
    skip the copies). The
    snapshot keeps the old data; blockdev-del of the filter puts the parent back on the disk,
    and writes after that are not copied. A reopen of a node without a file child is a no-op."""
    size = 16 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    fl = image('fl.qcow2', size)
    d = Daemon()
    d.ok('object-add', qom_type='throttle-group', id='tg')
    d.add_qcow2('disk0', disk)
    d.ok('blockdev-add', driver='throttle', node_name='thr', file='disk0', throttle_group='tg')
    d.ok('block-export-add', type='nbd', id='e0', node_name='thr', writable=True)
    d.add_qcow2('fl', fl)
    d.ok('blockdev-add', driver='copy-before-write', node_name='cbw', file='disk0', target='fl')
    d.ok('blockdev-reopen', options=[{'driver': 'throttle', 'node-name': 'thr', 'file': 'cbw', 'throttle-group': 'tg'}])
    d.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='cbw')
    # With a user (snapshot-access), the filter lets nobody else write its file (QEMU's
    # cbw_child_perm): the parent cannot be pointed past it.
    before = d.graph()
    e = d.err('blockdev-reopen', options=[{'driver': 'throttle', 'node-name': 'thr', 'file': 'disk0', 'throttle-group': 'tg'}])
    if 'conflict' not in e.lower(): fail(f'reopen past the filter: {e}')
    if d.graph() != before: fail('graph changed')
    d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk')
    sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x22 1M 64k', d.uri('thr'))
    sh('qemu-io', '-f', 'raw', '-r', '-c', 'read -P 0x11 1M 64k', d.uri('bk'))
    sh('qemu-io', '-f', 'raw', '-c', 'read -P 0x22 1M 64k', d.uri('thr'))
    d.ok('block-export-del', id='bk')
    d.wait('BLOCK_EXPORT_DELETED')
    d.ok('blockdev-del', node_name='snap')
    d.ok('blockdev-del', node_name='cbw')
    if any(n == 'cbw' for n, _ in d.graph()[0]): fail('filter still in the graph')
    sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x33 2M 64k', d.uri('thr'))
    d.ok('blockdev-add', driver='null-co', node_name='n0')
    d.ok('blockdev-reopen', options=[{'driver': 'null-co', 'node-name': 'n0'}])
    d.ok('blockdev-del', node_name='fl')
    d.ok('block-export-del', id='e0')
    d.wait('BLOCK_EXPORT_DELETED')
    d.quit()
    # The fleecing image got the old data of the one write made while the filter was in.
    data = [(e['start'], e['length']) for e in json.loads(sh('qemu-img', 'map', '--output=json', fl).stdout) if e['data']]
    if data != [(M, 64 * 1024)]: fail(f'fleecing image extents {data}')
    sh('qemu-io', '-f', 'qcow2', '-c', 'read -P 0x11 1M 64k', fl)
    sh('qemu-io', '-f', 'qcow2', '-c', 'read -P 0x22 1M 64k', '-c', 'read -P 0x33 2M 64k', '-c', 'read -P 0x11 3M 1M', disk)
    check_image(disk)
    print('OK')


# ---------------------------------------------------------------- copy-before-write errors
def qemu_io_log(tag, uri, *cmds, readonly=False):
    """Runs qemu-io over NBD and logs what it said, timings left out."""
    args = ['qemu-io', '-f', 'raw'] + (['-r'] if readonly else [])
    for c in cmds: args += ['-c', c]
    r = sh(*args, uri, check=False)
    said = [l for l in (r.stdout + r.stderr).splitlines() if not re.search(r'ops/sec|^\d', l) and l.strip()]
    said = [l for l in said if 'ops;' not in l]
    text = ' | '.join(said) or 'ok'
    if 'snapshot' in tag:
        # A broken or unreadable snapshot is EACCES in both daemons; on the wire QEMU's NBD
        # server says EINVAL, blockd (nbdkit's table) EPERM.
        text = re.sub(r'read failed: (Invalid argument|Operation not permitted)', 'read failed: EACCES', text)
    log('IO', tag, text)
    return r


def cbw_errors():
    """QEMU's copy-before-write test (tests/qemu-iotests/tests/copy-before-write) over NBD: a
    target that runs out of space (a qcow2 in a 1 MiB raw window) and a target slower than
    cbw-timeout (a throttle group). break-snapshot: the client's write succeeds, snapshot reads
    fail; break-guest-write: the client's write fails, the snapshot stays readable."""
    size = 4 * M
    for mode in ('break-snapshot', 'break-guest-write'):
        disk = image(f'disk-{mode}.qcow2', size, pattern=0x11)
        fl = image(f'fl-{mode}.qcow2', size)
        os.truncate(fl, 1 * M)
        d = Daemon()
        d.ok('blockdev-add', node_name='cbw', driver='copy-before-write', **{'on-cbw-error': mode},
             file={'driver': 'qcow2', 'node-name': 'disk0', 'file': {'driver': 'file', 'filename': disk}},
             target={'driver': 'qcow2', 'node-name': 'tmp',
                     'file': {'driver': 'raw', 'size': 1 * M, 'file': {'driver': 'file', 'filename': fl}}})
        d.ok('blockdev-add', node_name='access', driver='snapshot-access', file='cbw')
        d.ok('block-export-add', type='nbd', id='w', node_name='cbw', name='w', writable=True)
        d.ok('block-export-add', type='nbd', id='r', node_name='access', name='r')
        qemu_io_log(mode + ' write', d.uri('w'), f'write -P 0x22 0 {size}')
        qemu_io_log(mode + ' snapshot', d.uri('r'), f'read -P 0x11 0 {size}', readonly=True)
        qemu_io_log(mode + ' disk', d.uri('w'), f'read -P 0x22 0 {size}', readonly=True)
        for e in ('r', 'w'):
            d.ok('block-export-del', id=e)
            d.wait('BLOCK_EXPORT_DELETED')
        d.ok('blockdev-del', node_name='access')
        d.ok('blockdev-del', node_name='cbw')
        d.quit()
        r = sh('qemu-img', 'check', disk, check=False)
        log('CHECK', mode, r.returncode)
    for mode in ('break-guest-write', 'break-snapshot'):
        disk = image(f'tdisk-{mode}.qcow2', 1 * M, pattern=0x11)
        tmp = image(f'ttmp-{mode}.qcow2', 1 * M)
        d = Daemon()
        d.ok('object-add', qom_type='throttle-group', id='group0', limits={'bps-write': 300 * K})
        d.ok('blockdev-add', node_name='cbw', driver='copy-before-write', **{'on-cbw-error': mode, 'cbw-timeout': 1},
             file={'driver': 'qcow2', 'node-name': 'disk0', 'file': {'driver': 'file', 'filename': disk}},
             target={'driver': 'throttle', 'throttle-group': 'group0', 'node-name': 'thr',
                     'file': {'driver': 'qcow2', 'file': {'driver': 'file', 'filename': tmp}}})
        d.ok('blockdev-add', node_name='access', driver='snapshot-access', file='cbw')
        d.ok('block-export-add', type='nbd', id='w', node_name='cbw', name='w', writable=True)
        d.ok('block-export-add', type='nbd', id='r', node_name='access', name='r')
        qemu_io_log(mode + ' timeout write 1', d.uri('w'), 'write 0 512K')
        qemu_io_log(mode + ' timeout write 2', d.uri('w'), 'write 512K 512K')
        qemu_io_log(mode + ' timeout snapshot', d.uri('r'), 'read -P 0x11 0 1M', readonly=True)
        for e in ('r', 'w'):
            d.ok('block-export-del', id=e)
            d.wait('BLOCK_EXPORT_DELETED')
        d.ok('blockdev-del', node_name='access')
        d.ok('blockdev-del', node_name='cbw')
        d.quit()
    for l in events_only(LINES):
        print(l)
    for l in LINES:
        if l.startswith(('IO', 'CHECK')): print(l)


# ---------------------------------------------------------------- bitmap modes
def bitmap_modes():
    """blockdev-backup sync=bitmap with bitmap-mode on-success, never and always, ending in
    success, failure (the target runs out of space after the first MiB) and cancel, with a
    client write while the job runs: what the bitmap holds afterwards (QEMU's abdicate,
    reclaim, and the uncopied clusters merged back for always)."""
    size = 8 * M
    for mode in ('on-success', 'never', 'always'):
        for outcome in ('success', 'failure', 'cancel'):
            tag = f'{mode}/{outcome}'
            disk = image(f'disk-{mode}-{outcome}.qcow2', size, pattern=0x11)
            tgt = image(f't-{mode}-{outcome}.qcow2', size)
            d = Daemon()
            d.add_qcow2('disk0', disk)
            d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
            d.ok('block-dirty-bitmap-add', node='disk0', name='bm')
            sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x22 0 4M', d.uri('disk0'))
            if outcome == 'failure':
                # Room for the first MiB of data and the image's metadata, not more.
                os.truncate(tgt, 1536 * K)
                d.ok('blockdev-add', driver='qcow2', node_name='tgt',
                     file={'driver': 'raw', 'size': 1536 * K, 'file': {'driver': 'file', 'filename': tgt}})
            else:
                d.add_qcow2('tgt', tgt)
            d.ok('blockdev-backup', job_id='j', device='disk0', target='tgt', sync='bitmap', bitmap='bm',
                 bitmap_mode=mode, speed=1)
            # The job copied its first MiB and sleeps: a client write now goes to the successor.
            deadline = time.monotonic() + 30
            while d.quiet('query-block-jobs')[0]['offset'] < M and time.monotonic() < deadline: time.sleep(0.01)
            sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x33 7M 64k', d.uri('disk0'))
            b = d.bitmaps('disk0')['bm']
            log('DURING', tag, b['count'], b['recording'], b['busy'])
            if outcome == 'cancel':
                d.ok('block-job-cancel', device='j', force=True)
                d.wait('BLOCK_JOB_CANCELLED')
            else:
                d.ok('block-job-set-speed', device='j', speed=0)
                ev = d.wait('BLOCK_JOB_COMPLETED')
                log('END', tag, ev['data'].get('error', 'ok'))
            d.wait('JOB_STATUS_CHANGE')
            b = d.bitmaps('disk0')['bm']
            d.ok('block-export-del', id='e0')
            d.wait('BLOCK_EXPORT_DELETED')
            d.ok('block-export-add', type='nbd', id='e1', node_name='disk0', name='e1', writable=True, bitmaps=['bm'])
            h = connect(d.uri('e1'), ['qemu:dirty-bitmap:bm'])
            log('AFTER', tag, b['count'], b['recording'], b['busy'], dirty_extents(h, 'qemu:dirty-bitmap:bm', size))
            h.shutdown()
            d.ok('block-export-del', id='e1')
            d.wait('BLOCK_EXPORT_DELETED')
            d.ok('blockdev-del', node_name='tgt')
            d.quit()
    if os.environ.get('RAW'): print('\n'.join(LINES)); return
    for l in events_only(LINES):
        print(l)
    for l in LINES:
        if l.startswith(('DURING', 'END', 'AFTER')): print(l)


# ---------------------------------------------------------------- push mode
def compare_images(a, b, fa='qcow2', fb='qcow2'):
    r = sh('qemu-img', 'compare', '-f', fa, '-F', fb, a, b, check=False)
    if r.returncode != 0: fail(f'compare {a} {b}: {r.stdout}{r.stderr}')


def check_image(path):
    r = sh('qemu-img', 'check', path, check=False)
    if r.returncode != 0: fail(f'qemu-img check {path}: {r.stdout}{r.stderr}')


def allocated(path):
    out = json.loads(sh('qemu-img', 'map', '--output=json', path).stdout)
    return [(e['start'], e['length']) for e in out if e['data'] and e['depth'] == 0]


def push_backup(d, job, **args):
    d.ok('blockdev-backup', job_id=job, **args)
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data']: fail(ev)
    d.wait('JOB_STATUS_CHANGE')


def push_modes():
    """blockdev-backup of every sync mode into qcow2 targets (full also compressed): each
    target compared with the expected content and checked by qemu-img."""
    size = 16 * M
    base = image('base.qcow2', size, pattern=0x11)
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -z 12M 2M', base)
    disk = image('disk.qcow2', size, backing=base)
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 2M 1M', '-c', 'write -P 0x23 8M 64k', '-c', 'write -z 4M 1M', disk)
    flat = f'{D}/flat.raw'
    sh('qemu-img', 'convert', '-O', 'raw', disk, flat)
    targets = {n: image(f'{n}.qcow2', size) for n in ('full', 'compressed', 'none', 'inc0')}
    targets['top'] = image('top.qcow2', size, backing=base)
    d = Daemon()
    d.add_qcow2('base0', base, backing=None)
    d.add_qcow2('disk0', disk, backing='base0')
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    for n, path in targets.items():
        d.add_qcow2(f't-{n}', path, backing=None)
    push_backup(d, 'full', device='disk0', target='t-full', sync='full')
    push_backup(d, 'comp', device='disk0', target='t-compressed', sync='full', compress=True)
    push_backup(d, 'top', device='disk0', target='t-top', sync='top')
    # incremental: a full with a new bitmap in the same transaction, writes, then incremental
    # and bitmap (always) backups onto overlays of the full.
    d.ok('transaction', actions=[
        {'type': 'block-dirty-bitmap-add', 'data': {'node': 'disk0', 'name': 'bm'}},
        {'type': 'blockdev-backup', 'data': {'job-id': 'inc0', 'device': 'disk0', 'target': 't-inc0', 'sync': 'full'}}])
    ev = d.wait('BLOCK_JOB_COMPLETED')
    if 'error' in ev['data']: fail(ev)
    d.wait('JOB_STATUS_CHANGE')
    sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x44 1M 64k', '-c', 'write -P 0x45 5M 1536k', '-c', 'write -z 2M 64k',
       d.uri('disk0'))
    sh('qemu-img', 'convert', '-O', 'raw', '-U', disk, f'{D}/flat2.raw')
    inc1 = image('inc1.qcow2', size, backing=targets['inc0'])
    inc2 = image('inc2.qcow2', size, backing=targets['inc0'])
    d.add_qcow2('t-inc1', inc1, backing=None)
    d.add_qcow2('t-inc2', inc2, backing=None)
    d.ok('block-dirty-bitmap-add', node='disk0', name='bm2')
    d.ok('block-dirty-bitmap-merge', node='disk0', target='bm2', bitmaps=['bm'])
    push_backup(d, 'inc1', device='disk0', target='t-inc1', sync='incremental', bitmap='bm')
    push_backup(d, 'inc2', device='disk0', target='t-inc2', sync='bitmap', bitmap='bm2', bitmap_mode='always')
    bms = d.bitmaps('disk0')
    if bms['bm']['count'] != 0 or bms['bm2']['count'] != 0: fail(f'bitmaps after incremental backups: {bms}')
    # none: only what a client overwrites during the job reaches the target, with the old data.
    d.ok('blockdev-backup', job_id='none', device='disk0', target='t-none', sync='none')
    sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x55 3M 4k', '-c', 'write -P 0x56 10M 128k', d.uri('disk0'))
    d.ok('block-job-cancel', device='none')
    d.wait('BLOCK_JOB_CANCELLED')
    d.ok('block-export-del', id='e0')
    d.wait('BLOCK_EXPORT_DELETED')
    d.quit()
    for n, path in list(targets.items()) + [('inc1', inc1), ('inc2', inc2)]:
        check_image(path)
    compare_images(targets['full'], flat, fb='raw')
    compare_images(targets['compressed'], flat, fb='raw')
    comp = json.loads(sh('qemu-img', 'check', '--output=json', targets['compressed']).stdout)
    if comp.get('compressed-clusters', 0) == 0: fail(f'no compressed cluster in the compressed backup: {comp}')
    if os.path.getsize(targets['compressed']) >= os.path.getsize(targets['full']) // 4:
        fail(f"compressed backup is {os.path.getsize(targets['compressed'])} bytes, full {os.path.getsize(targets['full'])}")
    # top: the overlay's own clusters only; with base behind it, the disk.
    compare_images(targets['top'], flat, fb='raw')
    top_alloc = allocated(targets['top'])
    if sum(l for _, l in top_alloc) > 3 * M: fail(f'sync=top copied {top_alloc}')
    compare_images(targets['inc0'], flat, fb='raw')
    compare_images(inc1, f'{D}/flat2.raw', fb='raw')
    compare_images(inc2, f'{D}/flat2.raw', fb='raw')
    inc_alloc = sum(l for _, l in allocated(inc1))
    if inc_alloc > 2 * M: fail(f'incremental copied {inc_alloc} bytes')
    got = allocated(targets['none'])
    if got != [(3 * M, 64 * K), (10 * M, 128 * K)]: fail(f'sync=none target holds {got}')
    r = sh('qemu-io', '-f', 'qcow2', '-c', 'read -P 0x11 3M 64k', '-c', 'read -P 0x11 10M 128k', targets['none'], check=False)
    if 'fail' in r.stdout: fail(r.stdout)
    print('OK')


def remote_target():
    """Push mode into a remote node: blockdev-backup sync=full into an `nbd` node whose server
    is qemu-nbd serving a qcow2 image, while a client writes to the disk. The image equals
    the disk as it was at the start and passes qemu-img check."""
    size = 16 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 3M 1M', '-c', 'write -z 9M 2M', disk)
    flat = f'{D}/flat.raw'
    sh('qemu-img', 'convert', '-O', 'raw', disk, flat)
    remote = image('remote.qcow2', size)
    sock = f'{D}/remote.sock'
    srv = subprocess.Popen(['qemu-nbd', '-t', '-f', 'qcow2', '-x', 'tgt', '-k', sock, remote],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline: time.sleep(0.02)
        d = Daemon()
        d.add_qcow2('disk0', disk)
        d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
        d.ok('blockdev-add', driver='nbd', node_name='rt', server={'type': 'unix', 'path': sock}, export='tgt')
        d.ok('blockdev-backup', job_id='push', device='disk0', target='rt', sync='full', speed=4 * M)
        # Writes during the job: the remote target still gets the old data.
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x33 0 64k', '-c', 'write -P 0x34 15M 1M', d.uri('disk0'))
        d.ok('block-job-set-speed', device='push', speed=0)
        ev = d.wait('BLOCK_JOB_COMPLETED')
        if 'error' in ev['data']: fail(ev)
        d.wait('JOB_STATUS_CHANGE')
        d.ok('blockdev-del', node_name='rt')
        d.ok('block-export-del', id='e0')
        d.wait('BLOCK_EXPORT_DELETED')
        d.quit()
    finally:
        srv.terminate()
        srv.wait(20)
    check_image(remote)
    compare_images(remote, flat, fb='raw')
    print('OK')


# ---------------------------------------------------------------- incremental chains
def fio_burst(uri, size, seed, io=8 * M, background=False):
    args = ['fio', '--name=burst', '--ioengine=nbd', f'--uri={uri}', '--rw=randwrite', '--bsrange=4k-64k',
            f'--size={size}', f'--io_size={io}', '--iodepth=8', f'--randseed={seed}', '--randrepeat=0']
    if not background:
        sh(*args)
        return None
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def fio_done(p):
    _, err = p.communicate(timeout=300)
    if p.returncode != 0: fail(f'fio: {err}')


def pull(d, snapshot_uri, size, into, bitmap=None):
    """Copies the snapshot into the file `into`: all of it, or the extents `bitmap` marks."""
    h = connect(snapshot_uri, [f'qemu:dirty-bitmap:{bitmap}'] if bitmap else [])
    extents = dirty_extents(h, f'qemu:dirty-bitmap:{bitmap}', size) if bitmap else [(0, size)]
    with open(into, 'r+b' if os.path.exists(into) else 'w+b') as f:
        f.truncate(size)
        for off, ln in extents:
            for o in range(off, off + ln, 4 * M):
                n = min(4 * M, off + ln - o)
                f.seek(o)
                f.write(h.pread(n, o))
    h.shutdown()
    return extents


def incremental_chain():
    """A full backup and three incremental ones in pull mode, each while fio writes, with a
    fio burst between them. Each backup file, restored (the full plus the incrementals up to
    it), equals the disk as it was when that backup started."""
    if not shutil.which('fio'): print('missing fio', file=sys.stderr); sys.exit(77)
    size = 64 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    d = Daemon()
    d.add_qcow2('disk0', disk)
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    live = d.uri('disk0')
    restored = f'{D}/restored.raw'
    report = []
    for level in range(4):
        if level:
            fio_burst(live, size, 100 + level)
        fl = image(f'fl{level}.qcow2', size)
        d.add_qcow2(f'fl{level}', fl)
        pull_start(d, 'disk0', f'fl{level}', bitmaps=[(f'b{level}', True)],
                   disable=f'b{level - 1}' if level else None)
        bitmaps = [{'node': 'disk0', 'name': f'b{level - 1}'}] if level else []
        d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk', bitmaps=bitmaps)
        # The disk at the backup's start (nobody writes between the transaction and here).
        at_start = sha(read_all(live, size))
        writer = fio_burst(live, size, 200 + level, io=16 * M, background=True)
        extents = pull(d, d.uri('bk'), size, restored, bitmap=f'b{level - 1}' if level else None)
        fio_done(writer)
        pull_finish(d, f'fl{level}')
        if level:
            d.ok('block-dirty-bitmap-remove', node='disk0', name=f'b{level - 1}')
        got = sha(open(restored, 'rb').read())
        if got != at_start: fail(f'level {level}: restored {got}, disk at the start {at_start}')
        report.append(f'{level}:{sum(l for _, l in extents) // K}K')
    d.ok('block-export-del', id='e0')
    d.wait('BLOCK_EXPORT_DELETED')
    d.quit()
    check_image(disk)
    print('OK', ' '.join(report))


# ---------------------------------------------------------------- bitmaps
def bitmaps_exact():
    """The next checkpoint's bitmap holds exactly the client writes made during the backup:
    none of the copies the filter made (they read the disk and write the fleecing image)."""
    size = 32 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    fl = image('fl.qcow2', size)
    d = Daemon()
    d.add_qcow2('disk0', disk)
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    live = d.uri('disk0')
    d.ok('block-dirty-bitmap-add', node='disk0', name='b0')
    d.add_qcow2('fl', fl)
    pull_start(d, 'disk0', 'fl', bitmaps=[('b1', False)], disable='b0')
    d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk')
    writes = [(100 * K, 4 * K), (3 * M + 512, 70 * K), (8 * M, 1 * M), (20 * M - 4 * K, 8 * K), (31 * M, 64 * K)]
    h = connect(d.uri('bk'))
    for i, off in enumerate(range(0, size, M)):
        cookie = h.aio_pread(nbd.Buffer(M), off)
        for w in writes:
            if off <= w[0] < off + M:
                sh('qemu-io', '-f', 'raw', '-c', f'write -P {0x40 + i} {w[0]} {w[1]}', live)
        while not h.aio_command_completed(cookie): h.poll(-1)
    h.shutdown()
    pull_finish(d, 'fl')
    if d.bitmaps('disk0')['b0']['count'] != 0: fail('b0 changed while disabled')
    d.ok('block-export-add', type='nbd', id='e1', node_name='disk0', name='e1', writable=True, bitmaps=['b1'])
    h = connect(d.uri('e1'), ['qemu:dirty-bitmap:b1'])
    got = dirty_extents(h, 'qemu:dirty-bitmap:b1', size)
    h.shutdown()
    g = 64 * K
    want = []
    for off, ln in sorted(writes):
        a, b = off // g * g, (off + ln + g - 1) // g * g
        if want and want[-1][0] + want[-1][1] >= a:
            want[-1] = (want[-1][0], max(want[-1][0] + want[-1][1], b) - want[-1][0])
        else:
            want.append((a, b - a))
    if got != want: fail(f'b1 holds {got}, the client wrote {want}')
    for e in ('e1', 'e0'):
        d.ok('block-export-del', id=e)
        d.wait('BLOCK_EXPORT_DELETED')
    if not IS_QSD:
        # Old-style fleecing (QEMU's image-fleecing first case): the target is an overlay of
        # the disk, exported itself. blockd's copies into it are unchanged writes: a bitmap of
        # the overlay records none of them (QEMU's would record all).
        ov = image('ov.qcow2', size)
        d.ok('blockdev-add', driver='qcow2', node_name='ov', backing='disk0',
             file={'driver': 'file', 'filename': ov})
        d.ok('block-dirty-bitmap-add', node='ov', name='ovb')
        d.ok('blockdev-backup', job_id='old', device='disk0', target='ov', sync='none', filter_node_name='oldcbw')
        d.ok('block-export-add', type='nbd', id='ovx', node_name='ov', name='ovx')
        before = sha(read_all(d.uri('ovx'), size))
        d.ok('block-export-add', type='nbd', id='e2', node_name='oldcbw', name='e2', writable=True)
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x77 0 4M', d.uri('e2'))
        after = sha(read_all(d.uri('ovx'), size))
        if after != before: fail('the old-style fleecing export changed under client writes')
        if d.bitmaps('ov')['ovb']['count'] != 0: fail(f"copies into the overlay dirtied its bitmap: {d.bitmaps('ov')}")
        for e in ('ovx', 'e2'):
            d.ok('block-export-del', id=e)
            d.wait('BLOCK_EXPORT_DELETED')
        d.ok('block-job-cancel', device='old')
        d.wait('BLOCK_JOB_CANCELLED')
    d.quit()
    check_image(disk)
    print('OK', got)


# ---------------------------------------------------------------- crash
def crash():
    """kill -9 in the middle of a pull-mode incremental backup while fio writes: the disk and
    its persistent bitmaps pass qemu-img check, and the next incremental backup (the frozen
    checkpoint merged with the one the failed backup started) covers every write since the
    last good backup."""
    if not shutil.which('fio'): print('missing fio', file=sys.stderr); sys.exit(77)
    size = 64 * M
    disk = image('disk.qcow2', size, pattern=0x11)
    restored = f'{D}/restored.raw'
    d = Daemon()
    d.add_qcow2('disk0', disk)
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    live = d.uri('disk0')
    # The last good backup: a full one with checkpoint b0.
    d.add_qcow2('fl0', image('fl0.qcow2', size))
    pull_start(d, 'disk0', 'fl0', bitmaps=[('b0', True)])
    d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk')
    pull(d, d.uri('bk'), size, restored)
    pull_finish(d, 'fl0')
    fio_burst(live, size, 7)
    # The incremental backup that dies: b1 starts, b0 frozen; fio writes during the pull.
    d.add_qcow2('fl1', image('fl1.qcow2', size))
    pull_start(d, 'disk0', 'fl1', bitmaps=[('b1', True)], disable='b0')
    d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk', bitmaps=[{'node': 'disk0', 'name': 'b0'}])
    writer = fio_burst(live, size, 8, io=64 * M, background=True)
    h = connect(d.uri('bk'), ['qemu:dirty-bitmap:b0'])
    extents = dirty_extents(h, 'qemu:dirty-bitmap:b0', size)
    for off, ln in extents[:len(extents) // 2]:
        h.pread(min(ln, 4 * M), off)
    d.kill()
    writer.wait(60)
    for p in (disk,):
        r = sh('qemu-img', 'check', p, check=False)
        if r.returncode != 0: fail(f'qemu-img check after kill -9: {r.returncode}\n{r.stdout}{r.stderr}')
    # Restart: both checkpoints are there and usable.
    d = Daemon()
    d.add_qcow2('disk0', disk)
    bms = d.bitmaps('disk0')
    if set(bms) != {'b0', 'b1'} or any(b.get('inconsistent') for b in bms.values()):
        fail(f'bitmaps after the crash: {bms}')
    d.ok('block-export-add', type='nbd', id='e0', node_name='disk0', writable=True)
    fio_burst(live, size, 9)
    # Recovery (docs/backup.md): the failed backup's checkpoint b1 goes into b0, and the next
    # backup is taken of b0, with b2 starting.
    d.add_qcow2('fl2', image('fl2.qcow2', size))
    d.ok('transaction', actions=[
        {'type': 'block-dirty-bitmap-add', 'data': {'node': 'disk0', 'name': 'b2', 'persistent': True}},
        {'type': 'block-dirty-bitmap-merge', 'data': {'node': 'disk0', 'target': 'b0', 'bitmaps': ['b1']}},
        {'type': 'block-dirty-bitmap-remove', 'data': {'node': 'disk0', 'name': 'b1'}},
        {'type': 'blockdev-backup', 'data': {'job-id': 'fleece', 'device': 'disk0', 'target': 'fl2',
                                             'sync': 'none', 'filter-node-name': 'fl-cbw'}}])
    d.ok('blockdev-add', driver='snapshot-access', node_name='snap', file='fl-cbw')
    d.ok('block-export-add', type='nbd', id='bk', node_name='snap', name='bk', bitmaps=[{'node': 'disk0', 'name': 'b0'}])
    at_start = sha(read_all(live, size))
    writer = fio_burst(live, size, 10, background=True)
    pull(d, d.uri('bk'), size, restored, bitmap='b0')
    fio_done(writer)
    pull_finish(d, 'fl2')
    d.ok('block-dirty-bitmap-remove', node='disk0', name='b0')
    if sha(open(restored, 'rb').read()) != at_start: fail('the incremental after the crash missed writes')
    d.ok('block-export-del', id='e0')
    d.wait('BLOCK_EXPORT_DELETED')
    d.quit()
    check_image(disk)
    print('OK', len(extents), 'extents in the interrupted backup')

if __name__ == '__main__':
    try:
        globals()[SCENARIO]()
    finally:
        for d in DAEMONS:
            d.kill()
        shutil.rmtree(D, ignore_errors=True)
