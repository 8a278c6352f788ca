import socket, json, sys, time
class Q:
    def __init__(s, path):
        s.s = socket.socket(socket.AF_UNIX); 
        for i in range(100):
            try: s.s.connect(path); break
            except Exception: time.sleep(0.05)
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
    def wait(s, ev, t=10):
        s.s.settimeout(t)
        while True:
            for e in s.events:
                if e['event']==ev: s.events.remove(e); return e
            r = json.loads(s.f.readline()); s.events.append(r); print('EVENT', json.dumps({k:v for k,v in r.items() if k!='timestamp'}))
