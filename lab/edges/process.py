"""Starting and stopping a real edge: its files in a directory of its own, the edge's own config
check, the process in the foreground as our child, ready once every listener completes a TLS
handshake, and stopped (SIGTERM, then SIGKILL) whatever happens, Ctrl-C included.
"""
from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.edges import EDGES, CertFiles, Rendered, render
from lab.edges.plan import ListenerPlan, certificate_for, offered
from lab.pki import LabCA, file_stem
from lab.policy import certificate_names
from lab.topology import World

READY_TIMEOUT = 10.0  # every listener must complete a TLS handshake within this
STOP_TIMEOUT = 5.0  # after SIGTERM, then SIGKILL
CHECK_TIMEOUT = 30.0
LOG = "edge.log"  # the edge's stdout and stderr, in its directory


class EdgeError(RuntimeError):
    """The edge could not be set up or started: `str()` is one line for the user, the edge's own words."""


def binary(edge: str) -> str | None:
    """Where the edge's executable is: next to this Python first (mitmdump in the venv), then PATH, /usr/sbin."""
    name = EDGES[edge].BINARY
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def available(edge: str) -> str | None:
    """None when the edge can run here, else why not (and how to install it)."""
    if edge not in EDGES:
        return f"unknown edge {edge!r} (choose from {', '.join(EDGES)})"
    if binary(edge) is None:
        return f"{edge} is not installed ({EDGES[edge].INSTALL})"
    return None


def version(edge: str) -> str | None:
    """The edge's version (`1.22.1`, `2.6.12-1+deb12u4`), or None when it cannot say."""
    path = binary(edge)
    if path is None:
        return None
    try:
        out = subprocess.run([path, *EDGES[edge].VERSION], capture_output=True, text=True, timeout=CHECK_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\d+\.\d+[\w.+~-]*", out.stdout + out.stderr)
    return found.group(0) if found else None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def cert_files(ca: LabCA, world: World, directory: Path | None = None,
               write_bundles: bool = True) -> dict[tuple[str, ...], CertFiles]:
    """The lab's certificates for this world (those lab.edge.certstore serves), as files. Bundles
    (certificate then key, 0600) are `directory`/bundles/*.pem, written if `write_bundles`;
    without a directory they are only named, relative to the config."""
    out = {}
    write = directory is not None and write_bundles
    bundles = directory.resolve() / "bundles" if directory is not None else Path("bundles")
    if write:
        bundles.mkdir(mode=0o700, parents=True, exist_ok=True)
    for names in certificate_names(world):
        leaf = ca.leaf(names)
        bundle = bundles / f"{file_stem(names)}.pem"
        if write:
            _write_private(bundle, leaf.cert_path.read_bytes() + leaf.key_path.read_bytes())
        out[names] = CertFiles(str(leaf.cert_path.resolve()), str(leaf.key_path.resolve()), str(bundle))
    return out


def options(edge: str) -> dict:
    """What the writer needs to know of this machine: as root, nginx's workers run as root too
    (else as `nobody`, who cannot read the 0600 keys)."""
    if edge == "nginx" and os.geteuid() == 0:
        return {"user": f"{pwd.getpwuid(0).pw_name} {grp.getgrgid(os.getegid()).gr_name}"}
    return {}


def prepare(edge: str, world: World, flavour: str, ca: LabCA, directory: Path) -> Rendered:
    """Render the edge's config and write it, with the bundles, to `directory` (0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    certs = cert_files(ca, world, directory, write_bundles=EDGES[edge].BUNDLES)
    rendered = render(edge, world, flavour, certs, **options(edge))
    for rel, text in rendered.files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return rendered


def _argv(rendered: Rendered, argv: tuple[str, ...]) -> list[str]:
    path = binary(rendered.edge)
    if path is None:
        raise EdgeError(available(rendered.edge))
    return [path, *argv[1:]]


def _env(rendered: Rendered) -> dict[str, str]:
    return {**os.environ, **rendered.env}


def check(rendered: Rendered, directory: Path) -> None:
    """The edge's own config check (nginx -t, caddy validate, haproxy -c): its message on failure."""
    if rendered.check is None:
        return
    try:
        out = subprocess.run(_argv(rendered, rendered.check), cwd=directory, env=_env(rendered), capture_output=True,
                             text=True, timeout=CHECK_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EdgeError(f"{rendered.edge}: its config check did not finish in {CHECK_TIMEOUT:g} s") from None
    if out.returncode != 0:
        said = " | ".join(line.strip() for line in (out.stderr + out.stdout).strip().splitlines()[-5:])
        raise EdgeError(f"{rendered.edge} rejected its config ({directory / rendered.main}): {said}")


def _tail(directory: Path, lines: int = 5) -> str:
    try:
        text = (directory / LOG).read_text(errors="replace")
    except OSError:
        return "no output"
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "no output"


def _probe_name(lp: ListenerPlan) -> str | None:
    """An SNI the listener serves under either flavour (an exact name with a certificate), if any."""
    names = [n for n in (*lp.names, *offered(lp)) if not n.startswith("*.")]
    return next((n for n in names if certificate_for(lp.certificates, n)), names[0] if names else None)


async def _handshake(host: str, port: int, sni: str | None, timeout: float) -> bool:
    """Did the listener complete a TLS handshake (with no SNI to offer: answer in TLS at all)?"""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # readiness only; what the edge serves is the probes' business
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni), timeout)
    except ssl.SSLError:
        return sni is None
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


