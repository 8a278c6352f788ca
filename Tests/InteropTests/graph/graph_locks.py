#!/usr/bin/env python3
# Image locks along graph changes (Tests/InteropTests/NodeOptionsTests.swift, locksFollowTheGraph):
# a raw base read-only under a qcow2 top, the top exported writable, an active commit of top
# into base (base reopened read-write, the job writing it), the switch (the export now on
# base), the export gone. Prints the OFD lock bytes on both images after each step.
#   graph_locks.py DAEMON DIR
import json, os, socket, subprocess, sys, time
program, d = sys.argv[1], sys.argv[2]
base, top = f'{d}/base.raw', f'{d}/top.qcow2'
subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', base, '4M'], check=True)
subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top], check=True)
subprocess.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 0 64k', top], check=True, capture_output=True)
qmp, nbd = f'{d}/qmp.sock', f'{d}/nbd.sock'
p = subprocess.Popen([program, '--chardev', f'socket,id=m0,path={qmp},server=on,wait=off', '--monitor', 'chardev=m0',
                      '--nbd-server', f'addr.type=unix,addr.path={nbd}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
s = socket.socket(socket.AF_UNIX)
deadline = time.monotonic() + 10
while True:
    try: s.connect(qmp); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.02)
f = s.makefile('rwb'); f.readline()
def cmd(name, **args):
    m = {'execute': name}
    if args: m['arguments'] = {k.replace('_', '-'): v for k, v in args.items()}
    f.write((json.dumps(m) + '\n').encode()); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'return' in r or 'error' in r: return r
def locks(path):
    ino = os.stat(path).st_ino
    out = []
    for line in open('/proc/locks'):
        fs = line.split()
        for i, x in enumerate(fs):
            if x.endswith(f':{ino}'): out.append(f'{fs[i+1]}-{fs[i+2]}')
    return sorted(out)
def show(step): print(step, 'base', locks(base), 'top', locks(top))
def wait(pred):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if pred(): return
        time.sleep(0.02)
    raise SystemExit('timeout ' + json.dumps(cmd('query-jobs')))
try:
    cmd('qmp_capabilities')
    print(cmd('blockdev-add', driver='file', node_name='fb', filename=base))
    print(cmd('blockdev-add', driver='raw', node_name='base', file='fb', read_only=True))
    print(cmd('blockdev-add', driver='file', node_name='ft', filename=top))
    print(cmd('blockdev-add', driver='qcow2', node_name='top', file='ft', backing='base'))
    show('added')
    print(cmd('block-export-add', type='nbd', id='e0', node_name='top', writable=True))
    show('exported')
    print(cmd('block-commit', device='top', job_id='j0'))
    wait(lambda: any(j['status'] == 'ready' for j in cmd('query-jobs')['return']))
    show('ready')
    print(cmd('job-complete', id='j0'))
    wait(lambda: not cmd('query-jobs')['return'])
    show('pivoted')
    print(cmd('block-export-del', id='e0'))
    wait(lambda: not cmd('query-block-exports')['return'])
    show('unexported')
    print(cmd('quit'))
    p.wait(timeout=20)
finally:
    if p.poll() is None:
        p.kill()
        p.wait()
