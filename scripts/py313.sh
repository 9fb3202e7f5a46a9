#!/bin/sh
# The mitmproxy engine on mitmproxy 12.x: pip resolves 11.0.x on Python 3.11 (the main
# venv) and 12.x on 3.12+, so run the engine's tests once more with a Python 3.13.
#
#   sh scripts/py313.sh [pytest args...]
#
# Finds a Python 3.13 that really runs (a pyenv shim may be on PATH and fail), keeps its
# own venv in .venv-py313 (reinstalled only when pyproject.toml changed, like the
# Makefile's stamps), then runs the engine tests there (every file with the `engine` fixture).
# Without a Python 3.13 it says so and exits 0. PYTHON313=/path/to/python3.13 picks one.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV313:-.venv-py313}
STAMP=$VENV/.installed-mitmproxy

is_313() {
    [ -n "$1" ] && [ -x "$1" ] &&
        "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1
}

find_python() {
    for candidate in "${PYTHON313:-}" "$(command -v python3.13 2>/dev/null || true)" \
        "${PYENV_ROOT:-/root/.pyenv}"/versions/3.13*/bin/python3.13 \
        /root/.pyenv/versions/3.13*/bin/python3.13 \
        /usr/bin/python3.13 /usr/local/bin/python3.13; do
        if is_313 "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# A venv whose interpreter no longer runs (its Python was removed) is rebuilt.
if [ -d "$VENV" ] && ! is_313 "$VENV/bin/python"; then
    echo "$VENV: its python does not run any more; recreating it"
    rm -rf "$VENV"
fi

if [ ! -x "$VENV/bin/python" ]; then
    if ! PY=$(find_python); then
        echo "python3.13 not found: skipping the mitmproxy 12.x engine tests"
        exit 0
    fi
    echo "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# Reinstall only when the project's metadata changed (the package itself is editable).
if [ ! -f "$STAMP" ] || [ -n "$(find pyproject.toml -newer "$STAMP" 2>/dev/null)" ]; then
    "$VENV/bin/python" -m pip install -q -e '.[test,mitmproxy]'
    touch "$STAMP"
fi

"$VENV/bin/python" -c 'import mitmproxy.version as v, sys; print(f"Python {sys.version.split()[0]}, mitmproxy {v.VERSION}")'
exec "$VENV/bin/python" -m pytest tests/test_mitm.py tests/test_edge.py tests/test_http1.py tests/test_http2.py \
    tests/test_tls.py tests/test_faults_origin.py "$@"
