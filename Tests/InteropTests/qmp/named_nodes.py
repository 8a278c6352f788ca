#!/usr/bin/env python3
"""Prints `query-named-block-nodes` of the daemon at QMP_SOCKET, for comparing blockd with
qemu-storage-daemon run with the same --blockdev options.

Usage: named_nodes.py QMP_SOCKET

One line per node the user named (implicit `#blockNNN` nodes are numbered differently by each
daemon), sorted by node name, keys sorted, `actual-size` masked (it depends on when the file
was last written).
"""

import asyncio
import json
import sys

try:
    from qemu.qmp import QMPClient
except ImportError:
    sys.stderr.write("named_nodes: the qemu.qmp library is missing (pip install qemu.qmp)\n")
    sys.exit(77)


def mask(value):
    if isinstance(value, dict):
        return {k: ("<masked>" if k == "actual-size" else mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


async def main(sock):
    qmp = QMPClient("named-nodes")
    await qmp.connect(sock)
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    await qmp.disconnect()
    for node in sorted(nodes, key=lambda n: n["node-name"]):
        if node["node-name"].startswith("#"):
            continue
        print(json.dumps(mask(node), sort_keys=True))


asyncio.run(main(sys.argv[1]))
