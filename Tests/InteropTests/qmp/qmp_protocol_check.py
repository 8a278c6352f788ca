#!/usr/bin/env python3
"""QMP protocol conformance transcript for blockd and qemu-storage-daemon.

Usage: qmp_protocol_check.py SOCKET_PATH [--big-mib N]

Connects with the qemu.qmp library (pip install qemu.qmp), negotiates, runs query-version and
query-commands, then replays malformed and edge-case input over a raw socket. It prints a
normalised transcript (versions, package strings and timestamps masked, JSON keys sorted) so
the output for blockd and for qemu-storage-daemon 7.2 can be diffed:

    qemu-storage-daemon --chardev socket,id=m,path=/tmp/qsd.sock,server=on,wait=off \
        --monitor chardev=m &
    python3 qmp_protocol_check.py /tmp/qsd.sock > qsd.txt
    python3 qmp_protocol_check.py /tmp/blockd.sock > blockd.txt
    diff qsd.txt blockd.txt

Connections are made one after another: QEMU 7.2 serves one client per monitor at a time.
Exit status 0 when every step ran (the transcript is the result), 1 on a protocol failure.
"""

import asyncio
import json
import socket
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:  # pragma: no cover
    sys.exit("qmp_protocol_check: the qemu.qmp library is missing (pip install qemu.qmp)")

CORE_COMMANDS = ["qmp_capabilities", "query-commands", "query-version", "quit"]
SYNC_ID = "sync-7f3a"


def out(line=""):
    print(line, flush=True)


def mask(value):
    """Masks what legitimately differs between servers and runs."""
    if isinstance(value, dict):
        value = dict(value)
        if "timestamp" in value:
            value["timestamp"] = "<masked>"
        if set(value.keys()) >= {"qemu", "package"}:
            value = {"qemu": {"major": value["qemu"].get("major"), "minor": value["qemu"].get("minor"),
                              "micro": "<masked>"}, "package": "<masked>"}
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def norm(value):
    return json.dumps(mask(value), sort_keys=True, ensure_ascii=True)


# ---------------------------------------------------------------------------------------------
# Part 1: the qemu.qmp library

async def library_part(path):
    qmp = QMPClient("check")
    await qmp.connect(path)
    greeting = qmp.greeting._raw if hasattr(qmp.greeting, "_raw") else dict(qmp.greeting)
    caps = greeting["QMP"]["capabilities"]
    out(f"library: connected and negotiated, greeting capabilities {json.dumps(caps)}")
    version = await qmp.execute("query-version")
    out(f"library: query-version {norm(version)}")
    commands = await qmp.execute("query-commands")
    names = {c["name"] for c in commands}
    missing = [c for c in CORE_COMMANDS if c not in names]
    out(f"library: query-commands lists {', '.join(CORE_COMMANDS)}: {'yes' if not missing else 'missing ' + ','.join(missing)}")
    for cmd, args in [("no-such-command", None), ("query-version", {"unexpected": 1}),
                      ("qmp_capabilities", None)]:
        try:
            await qmp.execute(cmd, args)
            out(f"library: {cmd} unexpectedly succeeded")
        except ExecuteError as e:
            out(f"library: {cmd} -> {e.error_class}: {e.error.error.desc}")
    await qmp.disconnect()


# ---------------------------------------------------------------------------------------------
# Part 2: raw bytes

class Raw:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(path)
        self.buf = b""
        self.decoder = json.JSONDecoder()

    def close(self):
        self.sock.close()

    def message(self):
        """Next JSON message (the server ends each with CRLF)."""
        while True:
            text = self.buf.decode("utf-8", errors="replace").lstrip()
            if text:
                try:
                    value, end = self.decoder.raw_decode(text)
                    self.buf = text[end:].encode("utf-8", errors="replace")
                    return value
                except json.JSONDecodeError:
                    pass
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data

    def exchange(self, payload):
        """Sends payload plus a sync request; returns every message before the sync reply."""
        self.sock.sendall(payload + b'\n{"execute": "query-version", "id": "' + SYNC_ID.encode() + b'"}\n')
        replies = []
        while True:
            m = self.message()
            if isinstance(m, dict) and m.get("id") == SYNC_ID:
                return replies
            replies.append(m)


def show(label, replies, desc_masked=False):
    shown = []
    for r in replies:
        if desc_masked and isinstance(r, dict) and "error" in r:
            r = dict(r)
            r["error"] = {"class": r["error"].get("class"), "desc": "<masked>"}
        shown.append(norm(r))
    out(f"raw: {label} -> " + (" | ".join(shown) if shown else "(no reply)"))


BEFORE_NEGOTIATION = [
    ("command before negotiation", b'{"execute": "query-version"}'),
    ("command before negotiation, id echoed", b'{"execute": "query-version", "id": 5}'),
    ("unknown command before negotiation", b'{"execute": "no-such-command", "id": "x"}'),
    ("not an object before negotiation", b'[1, 2]'),
    ("exec-oob before negotiation", b'{"exec-oob": "query-version", "id": 1}'),
    ("qmp_capabilities with bad capability", b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}, "id": 1}', True),
    ("qmp_capabilities with enable not a list", b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 1}'),
    ("qmp_capabilities", b'{"execute": "qmp_capabilities", "id": 2}'),
]

