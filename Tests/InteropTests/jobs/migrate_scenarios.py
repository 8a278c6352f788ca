#!/usr/bin/env python3
"""Live storage migration between two daemons with `blockctl migrate` (docs/migration.md).
Usage: migrate_scenarios.py BLOCKCTL SOURCE_DAEMON DEST_DAEMON SCENARIO   (exit 77 naming a missing tool)
Scenarios:
  bitmap   fio writes (with verify, logged) through the source's export for the whole migration;
           the source image has a persistent bitmap; afterwards both images equal what the
           client sees, fio verifies, and the destination's bitmap is exactly the union of the
           earlier dirty range and every granule fio wrote (checked over NBD with nbdinfo).
  plain    no bitmaps; any peers (QSD as source or destination).
  tls      the migration's NBD connections use x509 TLS (both NBD servers require it).
  bad      refusals (size, unreachable server, TLS required, bitmaps without --source-nbd,
           unknown node, bad address) leave both daemons' nodes, exports and jobs unchanged.
Prints the daemons' transcripts and blockctl's output, 'OK' at the end."""
import json, os, shutil, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(__file__)); from qmpmini import Q, wait_until, fio_writer
blockctl, src_bin, dst_bin, scenario = sys.argv[1:5]
need = ['qemu-img', 'qemu-io', 'fio'] + (['nbdinfo'] if scenario == 'bitmap' else []) + \
       (['certtool', 'psktool'] if scenario in ('tls', 'bad') else [])
for tool in need:
    if not shutil.which(tool): print(f'missing {tool}'); sys.exit(77)
d = tempfile.mkdtemp()
M = 1 << 20
G = 65536
procs = []
def sh(*a): subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def start(binary, tag, extra=(), server_opts=''):
    # Two monitors: one for this script, one for blockctl (QSD serves one client per monitor).
    sock, nbd, ctl = f'{d}/{tag}-qmp.sock', f'{d}/{tag}-nbd.sock', f'{d}/{tag}-ctl.sock'
    p = subprocess.Popen([binary, '--chardev', f'socket,path={sock},server=on,wait=off,id=c', '--monitor', 'chardev=c',
                          '--chardev', f'socket,path={ctl},server=on,wait=off,id=c2', '--monitor', 'chardev=c2',
                          *extra, '--nbd-server', f'addr.type=unix,addr.path={nbd}{server_opts}'],
                         stderr=open(f'{d}/{tag}.log', 'a'))
    procs.append(p)
    return p, Q(sock), ctl, nbd

