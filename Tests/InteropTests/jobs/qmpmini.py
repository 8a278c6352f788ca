import os, socket, json, subprocess, sys, time


def until(cond, what, timeout=30.0, step=0.02):
    """Polls cond() until it returns a true value (which is returned) or `timeout` seconds pass
    (AssertionError naming `what`). Tests synchronise on conditions, never on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v: return v
        if time.monotonic() > deadline: raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(step)


def wait_until(pred, t=10, what='condition'):
    """`until` in the argument order the job scenarios use."""
    return until(pred, what, timeout=t)


def can_connect(path):
    """Whether a unix socket at path accepts a connection now."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path); return True
    except OSError:
        return False
    finally:
        s.close()


def fio_writer(uri, log, *options):
    """fio writing 4 KiB random blocks with crc32c verify to `uri`, every write logged to `log`
    (`--write_iolog`), plus `options`; returns the process once its first write is logged."""
    p = subprocess.Popen(['fio', '--name=w', '--ioengine=nbd', f'--uri={uri}', '--rw=randwrite', '--bs=4k',
                          '--verify=crc32c', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse',
                          f'--write_iolog={log}', *options],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: os.path.exists(log) and os.path.getsize(log) > 0, 10, 'fio writes')
    return p


def observe(seconds):
    """An observation window for something that must NOT happen (a paused job must not make
    progress). Not synchronisation: nothing waits on it, and a longer window only makes the
    check stricter."""
    time.sleep(seconds)


class Q:
    def __init__(s, path):
        s.s = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 10
        while True:
            try: s.s.connect(path); break
            except OSError:
                if time.monotonic() > deadline: raise
                time.sleep(0.02)
        s.f = s.s.makefile('rwb'); s.events=[]
        s.f.readline(); s.cmd('qmp_capabilities')
    def cmd(s, _name, **args):
        msg = {"execute": _name}
        if args: msg['arguments'] = {k.replace('_','-'): v for k,v in args.items()}
        s.f.write((json.dumps(msg)+'\n').encode()); s.f.flush()
        while True:
            r = json.loads(s.f.readline())
            if 'event' in r: s.events.append(r); print('EVENT', json.dumps({k:v for k,v in r.items() if k!='timestamp'})); continue
            print("CMD", _name, json.dumps(args), '->', json.dumps(r)); return r
    def wait_status(s, status, t=10):
        """Waits for JOB_STATUS_CHANGE to `status` (e.g. 'paused', 'null')."""
        s.s.settimeout(t)
        while True:
            for e in s.events:
                if e['event'] == 'JOB_STATUS_CHANGE' and e.get('data', {}).get('status') == status:
                    s.events.remove(e); return e
            r = json.loads(s.f.readline()); s.events.append(r); print('EVENT', json.dumps({k:v for k,v in r.items() if k!='timestamp'}))
    def job_offset(s):
        """The first block job's offset, or None when there is no job."""
        jobs = s.cmd('query-block-jobs')['return']
        return jobs[0]['offset'] if jobs else None
    def wait(s, ev, t=10):
        s.s.settimeout(t)
        while True:
            for e in s.events:
                if e['event']==ev: s.events.remove(e); return e
            r = json.loads(s.f.readline()); s.events.append(r); print('EVENT', json.dumps({k:v for k,v in r.items() if k!='timestamp'}))
