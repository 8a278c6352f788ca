#!/usr/bin/env python3
"""Graph changes the block layer's permissions refuse, run the same way against blockd and
qemu-storage-daemon.

Usage: graph_refusals.py DAEMON SCENARIO       (exit 77 when a tool is missing)

Prints one line per command under test ('CMD name args -> answer'; node names QEMU makes up
and the temporary directory masked) and, after each refusal, whether the graph is unchanged:
query-named-block-nodes, query-block-exports and query-block-jobs before and after. The
transcript of both daemons must be the same.

Scenarios:
  new_users     a second qcow2 node over a file another qcow2 node writes (and read-only), a raw
                node over that file exported writable and read-only, the file itself exported
  backing_export a writable export of a backing node: one opened from the image header
                (read-only), and one below a node a stream job holds
  job_writer    a second writer on nodes jobs hold: stream's intermediate node, intermediate
                commit's top and base, active commit's device and intermediate node; a second
                job; blockdev-del
  frozen_filter a filter inserted with blockdev-reopen where a stream job froze the link
  inline_children blockdev-del of a node whose file and backing were defined inline: they go
                with it (unless an export still uses them), and are not the monitor's to delete
"""
import json, os, re, shutil, socket, subprocess, sys, tempfile, time
for tool in ('qemu-img', 'qemu-io'):
    if not shutil.which(tool): print('missing', tool); sys.exit(77)
daemon, scenario = sys.argv[1], sys.argv[2]
d = tempfile.mkdtemp()

def sh(*a): subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def img(name, backing=None, size='64M'):
    a = ['qemu-img', 'create', '-q', '-f', 'qcow2']
    if backing: a += ['-b', f'{d}/{backing}', '-F', 'qcow2']
    sh(*a, f'{d}/{name}', size)

def io(name, cmd): sh('qemu-io', '-f', 'qcow2', '-c', cmd, f'{d}/{name}')

class Q:
    """A minimal QMP client: commands and answers; events are skipped."""
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline: raise
                time.sleep(0.02)
        self.f = self.s.makefile('rwb')
        self.f.readline()
        self.cmd('qmp_capabilities')

    def cmd(self, name, **args):
        msg = {'execute': name}
        if args: msg['arguments'] = {k.replace('_', '-'): v for k, v in args.items()}
        self.f.write((json.dumps(msg) + '\n').encode())
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line: raise EOFError(f'daemon closed the monitor during {name}')
            r = json.loads(line)
            if 'event' not in r: return r

def mask(text):
    text = text.replace(d, '<dir>')
    return re.sub(r'#block\d+', '#block', text)

class Session:
    def __init__(self):
        sock = f'{d}/qmp.sock'
        self.p = subprocess.Popen([daemon, '--chardev', f'socket,path={sock},server=on,wait=off,id=c', '--monitor', 'chardev=c',
                                   '--nbd-server', f'addr.type=unix,addr.path={d}/nbd.sock'],
                                  stdout=subprocess.DEVNULL, stderr=open(f'{d}/daemon.log', 'a'))
        self.q = Q(sock)

    def raw(self, name, **args):
        return self.q.cmd(name, **args)

    def do(self, name, **args):
        """A command whose answer is part of the transcript."""
        r = self.q.cmd(name, **args)
        shown = {k.replace('_', '-'): v for k, v in args.items()}
        print(mask(f'CMD {name} {json.dumps(shown, sort_keys=True)} -> {json.dumps(r, sort_keys=True)}'), flush=True)
        return r

    def ok(self, name, **args):
        r = self.q.cmd(name, **args)
        assert 'return' in r, (name, args, r)
        return r['return']

    def graph(self):
        nodes = self.ok('query-named-block-nodes', flat=True)
        shape = sorted((n['node-name'], n['drv'], n['ro'], n['file'], n.get('backing_file', '')) for n in nodes)
        exports = sorted(json.dumps(e, sort_keys=True) for e in self.ok('query-block-exports'))
        jobs = sorted((j['device'], j['type'], j['status']) for j in self.ok('query-block-jobs'))
        return shape, exports, jobs

    def refused(self, name, **args):
        """Runs a command that must fail, and checks the graph did not change."""
        before = self.graph()
        r = self.do(name, **args)
        assert 'error' in r, f'{name} was accepted: {r}'
        after = self.graph()
        if before == after:
            print('  graph unchanged', flush=True)
        else:
            print(mask(f'  GRAPH CHANGED: {before} -> {after}'), flush=True)

    def nodes(self):
        names = sorted(mask(n['node-name']) for n in self.ok('query-named-block-nodes', flat=True))
        print(f'  nodes {names}', flush=True)

    def quit(self):
        self.raw('quit')
        self.p.wait(10)

