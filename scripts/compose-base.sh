#!/bin/sh
# The local base image for the lab image, when no image registry is reachable: Debian
# bookworm's root filesystem made by debootstrap from the machine's own Debian mirror,
# turned into an image by `docker import`. Built once; kept while the engine keeps it.
# It stands in for python:3.12-slim: a Debian with a Python 3 that can make a venv.
set -eu
DOCKER=${DOCKER:-docker}
IMAGE=${1:-sni-lab-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "compose-base: $IMAGE is here, kept"
    exit 0
fi
root=$(mktemp -d /var/tmp/sni-lab-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "compose-base: debootstrap bookworm from $MIRROR (a few minutes, once)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR" \
    >"$root.log" 2>&1 || { tail -20 "$root.log"; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | $DOCKER import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' - "$IMAGE" >/dev/null
echo "compose-base: $IMAGE built"