try:
    extra, server_opts, tls_args = [], '', []
    if scenario == 'tls':
        k = f'{d}/k'
        sh('bash', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'scripts', 'make-pki.sh'), k)
        extra = ['--object', f'tls-creds-x509,id=srv,endpoint=server,dir={k}/pki',
                 '--object', f'tls-creds-x509,id=cli,endpoint=client,dir={k}/pki']
        server_opts = ',tls-creds=srv'
        tls_args = ['--tls-creds', 'cli', '--tls-hostname', 'localhost']
    if scenario == 'bad':
        # Refusals leave both daemons as they were: a destination of another size, an
        # unreachable destination NBD server, a wrong export name (TLS required but not
        # given), bitmaps without --source-nbd.
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/src.qcow2', '64M')
        sh('qemu-img', 'bitmap', '--add', f'{d}/src.qcow2', 'b')
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/dst.qcow2', '64M')
        sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/small.qcow2', '32M')
        k = f'{d}/k'
        sh('bash', os.path.join(os.path.dirname(__file__), '..', '..', '..', 'scripts', 'make-pki.sh'), k)
        sp, sq, ssock, snbd = start(src_bin, 'src')
        dp, dq, dsock, dnbd = start(dst_bin, 'dst', ['--object', f'tls-creds-x509,id=srv,endpoint=server,dir={k}/pki'],
                                    ',tls-creds=srv')
        sq.cmd('blockdev-add', driver='qcow2', node_name='disk', file={'driver': 'file', 'filename': f'{d}/src.qcow2'})
        sq.cmd('block-export-add', type='nbd', id='e', node_name='disk', name='disk', writable=True)
        dq.cmd('blockdev-add', driver='qcow2', node_name='new', file={'driver': 'file', 'filename': f'{d}/dst.qcow2'})
        dq.cmd('blockdev-add', driver='qcow2', node_name='small', file={'driver': 'file', 'filename': f'{d}/small.qcow2'})
        def state():
            # nodes (name, driver, read-only, bitmaps), exports and jobs of both daemons; not
            # file sizes (a persistent bitmap added and removed again leaves clusters behind)
            out = []
            for q in (sq, dq):
                out.append(sorted((n['node-name'], n['drv'], n['ro'], sorted(b['name'] for b in n.get('dirty-bitmaps', [])))
                                  for n in q.cmd('query-named-block-nodes')['return']))
                out.append(q.cmd('query-block-exports')['return'])
                out.append(q.cmd('query-jobs')['return'])
            return out
        before = state()
        base = [blockctl, '--socket', ssock, 'migrate', 'disk', '--to', dsock]
        cases = [(['--dest-node', 'small', '--dest-nbd', f'unix:{dnbd}', '--source-nbd', f'unix:{snbd}'], 'is 33554432 bytes'),
                 (['--dest-node', 'new', '--dest-nbd', f'unix:{d}/nowhere.sock', '--source-nbd', f'unix:{snbd}'], 'nowhere.sock'),
                 (['--dest-node', 'new', '--dest-nbd', f'unix:{dnbd}', '--source-nbd', f'unix:{snbd}'], 'TLS'),
                 (['--dest-node', 'new', '--dest-nbd', f'unix:{dnbd}'], '--source-nbd'),
                 (['--dest-node', 'nope', '--dest-nbd', f'unix:{dnbd}'], "no node 'nope'"),
                 (['--dest-node', 'new', '--dest-nbd', 'nonsense'], 'unix:PATH or HOST:PORT')]
        for args, words in cases:
            m = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
            print('REFUSED', m.returncode, m.stderr.strip())
            assert m.returncode != 0 and words in m.stderr, (args, m.stderr)
            after = state()
            assert after == before, (args, [a for a, b in zip(after, before) if a != b])
        sq.cmd('quit'); sp.wait(10); dq.cmd('quit'); dp.wait(10)
        print('OK', d); sys.exit(0)
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/src.qcow2', '64M')
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 7 0 40M', '-c', 'write -z 44M 4M', f'{d}/src.qcow2')
    if scenario == 'bitmap':
        sh('qemu-img', 'bitmap', '--add', f'{d}/src.qcow2', 'b')
        sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 8 60M 64k', f'{d}/src.qcow2')   # dirty before the migration
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/dst.qcow2', '64M')
    sp, sq, ssock, snbd = start(src_bin, 'src', extra, server_opts)
    dp, dq, dsock, dnbd = start(dst_bin, 'dst', extra, server_opts)
    r = sq.cmd('blockdev-add', driver='qcow2', node_name='disk', file={'driver': 'file', 'filename': f'{d}/src.qcow2'})
    assert 'return' in r, r
    r = sq.cmd('block-export-add', type='nbd', id='e', node_name='disk', name='disk', writable=True)
    assert 'return' in r, r
    r = dq.cmd('blockdev-add', driver='qcow2', node_name='new', file={'driver': 'file', 'filename': f'{d}/dst.qcow2'})
    assert 'return' in r, r
    if scenario == 'tls':
        uri = f'nbds+unix:///disk?socket={snbd}&tls-certificates={k}/pki&tls-hostname=localhost'
        fio_uri_ok = False
    else:
        uri = f'nbd+unix:///disk?socket={snbd}'
        fio_uri_ok = True
    # A client that never pauses: fio from before the migration until well after it.
    log = f'{d}/fio.iolog'
    writer = None
    if fio_uri_ok:
        writer = fio_writer(uri, log, '--offset=16M', '--size=32M', '--iodepth=4', '--rate_iops=150',
                            '--time_based', '--runtime=8')
    else:
        # nbd-over-TLS URIs: qemu-io writes in a loop instead (fio's nbd engine has no TLS here).
        writer = subprocess.Popen(['bash', '-c', 'for i in $(seq 1 40); do qemu-io --image-opts '
                                   f'-c "write -P $i $((16 + i % 30))M 4k" "driver=nbd,export=disk,server.type=unix,server.path={snbd},tls-creds=x,tls-hostname=localhost" '
                                   f'--object tls-creds-x509,id=x,endpoint=client,dir={k}/pki || exit 1; done'],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    args = [blockctl, '--socket', ssock, 'migrate', 'disk', '--to', dsock, '--dest-node', 'new',
            '--dest-nbd', f'unix:{dnbd}', '--speed', '32M', '--switch-at', '8M'] + tls_args
    if scenario == 'bitmap': args += ['--source-nbd', f'unix:{snbd}']
    t0 = time.monotonic()
    m = subprocess.run(args, capture_output=True, text=True, timeout=120)
    print('BLOCKCTL', m.returncode, m.stdout.replace('\x1b[2K', '').replace('\r', '\n'), m.stderr)
    assert m.returncode == 0, m.stderr
    assert 'write-blocking' in m.stdout and 'done:' in m.stdout, m.stdout
    print('MIGRATED-AFTER', round(time.monotonic() - t0, 1))
    out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0, out
    # The client still writes through the source's export; its data now lands on the destination.
    for q in (sq, dq): q.cmd('query-block-exports')
    jobs = sq.cmd('query-jobs')['return']; assert jobs == [], jobs
    sh('qemu-img', 'convert', '-O', 'raw', *( ['--image-opts', f'driver=nbd,export=disk,server.type=unix,server.path={snbd},tls-creds=x,tls-hostname=localhost', '--object', f'tls-creds-x509,id=x,endpoint=client,dir={k}/pki'] if scenario == 'tls' else ['-f', 'raw', uri]), f'{d}/seen.raw')
    if scenario == 'bitmap':
        r = dq.cmd('block-export-add', type='nbd', id='eb', node_name='new', name='check', writable=True, bitmaps=['b'])
        assert 'return' in r, r
        out = subprocess.run(['nbdinfo', '--map=qemu:dirty-bitmap:b', '--json', f'nbd+unix:///check?socket={dnbd}'],
                             capture_output=True, text=True, check=True).stdout
        dirty = set()
        for e in json.loads(out):
            if e['type'] & 1: dirty.update(range(e['offset'] // G, (e['offset'] + e['length']) // G))
        expected = {60 * M // G}
        for line in open(log):
            f = line.split()           # fio iolog v3: TIME FILE ACTION OFFSET LENGTH (v2: no TIME)
            if 'write' in f and len(f) >= f.index('write') + 3:
                off, ln = int(f[f.index('write') + 1]), int(f[f.index('write') + 2])
                expected.update(range(off // G, (off + ln + G - 1) // G))
        print('DIRTY-GRANULES', len(dirty), 'EXPECTED', len(expected))
        assert dirty == expected, (sorted(dirty - expected)[:10], sorted(expected - dirty)[:10])
        assert len(expected) < 32 * M // G + 1, 'fio touched every granule: the check would prove nothing'
    sq.cmd('quit'); sp.wait(10)
    dq.cmd('quit'); dp.wait(10)
    sh('qemu-img', 'check', f'{d}/dst.qcow2')
    sh('qemu-img', 'check', f'{d}/src.qcow2')
    subprocess.run(['qemu-img', 'compare', '-F', 'raw', f'{d}/dst.qcow2', f'{d}/seen.raw'], check=True)
    if scenario == 'bitmap':
        info = subprocess.run(['qemu-img', 'info', '--output=json', f'{d}/dst.qcow2'], capture_output=True, text=True).stdout
        assert '"name": "b"' in info, info      # persistent on the destination image
finally:
    for pr in procs:
        if pr.poll() is None: pr.kill()
print('OK', d)