async def _wait_ready(proc, rendered: Rendered, directory: Path, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = list(rendered.plan.listeners)
    exited = asyncio.ensure_future(proc.wait())
    try:
        while pending:
            if exited.done():
                raise EdgeError(f"{rendered.edge} exited with status {proc.returncode}: {_tail(directory)}")
            lp = pending[0]
            left = deadline - loop.time()
            if left <= 0:
                raise EdgeError(f"{rendered.edge}: listener {lp.name} ({lp.address}) completed no TLS handshake "
                                f"in {timeout:g} s: {_tail(directory)}")
            if await _handshake(lp.host, lp.port, _probe_name(lp), min(left, 1.0)):
                pending.pop(0)
            else:
                await asyncio.wait([exited], timeout=min(0.05, left))  # wakes at once if the edge exits
    finally:
        exited.cancel()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the edge leads its own group: its workers (nginx) go with it


async def _stop(proc, timeout: float) -> None:
    try:
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout)
    finally:  # also when cancelled while waiting (a second Ctrl-C): never leave it behind
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except BaseException:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, 0)
                raise


@dataclass
class Started:
    """What `running` yields: the edge's listeners (as the endpoints file lists them), its config, where it runs."""
    edge: str
    flavour: str
    listeners: list[dict]  # [{"name", "host", "port"}]
    rendered: Rendered
    directory: Path
    pid: int


@contextlib.asynccontextmanager
async def running(edge: str, world: World, flavour: str, ca: LabCA, workdir: str | Path | None = None, *,
                  ready_timeout: float = READY_TIMEOUT, stop_timeout: float = STOP_TIMEOUT):
    """`async with running("nginx", lab.world, "fixed", lab.ca) as started:` -> the edge serving the
    world's listeners, proxying to the world's origins (which must be running). `workdir`: where
    its files go (kept); by default a temporary directory, removed on exit."""
    reason = available(edge)
    if reason:
        raise EdgeError(reason)
    directory = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"sni-lab-{edge}-"))
    try:
        rendered = prepare(edge, world, flavour, ca, directory)
        await asyncio.to_thread(check, rendered, directory)
        with open(directory / LOG, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *_argv(rendered, rendered.command), cwd=directory, env=_env(rendered), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        try:
            await _wait_ready(proc, rendered, directory, ready_timeout)
            yield Started(edge, flavour, [{"name": lp.name, "host": lp.host, "port": lp.port}
                                          for lp in rendered.plan.listeners], rendered, directory, proc.pid)
        finally:
            await _stop(proc, stop_timeout)
    finally:
        if workdir is None:
            shutil.rmtree(directory, ignore_errors=True)