def chain_files():
    """base <- mid <- top, data in base and mid (so a job has work to do)."""
    img('base.qcow2'); io('base.qcow2', 'write -P 1 0 64M')
    img('mid.qcow2', 'base.qcow2'); io('mid.qcow2', 'write -P 2 0 32M')
    img('top.qcow2', 'mid.qcow2')

def explicit_chain(s):
    """The chain added node by node, every node writable."""
    for n in ('base', 'mid', 'top'):
        s.ok('blockdev-add', driver='file', node_name=f'{n}-f', filename=f'{d}/{n}.qcow2')
    s.ok('blockdev-add', driver='qcow2', node_name='base', file='base-f', backing=None)
    s.ok('blockdev-add', driver='qcow2', node_name='mid', file='mid-f', backing='base')
    s.ok('blockdev-add', driver='qcow2', node_name='top', file='top-f', backing='mid')

def paused_job(s, command, **args):
    """Starts a job at a crawl and pauses it, so it holds its nodes while we try things."""
    s.ok(command, job_id='j0', speed=1, **args)
    s.ok('job-pause', id='j0')
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        jobs = s.ok('query-jobs')
        if jobs and jobs[0]['status'] in ('paused', 'standby'):
            return
        time.sleep(0.02)
    raise AssertionError(f'job did not pause: {s.ok("query-jobs")}')

def end_job(s):
    s.ok('job-cancel', id='j0')
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not s.ok('query-jobs'): return
        time.sleep(0.02)
    raise AssertionError('job did not go away')

