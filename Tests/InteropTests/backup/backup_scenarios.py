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
    if getattr(QUIET, 'on', False): return
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


if __name__ == '__main__':
    try:
        globals()[SCENARIO]()
    finally:
        for d in DAEMONS:
            d.kill()
        shutil.rmtree(D, ignore_errors=True)