AFTER_NEGOTIATION = [
    ("qmp_capabilities again", b'{"execute": "qmp_capabilities", "id": 3}'),
    ("unknown command", b'{"execute": "no-such-command", "id": "x"}'),
    ("id echo, object id", b'{"execute": "query-version", "id": {"a": [1, 2]}}'),
    ("id echo, null id", b'{"execute": "query-version", "id": null}'),
    ("id echo, float id", b'{"execute": "query-version", "id": 1.5e3}'),
    ("single-quoted strings", b"{'execute': 'query-version', 'id': 'sq'}"),
    ("JSON array", b'[1, 2]'),
    ("JSON number", b'3'),
    ("JSON string", b'"str"'),
    ("missing execute", b'{"id": 7}'),
    ("execute not a string", b'{"execute": 5, "id": 8}'),
    ("unexpected top-level member", b'{"execute": "query-version", "foo": 1, "id": 9}'),
    ("control member", b'{"execute": "query-version", "control": {"run-oob": true}}'),
    ("exec-oob without oob", b'{"exec-oob": "query-version"}'),
    ("arguments not an object", b'{"execute": "query-version", "arguments": [], "id": 10}'),
    ("arguments null", b'{"execute": "query-version", "arguments": null}'),
    ("unexpected argument", b'{"execute": "query-version", "arguments": {"a": 1}, "id": 11}'),
    ("three requests on one line", b'{"execute": "query-version", "id": 1}{"execute": "query-version", "id": 2} {"execute": "query-version", "id": 3}'),
    ("request over several lines", b'{"execute":\n"query-version",\n"id": "ml"\n}'),
    ("bare word", b'garbage'),
    ("garbage between requests", b'{"execute": "query-version", "id": 1} @@@ {"execute": "query-version", "id": 2}'),
    ("0xff between requests", b'{"execute": "query-version", "id": 1} \xff {"execute": "query-version", "id": 2}'),
    ("control character between requests", b'{"execute": "query-version", "id": 1}\x04{"execute": "query-version", "id": 2}'),
    ("newline inside a string", b'{"exec\n}'),
    ("missing value", b'{"a":}'),
    ("missing separator in object", b'{"a": 1 2}'),
    ("missing colon", b'{"a" 1}'),
    ("non-string key", b'{1: 2}'),
    ("missing separator in list", b'[1 2]'),
    ("trailing comma in list", b'[1,]'),
    ("trailing comma in object", b'{"a": 1,}'),
    ("leading zero", b'01'),
    ("lone minus", b'{"a": -}'),
    ("stray closing bracket", b']'),
    ("unbalanced mixed brackets", b'{"a": [}]'),
    ("invalid escape", b'"\\q"'),
    ("invalid \\u escape", b'"\\u00zz"'),
    ("lone surrogate", b'"\\uD800"'),
    ("surrogate pair", b'"\\uD83D\\uDE00"'),
    ("escaped NUL", b'"\\u0000"'),
    ("invalid UTF-8", b'"\xc3\x28"'),
    ("0xff inside a string", b'"\xff"'),
    ("deep nesting", b'[' * 1100 + b']' * 1100, False, True),
]


def raw_part(path, big_mib):
    raw = Raw(path)
    greeting = raw.message()
    out(f"raw: greeting {norm(greeting)}")
    for case in BEFORE_NEGOTIATION:
        label, payload = case[0], case[1]
        show(label, raw.exchange(payload), desc_masked=len(case) > 2 and case[2])
    for case in AFTER_NEGOTIATION:
        label, payload = case[0], case[1]
        replies = raw.exchange(payload)
        if len(case) > 3 and case[3]:
            # QEMU reports the limit and then one error per leftover fragment; we report once.
            # Compare only the first reply and that the session still works.
            show(label + " (first reply)", replies[:1])
        else:
            show(label, replies, desc_masked=len(case) > 2 and case[2])
    if big_mib > 0:
        payload = (b'{"execute": "query-version", "arguments": {"x": "' + b'a' * (big_mib << 20) + b'"}, "id": "big"}')
        show(f"{big_mib} MiB request", raw.exchange(payload))
    show("still usable", raw.exchange(b'{"execute": "query-version", "id": "end"}'))
    raw.close()

    # A new session that enables out-of-band execution, as qemu.qmp does.
    raw = Raw(path)
    raw.message()
    for label, payload in [
        ("qmp_capabilities with oob", b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1}'),
        ("exec-oob of an in-band command", b'{"exec-oob": "query-version", "id": 3}'),
        ("exec-oob without id", b'{"exec-oob": "query-version"}'),
        ("exec-oob of an unknown command", b'{"exec-oob": "no-such-command", "id": 4}'),
        ("exec-oob not a string", b'{"exec-oob": 5, "id": 6}'),
        ("execute clashes with exec-oob", b'{"execute": "query-version", "exec-oob": "query-version", "id": 5}'),
        ("in-band command with oob enabled", b'{"execute": "query-version", "id": 7}'),
    ]:
        show(label, raw.exchange(payload))
    raw.close()


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        sys.stderr.write(__doc__)
        return 2
    path = args[0]
    big_mib = 1
    if "--big-mib" in args:
        big_mib = int(args[args.index("--big-mib") + 1])
    try:
        asyncio.run(library_part(path))
        raw_part(path, big_mib)
    except Exception as e:  # a transcript line, then failure
        out(f"FAILED: {type(e).__name__}: {e}")
        return 1
    out("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
