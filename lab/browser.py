"""`sni-lab browser`: a real Chromium on the lab's network, with the padlock as its own verdict.

The profile is throwaway: a HOME whose NSS database (`$HOME/.pki/nssdb`, where Chromium
on Linux reads user-added roots) trusts the lab CA, and a fresh user-data-dir. The
browser reaches the lab through its CONNECT proxy, which resolves every name through
the lab resolver as that browser, so a poisoning made while the browser is open reaches
it. No certificate check is ever switched off: without the CA in the database, the lab's
pages fail with the browser's own certificate error.

`prepare()` gives the same launch (arguments, environment, URL) to the CLI, the tests
and the demo's Playwright: `chromium.launch_persistent_context(str(launch.user_data_dir),
executable_path=..., env=launch.env, args=launch.args)`.

`sni-lab browser` also opens DevTools on a loopback port the browser picks and records it
in the lab's state directory (`browser.json`, 0600): `sni-lab demo` attaches there
(Playwright's `connect_over_cdp`) and drives this same browser, its session included.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lab.remote import RemoteError, endpoints

CHROMIUM = "/usr/bin/chromium"  # Debian's
CA_NICKNAME = "sni-lab CA"
# Chromium's own traffic (updates, sync, account services) would go through the proxy,
# which refuses it: turn it off rather than fill the event log. No QUIC: a proxy carries TCP.
FLAGS = ("--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
         "--disable-quic", "--no-default-browser-check")


BROWSER_FILE = "browser.json"  # in the lab's state directory, while `sni-lab browser` runs
DEVTOOLS_WAIT = 30.0  # s for Chromium to listen for DevTools (a cold start on a busy laptop)


class BrowserError(Exception):
    """One line for the user (exit 1)."""


@dataclass(frozen=True)
class Launch:
    home: Path           # HOME for the browser: its .pki/nssdb holds the lab CA (or not)
    user_data_dir: Path
    proxy: str           # http://HOST:PORT, the lab's CONNECT proxy
    url: str             # the victim's site on the edge
    args: tuple[str, ...]  # everything but --user-data-dir (Playwright passes that itself)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home)}

    def command(self, chromium: str, url: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        return [chromium, f"--user-data-dir={self.user_data_dir}", *self.args, *extra, url or self.url]


def proxy_url(ep: dict) -> str:
    proxy = ep.get("proxy")
    if not isinstance(proxy, dict) or "host" not in proxy or "port" not in proxy:
        raise BrowserError("the running lab has no proxy in its endpoints.json; restart it with `sni-lab up`")
    host = proxy["host"]
    return f"http://{'[' + host + ']' if ':' in host else host}:{proxy['port']}"


def victim_url(ep: dict) -> str:
    """https://www.victim.example:PORT/ on the shared (anycast) listener, the one without a zone."""
    listener = next((l for l in ep.get("edge", ()) if not l.get("zone")), None)
    if listener is None:
        raise BrowserError("the running lab has no shared edge listener")
    return f"https://www.victim.example:{listener['port']}/"


def find_tool(name: str, given: str | None = None) -> str:
    path = shutil.which(given or name)
    if path is None:
        hint = {"certutil": "install libnss3-tools (apt install libnss3-tools)",
                "chromium": "install Debian's chromium (apt install chromium) or pass --chromium PATH"}.get(name, "")
        raise BrowserError(f"{given or name} not found: {hint}" if not given else f"--chromium {given}: not found")
    return path