s = None
try:
    if scenario == 'new_users':
        img('disk.qcow2', size='4M')
        s = Session()
        s.ok('blockdev-add', driver='file', node_name='f0', filename=f'{d}/disk.qcow2')
        s.ok('blockdev-add', driver='qcow2', node_name='q0', file='f0', backing=None)
        s.refused('blockdev-add', driver='qcow2', node_name='q1', file='f0', backing=None)
        s.refused('blockdev-add', driver='qcow2', node_name='q2', file='f0', backing=None, read_only=True)
        s.do('blockdev-add', driver='raw', node_name='r0', file='f0')
        s.refused('block-export-add', type='nbd', id='e0', node_name='r0', writable=True)
        s.refused('block-export-add', type='nbd', id='e1', node_name='r0', writable=False)
        s.refused('block-export-add', type='nbd', id='e2', node_name='f0', writable=True)
        s.refused('block-export-add', type='nbd', id='e3', node_name='f0', writable=False)
        # Once q0 is gone the same requests are fine.
        s.ok('blockdev-del', node_name='q0')
        s.do('block-export-add', type='nbd', id='e0', node_name='r0', writable=True)
        s.refused('blockdev-add', driver='qcow2', node_name='q1', file='f0', backing=None)
        s.quit()
    elif scenario == 'backing_export':
        chain_files()
        s = Session()
        # The chain as the image header names it: the backing nodes are implicit and read-only.
        s.ok('blockdev-add', driver='qcow2', node_name='disk', file={'driver': 'file', 'filename': f'{d}/top.qcow2'})
        implicit = [n['node-name'] for n in s.ok('query-named-block-nodes', flat=True)
                    if n['drv'] == 'qcow2' and n['node-name'] != 'disk' and n['file'].endswith('/mid.qcow2')]
        assert len(implicit) == 1, implicit
        s.refused('block-export-add', type='nbd', id='b0', node_name=implicit[0], writable=True)
        s.do('block-export-add', type='nbd', id='b1', node_name=implicit[0], writable=False)
        s.ok('block-export-del', id='b1')
        s.ok('blockdev-del', node_name='disk')
        # The same chain added by hand, all writable, streamed from top into mid's place.
        explicit_chain(s)
        paused_job(s, 'block-stream', device='top', base_node='base')
        s.refused('block-export-add', type='nbd', id='b2', node_name='base', writable=True)
        s.refused('block-export-add', type='nbd', id='b3', node_name='base-f', writable=True)
        s.do('block-export-add', type='nbd', id='b4', node_name='base', writable=False)
        end_job(s)
        s.quit()
    elif scenario == 'job_writer':
        chain_files()
        s = Session()
        explicit_chain(s)
        # stream: top and mid are the job's; mid must not be written, top may be.
        paused_job(s, 'block-stream', device='top', base_node='base')
        s.refused('block-export-add', type='nbd', id='w0', node_name='mid', writable=True)
        s.refused('blockdev-add', driver='qcow2', node_name='mid2', file='mid-f', backing=None)
        s.refused('block-stream', job_id='j1', device='mid')
        s.refused('blockdev-del', node_name='mid')
        s.do('block-export-add', type='nbd', id='r0', node_name='mid', writable=False)
        s.ok('block-export-del', id='r0')
        end_job(s)
        # intermediate commit of mid into base: no consistent reader of mid, no writer of base.
        paused_job(s, 'block-commit', device='top', top_node='mid', base_node='base')
        s.refused('block-export-add', type='nbd', id='w1', node_name='mid', writable=False)
        s.refused('block-export-add', type='nbd', id='w2', node_name='base', writable=True)
        s.do('block-export-add', type='nbd', id='r1', node_name='base', writable=False)
        s.ok('block-export-del', id='r1')
        s.refused('blockdev-del', node_name='top')
        end_job(s)
        # active commit of top into base: QEMU puts its mirror filter above top for the users
        # top had; a new user of top asks for consistent reads of mid, which the job forbids.
        paused_job(s, 'block-commit', device='top', base_node='base')
        s.refused('block-export-add', type='nbd', id='w3', node_name='top', writable=True)
        s.refused('block-export-add', type='nbd', id='w4', node_name='mid', writable=False)
        s.do('block-export-add', type='nbd', id='r2', node_name='base', writable=True)
        s.ok('block-export-del', id='r2')
        end_job(s)
        s.quit()
    elif scenario == 'frozen_filter':
        chain_files()
        s = Session()
        explicit_chain(s)
        s.ok('object-add', qom_type='throttle-group', id='tg')
        paused_job(s, 'block-stream', device='top', base_node='base')
        # Adding the filter is fine (it takes nothing yet); putting it into the frozen link is not.
        s.do('blockdev-add', driver='throttle', node_name='flt', file='mid', throttle_group='tg')
        s.refused('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'top', 'file': 'top-f', 'backing': 'flt'}])
        # Below the frozen part (mid's backing, the edge into base) a filter may go in.
        s.do('blockdev-add', driver='throttle', node_name='flt2', file='base', throttle_group='tg')
        s.do('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'mid', 'file': 'mid-f', 'backing': 'flt2'}])
        end_job(s)
        s.do('blockdev-reopen', options=[{'driver': 'qcow2', 'node-name': 'top', 'file': 'top-f', 'backing': 'flt'}])
        s.quit()
    elif scenario == 'inline_children':
        chain_files()
        s = Session()
        s.do('blockdev-add', driver='qcow2', node_name='top',
             file={'driver': 'file', 'node-name': 'tf', 'filename': f'{d}/top.qcow2'},
             backing={'driver': 'qcow2', 'node-name': 'mid', 'backing': None,
                      'file': {'driver': 'file', 'filename': f'{d}/mid.qcow2'}})
        s.nodes()
        s.refused('blockdev-del', node_name='tf')
        s.refused('blockdev-del', node_name='mid')
        s.do('block-export-add', type='nbd', id='e', node_name='mid', writable=False)
        s.do('blockdev-del', node_name='top')
        s.nodes()
        s.do('block-export-del', id='e')
        # QEMU deletes an export (and what only it kept) from a bottom half: wait for it.
        deadline = time.monotonic() + 10
        while s.ok('query-named-block-nodes', flat=True) and time.monotonic() < deadline:
            time.sleep(0.02)
        s.nodes()
        # A child that another node uses by name stays after its parent goes.
        s.do('blockdev-add', driver='qcow2', node_name='top', backing=None,
             file={'driver': 'file', 'node-name': 'tf', 'filename': f'{d}/top.qcow2'})
        s.do('blockdev-add', driver='raw', node_name='r', file='tf', read_only=True)
        s.do('blockdev-del', node_name='top')
        s.nodes()
        s.do('blockdev-del', node_name='r')
        s.nodes()
        s.quit()
    else:
        raise SystemExit(f'unknown scenario {scenario}')
    print('OK')
finally:
    if s and s.p.poll() is None:
        s.p.kill()
        s.p.wait()
    shutil.rmtree(d, ignore_errors=True)
