"""Load the world file: read it, parse it (`lab.topology`), then the checks only the
deciding code can make (`policy.check_world`: every WAF rule compiles).

It sits above both, so the world's types never import the WAF or CEL and the imports
run one way: waf <- policy <- world. Every error is a `WorldError` with one line.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from lab import policy
from lab.topology import World, WorldError, default_path, parse


def load(path: str | Path | None = None) -> World:
    path = Path(path) if path else default_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise WorldError(f"{path}: no such file") from None
    except OSError as e:
        raise WorldError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WorldError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise WorldError(f"{path}: not valid TOML: {e}") from None
    world = parse(data, str(path))
    policy.check_world(world)
    return world
