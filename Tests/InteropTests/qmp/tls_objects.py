#!/usr/bin/env python3
"""TLS objects and nbd-server-start over QMP, runnable against blockd or qemu-storage-daemon.

Usage: tls_objects.py QMP_SOCKET PKI_ROOT NBD_SOCKET

PKI_ROOT is what scripts/make-pki.sh made. Prints one line per command: the command and
either "ok" or the error class and message, so both daemons' answers can be compared. Between
commands it runs nbdinfo against the server (a line "nbdinfo: ok" or "nbdinfo: failed").

tls_objects.expected.txt is blockd's answer (PKI stands for PKI_ROOT). qemu-storage-daemon 7.2
answers the same except that it lets object-del remove credentials and authz objects the running
NBD server still uses ("object-del tls0: ok"); blockd refuses with QEMU's in-use message.
"""

import asyncio
import subprocess
import sys

try:
    from qemu.qmp import QMPClient, ExecuteError
except ImportError:
    sys.stderr.write("tls_objects: the qemu.qmp library is missing (pip install qemu.qmp)\n")
    sys.exit(1)


async def main(qmp_path, pki, nbd_sock):
    qmp = QMPClient("tls-objects")
    await qmp.connect(qmp_path)

    async def run(cmd, **args):
        try:
            await qmp.execute(cmd, args)
            print(f"{cmd} {args.get('id', '')}: ok".replace(" :", ":"), flush=True)
        except ExecuteError as e:
            print(f"{cmd} {args.get('id', '')}: {e.error_class}: {e.error.error.desc}".replace(" :", ":"), flush=True)

    def nbdinfo(uri):
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
        print("nbdinfo:", "ok" if r.returncode == 0 else "failed", flush=True)

    uri = f"nbds+unix:///disk?socket={nbd_sock}&tls-certificates={pki}/pki"
    await run("blockdev-add", **{"driver": "null-co", "node-name": "n0", "size": 1048576})
    await run("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server", "dir": f"{pki}/pki"})
    await run("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server", "dir": f"{pki}/pki"})
    await run("object-add", **{"qom-type": "tls-creds-x509", "id": "cli0", "endpoint": "client", "dir": f"{pki}/pki"})
    await run("object-add", **{"qom-type": "tls-creds-psk", "id": "psk0", "endpoint": "server", "dir": f"{pki}/psk"})
    await run("object-add", **{"qom-type": "tls-creds-x509", "id": "bad0", "endpoint": "server", "dir": f"{pki}/nowhere"})
    await run("object-add", **{"qom-type": "authz-simple", "id": "authz0", "identity": "C=US,O=blockd tests,CN=client1"})
    await run("object-add", **{"qom-type": "authz-simple", "id": "authz1"})
    addr = {"type": "unix", "data": {"path": nbd_sock}}
    await run("nbd-server-start", addr=addr, **{"tls-creds": "nope"})
    await run("nbd-server-start", addr=addr, **{"tls-creds": "cli0"})
    await run("nbd-server-start", addr=addr, **{"tls-creds": "tls0", "tls-authz": "authz0"})
    await run("block-export-add", type="nbd", id="e0", **{"node-name": "n0", "name": "disk"})
    nbdinfo(uri)
    nbdinfo(f"nbds+unix:///disk?socket={nbd_sock}&tls-certificates={pki}/pki2")
    await run("object-del", id="tls0")
    await run("object-del", id="authz0")
    await run("object-del", id="psk0")
    await run("object-del", id="psk0")
    await run("block-export-del", id="e0")
    await run("nbd-server-stop")
    await run("object-del", id="tls0")
    await run("object-del", id="authz0")
    await qmp.disconnect()


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
