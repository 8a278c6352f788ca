#!/usr/bin/env python3
"""The rbd driver end to end, on the single-node cluster of scripts/ceph-single-node.sh (started
by the test suite with cephx): blockd (and qemu-storage-daemon for comparison) with rbd nodes,
checked with qemu-io, qemu-img, fio, nbdcopy, nbdinfo, libnbd and the rbd CLI.

Usage: rbd_scenarios.py BLOCKD CEPH_CONF SCENARIO [QSD]   (exit 77: a tool is missing)

Scenarios:
  export     export an RBD image: qemu-io, fio with verify, nbdcopy in and out; `rbd export`
             equals what the clients wrote; `nbdinfo --map` equals `rbd diff` (with and
             without fast-diff)
  zeroes     NO_HOLE zero writes stay allocated (rbd diff / du), may-unmap ones free whole
             objects; qemu-storage-daemon 7.2 deallocates NO_HOLE zeroes (printed, checked)
  overlay    a local qcow2 overlay over an RBD base: reads, writes, stream, commit
  bitmap     a dirty bitmap on an RBD node exported as qemu:dirty-bitmap: an incremental backup
  qsd        the same QMP script against blockd and qemu-storage-daemon: same content, same events
  qcow2      a qcow2 image stored in RBD (format over the rbd protocol node): it grows the image
  osd        the OSD stops under I/O: EIO after rados_osd_op_timeout, or the requests wait and
             succeed when it comes back; the daemon and other exports go on
  lock       a second writable node of one image is refused (same daemon, other process);
             read-only nodes and snapshots open beside it; the graph's permissions across the
             nodes of one image (a writer and a qcow2 reader exclude each other)
  mirror     live import of a local qcow2 export into RBD with blockdev-mirror while fio
             writes with verify, then a live export back out to a local qcow2
  bad        unreachable monitors (bounded, named, QMP not stalled), missing pool, image,
             snapshot, namespace, wrong user or key, bad secrets and options: clear errors,
             graph unchanged, daemon alive
Prints progress lines and 'OK' at the end; asserts on everything."""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'jobs'))
from qmpmini import until, can_connect

blockd_bin, conf, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
qsd_bin = sys.argv[4] if len(sys.argv) > 4 else shutil.which('qemu-storage-daemon')
for tool in ('qemu-img', 'qemu-io', 'rbd'):
    if not shutil.which(tool): print('missing', tool); sys.exit(77)
cluster_dir = os.path.dirname(conf)
d = tempfile.mkdtemp(prefix='rbdt-')
M = 1 << 20
procs = []
images = []

