#!/bin/sh
# The image's entrypoint. Services that need root for one step start as root (`user: "0"`
# in docker-compose.yml), do only that step here, and run the lab as the `lab` user with
# no capability left:
#   LAB_ADDRESSES  extra addresses of this container, added to its interface (NET_ADMIN): the
#                  edge's other listeners, the control plane's validation vantage points
#   LAB_TRUST      the client: this CA certificate into the system trust store
set -eu
if [ "$(id -u)" = 0 ]; then
    if [ -n "${LAB_ADDRESSES:-}" ]; then
        dev=$(ip -o -4 addr show scope global | awk '{print $2; exit}')
        for addr in $LAB_ADDRESSES; do
            ip addr add "$addr/32" dev "$dev" 2>/dev/null || ip -o addr show dev "$dev" | grep -q " $addr/" \
                || { echo "entrypoint: cannot add $addr to $dev (the service needs cap_add: NET_ADMIN)" >&2; exit 1; }
        done
    fi
    if [ -n "${LAB_TRUST:-}" ]; then
        [ -s "$LAB_TRUST" ] || { echo "entrypoint: no CA certificate at $LAB_TRUST (the init service makes it)" >&2; exit 1; }
        cp "$LAB_TRUST" /usr/local/share/ca-certificates/sni-lab.crt
        update-ca-certificates >/dev/null 2>&1
    fi
    export HOME=/home/lab USER=lab
    exec setpriv --reuid=lab --regid=lab --init-groups --inh-caps=-all --bounding-set=-all -- "$@"
fi
exec "$@"
