#!/usr/bin/env python3
"""The nbd driver end to end: a local blockd whose nodes live on a REMOTE NBD server (a second
blockd or qemu-storage-daemon), checked with qemu-io, qemu-img, fio and nbdinfo.

Usage: remote_scenarios.py LOCAL_BLOCKD REMOTE_DAEMON SCENARIO   (exit 77: a tool is missing)

Scenarios:
  overlay      qcow2 overlay with the remote base as backing: read, write, qemu-img compare, fio verify
  stream       block-stream pulls the remote base into the overlay
  commit       active block-commit of the overlay down into the remote base
  reconnect    re-export of a remote node; the remote is killed and restarted within
               reconnect-delay under fio with verify: no client error, verify passes
  expire       past reconnect-delay clients get EIO; the daemon stays healthy and recovers
  bad          unreachable server, wrong export, refused options: QMP errors, graph unchanged
  opentimeout  open-timeout waits for a server that comes up late
  hostile      a misbehaving server (bad magic, unknown cookie, chunk outside the request,
               huge chunk, silence, handshake that never ends): clear errors, loops keep serving
  bitmap       x-dirty-bitmap: block status of a re-export matches QEMU's nbd driver (qemu-img map)
  multiconn    a multi-conn server gets one connection per event loop
  blocksize    nbdkit with strict block sizes: advertised by the node, big requests split
  commands     every command through a re-export: FUA, zeroes, fast zero, trim, flush, status
  tls          nbd nodes over TLS (x509 over TCP and a unix socket, PSK) to a remote requiring it;
               mismatches (no TLS, TLS to a plain server, wrong CA, hostname, key, credentials
               object) are clear QMP errors and leave the graph unchanged
Prints progress lines and 'OK' at the end; asserts on everything."""
import json, os, resource, shutil, signal, socket, struct, subprocess, sys, tempfile, threading, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'jobs'))
from qmpmini import Q, until, can_connect

for tool in ('qemu-img', 'qemu-io'):
    if not shutil.which(tool): print('missing', tool); sys.exit(77)
local_bin, remote_bin, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
remote_is_qsd = 'qemu-storage-daemon' in remote_bin
d = tempfile.mkdtemp(prefix='nbdc-')
M = 1 << 20
procs = []

def sh(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def run(*a, timeout=120):
    return subprocess.run(a, capture_output=True, text=True, timeout=timeout)

class Daemon:
    """A daemon with a QMP monitor and an NBD server on unix sockets under d/NAME.*"""
    def __init__(self, binary, name, extra=(), server_opts=''):
        self.binary, self.name, self.extra, self.server_opts = binary, name, list(extra), server_opts
        self.qmp_path, self.nbd_path = f'{d}/{name}.qmp', f'{d}/{name}.nbd'
        self.start()

    def start(self):
        for p in (self.qmp_path, self.nbd_path):
            if os.path.exists(p): os.unlink(p)
        self.log = open(f'{d}/{self.name}.log', 'a')
        self.p = subprocess.Popen([self.binary, '--chardev', f'socket,path={self.qmp_path},server=on,wait=off,id=m',
                                   '--monitor', 'chardev=m'] + self.extra
                                  + ['--nbd-server', f'addr.type=unix,addr.path={self.nbd_path}{self.server_opts}'],
                                  stdout=self.log, stderr=self.log)
        procs.append(self.p)
        until(lambda: can_connect(self.qmp_path) and can_connect(self.nbd_path), f'{self.name} to listen')
        self.q = Q(self.qmp_path)

    def cmd(self, _command, **args):
        return self.q.cmd(_command, **args)

    def ok(self, _command, **args):
        r = self.q.cmd(_command, **args)
        assert 'return' in r, (_command, args, r)
        return r['return']

    def uri(self, export):
        return f'nbd+unix:///{export}?socket={self.nbd_path}'

    def kill9(self):
        self.p.send_signal(signal.SIGKILL); self.p.wait(10)

    def quit(self):
        if self.p.poll() is None:
            self.q.cmd('quit'); self.p.wait(20)

    def logtext(self):
        with open(f'{d}/{self.name}.log') as f: return f.read()

def remote(image, fmt, name='base', writable=True, bitmaps=(), extra=()):
    r = Daemon(remote_bin, 'remote', extra)
    r.ok('blockdev-add', driver='file', node_name='rf', filename=image)
    r.ok('blockdev-add', driver=fmt, node_name='rn', file='rf')
    for b in bitmaps: r.ok('block-dirty-bitmap-add', node='rn', name=b)
    export = dict(type='nbd', id='re', node_name='rn', name=name, writable=writable, allocation_depth=True)
    if bitmaps: export['bitmaps'] = list(bitmaps)
    r.ok('block-export-add', **export)
    return r

def restart_remote(r, image, fmt, name='base'):
    r.start()
    r.ok('blockdev-add', driver='file', node_name='rf', filename=image)
    r.ok('blockdev-add', driver=fmt, node_name='rn', file='rf')
    r.ok('block-export-add', type='nbd', id='re', node_name='rn', name=name, writable=True)

def nbd_node(r, export='base', **extra):
    return dict(driver='nbd', server={'type': 'unix', 'path': r.nbd_path}, export=export, **extra)

def io_ok(uri, *cmds, fmt='raw'):
    a = ['qemu-io', '-f', fmt]
    for c in cmds: a += ['-c', c]
    r = run(*a, uri)
    assert r.returncode == 0 and 'failed' not in r.stdout and 'error' not in r.stderr.lower(), (cmds, r.stdout, r.stderr)
    return r

def compare(a, b, fa='raw', fb='raw'):
    r = run('qemu-img', 'compare', '-f', fa, '-F', fb, a, b)
    assert r.returncode == 0, (a, b, r.stdout, r.stderr)

def base_image():
    """A 64 MiB qcow2 base with data, a zero range and holes, plus its raw copy."""
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/base.qcow2', '64M')
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x22 16M 4M', '-c', 'write -z 24M 1M',
       '-c', 'write -P 0x23 40M 64k', f'{d}/base.qcow2')
    sh('qemu-img', 'convert', '-O', 'raw', f'{d}/base.qcow2', f'{d}/expected.raw')
    shutil.copy(f'{d}/expected.raw', f'{d}/base-orig.raw')

