#!/bin/sh
# `make compose-test`: the compose stack built and brought up for real on this machine.
# Installs Debian's docker.io, docker-compose and debootstrap when missing; starts dockerd
# when none answers (and stops it at the end); builds the local base image once (kept
# while the engine keeps it), a wheelhouse with this machine's own pip settings, and the
# lab image from both; then scripts/compose-check.py brings the stack up, checks it and
# takes it down.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DOCKER=/usr/bin/docker   # Debian's CLI, the same release as its dockerd
BASE=sni-lab-base:bookworm
now() { date +%s; }
t0=$(now)

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null \
        || [ ! -x "$DOCKER" ]; then
    echo "compose-test: installing docker.io docker-compose debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi

started=""
stop_dockerd() {
    if [ -n "$started" ]; then
        kill "$started" 2>/dev/null || true
        wait "$started" 2>/dev/null || true
        echo "compose-test: stopped the dockerd it started"
    fi
}
trap stop_dockerd EXIT
trap 'exit 130' INT TERM
if ! $DOCKER info >/dev/null 2>&1; then
    log=${TMPDIR:-/tmp}/sni-lab-dockerd.log
    dockerd >"$log" 2>&1 &
    started=$!
    i=0
    until $DOCKER info >/dev/null 2>&1; do
        i=$((i + 1))
        kill -0 "$started" 2>/dev/null && [ $i -lt 60 ] || { echo "compose-test: dockerd did not start:"; tail -20 "$log"; exit 1; }
        sleep 0.5
    done
    echo "compose-test: started dockerd (pid $started, log $log)"
fi

DOCKER=$DOCKER sh scripts/compose-base.sh "$BASE"
t1=$(now)

# The host's pip settings (index, find-links, constraints, CA) apply here, on the host; the
# build sees only the wheels, in a stage the image does not keep.
rm -rf build/wheels
mkdir -p build
"$PYTHON" -m pip wheel -q --wheel-dir build/wheels . "setuptools>=77" >build/wheels.log 2>&1 \
    || { tail -30 build/wheels.log; exit 1; }
rm -f build/wheels/sni_lab-*.whl
DOCKER_BUILDKIT=0 $DOCKER build -q -t sni-lab --build-arg BASE="$BASE" . >/dev/null
t2=$(now)
echo "compose-test: base image $((t1 - t0)) s, lab image $((t2 - t1)) s"

DOCKER=$DOCKER "$PYTHON" scripts/compose-check.py
t3=$(now)
echo "compose-test: passed; base $((t1 - t0)) s, image $((t2 - t1)) s, stack $((t3 - t2)) s, total $((t3 - t0)) s"
