#!/usr/bin/env python3
"""Serves IMAGE writable from the daemon at QMP_SOCKET, writes 4 KiB at offset 0 with qemu-io
over NBD, and prints what a management tool sees when the write would land on the image's
metadata: qemu-io's result and the BLOCK_IMAGE_CORRUPTED event (without its timestamp), for
comparing blockd with qemu-storage-daemon.

Usage: corrupt_event.py QMP_SOCKET IMAGE NBD_SOCKET
"""

import asyncio
import json
import sys

try:
    from qemu.qmp import QMPClient
except ImportError:
    sys.stderr.write("corrupt_event: the qemu.qmp library is missing (pip install qemu.qmp)\n")
    sys.exit(77)


async def main(sock, image, nbd):
    qmp = QMPClient("corrupt-event")
    await qmp.connect(sock)
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "d0",
                                       "file": {"driver": "file", "filename": image}})
    await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0", "writable": True})
    with qmp.listener() as listener:
        io = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", "-c", "read -P 0 64k 4k",
            "nbd+unix:///d0?socket=" + nbd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await io.communicate()
        print("qemu-io:", io.returncode, out.decode().splitlines()[0])
        event = await asyncio.wait_for(listener.get(), timeout=10)
        while event["event"] != "BLOCK_IMAGE_CORRUPTED":
            event = await asyncio.wait_for(listener.get(), timeout=10)
        print(event["event"], json.dumps(event["data"]))
    await qmp.execute("block-export-del", {"id": "e0"})
    await qmp.disconnect()


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
