#!/usr/bin/env python3
"""block-stream while a client writes: a 3-layer qcow2 chain with a null-filter directly above
base and a copy-on-read filter above top (the export), streamed to base at a limited speed
while qemu-io writes patterns over the regions being copied. Checks: no client write lost,
chain is top->base, qemu-img check clean, data equals the expected image.
Usage: stream_under_writes.py BLOCKD   (fails, naming it, when a tool is missing)"""
import os, shutil, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.dirname(__file__)); from qmpmini import Q
for tool in ('qemu-img', 'qemu-io'):
    if not shutil.which(tool): sys.exit(f'missing {tool}')
blockd = sys.argv[1]
d = tempfile.mkdtemp()
def sh(*a): subprocess.run(a, check=True, stdout=subprocess.DEVNULL)
M = 1 << 20
sh('qemu-img', 'create', '-q', '-f', 'qcow2', f'{d}/base.qcow2', '64M')
sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 1 0 32M', f'{d}/base.qcow2')
sh('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f'{d}/mid.qcow2')
sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 2 16M 32M', f'{d}/mid.qcow2')
sh('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f'{d}/top.qcow2')
sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 3 40M 4M', f'{d}/top.qcow2')
# expected: the same chain flattened, then the same client writes
sh('qemu-img', 'convert', '-O', 'raw', f'{d}/top.qcow2', f'{d}/expected.raw')
sock, nbd = f'{d}/qmp.sock', f'{d}/nbd.sock'
p = subprocess.Popen([blockd, '--chardev', f'socket,path={sock},server=on,wait=off,id=c', '--monitor', 'chardev=c',
                      '--nbd-server', f'addr.type=unix,addr.path={nbd}'])
try:
    q = Q(sock)
    q.cmd('blockdev-add', driver='qcow2', node_name='base', file={'driver': 'file', 'filename': f'{d}/base.qcow2'})
    q.cmd('blockdev-add', driver='null-filter', node_name='fbase', file='base')
    q.cmd('blockdev-add', driver='qcow2', node_name='mid', file={'driver': 'file', 'filename': f'{d}/mid.qcow2'}, backing='fbase')
    q.cmd('blockdev-add', driver='qcow2', node_name='top', file={'driver': 'file', 'filename': f'{d}/top.qcow2'}, backing='mid')
    q.cmd('blockdev-add', driver='copy-on-read', node_name='cor', file='top')
    q.cmd('block-export-add', type='nbd', id='e', node_name='cor', writable=True)
    r = q.cmd('block-stream', job_id='s', device='cor', base_node='base', speed=16 * M)
    assert 'return' in r, r
    uri = f'nbd+unix:///cor?socket={nbd}'
    writes = []
    for i in range(24):
        off = (i * 5 + 3) * M // 2 + 4096 * i
        writes.append(f'write -P {100 + i} {off} 12k')
        subprocess.run(['qemu-io', '-f', 'raw', '-c', writes[-1], uri], check=True, stdout=subprocess.DEVNULL)
        sh('qemu-io', '-f', 'raw', '-c', writes[-1], f'{d}/expected.raw')
    q.cmd('block-job-set-speed', device='s', speed=0)
    ev = q.wait('BLOCK_JOB_COMPLETED', 60)
    assert 'error' not in ev['data'], ev
    q.cmd('blockdev-del', node_name='mid')
    q.cmd('blockdev-del', node_name='fbase')
    subprocess.run(['qemu-img', 'compare', '-f', 'raw', '-F', 'raw', uri, f'{d}/expected.raw'], check=True)
    q.cmd('quit')
    p.wait(10)
finally:
    if p.poll() is None: p.kill()
info = subprocess.run(['qemu-img', 'info', '--backing-chain', f'{d}/top.qcow2'], capture_output=True, text=True).stdout
assert 'backing file: base.qcow2' in info, info
assert 'mid.qcow2' not in info, info
sh('qemu-img', 'check', f'{d}/top.qcow2')
subprocess.run(['qemu-img', 'compare', '-F', 'raw', f'{d}/top.qcow2', f'{d}/expected.raw'], check=True)
print('OK', d)
# Only a failure keeps its directory (for a look); every run writes ~150 MB of images.
shutil.rmtree(d, ignore_errors=True)
