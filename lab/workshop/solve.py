"""Apply an exercise's reference solution as an attendee would: the same commands, the same requests.

`run` steps are `sni-lab` command lines, run in this process against the lab of `state`;
`get` is what curl does (the lab resolver's answer, then https verified against the lab CA);
`predict` writes the predictions into the attendee's file; `browser` steps are the
attendee's to do in `sni-lab browser` (a test passes a driver that does them in Chromium).
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from lab.client import probe
from lab.dns import query
from lab.remote import RemoteError

Browser = Callable[[dict], Awaitable[None]]
_LOOKUP = re.compile(r"\{(txt_name|txt_token):([a-z0-9.-]+)\}")


async def apply(ep: dict, state: str, steps: list[dict], file: str | None = None, browser: Browser | None = None,
                say: Callable[[str], None] = print) -> list[str]:
    """Run every step in order; returns the steps left to do by hand (browser steps, without a driver)."""
    from lab.cli import main

    manual = []
    for step in steps:
        if "run" in step:
            line = await _lookups(ep, step["run"])
            argv = shlex.split(line)
            if not argv or argv[0] != "sni-lab":
                raise RemoteError(f"solution step {line!r}: not an sni-lab command")
            say(f"$ {line}")
            try:
                code = await asyncio.to_thread(main, [*argv[1:], "--state", state])
            except SystemExit as e:  # argparse: a usage error in the exercise file
                code = e.code
            if code != 0:
                raise RemoteError(f"solution step `{line}` failed (exit {code})")
        elif "get" in step:
            say(f"$ {step.get('show') or 'GET https://' + step['get'] + '/'}")
            say("  " + await get(ep, step["get"], step.get("path", "/")))
        elif "predict" in step:
            write_predictions(Path(file), step["predict"])
            say(f"predictions written to {file}")
        elif browser is not None:
            say(f"browser: {step.get('show') or step['browser']}")
            await browser(step)
        else:
            manual.append(step.get("show") or f"in the browser: {step['browser']} {step.get('url', '')}")
    return manual


async def _lookups(ep: dict, line: str) -> str:
    """`{txt_name:NAME}`, `{txt_token:NAME}`: from the custom hostname NAME's registration."""
    names = {m.group(2) for m in _LOOKUP.finditer(line)}
    found = {}
    if names:
        control = ep["control"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            for name in names:
                async with s.get(f"{control['url']}/hostnames/{name}") as r:
                    if r.status != 200:
                        raise RemoteError(f"solution: {name} is not registered")
                    found[name] = await r.json()
    return _LOOKUP.sub(lambda m: str(found[m.group(2)][m.group(1)]), line)


async def get(ep: dict, name: str, path: str = "/") -> str:
    """GET https://NAME/PATH as curl would: the lab resolver's address, SNI and Host NAME, the lab CA."""
    trace = "ws-" + os.urandom(4).hex()  # the resolver's answer and the edge's decision name the same request
    dns = ep["dns"]
    reply = await query(name, "A", dns["host"], dns["port"], trace=trace)
    addrs = [str(rr.rdata) for rr in reply.rr if rr.rtype == 1]
    edge = {l["host"]: l for l in ep["edge"]}
    if not addrs or addrs[0] not in edge:
        return f"{name}: the lab resolver answered {addrs or 'no address'}, not an edge listener"
    listener = edge[addrs[0]]
    out = await probe(addrs[0], listener["port"], name, [{"host": name, "path": path,
                                                          "headers": [("X-Lab-Trace", trace)]}], ep["ca"])
    if out.tls_error or out.response is None:
        return f"{name} at {addrs[0]}: {out.tls_error or out.error}"
    return f"{out.response.status} from {out.response.origin or 'the edge'} ({listener['name']} {addrs[0]})"


def write_predictions(file: Path, predictions: dict) -> None:
    """Replace the [expect] table (the last part of a prediction file) with `predictions`."""
    text = file.read_text(encoding="utf-8")
    head, sep, _ = text.partition("\n[expect]")
    if not sep:
        raise RemoteError(f"{file}: no [expect] table")

    def value(v):
        return "[" + ", ".join(f'"{x}"' for x in v) + "]" if isinstance(v, list) else f'"{v}"'
    lines = [f'{k if re.fullmatch(r"[a-z0-9_]+", k) else chr(34) + k + chr(34)} = {value(v)}' for k, v in predictions.items()]
    file.write_text(head + "\n[expect]\n" + "\n".join(lines) + "\n", encoding="utf-8")
