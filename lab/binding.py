"""One wording for "cannot bind", whichever actor failed: what, where, why, and what to do."""
from __future__ import annotations

import errno
import os
import sys


def bind_error(what: str, host: str, port: int, e: OSError) -> OSError:
    """`origin victim: cannot bind 127.0.0.31:8080: address already in use`."""
    # asyncio's strerror repeats the address ("error while attempting to bind on ..."): use errno's text.
    reason = os.strerror(e.errno).lower() if e.errno else (e.strerror or str(e))
    return OSError(e.errno, f"{what}: cannot bind {host}:{port}: {reason}")


def bind_hint(e: OSError) -> str:
    """The error as one line, with what the user can do about it."""
    msg = str(e.strerror or e)
    if e.errno == errno.EADDRINUSE:
        return f"{msg} (another `sni-lab up` or program holds the port; stop it or pick other ports with --config)"
    if e.errno == errno.EADDRNOTAVAIL:
        if sys.platform == "darwin":
            return (f"{msg}: macOS has only 127.0.0.1 on loopback; add the lab's addresses with "
                    f"`for i in 2 10 11 12 31 32 33 34; do sudo ifconfig lo0 alias 127.0.0.$i up; done`, "
                    f"or run the lab with `docker compose up`")
        return f"{msg} (is that address on a local interface?)"
    return msg


def free_port(host: str) -> int:
    """A TCP port free on `host` now, for a process the lab starts but does not bind for (a
    real edge): the OS picks it, and it is released at once for that process to take."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
