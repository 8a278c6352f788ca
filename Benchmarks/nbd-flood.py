#!/usr/bin/python3
"""Floods an NBD server with pipelined requests whose replies are never read, and reports
the server's RSS growth and how long a second client waits for one 4 KiB read meanwhile.

    nbd-flood.py --socket S --export E --pid PID --kind large|zero [--count N] [--hold SECONDS]

large: N (default 4000) pipelined 1 MiB NBD_CMD_READs; zero: N (default 200000) zero-length
READs. Plain Python sockets (no libnbd): the flood is a handful of bytes per request, and the
point is that nobody reads the replies. Prints one line of key=value pairs.
"""
import argparse
import os
import socket
import struct
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST = 0x25609513


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError("server closed")
        out += chunk
    return out


def connect(path, export):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    name = export.encode()
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + b"\0\0")
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if rtype == 1:
            return s
        if rtype & 0x80000000:
            raise RuntimeError(f"NBD_OPT_GO failed: {rtype:#x}")


def probe(path, export):
    """Seconds for connect + handshake + one 4 KiB read on a fresh connection."""
    start = time.monotonic()
    s = connect(path, export)
    s.sendall(struct.pack(">IHHQQI", REQUEST, 0, 0, 1, 0, 4096))
    magic, err, _cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698 and err == 0
    recv_exact(s, 4096)
    elapsed = time.monotonic() - start
    s.sendall(struct.pack(">IHHQQI", REQUEST, 0, 2, 2, 0, 0))
    s.close()
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--export", default="")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--kind", choices=["large", "zero"], required=True)
    ap.add_argument("--count", type=int)
    ap.add_argument("--hold", type=float, default=3.0, help="seconds to watch RSS after the flood is sent")
    a = ap.parse_args()
    count = a.count or (4000 if a.kind == "large" else 200000)
    length = (1 << 20) if a.kind == "large" else 0

    base_probe = probe(a.socket, a.export)
    before = rss_kib(a.pid)
    flood = connect(a.socket, a.export)
    flood.setblocking(False)
    batch = b"".join(struct.pack(">IHHQQI", REQUEST, 0, 0, i, 0, length) for i in range(count))
    sent = 0
    stalled_since = None
    start = time.monotonic()
    peak = before
    while sent < len(batch):
        try:
            sent += flood.send(batch[sent:sent + (1 << 20)])
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 2.0:
                break  # the server stopped reading us: that is the point
            time.sleep(0.01)
        peak = max(peak, rss_kib(a.pid))
    requests_sent = sent // 28
    # Watch RSS while the server does whatever it does with the unread replies.
    worst_probe = 0.0
    deadline = time.monotonic() + a.hold
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(a.pid))
        worst_probe = max(worst_probe, probe(a.socket, a.export))
        time.sleep(0.1)
    peak = max(peak, rss_kib(a.pid))
    flood.close()
    print(f"kind={a.kind} requests_sent={requests_sent}/{count} rss_before_mib={before / 1024:.1f} "
          f"rss_peak_mib={peak / 1024:.1f} growth_mib={(peak - before) / 1024:.1f} "
          f"probe_idle_ms={base_probe * 1000:.1f} probe_during_ms={worst_probe * 1000:.1f} "
          f"flood_seconds={time.monotonic() - start:.1f}")


if __name__ == "__main__":
    main()
