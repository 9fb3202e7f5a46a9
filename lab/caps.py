"""Connections held per client address and in all: the one count every listener of the lab keeps.

The edge, the resolver's TCP side and the browsers' proxy each count a connection in before
doing any work for it and out when it closes (nginx `limit_conn` under `worker_connections`).
State as data; the caps are passed in, so a limit changed at run time applies to the next
connection.
"""
from __future__ import annotations


class Caps:
    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        self.total = 0
        self.refused = 0  # since start, for anyone counting

    def admit(self, client: str, total: int, per_client: int) -> str | None:
        """Count a connection from `client` in (None), or name the cap it met: "total" or "client"."""
        if self.total >= total:
            met = "total"
        elif self.open.get(client, 0) >= per_client:
            met = "client"
        else:
            self.open[client] = self.open.get(client, 0) + 1
            self.total += 1
            return None
        self.refused += 1
        return met

    def release(self, client: str) -> None:
        n = self.open.get(client, 0) - 1
        if n > 0:
            self.open[client] = n
        else:
            self.open.pop(client, None)
        self.total = max(self.total - 1, 0)
