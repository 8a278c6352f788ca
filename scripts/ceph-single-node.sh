#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests: one monitor, one in-memory OSD (memstore), no
# authentication, a pool "rbd". Starts in a few seconds and uses about 60 MB of memory.
#
#   ceph-single-node.sh start [DIR]   start; prints the path of its ceph.conf on the last line
#   ceph-single-node.sh stop DIR      stop the daemons started in DIR and remove DIR
#
# With CEPH_AUTH=cephx the cluster requires cephx authentication: DIR/keyring holds the keys
# (client.admin's too) and the printed ceph.conf points clients at it.
#
# Needs the Debian packages ceph-mon ceph-osd ceph-common (and librbd-dev to build against
# librbd). Clients use the printed conf: `rbd -c CONF ls`, `qemu-img info rbd:rbd/IMG:conf=CONF`,
# QMP `{"driver": "rbd", "pool": "rbd", "image": "IMG", "conf": CONF}`. Data lives in memory
# and is gone when the OSD stops.
set -euo pipefail

start() {
    local D=${1:-$(mktemp -d "${TMPDIR:-/tmp}/ceph.XXXXXX")}
    mkdir -p "$D/mon" "$D/osd0" "$D/run" "$D/log"
    D=$(cd "$D" && pwd)
    local port fsid
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fsid=$(cat /proc/sys/kernel/random/uuid)
    local auth=${CEPH_AUTH:-none} keyring=""
    if [ "$auth" = cephx ]; then
        keyring="keyring = $D/keyring"
        ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
            --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
        ceph-authtool "$D/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' \
            --cap mgr 'allow profile osd' >/dev/null
    fi
    cat > "$D/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
$keyring
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
# The monitor refuses to start (and its health check errs) at 5% free on the disk of its data;
# it writes a few MB here.
mon data avail crit = 0
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
mon data = $D/mon
osd data = $D/osd0
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-4294967296}
osd max object name len = 256
osd max object namespace len = 64
# PGs serve reads under a lease (osd_heartbeat_grace x this ratio; 16 s by default) that a
# paused OSD outlives (the rbd tests SIGSTOP it for ~20 s). A lone OSD then does not always
# renew it: its PGs stay "laggy" and park every request for good (ceph-container#1682).
# 120 s outlasts any pause of the tests.
osd pool default read lease ratio = 6
[client]
admin socket = $D/run/\$name.\$pid.\$cctid.asok
CONF
    monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$D/monmap" >/dev/null
    ceph-mon --mkfs -i a --monmap "$D/monmap" -c "$D/ceph.conf" ${keyring:+--keyring "$D/keyring"}
    ceph-mon -i a -c "$D/ceph.conf"
    local osd
    osd=$(timeout 30 ceph -c "$D/ceph.conf" osd create)
    ceph-osd -i "$osd" --mkfs -c "$D/ceph.conf" >/dev/null 2>&1
    ceph-osd -i "$osd" -c "$D/ceph.conf" 2>/dev/null
    timeout 30 ceph -c "$D/ceph.conf" osd pool create rbd 8 >/dev/null 2>&1
    timeout 30 rbd -c "$D/ceph.conf" pool init rbd
    echo "$D/ceph.conf"
}

stop() {
    local D=${1:?usage: $0 stop DIR}
    local f pid
    # SIGKILL at once: the OSD's data is in memory and DIR goes away, so there is nothing to
    # save, and a terminated OSD or monitor spends seconds shutting down (the OSD trying to
    # reach its monitor).
    for f in "$D"/run/*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f"); kill -9 "$pid" 2>/dev/null || true
    done
    for f in "$D"/run/*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    rm -rf "$D"
}

case ${1:-} in
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start [DIR] | stop DIR" >&2; exit 2 ;;
esac
