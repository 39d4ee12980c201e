#!/bin/sh
# move-address.sh — a precopy-dest --on-resume step: move a service address
# to this (the destination) host and announce it, the network clean-up step
# of a VM live migration.
#
#   move-address.sh ADDR/PREFIX DEV [RELEASE-CMD]
#
#   ADDR/PREFIX   the service address, e.g. 192.0.2.50/24 (IPv4) or 2001:db8::50/64
#   DEV           this host's interface that should carry it, e.g. eth0
#   RELEASE-CMD   optional shell command that removes the address from the
#                 source host, run first so the address is never on both,
#                 e.g. "ssh root@src-host ip addr del 192.0.2.50/24 dev eth0"
#
# Steps: 1. RELEASE-CMD (a failure is reported, the move goes on: the
# workload already runs here); 2. `ip addr replace ADDR/PREFIX dev DEV`;
# 3. announce the new location so switches and neighbours update at once:
# IPv4 with `arping -U` (iputils or busybox) when installed, otherwise a
# gratuitous ARP sent by python3; IPv6 with `ndsend` when installed,
# otherwise `ip -6 neigh` is flushed and the kernel's own unsolicited
# neighbour advertisement (sent when an address is added) does the job.
#
# Usage with the daemon (runs after every commit, with PRECOPY_MEMORY etc. set):
#   precopy-dest ... --on-resume 'my-guest --memory "$PRECOPY_MEMORY" & \
#       /usr/share/precopy/move-address.sh 192.0.2.50/24 eth0 "ssh src ip addr del 192.0.2.50/24 dev eth0"'
#
# Exit status: 0 moved and announced; 1 moved but the release or the
# announcement failed (see the message); 2 usage or the address could not be added.
set -u

ADDR=${1:-}
DEV=${2:-}
RELEASE=${3:-}
if [ -z "$ADDR" ] || [ -z "$DEV" ] || [ "${ADDR#*/}" = "$ADDR" ]; then
    echo "usage: move-address.sh ADDR/PREFIX DEV [RELEASE-CMD]" >&2
    exit 2
fi
IP=${ADDR%/*}
status=0
log() { echo "move-address: $*" >&2; }

if [ -n "$RELEASE" ]; then
    if sh -c "$RELEASE"; then
        log "released $ADDR on the source ($RELEASE)"
    else
        log "WARNING: the release command failed; $ADDR may still be on the source host"
        status=1
    fi
fi

if ! ip addr replace "$ADDR" dev "$DEV"; then
    log "cannot add $ADDR to $DEV"
    exit 2
fi
log "added $ADDR to $DEV"

case "$IP" in
*:*)
    if command -v ndsend >/dev/null 2>&1; then
        ndsend "$IP" "$DEV" || status=1
        log "announced $IP with ndsend"
    else
        ip -6 neigh flush dev "$DEV" >/dev/null 2>&1
        log "announced $IP by the kernel's unsolicited neighbour advertisement (install ndsend to repeat it)"
    fi
    ;;
*)
    if command -v arping >/dev/null 2>&1; then
        if arping -U -c 3 -I "$DEV" "$IP" >/dev/null 2>&1; then
            log "announced $IP with arping -U"
        else
            log "WARNING: arping -U failed"
            status=1
        fi
    elif ${PYTHON:-python3} - "$DEV" "$IP" <<'PY'
import fcntl, socket, struct, sys, time
dev, ip = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((dev, 0))
mac = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("256s", dev.encode()[:15]))[18:24]  # SIOCGIFHWADDR
addr = socket.inet_aton(ip)
# Gratuitous ARP request: sender and target are both the moved address.
frame = b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\0" * 6 + addr
for _ in range(3):
    s.send(frame)
    time.sleep(0.05)
PY
    then
        log "announced $IP with a gratuitous ARP (python3; install arping to use arping -U)"
    else
        log "WARNING: could not announce $IP (no arping, and python3 failed)"
        status=1
    fi
    ;;
esac
exit $status
