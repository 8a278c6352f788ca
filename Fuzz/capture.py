#!/usr/bin/env python3
"""Records what a real client sends: listens on LISTEN (a unix socket), forwards every
connection to TARGET (the server's unix socket), and writes each connection's client->server
bytes to OUTDIR/PREFIX-N. Fuzz/make-corpus.sh uses it to capture nbdinfo, qemu-io, nbdcopy,
qemu-img and QMP client sessions as seed inputs.

Usage: capture.py LISTEN TARGET OUTDIR PREFIX      (runs until killed)
"""
import os, select, socket, sys, threading

listen_path, target, outdir, prefix = sys.argv[1:5]
limit = int(os.environ.get('CAPTURE_LIMIT', 1 << 20))
if os.path.exists(listen_path):
    os.unlink(listen_path)
server = socket.socket(socket.AF_UNIX)
server.bind(listen_path)
server.listen(16)
counter = [0]
lock = threading.Lock()


def serve(client):
    with lock:
        counter[0] += 1
        n = counter[0]
    upstream = socket.socket(socket.AF_UNIX)
    upstream.connect(target)
    recorded = bytearray()
    peers = {client: upstream, upstream: client}
    open_ends = {client, upstream}
    while open_ends:
        ready, _, _ = select.select(list(open_ends), [], [], 30)
        if not ready:
            break
        for s in ready:
            try:
                data = s.recv(1 << 16)
            except OSError:
                data = b''
            if not data:
                open_ends.discard(s)
                try:
                    peers[s].shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            if s is client and len(recorded) < limit:
                recorded += data[:limit - len(recorded)]
            try:
                peers[s].sendall(data)
            except OSError:
                open_ends.clear()
    client.close()
    upstream.close()
    if recorded:
        with open(os.path.join(outdir, f'{prefix}-{n}'), 'wb') as f:
            f.write(recorded)


while True:
    c, _ = server.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
