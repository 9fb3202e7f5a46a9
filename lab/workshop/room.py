"""PURE: room mode's rules: what an attendee's lab may send the instructor's, and the scoreboard.

Only check results travel: a name the attendee chose, an exercise id (or none, on joining),
passed or not, and a time. The class token rides in the Authorization header and is
compared, never stored by the attendee's side anywhere but its own lab's state.
Everything is bounded: the body, the name, the number of attendees, one record per
exercise and attendee.
"""
from __future__ import annotations

import math
import re
from typing import Any

MAX_ATTENDEES = 200
MAX_BODY = 1024
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,31}")
TOKEN = re.compile(r"[A-Za-z0-9_-]{8,64}")
_KEYS = {"name", "exercise", "passed", "time"}
_URL = re.compile(r"(https?)://([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(\d{1,5}))?/?")


class RoomError(ValueError):
    """Refused input: `status` is the HTTP answer, `str()` the reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name.strip()):
        raise RoomError("name: 1 to 32 letters, digits, spaces, '.', '_' or '-', starting with a letter or digit")
    return name.strip()


def check_token(token: Any) -> str:
    if not isinstance(token, str) or not TOKEN.fullmatch(token):
        raise RoomError("token: the class token the instructor's lab printed (8 to 64 letters, digits, - or _)")
    return token


def check_url(url: Any) -> str:
    """The instructor's control plane: http(s)://HOST:PORT, nothing else."""
    m = _URL.fullmatch(url) if isinstance(url, str) else None
    if m is None or (m.group(3) and not 0 < int(m.group(3)) < 65536):
        raise RoomError("url: the instructor's lab address, like http://192.0.2.10:8000")
    return url.rstrip("/")


def parse_report(body: Any, exercises: set[str]) -> dict:
    """{name, exercise (an id, or None on joining), passed, time}: anything else is refused."""
    if not isinstance(body, dict) or set(body) != _KEYS:
        raise RoomError(f"a report is exactly {{{', '.join(sorted(_KEYS))}}}")
    name = check_name(body["name"])
    exercise = body["exercise"]
    if exercise is not None and exercise not in exercises:
        raise RoomError("exercise: not one of this room's exercises")
    if not isinstance(body["passed"], bool):
        raise RoomError("passed: true or false")
    t = body["time"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t < 1e11:
        raise RoomError("time: seconds since the epoch")
    return {"name": name, "exercise": exercise, "passed": body["passed"], "time": float(t)}


def record(attendees: dict, report: dict, received: float) -> dict:
    """The scoreboard data with `report` folded in (a new dict); a pass, once made, stays."""
    name = report["name"]
    if name not in attendees and len(attendees) >= MAX_ATTENDEES:
        raise RoomError(f"the room is full ({MAX_ATTENDEES} attendees)", 429)
    out = {k: dict(v) for k, v in attendees.items()}
    results = out.setdefault(name, {})
    ex = report["exercise"]
    if ex is not None:
        before = results.get(ex, {})
        passed = bool(before.get("passed")) or report["passed"]
        results[ex] = {"passed": passed, "time": before.get("time") if before.get("passed") else received,
                       "tries": int(before.get("tries", 0)) + 1}
    return out


def scoreboard(attendees: dict, exercises: list[dict]) -> dict:
    ids = [e["id"] for e in exercises]
    rows = [{"name": name, "solved": sum(1 for i in ids if results.get(i, {}).get("passed")),
             "results": {i: results[i] for i in ids if i in results}} for name, results in attendees.items()]
    rows.sort(key=lambda r: (-r["solved"], r["name"].lower()))
    solved_by = {i: sum(1 for r in rows if r["results"].get(i, {}).get("passed")) for i in ids}
    return {"exercises": exercises, "attendees": rows, "solved_by": solved_by}