def sh(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def run(*a, timeout=180):
    return subprocess.run(a, capture_output=True, text=True, timeout=timeout)

def rbd(*a, check=True):
    r = run('rbd', '-c', conf, *a)
    if check: assert r.returncode == 0, (a, r.stdout, r.stderr)
    return r

def create(name, size='64M', features=None):
    """A fresh image (removed at the end); features=None: Ceph's defaults (fast-diff)."""
    rbd('rm', name, check=False)
    args = ['create', '--size', size, name]
    if features: args += ['--image-feature', features]
    rbd(*args)
    images.append(name)
    return name

def rbd_node(image, **extra):
    return dict(driver='rbd', pool='rbd', image=image, conf=conf, **extra)

def qemu_rbd(image):
    """The image as qemu-img/qemu-io name it (qemu-block-extra's rbd driver)."""
    return f'rbd:rbd/{image}:conf={conf}'

class Q:
    """A QMP client that keeps every event it receives (`history`, in order)."""
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile('rwb')
        self.pending, self.history = [], []
        self.f.readline()
        self.cmd('qmp_capabilities')

    def _read(self, timeout):
        self.s.settimeout(timeout)
        line = self.f.readline()
        if not line: raise EOFError('QMP connection closed')
        r = json.loads(line)
        if 'event' in r:
            r.pop('timestamp', None)
            self.pending.append(r); self.history.append(r)
            return None
        return r

    def cmd(self, _name, _timeout=120, **args):
        msg = {'execute': _name}
        if args: msg['arguments'] = {k.replace('_', '-'): v for k, v in args.items()}
        self.f.write((json.dumps(msg) + '\n').encode()); self.f.flush()
        while True:
            r = self._read(_timeout)
            if r is not None: return r

    def wait(self, event, timeout=30):
        end = time.monotonic() + timeout
        while True:
            for e in self.pending:
                if e['event'] == event:
                    self.pending.remove(e)
                    return e
            self._read(max(0.1, end - time.monotonic()))
            if time.monotonic() > end: raise AssertionError(f'no {event} within {timeout} s')

class Daemon:
    """blockd or qemu-storage-daemon with a QMP monitor and an NBD server under d/NAME.*"""
    def __init__(self, binary, name, extra=()):
        self.binary, self.name, self.extra = binary, name, list(extra)
        self.qmp_path, self.nbd_path = f'{d}/{name}.qmp', f'{d}/{name}.nbd'
        self.is_qsd = 'qemu-storage-daemon' in binary
        for p in (self.qmp_path, self.nbd_path):
            if os.path.exists(p): os.unlink(p)
        self.log = open(f'{d}/{name}.log', 'a')
        self.p = subprocess.Popen([binary, '--chardev', f'socket,path={self.qmp_path},server=on,wait=off,id=m',
                                   '--monitor', 'chardev=m', '--nbd-server', f'addr.type=unix,addr.path={self.nbd_path}']
                                  + self.extra, stdout=self.log, stderr=self.log)
        procs.append(self.p)
        until(lambda: can_connect(self.qmp_path) and can_connect(self.nbd_path), f'{name} to listen')
        self.q = Q(self.qmp_path)

    def cmd(self, _command, **args):
        return self.q.cmd(_command, **args)

    def ok(self, _command, **args):
        r = self.q.cmd(_command, **args)
        assert 'return' in r, (_command, args, r)
        return r['return']

    def uri(self, export):
        return f'nbd+unix:///{export}?socket={self.nbd_path}'

    def quit(self):
        if self.p.poll() is None:
            self.q.cmd('quit'); self.p.wait(60)

    def logtext(self):
        with open(f'{d}/{self.name}.log') as f: return f.read()

def io_ok(uri, *cmds, fmt='raw', read_only=False):
    a = ['qemu-io', '-f', fmt] + (['-r'] if read_only else [])
    for c in cmds: a += ['-c', c]
    r = run(*a, uri)
    assert r.returncode == 0 and 'failed' not in r.stdout and 'error' not in r.stderr.lower(), (cmds, r.stdout, r.stderr)
    return r

def compare(a, b, fa='raw', fb='raw'):
    r = run('qemu-img', 'compare', '-f', fa, '-F', fb, a, b)
    assert r.returncode == 0, (a, b, r.stdout, r.stderr)

def rbd_export(image, path):
    if os.path.exists(path): os.unlink(path)
    rbd('export', image, path)
    return path

def merge(extents):
    out = []
    for o, n in extents:
        if out and out[-1][0] + out[-1][1] == o: out[-1] = (out[-1][0], out[-1][1] + n)
        else: out.append((o, n))
    return out

def rbd_allocated(image, whole_object=False):
    a = ['diff', '--format', 'json', image] + (['--whole-object'] if whole_object else [])
    return merge([(e['offset'], e['length']) for e in json.loads(rbd(*a).stdout) if e['exists'] == 'true'])

def nbd_data(uri):
    m = json.loads(run('nbdinfo', '--map', '--json', uri).stdout)
    return merge([(e['offset'], e['length']) for e in m if not e['type'] & 1])

def fio(uri, *extra, timeout=240):
    a = ['fio', '--name=w', '--ioengine=nbd', f'--uri={uri}', '--bs=4k', '--iodepth=16', '--verify=crc32c',
         '--verify_fatal=1', '--verify_state_save=0', '--randrepeat=1', '--output-format=terse'] + list(extra)
    r = run(*a, timeout=timeout)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r

def nodes(daemon):
    return sorted((n['node-name'], n['drv']) for n in daemon.ok('query-named-block-nodes'))

def osd_pid():
    with open(f'{cluster_dir}/run/osd.0.pid') as f: return int(f.read().strip())

def need(*tools):
    for t in tools:
        if not shutil.which(t): print('missing', t); sys.exit(77)

def need_qsd():
    if not qsd_bin or not os.path.exists(qsd_bin): print('missing qemu-storage-daemon'); sys.exit(77)

try:
    if scenario == 'export':
        need('fio', 'nbdcopy', 'nbdinfo')
        img = create('exp', '64M')
        # Two loops (-v: info lines): clients land on both, and the completion eventfd follows them.
        b = Daemon(blockd_bin, 'b', extra=['--loops', '2', '-v'])
        b.ok('blockdev-add', node_name='r0', **rbd_node(img))
        b.ok('block-export-add', type='nbd', id='e', node_name='r0', name='r', writable=True)
        uri = b.uri('r')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/expected.raw', '64M')
        def both(cmd):
            io_ok(uri, cmd)
            sh('qemu-io', '-f', 'raw', '-c', cmd, f'{d}/expected.raw')
        for c in ('write -P 0x11 0 1M', 'write -P 0x12 1536k 8k', 'write -f -P 0x13 3M 64k', 'write -z 5M 1M',
                  'write -z -u 9M 4M', 'write -P 0x14 20M 4M', 'write -z -u 21M 1M', 'write -P 0x15 63M 1M'):
            both(c)
        io_ok(uri, 'read -P 0x11 0 1M', 'read -P 0 5M 1M', 'read -P 0x14 20M 1M', 'read -P 0 21M 1M', 'flush')
        compare(uri, f'{d}/expected.raw')
        # fio with verify in a region of its own; the written data is then copied out.
        r = fio(uri, '--rw=randwrite', '--offset=32M', '--size=16M', '--io_size=24M')
        print('FIO', r.stdout.strip().split(';')[:3])
        io_ok(uri, 'flush')
        sh('nbdcopy', uri, f'{d}/out.raw')
        rbd_export(img, f'{d}/rbd.raw')
        compare(f'{d}/out.raw', f'{d}/rbd.raw')
        # nbdcopy in: a local image with data and holes over the whole export.
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/in.raw', '64M')
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x21 0 3M', '-c', 'write -P 0x22 17M 5M', '-c', 'write -P 0x23 60M 4M',
           f'{d}/in.raw')
        sh('nbdcopy', '--flush', f'{d}/in.raw', uri)
        compare(uri, f'{d}/in.raw')
        rbd_export(img, f'{d}/rbd.raw')
        compare(f'{d}/rbd.raw', f'{d}/in.raw')
        # Allocation: nbdinfo --map through blockd equals rbd diff (whole objects: fast-diff).
        ours, theirs = nbd_data(uri), rbd_allocated(img, whole_object=True)
        print('MAP fast-diff', ours, theirs)
        assert ours == theirs and ours, (ours, theirs)
        # Consecutive clients alternate between the two loops; whichever is not the node's home
        # loop makes the completions move there (after 512 requests in a row). Data verifies
        # across the moves.
        # (fio, fio, one qemu-io connection, fio: whether fio opens one connection or two, its
        # three runs do not all land on one loop.)
        for i in range(3):
            if i == 2: io_ok(uri, 'read 0 4k')
            fio(uri, '--rw=randwrite', f'--offset={36 + 4 * i}M', '--size=4M', '--io_size=12M')
        assert 'completions now collected on loop' in b.logtext(), b.logtext()
        print('MOVES', b.logtext().count('completions now collected on loop'))
        # An image without object-map/fast-diff: exact extents from the OSDs.
        plain = create('exp-plain', '32M', features='layering')
        b.ok('blockdev-add', node_name='r1', **rbd_node(plain))
        b.ok('block-export-add', type='nbd', id='e1', node_name='r1', name='plain', writable=True)
        io_ok(b.uri('plain'), 'write -P 1 0 64k', 'write -P 2 5M 192k', 'write -P 3 9M 4k', 'write -z 12M 1M',
              'write -P 4 30M 2M', 'flush')
        ours, theirs = nbd_data(b.uri('plain')), rbd_allocated(plain)
        print('MAP exact', ours, theirs)
        assert ours == theirs and ours, (ours, theirs)
        b.quit()
        assert 'blockd: error' not in b.logtext() and 'blockd: warning' not in b.logtext(), b.logtext()
    elif scenario == 'zeroes':
        need_qsd()
        result = {}
        # discard=unmap lets zero writes deallocate; with QEMU's default for blockdev-add
        # (discard=ignore) MAY_UNMAP is dropped, so blockd keeps every zeroed range allocated.
        for name, binary, discard in (('blockd', blockd_bin, 'unmap'), ('qsd', qsd_bin, 'unmap'),
                                      ('blockd-ignore', blockd_bin, None)):
            img = create(f'zero-{name}', '32M')
            # Data everywhere first: 8 objects of 4 MiB.
            io_ok(qemu_rbd(img), 'write -P 0x5a 0 32M', 'flush')
            s = Daemon(binary, name)
            s.ok('blockdev-add', node_name='r0', **rbd_node(img, **({'discard': discard} if discard else {})))
            s.ok('block-export-add', type='nbd', id='e', node_name='r0', name='r', writable=True)
            # NO_HOLE (qemu-io write -z): must stay allocated; MAY_UNMAP (-u): may be freed.
            io_ok(s.uri('r'), 'write -z 4M 8M', 'write -z -u 16M 8M', 'flush', 'read -P 0 4M 8M', 'read -P 0 16M 8M',
                  'read -P 0x5a 0 4M', 'read -P 0x5a 12M 4M')
            s.quit()
            result[name] = rbd_allocated(img, whole_object=True)
            du = json.loads(rbd('du', '--format', 'json', img).stdout)['images'][0]['used_size']
            print('ALLOCATED', name, result[name], 'used', du)
            rbd_export(img, f'{d}/{name}.raw')
        compare(f'{d}/blockd.raw', f'{d}/qsd.raw')
        # blockd: the NO_HOLE range [4M, 12M) is allocated, the unmapped [16M, 24M) is not.
        assert result['blockd'] == [(0, 16 * M), (24 * M, 8 * M)], result
        # qemu-storage-daemon 7.2 frees the NO_HOLE range too (its thick-provision check never matches).
        assert result['qsd'] == [(0, 4 * M), (12 * M, 4 * M), (24 * M, 8 * M)], result
        assert result['blockd-ignore'] == [(0, 32 * M)], result
        compare(f'{d}/blockd.raw', f'{d}/blockd-ignore.raw')
    elif scenario == 'overlay':
        need('fio')
        img = create('base', '64M')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/expected.raw', '64M')
        for c in ('write -P 0x11 0 8M', 'write -P 0x22 16M 4M', 'write -P 0x23 40M 64k'):
            io_ok(qemu_rbd(img), c)
            sh('qemu-io', '-f', 'raw', '-c', c, f'{d}/expected.raw')
        def setup(name):
            sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/top.qcow2', '64M')
            b = Daemon(blockd_bin, name)
            b.ok('blockdev-add', node_name='base', **rbd_node(img))
            b.ok('blockdev-add', driver='qcow2', node_name='top', file={'driver': 'file', 'filename': f'{d}/top.qcow2'},
                 backing='base')
            b.ok('block-export-add', type='nbd', id='e', node_name='top', name='top', writable=True)
            return b, b.uri('top')
        def both(uri, cmd):
            io_ok(uri, cmd)
            sh('qemu-io', '-f', 'raw', '-c', cmd, f'{d}/expected.raw')
        # Reads and writes through the overlay.
        b, uri = setup('b1')
        io_ok(uri, 'read -P 0x11 0 8M', 'read -P 0x22 16M 4M', 'read -P 0 24M 1M', 'read -P 0x23 40M 64k')
        compare(uri, f'{d}/expected.raw')
        both(uri, 'write -P 0x33 4M 1M')
        both(uri, 'write -P 0x34 16380k 8k')
        both(uri, 'write -z 40M 4k')
        fio(uri, '--rw=randwrite', '--offset=48M', '--size=8M')
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0 48M 8M', f'{d}/expected.raw')   # fio's data is compared below
        # Stream: the overlay takes in the base and stands alone.
        b.ok('block-stream', job_id='s', device='top')
        ev = b.q.wait('BLOCK_JOB_COMPLETED', 120)
        assert 'error' not in ev['data'], ev
        top = [n for n in b.ok('query-named-block-nodes') if n['node-name'] == 'top'][0]
        assert 'backing_file' not in top, top
        print('STREAMED', ev['data'])
        sh('nbdcopy', uri, f'{d}/streamed.raw') if shutil.which('nbdcopy') else sh('qemu-img', 'convert', '-O', 'raw', uri, f'{d}/streamed.raw')
        b.quit()
        sh('qemu-img', 'check', f'{d}/top.qcow2')
        compare(f'{d}/top.qcow2', f'{d}/streamed.raw', fa='qcow2')
        sh('qemu-img', 'convert', '-O', 'raw', f'{d}/streamed.raw', f'{d}/expected.raw')
        # The base was only read.
        rbd_export(img, f'{d}/base.raw')
        # Commit: a fresh overlay's writes go down into the RBD base (active commit).
        shutil.copy(f'{d}/base.raw', f'{d}/expected.raw')
        b, uri = setup('b2')
        both(uri, 'write -P 0x41 4M 1M')
        both(uri, 'write -P 0x42 30M 64k')
        b.ok('block-commit', job_id='c', device='top')
        b.q.wait('BLOCK_JOB_READY', 120)
        both(uri, 'write -P 0x43 8M 64k')
        b.ok('job-complete', id='c')
        ev = b.q.wait('BLOCK_JOB_COMPLETED', 120)
        assert 'error' not in ev['data'], ev
        print('COMMITTED', ev['data'])
        # The export now serves the RBD node itself.
        both(uri, 'write -P 0x44 12M 64k')
        compare(uri, f'{d}/expected.raw')
        b.quit()
        rbd_export(img, f'{d}/base.raw')
        compare(f'{d}/base.raw', f'{d}/expected.raw')
    elif scenario == 'bitmap':
        need('nbdinfo', 'nbdcopy')
        if run('/usr/bin/python3', '-c', 'import nbd').returncode != 0: print('missing python3-libnbd'); sys.exit(77)
        img = create('bm', '64M')
        io_ok(qemu_rbd(img), 'write -P 0x10 0 64M')
        b = Daemon(blockd_bin, 'b')
        # discard=unmap: the trim below reaches the image (and the bitmap).
        b.ok('blockdev-add', node_name='r0', **rbd_node(img, discard='unmap'))
        b.ok('block-dirty-bitmap-add', node='r0', name='b0')
        b.ok('block-export-add', type='nbd', id='full', node_name='r0', name='r', writable=True)
        # Full backup, then changes through the export.
        sh('nbdcopy', b.uri('r'), f'{d}/backup.raw')
        io_ok(b.uri('r'), 'write -P 0x21 1M 64k', 'write -P 0x22 10M 3M', 'write -z 30M 1M', 'discard 40M 4M',
              'write -P 0x23 63M 4k', 'flush')
        # Freeze b0 and start b1 atomically (writes go on being tracked), then an incremental
        # export: the frozen bitmap as qemu:dirty-bitmap:b0.
        b.ok('transaction', actions=[
            {'type': 'block-dirty-bitmap-add', 'data': {'node': 'r0', 'name': 'b1'}},
            {'type': 'block-dirty-bitmap-disable', 'data': {'node': 'r0', 'name': 'b0'}}])
        io_ok(b.uri('r'), 'write -P 0x24 50M 64k', 'flush')
        b.ok('block-export-add', type='nbd', id='inc', node_name='r0', name='inc', bitmaps=['b0'])
        m = json.loads(run('nbdinfo', '--map=qemu:dirty-bitmap:b0', '--json', b.uri('inc')).stdout)
        dirty = merge([(e['offset'], e['length']) for e in m if e['type'] & 1])
        print('DIRTY', dirty)
        assert dirty == [(1 * M, 64 * 1024), (10 * M, 3 * M), (30 * M, 1 * M), (40 * M, 4 * M), (63 * M, 64 * 1024)], dirty
        # Copy only the dirty extents into the full backup: it then equals the image.
        script = ('import nbd, sys, json\n'
                  'h = nbd.NBD(); h.connect_uri(sys.argv[1])\n'
                  'f = open(sys.argv[2], "r+b")\n'
                  'for off, n in json.loads(sys.argv[3]):\n'
                  '    f.seek(off); f.write(h.pread(n, off))\n'
                  'f.close(); h.shutdown()\n')
        res = run('/usr/bin/python3', '-c', script, b.uri('inc'), f'{d}/backup.raw', json.dumps(dirty))
        assert res.returncode == 0, res
        b.ok('block-export-del', id='inc')
        # b1 holds what came after the freeze.
        bm = {x['name']: x['count'] for n in b.ok('query-named-block-nodes') if n['node-name'] == 'r0' for x in n['dirty-bitmaps']}
        assert bm['b1'] == 64 * 1024, bm
        b.quit()
        rbd_export(img, f'{d}/now.raw')
        # The backup is the image as it was at the freeze.
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x24 50M 64k', f'{d}/backup.raw')
        compare(f'{d}/backup.raw', f'{d}/now.raw')
    elif scenario == 'qsd':
        need_qsd()
        # One QMP script (an RBD base with a bitmap and a local overlay, exported and written,
        # streamed; a second overlay committed down into the base; everything deleted), run
        # against both daemons on images of their own: the same replies and events in the same
        # order, and the same bytes in the end.
        transcripts = {}
        for name, binary in (('blockd', blockd_bin), ('qsd', qsd_bin)):
            img = create(f'same-{name}', '32M')
            io_ok(qemu_rbd(img), 'write -P 0x61 0 8M', 'write -P 0x62 20M 2M')
            for t in ('top', 'top2'):
                sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/{name}-{t}.qcow2', '32M')
            s = Daemon(binary, name)
            log = []
            def step(_command, **args):
                r = s.cmd(_command, **args)
                log.append(f'{_command} -> ' + ('return' if 'return' in r else r['error']['class']))
                return r
            def wait(event):
                ev = s.q.wait(event, 120)
                data = {k: v for k, v in ev.get('data', {}).items()}
                log.append(f'{event} ' + json.dumps(data, sort_keys=True))
            step('blockdev-add', node_name='base', **rbd_node(img))
            step('blockdev-add', driver='qcow2', node_name='top', backing='base',
                 file={'driver': 'file', 'filename': f'{d}/{name}-top.qcow2'})
            step('block-dirty-bitmap-add', node='base', name='bm')
            step('block-export-add', type='nbd', id='e', node_name='top', name='top', writable=True)
            io_ok(s.uri('top'), 'write -P 0x63 4M 1M', 'write -P 0x64 24M 64k')
            step('block-stream', job_id='s', device='top')
            wait('BLOCK_JOB_COMPLETED')
            # Stream only read base: its bitmap is clean in both.
            bm = [b for n in s.ok('query-named-block-nodes') if n['node-name'] == 'base' for b in n.get('dirty-bitmaps', [])]
            log.append('bitmaps ' + json.dumps(sorted((b['name'], b['count']) for b in bm)))
            step('block-export-del', id='e')
            wait('BLOCK_EXPORT_DELETED')
            step('blockdev-del', node_name='top')
            step('blockdev-add', driver='qcow2', node_name='top2', backing='base',
                 file={'driver': 'file', 'filename': f'{d}/{name}-top2.qcow2'})
            step('block-export-add', type='nbd', id='e2', node_name='top2', name='top2', writable=True)
            io_ok(s.uri('top2'), 'write -P 0x65 8M 1M', 'write -P 0x66 30M 64k')
            step('block-commit', job_id='c', device='top2')
            wait('BLOCK_JOB_READY')
            step('job-complete', id='c')
            wait('BLOCK_JOB_COMPLETED')
            # base's bitmap: present in both; its count differs on purpose (blockd's commit marks
            # no bitmap of base, QEMU's marks it: docs/bitmaps.md, "Through commit").
            bm = [b for n in s.ok('query-named-block-nodes') if n['node-name'] == 'base' for b in n.get('dirty-bitmaps', [])]
            log.append('bitmaps ' + json.dumps(sorted(b['name'] for b in bm)))
            step('block-export-del', id='e2')
            wait('BLOCK_EXPORT_DELETED')
            step('blockdev-del', node_name='top2')
            step('blockdev-del', node_name='base')
            # Every event in order (timestamps aside), waited for or not.
            log += ['EVENT ' + e['event'] + ' ' + json.dumps(e.get('data', {}), sort_keys=True) for e in s.q.history]
            s.quit()
            transcripts[name] = log
            rbd_export(img, f'{d}/{name}.raw')
            sh('qemu-img', 'convert', '-O', 'raw', '-f', 'qcow2', f'{d}/{name}-top.qcow2', f'{d}/{name}-top.raw')
        for name in ('blockd', 'qsd'): print('TRANSCRIPT', name, '\n  ' + '\n  '.join(transcripts[name]))
        assert transcripts['blockd'] == transcripts['qsd'], transcripts
        compare(f'{d}/blockd.raw', f'{d}/qsd.raw')
        compare(f'{d}/blockd-top.raw', f'{d}/qsd-top.raw')
    elif scenario == 'qcow2':
        # A qcow2 image whose file is an RBD image: qcow2 allocates past the end of its file,
        # which grows the RBD image (rbd_resize, as QEMU's driver does).
        need('fio')
        img = 'q2'
        rbd('rm', img, check=False)
        images.append(img)
        # qemu-img creates the RBD image and writes a qcow2 header into it (its rbd driver).
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', qemu_rbd(img), '64M')
        start_size = json.loads(rbd('info', '--format', 'json', img).stdout)['size']
        b = Daemon(blockd_bin, 'b')
        b.ok('blockdev-add', node_name='rf', **rbd_node(img))
        b.ok('blockdev-add', driver='qcow2', node_name='q', file='rf')
        b.ok('block-export-add', type='nbd', id='e', node_name='q', name='q', writable=True)
        io_ok(b.uri('q'), 'write -P 0x71 0 4M', 'write -P 0x72 40M 4M', 'flush')
        fio(b.uri('q'), '--rw=randwrite', '--offset=8M', '--size=16M')
        size = [n for n in b.ok('query-named-block-nodes') if n['node-name'] == 'rf'][0]['image']['virtual-size']
        print('GREW', start_size, '->', size)
        assert size > start_size and size > 24 * M, (start_size, size)
        b.quit()
        info = json.loads(rbd('info', '--format', 'json', img).stdout)
        assert info['size'] == size, (info, size)
        r = run('qemu-img', 'check', '-f', 'qcow2', qemu_rbd(img))
        assert r.returncode == 0, (r.stdout, r.stderr)
        io_ok(qemu_rbd(img), 'read -P 0x71 0 4M', 'read -P 0x72 40M 4M', fmt='qcow2')
    elif scenario == 'osd':
        need('fio')
        img = create('osd', '64M')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/local.raw', '16M')
        # Per-node Ceph options through the legacy file name: requests give up after 6 s.
        b = Daemon(blockd_bin, 'b')
        b.ok('blockdev-add', node_name='r0', driver='rbd', filename=f'rbd:rbd/{img}:conf={conf}:rados_osd_op_timeout=6')
        b.ok('blockdev-add', node_name='r1', **rbd_node(img, read_only=True))
        b.ok('block-export-add', type='nbd', id='e', node_name='r0', name='r', writable=True)
        b.ok('blockdev-add', driver='raw', node_name='lf', file={'driver': 'file', 'filename': f'{d}/local.raw'})
        b.ok('block-export-add', type='nbd', id='l', node_name='lf', name='local', writable=True)
        io_ok(b.uri('r'), 'write -P 0x31 0 4M', 'flush')
        pid = osd_pid()
        # 1. The OSD stops and comes back within the timeout: requests wait and succeed.
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            writer = subprocess.Popen(['qemu-io', '-f', 'raw', '-c', 'write -P 0x32 8M 4M', '-c', 'flush', '-c', 'read -P 0x32 8M 4M',
                                       b.uri('r')], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(writer)
            # Meanwhile other exports and QMP go on without delay.
            io_ok(b.uri('local'), 'write -P 9 0 1M', 'read -P 9 0 1M')
            assert ('r0', 'rbd') in nodes(b)
            assert time.monotonic() - t0 < 2.5, time.monotonic() - t0
            until(lambda: time.monotonic() - t0 > 3, 'three seconds of OSD downtime', step=0.1)
            # The write is waiting for the OSD (neither done nor failed).
            assert writer.poll() is None, writer.communicate()
        finally:
            os.kill(pid, signal.SIGCONT)
        out, _ = writer.communicate(timeout=120)
        print('WAITED', round(time.monotonic() - t0, 1), out.replace('\n', ' | '))
        assert writer.returncode == 0 and 'failed' not in out and 'read 4194304/4194304' in out, out

        # 2. It stays away past rados_osd_op_timeout: requests fail with EIO, nothing hangs.
        # Meanwhile a new node's open (which needs the OSD) gives up after its bound:
        # client_mount_timeout (3 s here) for the monitors, as long again for the OSDs.
        img2 = create('osd2', '16M')
        opened = {}
        def add_while_down():
            q2 = Q(b.qmp_path)
            t = time.monotonic()
            opened['r'] = q2.cmd('blockdev-add', node_name='late', driver='rbd',
                                 filename=f'rbd:rbd/{img2}:conf={conf}:client_mount_timeout=3')
            opened['t'] = time.monotonic() - t
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            adder = threading.Thread(target=add_while_down); adder.start()
            res = run('qemu-io', '-f', 'raw', '-c', 'write -P 0x33 16M 64k', '-c', 'read 0 4k', b.uri('r'), timeout=60)
            took = time.monotonic() - t0
            print('EIO-AFTER', round(took, 1), res.stdout.strip().replace('\n', ' | '))
            assert 'Input/output error' in res.stdout + res.stderr, res
            assert 4 < took < 30, took
            io_ok(b.uri('local'), 'read -P 9 0 1M')
            assert ('lf', 'raw') in nodes(b)
            adder.join(30)
            print('OPEN-WHILE-DOWN', round(opened['t'], 1), json.dumps(opened['r']))
            assert 'error' in opened['r'] and 'did not answer' in opened['r']['error']['desc'], opened
            assert 5 < opened['t'] < 15, opened
            assert ('late', 'rbd') not in nodes(b)
        finally:
            os.kill(pid, signal.SIGCONT)
        # 3. Back again: the node serves without being reopened.
        until(lambda: run('qemu-io', '-f', 'raw', '-c', 'write -P 0x34 20M 64k', '-c', 'read -P 0x34 20M 64k',
                          b.uri('r')).stdout.count('64 KiB') == 2, 'the node to serve again', timeout=60, step=0.5)
        io_ok(b.uri('r'), 'read -P 0x31 0 4M', 'read -P 0x32 8M 4M')
        assert 'timed out' in b.logtext() or 'Connection timed out' in b.logtext(), b.logtext()
        assert b.p.poll() is None
        b.quit()
    elif scenario == 'lock':
        img = create('lk', '16M')
        plain = create('lk-plain', '16M', features='layering')
        b = Daemon(blockd_bin, 'b')
        before = nodes(b)
        b.ok('blockdev-add', node_name='w0', **rbd_node(img))
        b.ok('blockdev-add', node_name='p0', **rbd_node(plain))
        for i, (image, why) in enumerate(((img, 'already open writable in this daemon'), (plain, 'already open writable in this daemon'))):
            res = b.cmd('blockdev-add', node_name=f'x{i}', **rbd_node(image))
            print('SECOND', json.dumps(res))
            assert 'error' in res and why in res['error']['desc'], res
            # Inline under a format node too: nothing is left behind.
            res = b.cmd('blockdev-add', node_name=f'y{i}', driver='raw', file=rbd_node(image))
            assert 'error' in res and why in res['error']['desc'], res
        # Readers are fine beside the writer, also those read-only by inheritance: the file
        # child of a read-only node, and a qcow2 overlay's inline backing child.
        b.ok('blockdev-add', node_name='ro0', **rbd_node(img, read_only=True))
        b.ok('blockdev-add', node_name='ro1', driver='raw', read_only=True, file=rbd_node(img))
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/lk-overlay.qcow2', '16M')
        b.ok('blockdev-add', node_name='ov', driver='qcow2', file={'driver': 'file', 'filename': f'{d}/lk-overlay.qcow2'},
             backing=rbd_node(img))
        b.ok('blockdev-del', node_name='ov')
        b.ok('blockdev-del', node_name='ro1')
        b.ok('block-export-add', type='nbd', id='e', node_name='w0', name='w', writable=True)
        io_ok(b.uri('w'), 'write -P 0x51 0 1M', 'flush')
        # The graph's permissions reach across the nodes of one image, as image locks do for
        # files: a qcow2 node over a read-only node of an image (qcow2 metadata: it shares no
        # writes) and a writer of the image through another node exclude each other, in either
        # order; each refusal leaves the graph as it was.
        q2 = 'lk-q2'
        rbd('rm', q2, check=False)
        images.append(q2)
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', qemu_rbd(q2), '16M')
        b.ok('blockdev-add', node_name='qw', **rbd_node(q2))
        b.ok('block-export-add', type='nbd', id='qe', node_name='qw', name='qw', writable=True)
        before_perm = nodes(b)
        res = b.cmd('blockdev-add', node_name='qr', driver='qcow2', read_only=True, file=rbd_node(q2))
        print('READER-AFTER-WRITER', json.dumps(res))
        assert 'error' in res and f"Failed to get shared \"write\" lock on RBD image 'rbd/{q2}'" in res['error']['desc'], res
        assert nodes(b) == before_perm, (nodes(b), before_perm)
        # The export gone, nobody writes through qw (still a writable node): the reader opens.
        b.ok('block-export-del', id='qe')
        until(lambda: not any(e['id'] == 'qe' for e in b.ok('query-block-exports')), 'export qe to go', timeout=10, step=0.05)
        b.ok('blockdev-add', node_name='qr', driver='qcow2', read_only=True, file=rbd_node(q2))
        res = b.cmd('block-export-add', type='nbd', id='qe', node_name='qw', name='qw', writable=True)
        print('WRITER-AFTER-READER', json.dumps(res))
        assert 'error' in res and f"Failed to get \"write\" lock on RBD image 'rbd/{q2}'" in res['error']['desc'], res
        assert not any(e['id'] == 'qe' for e in b.ok('query-block-exports'))
        # A read-only export of qw shares everything: fine beside the reader.
        b.ok('block-export-add', type='nbd', id='qe', node_name='qw', name='qw')
        io_ok(b.uri('qw'), 'read 0 64k', read_only=True)
        b.ok('block-export-del', id='qe')
        until(lambda: not any(e['id'] == 'qe' for e in b.ok('query-block-exports')), 'export qe to go', timeout=10, step=0.05)
        b.ok('blockdev-del', node_name='qr')
        b.ok('block-export-add', type='nbd', id='qe', node_name='qw', name='qw', writable=True)
        io_ok(b.uri('qw'), 'write -P 0x5a 0 4k')   # the image is as large as qemu-img made the qcow2 file
        b.ok('block-export-del', id='qe')
        until(lambda: 'return' in b.cmd('blockdev-del', node_name='qw'), 'qw to go', timeout=10, step=0.1)
        # Another process: its writable open is refused by the exclusive lock (the image has
        # the feature), and it cannot take the lock away with writes either.
        o = Daemon(blockd_bin, 'other')
        res = o.cmd('blockdev-add', node_name='w1', **rbd_node(img))
        print('OTHER-PROCESS', json.dumps(res))
        assert 'error' in res and 'holds its exclusive lock' in res['error']['desc'], res
        o.ok('blockdev-add', node_name='r1', **rbd_node(img, read_only=True))
        o.ok('block-export-add', type='nbd', id='e', node_name='r1', name='r')
        io_ok(o.uri('r'), 'read -P 0x51 0 1M', read_only=True)
        res = run('rbd', '-c', conf, 'bench', '--io-type', 'write', '--io-size', '4096', '--io-total', '4096', img)
        print('RBD-BENCH-WRITE', res.returncode, res.stderr.strip()[-200:])
        assert res.returncode != 0, res
        io_ok(b.uri('w'), 'read -P 0x51 0 1M', 'write -P 0x52 1M 1M')
        # Deleting the writer releases the lock: the other process may now write.
        b.ok('block-export-del', id='e')
        until(lambda: 'return' in b.cmd('blockdev-del', node_name='w0'), 'w0 to go', timeout=10, step=0.1)
        o.ok('blockdev-add', node_name='w1', **rbd_node(img))
        o.quit(); b.quit()
    elif scenario == 'mirror':
        need('fio', 'nbdcopy')
        # Live import: a local qcow2 disk, exported and written by fio (with verify) the whole
        # time, moves into Ceph with blockdev-mirror; after job-complete the export serves the
        # RBD node. Then a live export of it back out to a local qcow2, fio writing again.
        # No write is lost: fio verifies what it wrote, and the image in Ceph (rbd export)
        # equals what the export served.
        img = create('imp', '64M')
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/local.qcow2', '64M')
        sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x12 20M 4M', '-c', 'write -z 26M 1M',
           f'{d}/local.qcow2')
        b = Daemon(blockd_bin, 'b')
        b.ok('blockdev-add', driver='qcow2', node_name='disk0', file={'driver': 'file', 'filename': f'{d}/local.qcow2'})
        b.ok('block-export-add', type='nbd', id='e0', node_name='disk0', name='disk0', writable=True)
        uri = b.uri('disk0')
        # discard=unmap: zero ranges of the source stay holes in Ceph (docs/ceph.md).
        b.ok('blockdev-add', node_name='ceph0', **rbd_node(img, discard='unmap'))

        def move(job, device, target, region):
            """fio writes region (offset, size) of the export while `device` is mirrored into
            `target`; job-complete while fio still runs; fio then verifies everything it wrote."""
            off, size = region
            writer = subprocess.Popen(['fio', '--name=w', '--ioengine=nbd', f'--uri={uri}', '--bs=4k', '--iodepth=8',
                                       '--rw=randwrite', f'--offset={off}', f'--size={size}', f'--io_size={4 * size}',
                                       '--thread', '--rate_iops=1500', '--verify=crc32c', '--verify_fatal=1',
                                       '--verify_state_save=0', '--randrepeat=0', '--output-format=terse'],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(writer)
            # fio is connected (libnbd's socket; --thread: in fio's own process) before the job starts.
            def connected():
                if writer.poll() is not None: return True
                fds = f'/proc/{writer.pid}/fd'
                try: return any(os.readlink(f'{fds}/{f}').startswith('socket:') for f in os.listdir(fds))
                except OSError: return False
            until(connected, 'fio to connect')
            assert writer.poll() is None, writer.communicate()
            t0 = time.monotonic()
            b.ok('blockdev-mirror', job_id=job, device=device, target=target, sync='full')
            ready = b.q.wait('BLOCK_JOB_READY', 120)
            t_ready = time.monotonic() - t0
            assert ready['data']['device'] == job, ready
            running = writer.poll() is None
            b.ok('job-complete', id=job)
            ev = b.q.wait('BLOCK_JOB_COMPLETED', 120)
            assert 'error' not in ev['data'] and ev['data']['offset'] == ev['data']['len'], ev
            out, _ = writer.communicate(timeout=240)
            print('MOVED', job, 'ready after', round(t_ready, 2), 's; fio running at complete:', running,
                  'and done', round(time.monotonic() - t0, 2), 's after the start; fio:', out.strip().split(';')[2:9])
            assert writer.returncode == 0, out
            assert running, 'fio finished before the job was ready: nothing was written during the move'
            exports = b.ok('query-block-exports')
            assert [e['node-name'] for e in exports if e['id'] == 'e0'] == [target], exports

        move('import0', 'disk0', 'ceph0', (32 * M, 8 * M))
        b.ok('blockdev-del', node_name='disk0')
        assert ('disk0', 'qcow2') not in nodes(b)
        io_ok(uri, 'read -P 0x11 0 8M', 'read -P 0x12 20M 4M', 'read -P 0 26M 1M', 'flush')
        sh('nbdcopy', uri, f'{d}/served.raw')
        rbd_export(img, f'{d}/ceph.raw')
        compare(f'{d}/served.raw', f'{d}/ceph.raw')
        # The zeroed range was not written as data into Ceph (whole-object granularity).
        alloc = rbd_allocated(img, whole_object=True)
        print('IMPORTED', alloc)
        assert all(not (o <= 26 * M and 27 * M <= o + n) for o, n in alloc if o >= 24 * M), alloc

        # Live export: back out to a fresh local qcow2 image.
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/out.qcow2', '64M')
        b.ok('blockdev-add', driver='qcow2', node_name='local0', discard='unmap',
             file={'driver': 'file', 'filename': f'{d}/out.qcow2'})
        move('export0', 'ceph0', 'local0', (48 * M, 8 * M))
        sh('nbdcopy', uri, f'{d}/served2.raw')
        b.ok('blockdev-del', node_name='ceph0')
        # The exclusive lock went with the node: another client may write the image now.
        io_ok(qemu_rbd(img), 'write -P 0x77 60M 4k')
        b.quit()
        sh('qemu-img', 'check', f'{d}/out.qcow2')
        compare(f'{d}/out.qcow2', f'{d}/served2.raw', fa='qcow2')
        assert 'blockd: error' not in b.logtext(), b.logtext()
    elif scenario == 'bad':
        img = create('bad', '16M')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/local.raw', '16M')
        keyring = open(f'{cluster_dir}/keyring').read()
        admin_key = keyring.split('[client.admin]')[1].split('key = ')[1].split()[0]
        # The key as a secret object from the command line.
        b = Daemon(blockd_bin, 'b', extra=['--object', f'secret,id=good,data={admin_key},format=base64'])
        b.ok('blockdev-add', driver='raw', node_name='lf', file={'driver': 'file', 'filename': f'{d}/local.raw'})
        b.ok('block-export-add', type='nbd', id='l', node_name='lf', name='local', writable=True)
        before = nodes(b)
        with open(f'{d}/dead.conf', 'w') as f:
            f.write('[global]\nmon host = 127.0.0.1:1\nclient mount timeout = 4\n')
        with open(f'{d}/bare.conf', 'w') as f:
            f.write('[global]\n')
        b.ok('object-add', qom_type='secret', id='wrong', data='AQBBBBBBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==', format='base64')
        # Secrets themselves.
        for args, text in ((dict(id='s1'), "Either 'file' or 'data' must be provided"),
                           (dict(id='s2', data='x', file='/etc/hostname'), "mutually exclusive"),
                           (dict(id='s3', data='not base64!', format='base64'), 'Base64 data contains invalid characters'),
                           (dict(id='s4', file=f'{d}/nope'), f'Unable to read {d}/nope'),
                           (dict(id='good', data='x'), "duplicate")):
            res = b.cmd('object-add', qom_type='secret', **args)
            assert 'error' in res and text in res['error']['desc'], (args, res)
        # An open against monitors that never answer: bounded, the monitor is named, and
        # meanwhile QMP and the other export go on.
        holder = {}
        def slow_add():
            q2 = Q(b.qmp_path)
            t0 = time.monotonic()
            holder['r'] = q2.cmd('blockdev-add', node_name='dead', driver='rbd', pool='rbd', image=img, conf=f'{d}/dead.conf')
            holder['t'] = time.monotonic() - t0
        t = threading.Thread(target=slow_add); t.start()
        def opening():
            for task in os.listdir(f'/proc/{b.p.pid}/task'):
                try:
                    if open(f'/proc/{b.p.pid}/task/{task}/comm').read().strip() == 'rbd-open': return True
                except OSError: pass
            return False
        until(opening, 'the slow open to start (its rbd-open thread)')
        t0 = time.monotonic()
        assert nodes(b) == before
        io_ok(b.uri('local'), 'write -P 7 0 1M', 'read -P 7 0 1M')
        quick = time.monotonic() - t0
        t.join(60)
        print('DEAD-MONITOR', round(holder['t'], 1), json.dumps(holder['r']), 'meanwhile', round(quick, 2))
        assert 'error' in holder['r'] and '127.0.0.1:1' in holder['r']['error']['desc'], holder
        assert 3 < holder['t'] < 12 and quick < 2, (holder, quick)
        cases = [
            (rbd_node(img) | {'pool': 'nopool'}, 'error opening pool nopool: No such file or directory'),
            (rbd_node('nope'), 'error reading header from nope: No such file or directory'),
            (rbd_node(img, snapshot='nosnap', read_only=True), "snapshot 'nosnap' does not exist"),
            (rbd_node(img, snapshot='nosnap'), 'rbd snapshots are read-only'),
            (rbd_node(img, namespace='nons'), "namespace 'nons' does not exist"),
            (rbd_node(img, user='nobody'), 'as client.nobody: Permission denied'),
            (rbd_node(img, user='admin', **{'key-secret': 'wrong'}), 'Permission denied'),
            (rbd_node(img, **{'key-secret': 'missing'}), "No secret with id 'missing'"),
            (rbd_node(img, **{'auth-client-required': ['none']}), 'error connecting'),
            (rbd_node(img, **{'auth-client-required': ['kerberos']}), "Parameter 'auth-client-required[0]' does not accept value 'kerberos'"),
            (rbd_node(img) | {'conf': f'{d}/nope.conf'}, f'error reading conf file {d}/nope.conf'),
            (rbd_node(img, encrypt={'format': 'luks', 'key-secret': 'good'}), "does not support 'encrypt'"),
            (rbd_node(img, bogus=1), "Parameter 'bogus' is unexpected"),
            ({'driver': 'rbd', 'image': img}, "Parameter 'pool' is missing"),
            (rbd_node(img, server=[{'host': '127.0.0.1'}]), "Parameter 'server[0].port' is missing"),
            ({'driver': 'rbd', 'filename': 'rbd:'}, 'Pool name is required'),
            ({'driver': 'rbd', 'filename': f'rbd:rbd/{img}:conf={conf}:no_such_option=1'}, 'invalid conf option no_such_option'),
            ({'driver': 'raw', 'file': rbd_node('nope')}, 'error reading header from nope'),
        ]
        for i, (opts, text) in enumerate(cases):
            t0 = time.monotonic()
            res = b.cmd('blockdev-add', node_name=f'n{i}', **opts)
            took = time.monotonic() - t0
            print('CASE', i, round(took, 2), json.dumps(res))
            assert 'error' in res and res['error']['class'] == 'GenericError', res
            assert text in res['error']['desc'], (text, res)
            assert took < 40, took
        # Nothing was added, not even an implicit child; the daemon serves as before.
        assert nodes(b) == before, (nodes(b), before)
        # Monitors, user and key from the options alone (a configuration file without them).
        mon = open(conf).read().split('mon host = ')[1].split()[0]
        host, port = mon.strip('[]').split(':', 1)[1].rsplit(':', 1)
        b.ok('blockdev-add', node_name='good', driver='rbd', pool='rbd', image=img, conf=f'{d}/bare.conf', user='admin',
             server=[{'host': host, 'port': port}], **{'key-secret': 'good', 'auth-client-required': ['cephx']})
        b.ok('block-export-add', type='nbd', id='g', node_name='good', name='good', writable=True)
        io_ok(b.uri('good'), 'write -P 3 0 64k', 'read -P 3 0 64k')
        b.ok('block-export-del', id='g')
        until(lambda: 'return' in b.cmd('blockdev-del', node_name='good'), 'good to go', timeout=10, step=0.1)
        b.ok('object-del', id='good')
        assert nodes(b) == before
        assert b.p.poll() is None
        b.quit()
        # The log has no librados noise, only what blockd says.
        print(b.logtext())
    else:
        print('unknown scenario'); sys.exit(2)
finally:
    for p in procs:
        if p.poll() is None: p.kill(); p.wait(10)
    for name in images:
        run('rbd', '-c', conf, 'rm', '--no-progress', name, timeout=60)
print('OK', d)
shutil.rmtree(d, ignore_errors=True)