def overlay_setup():
    base_image()
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/top.qcow2', '64M')
    r = remote(f'{d}/base.qcow2', 'qcow2')
    l = Daemon(local_bin, 'local')
    l.ok('blockdev-add', node_name='rb', **nbd_node(r))
    l.ok('blockdev-add', driver='qcow2', node_name='top', file={'driver': 'file', 'filename': f'{d}/top.qcow2'}, backing='rb')
    l.ok('block-export-add', type='nbd', id='e', node_name='top', name='top', writable=True)
    return r, l, l.uri('top')

def both_write(uri, cmd):
    io_ok(uri, cmd)
    sh('qemu-io', '-f', 'raw', '-c', cmd, f'{d}/expected.raw')

def fio(uri, *extra, timeout=120):
    a = ['fio', '--name=w', '--ioengine=nbd', f'--uri={uri}', '--bs=4k', '--iodepth=8', '--verify=crc32c',
         '--verify_fatal=1', '--verify_state_save=0', '--randrepeat=1', '--output-format=terse'] + list(extra)
    return subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

def nodes(daemon):
    return sorted((n['node-name'], n['drv']) for n in daemon.ok('query-named-block-nodes'))

def rss_mib(pid):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'): return int(line.split()[1]) // 1024
    return 0

# A server that negotiates like a real one, then breaks the protocol in one way.
def hostile_server(path, mode):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path); srv.listen(16)
    def recv_exact(c, n):
        b = b''
        while len(b) < n:
            x = c.recv(n - len(b))
            if not x: raise EOFError
            b += x
        return b
    def rep(c, opt, typ, payload=b''):
        c.sendall(struct.pack('>QIII', 0x3e889045565a9, opt, typ, len(payload)) + payload)
    def serve(c):
        try:
            if mode == 'nogreeting':
                time.sleep(60); return
            c.sendall(b'NBDMAGICIHAVEOPT' + struct.pack('>H', 3))
            recv_exact(c, 4)
            while True:
                _, opt, ln = struct.unpack('>QII', recv_exact(c, 16))
                payload = recv_exact(c, ln)
                if mode == 'endless' and opt == 10:
                    # Meta context replies forever (names we did not ask for): never an ACK.
                    while True:
                        rep(c, 10, 4, struct.pack('>I', 1) + b'x:y' * 100); time.sleep(0.001)
                if opt == 8: rep(c, 8, 1)
                elif opt == 10:
                    rep(c, 10, 4, struct.pack('>I', 1) + b'base:allocation'); rep(c, 10, 1)
                elif opt == 7:
                    rep(c, 7, 3, struct.pack('>HQH', 0, 1 * M, 1 | 4)); rep(c, 7, 1); break
                else: rep(c, opt, 0x80000001)
            while True:
                h = recv_exact(c, 28)
                _, flags, typ, cookie, off, ln = struct.unpack('>IHHQQI', h)
                if typ == 1: recv_exact(c, ln)
                if typ == 2: return
                if mode == 'silent': continue
                if mode == 'badmagic': c.sendall(b'\xde\xad\xbe\xef' * 8); continue
                if mode == 'cookie': c.sendall(struct.pack('>IIQ', 0x67446698, 0, cookie ^ 0xffff)); continue
                if mode == 'range' and typ == 0:
                    data = b'x' * ln
                    c.sendall(struct.pack('>IHHQIQ', 0x668e33ef, 1, 1, cookie, 8 + ln, off + 512) + data); continue
                if mode == 'huge':
                    c.sendall(struct.pack('>IHHQI', 0x668e33ef, 1, 0x8001, cookie, 0x7fffffff)); continue
                if typ == 0:
                    c.sendall(struct.pack('>IHHQIQ', 0x668e33ef, 1, 1, cookie, 8 + ln, off) + b'\0' * ln)
                else:
                    c.sendall(struct.pack('>IIQ', 0x67446698, 0, cookie))
        except (EOFError, OSError):
            pass
        finally:
            c.close()
    def accept():
        while True:
            try: c, _ = srv.accept()
            except OSError: return
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return srv

