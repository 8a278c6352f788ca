#!/usr/bin/env python3
"""A whole session driven only through QMP, runnable against blockd or qemu-storage-daemon.

Usage: qmp_session.py QMP_SOCKET WORKDIR

WORKDIR must hold base.qcow2 and top.qcow2 (top backed by base, made by qemu-img). The script
adds the chain with blockdev-add, starts the NBD server on WORKDIR/nbd.sock, exports the top
writable, writes and verifies a pattern with qemu-io, removes the export, deletes the nodes and
quits — printing one normalised line per command and event (timestamps and versions masked,
keys sorted), so the transcripts of both daemons can be diffed.
"""

import asyncio
import json
import os
import subprocess
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:
    sys.exit("qmp_session: the qemu.qmp library is missing (pip install qemu.qmp)")


def mask(value):
    if isinstance(value, dict):
        value = {k: mask(v) for k, v in value.items()}
        if "timestamp" in value:
            value["timestamp"] = "<masked>"
        return value
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def show(prefix, value):
    print(prefix, json.dumps(mask(value), sort_keys=True), flush=True)


async def main(sock, work):
    qmp = QMPClient("session")
    await qmp.connect(sock)
    events = []
    arrived = asyncio.Event()

    async def collect():
        async for event in qmp.events:
            events.append(event)
            arrived.set()

    listener = asyncio.create_task(collect())

    async def run(cmd, args=None, then=()):
        """Runs a command; `then` names events it causes (which may follow the reply, as
        QEMU's BLOCK_EXPORT_DELETED does): they are awaited, with a deadline, so the
        transcript shows them after this command and never after a later one."""
        try:
            result = await qmp.execute(cmd, args or {})
            show(f"{cmd} ->", {"return": result})
        except ExecuteError as e:
            show(f"{cmd} ->", {"error": {"class": e.error_class, "desc": e.error.error.desc}})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        for name in then:
            while not any(ev["event"] == name for ev in events):
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    print(f"no {name} event within 10 s after {cmd}", flush=True)
                    break
        while events:
            ev = events.pop(0)
            show("event", {"event": ev["event"], "data": ev.get("data", {})})

    nbd = os.path.join(work, "nbd.sock")
    await run("blockdev-add", {"driver": "file", "node-name": "base-file", "filename": os.path.join(work, "base.qcow2")})
    await run("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": "base-file"})
    await run("blockdev-add", {"driver": "file", "node-name": "top-file", "filename": os.path.join(work, "top.qcow2")})
    await run("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base"})
    await run("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": "top-file"})
    await run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
    await run("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "top", "name": "disk", "writable": True})
    await run("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "top"})
    await run("query-block-exports")
    await run("blockdev-del", {"node-name": "top"})

    uri = f"nbd+unix:///disk?socket={nbd}"
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 128k", "-c", "read -P 0x5a 64k 128k",
                         "-c", "read -P 0x11 0 64k", uri], capture_output=True, text=True)
    print("qemu-io exit", io.returncode, "verified" if "Pattern verification failed" not in io.stdout else "MISMATCH", flush=True)

    await run("block-export-del", {"id": "exp0"}, then=["BLOCK_EXPORT_DELETED"])
    await run("block-export-del", {"id": "exp0"})
    await run("query-block-exports")
    await run("nbd-server-stop")
    await run("blockdev-del", {"node-name": "base"})
    await run("blockdev-del", {"node-name": "top"})
    await run("blockdev-del", {"node-name": "top-file"})
    await run("blockdev-del", {"node-name": "base"})
    await run("blockdev-del", {"node-name": "base-file"})
    await run("query-named-block-nodes", {"flat": True})
    try:
        await qmp.execute("quit")
        print("quit -> ok", flush=True)
    except Exception as e:  # the server may close before the reply is read
        print("quit ->", type(e).__name__, flush=True)
    listener.cancel()
    try:
        await qmp.disconnect()
    except (EOFError, ConnectionError):
        pass  # the daemon closed the monitor on quit


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
