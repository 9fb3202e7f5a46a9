"""Talk to a running lab: its endpoints file and its control plane API (stdlib only)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import quote


class RemoteError(Exception):
    """One line for the user; `code` is the exit status."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def endpoints(state: str | Path = ".lab") -> dict:
    path = Path(state) / "endpoints.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RemoteError(f"{path}: no running lab here; start one with `sni-lab up` (or pass --state DIR)") from None
    except (OSError, ValueError) as e:
        raise RemoteError(f"{path}: unreadable ({e}); restart the lab with `sni-lab up`") from None


class Api:
    def __init__(self, state: str | Path = ".lab") -> None:
        ep = endpoints(state)
        if "control" not in ep:
            raise RemoteError("the running lab has no control plane")
        self.url = ep["control"]["url"]
        self.token = ep["control"]["token"]

    def _request(self, method: str, path: str, body: Any = None, accept: str = "application/json"):
        data = json.dumps(body, allow_nan=False).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", "Accept": accept,
                                              "Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=None if accept == "text/event-stream" else 15)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise RemoteError(f"{method} {path}: {e.code} {message}", 2 if e.code in (400, 404) else 1) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RemoteError(f"no answer from the control plane at {self.url} ({reason}); is `sni-lab up` running?") from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        with self._request(method, path, body) as resp:
            return json.loads(resp.read())

    def pages(self, path: str) -> Iterator[dict]:
        """Each page of a paged listing (`{"hostnames": [...], "next": cursor}`), the first one first."""
        page = self.call("GET", path)
        yield page
        while page.get("next") is not None:
            page = self.call("GET", next_page(path, page["next"]))
            yield page

    def stream(self, path: str) -> Iterator[dict]:
        """Server-Sent Events, one dict per event."""
        with self._request("GET", path, accept="text/event-stream") as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith("data: "):
                    yield json.loads(line[6:])


def next_page(path: str, cursor: str) -> str:
    """`path` (a paged listing, with its filters) asking for the page after `cursor`."""
    base = "&".join(p for p in path.partition("?")[2].split("&") if p and not p.startswith("cursor="))
    return f"{path.partition('?')[0]}?{base + '&' if base else ''}cursor={quote(cursor, safe='')}"


async def every(call: Callable[[str, str], Awaitable[Any]], path: str, key: str = "hostnames") -> list[dict]:
    """Every item of a paged listing, page after page, through an async `call(method, path)`
    (the scenario runner's, the demo's): for code that wants them all, in a small lab."""
    page = await call("GET", path)
    items = list(page[key])
    while page.get("next") is not None:
        page = await call("GET", next_page(path, page["next"]))
        items += page[key]
    return items
