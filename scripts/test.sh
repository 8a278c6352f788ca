#!/usr/bin/env bash
# Runs every test of blockd: installs what the interop tests drive (Debian packages and the
# qemu.qmp Python library) when missing, builds, and runs `swift test`.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libnbd-dev libnbd-bin nbdkit nbdfuse python3-libnbd qemu-utils qemu-system-common
          fuse3 fio zlib1g-dev libzstd-dev pkg-config socat
          librbd-dev ceph-mon ceph-osd ceph-common qemu-block-extra)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
  echo "test.sh: installing qemu.qmp"
  python3 -m pip install -q qemu.qmp
fi

swift build
swift test "$@"