try:
    if scenario == 'overlay':
        if not shutil.which('fio'): print('missing fio'); sys.exit(77)
        r, l, uri = overlay_setup()
        # Reads come from the remote base through the overlay.
        io_ok(uri, 'read -P 0x11 0 8M', 'read -P 0x22 16M 4M', 'read -P 0 24M 1M', 'read -P 0x23 40M 64k', 'read -P 0 60M 1M')
        compare(uri, f'{d}/expected.raw')
        both_write(uri, 'write -P 0x33 4M 1M')
        both_write(uri, 'write -P 0x34 16380k 8k')
        both_write(uri, 'write -z 40M 4k')
        compare(uri, f'{d}/expected.raw')
        # fio with verify in a region of its own, through the overlay over the remote base.
        f = fio(uri, '--rw=randwrite', '--offset=48M', '--size=8M', '--rate_iops=4000')
        out, _ = f.communicate(timeout=120)
        assert f.returncode == 0, out
        print('FIO', out.strip().split(';')[:3])
        if shutil.which('nbdinfo'):
            # qemu:allocation-depth through a re-export of the remote node: what the remote
            # chain leaves unallocated (depth 0) stays unallocated, the rest is this layer's.
            l.ok('block-export-add', type='nbd', id='x', node_name='rb', name='rb', allocation_depth=True)
            def unallocated(u):
                m = json.loads(run('nbdinfo', '--map=qemu:allocation-depth', '--json', u).stdout)
                out = []
                for e in m:
                    if e['type'] != 0: continue
                    if out and out[-1][0] + out[-1][1] == e['offset']: out[-1] = (out[-1][0], out[-1][1] + e['length'])
                    else: out.append((e['offset'], e['length']))
                return out
            ours, origin = unallocated(l.uri('rb')), unallocated(r.uri('base'))
            print('UNALLOCATED', ours)
            assert ours == origin and ours, (ours, origin)
        l.quit()
        sh('qemu-img', 'check', f'{d}/top.qcow2')
        r.quit()
        # The base was only read.
        sh('qemu-img', 'check', f'{d}/base.qcow2')
        compare(f'{d}/base.qcow2', f'{d}/base-orig.raw', fa='qcow2')
    elif scenario == 'stream':
        r, l, uri = overlay_setup()
        both_write(uri, 'write -P 0x33 4M 1M')
        l.ok('block-stream', job_id='s', device='top')
        ev = l.q.wait('BLOCK_JOB_COMPLETED', 60)
        assert 'error' not in ev['data'], ev
        top = [n for n in l.ok('query-named-block-nodes') if n['node-name'] == 'top'][0]
        assert 'backing_file' not in top, top
        compare(uri, f'{d}/expected.raw')
        l.ok('block-export-del', id='e')
        l.ok('blockdev-del', node_name='top')
        l.ok('blockdev-del', node_name='rb')
        l.quit(); r.quit()
        sh('qemu-img', 'check', f'{d}/top.qcow2')
        # The overlay alone now holds everything.
        compare(f'{d}/top.qcow2', f'{d}/expected.raw', fa='qcow2')
    elif scenario == 'commit':
        r, l, uri = overlay_setup()
        both_write(uri, 'write -P 0x33 4M 1M')
        both_write(uri, 'write -P 0x35 30M 64k')
        l.ok('block-commit', job_id='c', device='top')
        l.q.wait('BLOCK_JOB_READY', 60)
        both_write(uri, 'write -P 0x44 8M 64k')
        l.ok('job-complete', id='c')
        ev = l.q.wait('BLOCK_JOB_COMPLETED', 60)
        assert 'error' not in ev['data'], ev
        # The export now serves the remote node itself.
        both_write(uri, 'write -P 0x55 12M 64k')
        compare(uri, f'{d}/expected.raw')
        l.quit(); r.quit()
        sh('qemu-img', 'check', f'{d}/base.qcow2')
        compare(f'{d}/base.qcow2', f'{d}/expected.raw', fa='qcow2')
    elif scenario == 'reconnect':
        if not shutil.which('fio'): print('missing fio'); sys.exit(77)
        # A raw base: a killed server loses nothing it acknowledged (no metadata in its cache).
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/base.raw', '64M')
        r = remote(f'{d}/base.raw', 'raw')
        l = Daemon(local_bin, 'local', extra=['-v'])   # -v: the node's reconnect lines
        l.ok('blockdev-add', node_name='rb', **nbd_node(r, **{'reconnect-delay': 15}))
        l.ok('block-export-add', type='nbd', id='e', node_name='rb', name='re', writable=True)
        uri = l.uri('re')
        # Writes for ~3 s, then reads everything back and verifies it, all through the re-export.
        f = fio(uri, '--rw=randwrite', '--size=16M', '--rate_iops=1400')
        until(lambda: os.stat(f'{d}/base.raw').st_blocks > 64, 'fio to start writing')
        r.kill9()
        down = time.monotonic()
        # The node notices, requests queue up; the server stays away for a second.
        until(lambda: 'requests wait up to 15 s' in l.logtext(), 'the node to notice')
        until(lambda: time.monotonic() - down > 1.0, 'a second of downtime')
        restart_remote(r, f'{d}/base.raw', 'raw')
        print('REMOTE-DOWN-FOR', round(time.monotonic() - down, 2))
        out, _ = f.communicate(timeout=120)
        assert f.returncode == 0, out
        fields = out.strip().split(';')
        print('FIO', fields[:5])
        assert 'reconnected' in l.logtext(), l.logtext()
        # A second round after the reconnect, and the data reached the remote image.
        io_ok(uri, 'write -P 0x66 20M 64k', 'flush')
        sh('qemu-io', '-f', 'raw', '-c', 'read -P 0x66 20M 64k', f'{d}/base.raw')
        l.quit(); r.quit()
    elif scenario == 'expire':
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/base.raw', '16M')
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x77 0 1M', f'{d}/base.raw')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/local.raw', '16M')
        r = remote(f'{d}/base.raw', 'raw')
        l = Daemon(local_bin, 'local')
        l.ok('blockdev-add', node_name='rb', **nbd_node(r, **{'reconnect-delay': 5}))
        l.ok('block-export-add', type='nbd', id='e', node_name='rb', name='re', writable=True)
        l.ok('blockdev-add', driver='raw', node_name='lf', file={'driver': 'file', 'filename': f'{d}/local.raw'})
        l.ok('block-export-add', type='nbd', id='e2', node_name='lf', name='other', writable=True)
        io_ok(l.uri('re'), 'read -P 0x77 0 1M')
        r.kill9()
        t0 = time.monotonic()
        res = run('qemu-io', '-f', 'raw', '-c', 'read 0 4k', '-c', 'write -P 1 8M 4k', l.uri('re'), timeout=30)
        took = time.monotonic() - t0
        print('EXPIRED-AFTER', round(took, 2), res.stdout.strip(), res.stderr.strip())
        assert 'Input/output error' in res.stdout + res.stderr, res
        assert 4.5 < took < 20, took
        # The daemon is healthy: QMP answers, other exports serve, new requests fail fast.
        assert ('rb', 'nbd') in nodes(l)
        io_ok(l.uri('other'), 'write -P 5 0 64k', 'read -P 5 0 64k')
        t0 = time.monotonic()
        res = run('qemu-io', '-f', 'raw', '-c', 'read 0 4k', l.uri('re'))
        # No second wait: the delay is over, requests fail at once until a reconnect.
        assert 'Input/output error' in res.stdout + res.stderr and time.monotonic() - t0 < 4, res
        assert 'no connection within reconnect-delay' in l.logtext(), l.logtext()
        # The server comes back: the node reconnects in the background and serves again.
        restart_remote(r, f'{d}/base.raw', 'raw')
        until(lambda: run('qemu-io', '-f', 'raw', '-c', 'read -P 0x77 0 1M', l.uri('re')).stdout.count('read 1048576/1048576') == 1,
              'the node to reconnect', timeout=20, step=0.2)
        l.quit(); r.quit()
    elif scenario == 'bad':
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/base.raw', '16M')
        r = remote(f'{d}/base.raw', 'raw')
        l = Daemon(local_bin, 'local')
        before = nodes(l)
        cases = [
            (nbd_node(r, export='base') | {'server': {'type': 'unix', 'path': f'{d}/nope.sock'}},
             f"Failed to connect to '{d}/nope.sock': No such file or directory"),
            (nbd_node(r, export='base') | {'server': {'type': 'inet', 'host': '127.0.0.1', 'port': '1'}},
             "Failed to connect to '127.0.0.1:1': Connection refused"),
            (nbd_node(r, export='nope'), 'Requested export not available'),
            (nbd_node(r, export='base', **{'x-dirty-bitmap': 'qemu:dirty-bitmap:nope'}),
             'requested x-dirty-bitmap qemu:dirty-bitmap:nope not found'),
            (nbd_node(r, export='base', **{'tls-creds': 'tls0'}), "No TLS credentials with id 'tls0'"),
            (nbd_node(r, export='base', bogus=1), "Parameter 'bogus' is unexpected"),
            (nbd_node(r, export='base') | {'server': {'type': 'unix'}}, "Parameter 'server.path' is missing"),
            ({'driver': 'nbd', 'export': 'base'}, "Parameter 'server' is missing"),
            (nbd_node(r, export='base', **{'reconnect-delay': -1}), "Parameter 'reconnect-delay' expects uint32_t"),
            (nbd_node(r, export='base') | {'server': {'type': 'fd', 'str': 'monfd'}}, "File descriptor named 'monfd' has not been found"),
            ({'driver': 'raw', 'file': nbd_node(r, export='nope')}, 'Requested export not available'),
        ]
        for i, (opts, text) in enumerate(cases):
            t0 = time.monotonic()
            res = l.cmd('blockdev-add', node_name=f'n{i}', **opts)
            took = time.monotonic() - t0
            print('CASE', i, round(took, 2), json.dumps(res))
            assert 'error' in res and res['error']['class'] == 'GenericError', res
            assert text in res['error']['desc'], (text, res)
            assert took < 13, took
        # Nothing was added, not even an implicit child; the daemon serves as before.
        assert nodes(l) == before, (nodes(l), before)
        l.ok('blockdev-add', node_name='good', **nbd_node(r))
        assert ('good', 'nbd') in nodes(l)
        l.ok('blockdev-del', node_name='good')
        assert nodes(l) == before
        l.quit(); r.quit()
    elif scenario == 'opentimeout':
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/base.raw', '16M')
        r = remote(f'{d}/base.raw', 'raw')
        path = r.nbd_path
        r.quit()
        l = Daemon(local_bin, 'local', extra=['-T', 'nbd_*'])   # -T: debug lines (each failed attempt)
        # Without open-timeout one attempt fails at once; with it the open waits for the server.
        res = l.cmd('blockdev-add', node_name='n0', **nbd_node(r))
        assert 'error' in res, res
        attempts = l.logtext().count('Failed to connect')
        result = {}
        def add():
            q2 = Q(l.qmp_path)
            t0 = time.monotonic()
            result['r'] = q2.cmd('blockdev-add', node_name='n1', **nbd_node(r, **{'open-timeout': 10}))
            result['t'] = time.monotonic() - t0
        t = threading.Thread(target=add); t.start()
        # The open is retrying (its failed attempts are logged at debug level).
        until(lambda: l.logtext().count('Failed to connect') > attempts + 1, 'the open to retry')
        r2 = remote(f'{d}/base.raw', 'raw')
        t.join(30)
        print('OPENED-AFTER', round(result['t'], 2), result['r'])
        assert 'return' in result['r'], result
        assert ('n1', 'nbd') in nodes(l)
        # open-timeout also ends: a server that never comes is an error after that time.
        r2.quit()
        t0 = time.monotonic()
        res = l.cmd('blockdev-add', node_name='n2', **nbd_node(r, **{'open-timeout': 2}))
        took = time.monotonic() - t0
        print('GAVE-UP-AFTER', round(took, 2), res)
        assert 'error' in res and 1.5 < took < 6, (took, res)
        l.quit()
    elif scenario == 'hostile':
        l = Daemon(local_bin, 'local')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/local.raw', '16M')
        l.ok('blockdev-add', driver='raw', node_name='lf', file={'driver': 'file', 'filename': f'{d}/local.raw'})
        l.ok('block-export-add', type='nbd', id='ok', node_name='lf', name='ok', writable=True)
        for mode in ('badmagic', 'cookie', 'range', 'huge', 'silent', 'endless'):
            path = f'{d}/{mode}.sock'
            srv = hostile_server(path, mode)
            node = {'driver': 'nbd', 'server': {'type': 'unix', 'path': path}, 'export': 'x'}
            res = l.cmd('blockdev-add', node_name=f'h{mode}', **node)
            if mode == 'endless':
                # A handshake that never ends: the attempt times out, nothing is added.
                assert 'error' in res and 'did not complete the NBD handshake' in res['error']['desc'], res
                print('MODE', mode, res['error']['desc'])
                srv.close(); continue
            assert 'return' in res, res
            l.ok('block-export-add', type='nbd', id=f'e{mode}', node_name=f'h{mode}', name=mode, writable=True)
            reader = subprocess.Popen(['qemu-io', '-f', 'raw', '-c', 'read 0 4k', l.uri(mode)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            # While the bad server is at it, the other export is served without delay.
            t0 = time.monotonic()
            io_ok(l.uri('ok'), 'write -P 9 0 64k', 'read -P 9 0 64k')
            assert time.monotonic() - t0 < 5
            if mode == 'silent':
                # No reply ever comes (QEMU has no request timeout either): the request waits,
                # nothing else does. The client gives up; the node is deleted cleanly.
                reader.kill(); reader.wait(10)
                l.ok('block-export-del', id=f'e{mode}', mode='hard')
            else:
                out, _ = reader.communicate(timeout=30)
                print('MODE', mode, out.strip().replace('\n', ' | '))
                assert 'Input/output error' in out or 'failed' in out, out
                l.ok('block-export-del', id=f'e{mode}')
            until(lambda: l.cmd('blockdev-del', node_name=f'h{mode}').get('return') is not None, f'h{mode} to go', timeout=10, step=0.1)
            srv.close()
            assert rss_mib(l.p.pid) < 300, rss_mib(l.p.pid)
        log = l.logtext()
        print(log)
        for text in ('invalid reply magic', 'reply for unknown cookie', 'exceeding requested region', 'is too long'):
            assert text in log, (text, log)
        assert l.p.poll() is None
        io_ok(l.uri('ok'), 'read -P 9 0 64k')
        l.quit()
    elif scenario == 'bitmap':
        if not shutil.which('nbdinfo'): print('missing nbdinfo'); sys.exit(77)
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/base.qcow2', '16M')
        r = remote(f'{d}/base.qcow2', 'qcow2', bitmaps=['b0'])
        io_ok(r.uri('base'), 'write -P 1 1M 64k', 'write -P 2 5M 192k', 'write -P 3 15M 4k')
        l = Daemon(local_bin, 'local')
        l.ok('blockdev-add', node_name='xb', read_only=True, **nbd_node(r, **{'x-dirty-bitmap': 'qemu:dirty-bitmap:b0'}))
        l.ok('block-export-add', type='nbd', id='e', node_name='xb', name='xb')
        ours = json.loads(run('nbdinfo', '--map', '--json', l.uri('xb')).stdout)
        ours_dirty = [(e['offset'], e['length']) for e in ours if e['type'] & 1]
        # QEMU's own nbd driver, as qemu-img map uses x-dirty-bitmap: dirty shows as "data": false.
        spec = f'driver=nbd,server.type=unix,server.path={r.nbd_path},export=base,x-dirty-bitmap=qemu:dirty-bitmap:b0'
        theirs = json.loads(run('qemu-img', 'map', '--output=json', '--image-opts', spec).stdout)
        theirs_dirty = [(e['start'], e['length']) for e in theirs if not e['data']]
        def merge(xs):
            out = []
            for o, n in xs:
                if out and out[-1][0] + out[-1][1] == o: out[-1] = (out[-1][0], out[-1][1] + n)
                else: out.append((o, n))
            return out
        print('DIRTY', merge(ours_dirty), merge(theirs_dirty))
        assert merge(ours_dirty) == merge(theirs_dirty) and merge(ours_dirty), (ours, theirs)
        l.quit(); r.quit()
    elif scenario == 'multiconn':
        assert not remote_is_qsd, 'multiconn: blockd remote only (counts its connections in its log)'
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/base.raw', '16M')
        r = remote(f'{d}/base.raw', 'raw', extra=['-T', 'nbd_*'])   # -T: a debug line per client's export
        l = Daemon(local_bin, 'local', extra=['--loops', '2'])
        l.ok('blockdev-add', node_name='rb', **nbd_node(r))
        l.ok('block-export-add', type='nbd', id='e', node_name='rb', name='re', writable=True)
        opened = until(lambda: r.logtext().count("export 'base'") >= 2 and r.logtext().count("export 'base'"), 'two connections')
        print('CONNECTIONS', opened)
        assert opened == 2, r.logtext()
        # Two clients land on both loops; writes on one connection are read on the other.
        io_ok(l.uri('re'), 'write -P 0x42 0 1M', 'flush')
        io_ok(l.uri('re'), 'read -P 0x42 0 1M')
        io_ok(l.uri('re'), 'read -P 0x42 0 1M')
        l.quit(); r.quit()
    elif scenario == 'commands':
        # Every command through a re-export (raw over an inline nbd node: the asynchronous
        # path through a forwarding layer): FUA, zeroes with and without unmap, fast zero,
        # trim, flush, sparse reads and block status.
        if not shutil.which('nbdinfo'): print('missing nbdinfo'); sys.exit(77)
        if run('/usr/bin/python3', '-c', 'import nbd').returncode != 0: print('missing python3-libnbd'); sys.exit(77)
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/base.raw', '16M')
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x12 10M 2M', f'{d}/base.raw')
        shutil.copy(f'{d}/base.raw', f'{d}/expected.raw')
        # -T on a blockd remote: its debug line per client says which reply format was agreed.
        r = remote(f'{d}/base.raw', 'raw', extra=[] if remote_is_qsd else ['-T', 'nbd_*'])
        l = Daemon(local_bin, 'local')
        l.ok('blockdev-add', driver='raw', node_name='rr', file=nbd_node(r))
        if not remote_is_qsd:
            # blockd offers extended headers, so the node's connection uses them.
            until(lambda: 'replies extended' in r.logtext(), 'the node to negotiate extended headers', timeout=5)
        l.ok('block-export-add', type='nbd', id='e', node_name='rr', name='re', writable=True)
        uri = l.uri('re')
        cmds = ['write -P 0x21 1M 64k', 'write -f -P 0x22 2M 64k', 'write -z 3M 64k', 'write -z -u 4M 1M',
                'write -z -f 10M 64k', 'aio_write -P 0x23 5M 4k', 'aio_write -P 0x24 5M 4k', 'aio_flush']
        for c in cmds: both_write(uri, c)
        io_ok(uri, 'discard 6M 1M', 'flush', 'read -P 0x22 2M 64k', 'read -P 0 3M 64k', 'read -P 0 4M 1M', 'read -P 0x24 5M 4k')
        compare(uri, f'{d}/expected.raw')
        # Fast zero and FUA trim, with libnbd.
        script = ('import nbd, sys\n'
                  'h = nbd.NBD(); h.connect_uri(sys.argv[1])\n'
                  'assert h.can_fast_zero() and h.can_trim() and h.can_fua()\n'
                  'h.zero(65536, 8 << 20, nbd.CMD_FLAG_FAST_ZERO)\n'
                  'h.trim(65536, 9 << 20, nbd.CMD_FLAG_FUA)\n'
                  'assert h.pread(65536, 8 << 20) == bytes(65536)\n'
                  'h.shutdown()\n')
        res = run('/usr/bin/python3', '-c', script, uri)
        assert res.returncode == 0, res
        # Block status through the re-export is the origin's (extents merged alike).
        def extents(u):
            m = json.loads(run('nbdinfo', '--map', '--json', u).stdout)
            out = []
            for e in m:
                if out and out[-1][2] == e['type'] and out[-1][0] + out[-1][1] == e['offset']:
                    out[-1] = (out[-1][0], out[-1][1] + e['length'], e['type'])
                else:
                    out.append((e['offset'], e['length'], e['type']))
            return out
        ours, origin = extents(uri), extents(r.uri('base'))
        print('MAP', ours)
        assert ours == origin, (ours, origin)
        # Sparse reads: holes arrive as holes (libnbd sees OFFSET_HOLE chunks through the re-export).
        script = ('import nbd, sys\n'
                  'h = nbd.NBD(); h.connect_uri(sys.argv[1]); kinds = []\n'
                  'def chunk(sub, off, status, err): kinds.append(status); return 0\n'
                  'h.pread_structured(1 << 20, 6 << 20, chunk)\n'
                  'print(kinds); assert nbd.READ_HOLE in kinds\n')
        res = run('/usr/bin/python3', '-c', script, uri)
        assert res.returncode == 0, res
        l.quit(); r.quit()
    elif scenario == 'blocksize':
        # nbdkit with strict block sizes (512 / 4 KiB / 64 KiB; anything else is an error):
        # the node advertises them, and larger requests from a qcow2 overlay are split.
        if not shutil.which('nbdkit') or not shutil.which('nbdinfo'): print('missing nbdkit/nbdinfo'); sys.exit(77)
        ksock = f'{d}/kit.sock'
        kit = subprocess.Popen(['nbdkit', '--foreground', '-U', ksock, '--filter=blocksize-policy', 'memory', '16M',
                                'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=65536',
                                'blocksize-error-policy=error'], stderr=open(f'{d}/kit.log', 'w'))
        procs.append(kit)
        until(lambda: can_connect(ksock), 'nbdkit')
        kuri = f'nbd+unix:///?socket={ksock}'
        io_ok(kuri, 'write -P 0x5a 0 4M')
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/top.qcow2', '16M')
        l = Daemon(local_bin, 'local')
        l.ok('blockdev-add', driver='nbd', node_name='kb', server={'type': 'unix', 'path': ksock})
        l.ok('block-export-add', type='nbd', id='k', node_name='kb', name='kb', writable=True)
        info = json.loads(run('nbdinfo', '--json', l.uri('kb')).stdout)['exports'][0]
        print('LIMITS', info['block_size_minimum'], info['block_size_preferred'], info['block_size_maximum'])
        assert (info['block_size_minimum'], info['block_size_preferred'], info['block_size_maximum']) == (512, 4096, 65536), info
        l.ok('blockdev-add', driver='qcow2', node_name='top', file={'driver': 'file', 'filename': f'{d}/top.qcow2'}, backing='kb')
        l.ok('block-export-add', type='nbd', id='t', node_name='top', name='top', writable=True)
        # 4 MiB reads and writes through the overlay reach nbdkit as 64 KiB requests.
        io_ok(l.uri('top'), 'read -P 0x5a 0 4M', 'write -P 0x6b 4M 2M', 'read -P 0x6b 4M 2M')
        l.ok('block-commit', job_id='c', device='top')
        l.q.wait('BLOCK_JOB_READY', 60)
        l.ok('job-complete', id='c')
        ev = l.q.wait('BLOCK_JOB_COMPLETED', 60)
        assert 'error' not in ev['data'], ev
        io_ok(kuri, 'read -P 0x5a 0 4M', 'read -P 0x6b 4M 2M')
        l.quit()
    elif scenario == 'tls':
        if not shutil.which('certtool') or not shutil.which('psktool'): print('missing certtool/psktool'); sys.exit(77)
        k = f'{d}/k'
        sh('bash', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'scripts', 'make-pki.sh'), k)
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/base.raw', '16M')
        sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x31 0 1M', f'{d}/base.raw')
        # A remote requiring x509 TLS, on its unix socket and on TCP.
        r = Daemon(remote_bin, 'remote', extra=['--object', f'tls-creds-x509,id=s0,endpoint=server,dir={k}/pki'],
                   server_opts=',tls-creds=s0')
        r.ok('blockdev-add', driver='file', node_name='rf', filename=f'{d}/base.raw')
        r.ok('block-export-add', type='nbd', id='re', node_name='rf', name='base', writable=True)
        tcp = socket.socket(); tcp.bind(('127.0.0.1', 0)); port = tcp.getsockname()[1]; tcp.close()
        # The local daemon: client credentials of the same CA, of another CA, PSK, and a
        # server-endpoint object (the wrong kind).
        l = Daemon(local_bin, 'local', extra=[
            '--object', f'tls-creds-x509,id=c0,endpoint=client,dir={k}/pki',
            '--object', f'tls-creds-x509,id=rogue,endpoint=client,dir={k}/rogue',
            '--object', f'tls-creds-x509,id=srv,endpoint=server,dir={k}/pki',
            '--object', f'tls-creds-psk,id=p0,endpoint=client,username=alice,dir={k}/psk',
            '--object', f'tls-creds-psk,id=pbad,endpoint=client,username=alice,dir={k}/psk-wrong'])
        before = nodes(l)
        # x509 over the unix socket (the hostname checked against the certificate is given).
        l.ok('blockdev-add', node_name='rb', **nbd_node(r, **{'tls-creds': 'c0', 'tls-hostname': 'localhost'}))
        l.ok('block-export-add', type='nbd', id='e', node_name='rb', name='re', writable=True)
        io_ok(l.uri('re'), 'read -P 0x31 0 1M', 'write -P 0x32 1M 1M', 'flush', 'read -P 0x32 1M 1M')
        sh('qemu-io', '-f', 'raw', '-c', 'read -P 0x32 1M 1M', f'{d}/base.raw')
        f = fio(l.uri('re'), '--rw=randwrite', '--offset=8M', '--size=4M', '--rate_iops=2000') if shutil.which('fio') else None
        if f:
            out, _ = f.communicate(timeout=120)
            assert f.returncode == 0, out
            print('FIO', out.strip().split(';')[:3])
        l.ok('block-export-del', id='e')
        until(lambda: 'error' not in l.cmd('blockdev-del', node_name='rb'), 'the export to let go of rb', timeout=10)
        assert nodes(l) == before, (nodes(l), before)
        # x509 over TCP: the hostname defaults to the server's host (127.0.0.1, in the certificate).
        r.ok('nbd-server-stop')
        r.ok('nbd-server-start', addr={'type': 'inet', 'data': {'host': '127.0.0.1', 'port': str(port)}}, **{'tls-creds': 's0'})
        # QEMU's nbd-server-stop removes the exports; blockd keeps them.
        res = r.cmd('block-export-add', type='nbd', id='re', node_name='rf', name='base', writable=True)
        assert 'return' in res or 'already in use' in res['error']['desc'], res
        tcp_node = dict(driver='nbd', server={'type': 'inet', 'host': '127.0.0.1', 'port': str(port)}, export='base')
        l.ok('blockdev-add', node_name='rt', **tcp_node, **{'tls-creds': 'c0'})
        l.ok('block-export-add', type='nbd', id='t', node_name='rt', name='rt', writable=True)
        io_ok(l.uri('rt'), 'read -P 0x32 1M 1M', 'write -P 0x33 2M 64k', 'read -P 0x33 2M 64k')
        # Mismatches: clear errors, nothing added.
        before = nodes(l)
        cases = [
            (tcp_node, 'TLS negotiation required before option'),
            (tcp_node | {'tls-creds': 'rogue'}, 'TLS handshake failed'),
            (tcp_node | {'tls-creds': 'c0', 'tls-hostname': 'wrong.example'}, 'Certificate does not match the hostname wrong.example'),
            (tcp_node | {'tls-creds': 'nope'}, "No TLS credentials with id 'nope'"),
            (tcp_node | {'tls-creds': 'srv'}, 'Expected TLS credentials for a client endpoint'),
            ({'driver': 'raw', 'file': tcp_node | {'tls-creds': 'rogue'}}, 'TLS handshake failed'),
        ]
        for i, (opts, text) in enumerate(cases):
            t0 = time.monotonic()
            res = l.cmd('blockdev-add', node_name=f'bad{i}', **opts)
            took = time.monotonic() - t0
            print('CASE', i, round(took, 2), json.dumps(res))
            assert 'error' in res and res['error']['class'] == 'GenericError', res
            assert text in res['error']['desc'], (text, res)
            assert took < 13, took
        assert nodes(l) == before, (nodes(l), before)
        io_ok(l.uri('rt'), 'read -P 0x33 2M 64k')
        l.ok('block-export-del', id='t')
        until(lambda: 'error' not in l.cmd('blockdev-del', node_name='rt'), 'the export to let go of rt', timeout=10)
        r.quit()
        # PSK, and TLS asked of a plain server.
        r2 = Daemon(remote_bin, 'rpsk', extra=['--object', f'tls-creds-psk,id=s1,endpoint=server,dir={k}/psk'],
                    server_opts=',tls-creds=s1')
        r2.ok('blockdev-add', driver='file', node_name='rf', filename=f'{d}/base.raw')
        r2.ok('block-export-add', type='nbd', id='re', node_name='rf', name='base', writable=True)
        l.ok('blockdev-add', node_name='rp', **nbd_node(r2, **{'tls-creds': 'p0'}))
        l.ok('block-export-add', type='nbd', id='p', node_name='rp', name='rp', writable=True)
        io_ok(l.uri('rp'), 'read -P 0x33 2M 64k', 'write -P 0x34 3M 64k', 'read -P 0x34 3M 64k')
        before = nodes(l)
        res = l.cmd('blockdev-add', node_name='pbad', **nbd_node(r2, **{'tls-creds': 'pbad'}))
        print('WRONG-KEY', json.dumps(res))
        assert 'error' in res and 'TLS handshake failed' in res['error']['desc'], res
        plain = Daemon(remote_bin, 'plain')
        sh('qemu-img', 'create', '-q', '-f', 'raw', f'{d}/plain.raw', '1M')
        plain.ok('blockdev-add', driver='file', node_name='pf', filename=f'{d}/plain.raw')
        plain.ok('block-export-add', type='nbd', id='pe', node_name='pf', name='base')
        res = l.cmd('blockdev-add', node_name='tlsplain', **nbd_node(plain, **{'tls-creds': 'c0', 'tls-hostname': 'localhost'}))
        print('TLS-TO-PLAIN', json.dumps(res))
        assert 'error' in res and 'Denied by server for option 5 (starttls)' in res['error']['desc'], res
        assert nodes(l) == before, (nodes(l), before)
        l.quit(); r2.quit(); plain.quit()
        sh('qemu-io', '-f', 'raw', '-c', 'read -P 0x34 3M 64k', f'{d}/base.raw')
    else:
        print('unknown scenario'); sys.exit(2)
finally:
    for p in procs:
        if p.poll() is None: p.kill(); p.wait(10)
print('OK', d)
shutil.rmtree(d, ignore_errors=True)
