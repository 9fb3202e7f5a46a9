"""What every origin app shares: its keys and how it answers with a page."""
from __future__ import annotations

from aiohttp import web

from lab.topology import Origin, World

ORIGIN_KEY = web.AppKey("origin", Origin)


def html_response(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=headers)


class WorldRef:
    """The world as it is now, for handlers that need what is bound after the origins start
    (the edge's ports): `Origins.set_world` updates it."""

    def __init__(self, world: World) -> None:
        self.world = world


WORLD_KEY = web.AppKey("world", WorldRef)