def nss_db(home: Path, certutil: str) -> Path:
    """home/.pki/nssdb, created empty (no password) if missing."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (db / "cert9.db").exists():
        _certutil(certutil, "-N", "--empty-password", "-d", f"sql:{db}")
    return db


def trust_ca(db: Path, ca: str, certutil: str) -> None:
    """Make the NSS database trust `ca` to identify websites."""
    # A kept profile may hold the CA of an earlier lab (certs/ regenerated): replace it.
    subprocess.run([certutil, "-D", "-n", CA_NICKNAME, "-d", f"sql:{db}"], capture_output=True)
    _certutil(certutil, "-A", "-t", "C,,", "-n", CA_NICKNAME, "-i", ca, "-d", f"sql:{db}")


def _certutil(certutil: str, *args: str) -> None:
    done = subprocess.run([certutil, *args], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise BrowserError(f"certutil {args[0]} failed: {why[-1] if why else f'exit {done.returncode}'}")


def prepare(ep: dict, directory: str | Path, trust: bool = True, certutil: str | None = None) -> Launch:
    """A profile under `directory` for the lab of endpoints `ep`; `trust=False` leaves the CA
    out of its NSS database (the control run: the browser must then refuse the lab's pages)."""
    directory = Path(directory)
    home, user_data_dir = directory / "home", directory / "chromium"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    user_data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    proxy = proxy_url(ep)
    certutil = find_tool("certutil", certutil)
    db = nss_db(home, certutil)
    if trust:
        trust_ca(db, ep["ca"], certutil)
    args = [f"--proxy-server={proxy}", *FLAGS]  # loopback stays direct (Chromium's default): the control page
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    return Launch(home, user_data_dir, proxy, victim_url(ep), tuple(args))


def manual_settings(ep: dict) -> str:
    """What to set by hand in another browser."""
    proxy = proxy_url(ep).removeprefix("http://")
    host, _, port = proxy.rpartition(":")
    return "\n".join([
        "Other browsers: make two settings by hand",
        f"  proxy  HTTPS (CONNECT) proxy {proxy}; leave loopback addresses direct",
        f"  CA     import {ep['ca']} as an authority trusted to identify websites",
        f"  Firefox: Settings > Network Settings > Manual proxy configuration > HTTPS Proxy {host} Port {port};",
        "           Settings > Privacy & Security > Certificates > View Certificates > Authorities > Import",
        f"           {ep['ca']}, tick \"Trust this CA to identify websites\"",
        f"  then open {victim_url(ep)}",
    ])


def devtools_url(user_data_dir: Path, proc: subprocess.Popen, within: float = DEVTOOLS_WAIT) -> str:
    """http://127.0.0.1:PORT, read from the DevToolsActivePort file Chromium writes into its
    profile once it listens (`--remote-debugging-port=0`: a free port of its choosing)."""
    path = user_data_dir / "DevToolsActivePort"
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError, ValueError, IndexError):
            port = int(path.read_text().splitlines()[0])
            if 0 < port < 65536:
                return f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise BrowserError(f"the browser exited (status {proc.returncode}) before it opened DevTools")
        if time.monotonic() > deadline:
            raise BrowserError(f"the browser wrote no {path} within {within:g}s")
        time.sleep(0.05)


def attached(state: str | Path) -> dict | None:
    """The browser `sni-lab browser` recorded for the lab of `state` ({"cdp", "pid", ...}), or None."""
    try:
        found = json.loads((Path(state) / BROWSER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("cdp"), str) else None


def _record(state: str | Path, info: dict) -> Path:
    path = Path(state) / BROWSER_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # its DevTools drive the browser
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info) + "\n")
    return path


def _forget(path: Path, pid: int) -> None:
    """Remove the record if it is still this browser's (another may have replaced it)."""
    if (attached(path.parent) or {}).get("pid") == pid:
        path.unlink(missing_ok=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def browser_command(args) -> int:
    """`sni-lab browser [--profile DIR] [--chromium PATH] [--url URL] [--headless]`: runs until the browser closes."""
    try:
        ep = endpoints(args.state)
        chromium = find_tool("chromium", args.chromium or (CHROMIUM if Path(CHROMIUM).exists() else None))
        if not args.headless and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise BrowserError("no display (DISPLAY and WAYLAND_DISPLAY unset): run it from a desktop session "
                               "(or pass --headless, for `sni-lab demo` to drive it unseen)")
        kept = contextlib.nullcontext(args.profile) if args.profile else None
        with kept or tempfile.TemporaryDirectory(prefix="sni-lab-browser-") as directory:
            launch = prepare(ep, directory)
            print(f"Chromium through the lab proxy {launch.proxy}, trusting {ep['ca']} "
                  f"(profile {args.profile or 'throwaway'})")
            print(manual_settings(ep))
            (launch.user_data_dir / "DevToolsActivePort").unlink(missing_ok=True)  # a kept profile's last run
            extra = ("--remote-debugging-port=0",) + (("--headless",) if args.headless else ())
            # SIGTERM ends it as Ctrl-C does: the browser closes and its record goes with it.
            signal.signal(signal.SIGTERM, _interrupt)
            proc = subprocess.Popen(launch.command(chromium, args.url, extra), env=launch.env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            record = None
            try:
                cdp = devtools_url(launch.user_data_dir, proc)
                record = _record(args.state, {"cdp": cdp, "pid": proc.pid, "proxy": launch.proxy,
                                              "started": time.time()})
                print(f"DevTools at {cdp} (recorded in {record}): `sni-lab demo` drives this browser", flush=True)
                return 0 if proc.wait() == 0 else 1
            except KeyboardInterrupt:
                return 130
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                if record is not None:
                    _forget(record, proc.pid)
    except (RemoteError, BrowserError, OSError) as e:
        print(f"sni-lab: error: {e}", file=sys.stderr)
        return 1
