"""Workshop exercises as data: one folder each under `lab/exercises/`, read here.

A folder `NN-slug/` holds `exercise.toml` (title, goal, story, steps, three hints, what it
teaches, a starting state, checks and a reference solution) and, for an exercise that asks
for predictions, the prediction file the attendee edits (copied into the lab's own state
directory by `start`, never edited in place). An instructor adds an exercise by adding a
folder: the checks are declarative (`lab.workshop.checks`), so no code is needed.

Loading is pure apart from reading the files; every error is one line naming the file and key.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "exercises"
HINTS = 3
CHECK_KINDS = ("event", "request", "collector", "catalog", "hostname", "zone", "predictions")
START_KEYS = {"model", "validation", "clear_overrides", "purge_hostnames", "records", "delete_records", "rules",
              "remove_zones"}
STEP_KINDS = ("run", "get", "browser", "predict")
REQUIRES = ("validation", "zones")  # control-plane APIs an exercise may need
_TOP = {"title", "goal", "story", "teaches", "steps", "hints", "requires", "start", "check", "solution"}
_FOLDER = re.compile(r"(\d{2})-[a-z0-9-]+")


class ExerciseError(ValueError):
    """A broken exercise folder: one line naming the file and the key."""


@dataclass(frozen=True)
class Exercise:
    id: str                  # the folder name, e.g. "01-follow-one-request"
    number: int
    title: str
    goal: str
    story: str
    teaches: str
    steps: tuple[str, ...]
    hints: tuple[str, ...]
    requires: tuple[str, ...]
    start: dict[str, Any]
    checks: tuple[dict[str, Any], ...]
    solution: tuple[dict[str, Any], ...]
    folder: Path
    prediction: str | None = None  # file name of the prediction template in `folder`

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "number": self.number, "title": self.title, "goal": self.goal,
                "requires": list(self.requires)}

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "story": self.story, "steps": list(self.steps), "teaches": self.teaches,
                "checks": [c.get("says", c["kind"]) for c in self.checks], "prediction": self.prediction}


def load_all(directory: Path | None = None) -> list[Exercise]:
    directory = directory or DEFAULT_DIR
    out = [load(p) for p in sorted(directory.iterdir()) if p.is_dir() and _FOLDER.fullmatch(p.name)]
    numbers = [e.number for e in out]
    for n in set(numbers):
        if numbers.count(n) > 1:
            raise ExerciseError(f"{directory}: two exercises numbered {n:02d}")
    return out


def load(folder: Path) -> Exercise:
    path = folder / "exercise.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExerciseError(f"{path}: missing") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ExerciseError(f"{path}: not valid TOML: {e}") from None

    def fail(key: str, msg: str) -> ExerciseError:
        return ExerciseError(f"{path}: {key}: {msg}")

    for key in sorted(set(data) - _TOP):
        raise fail(key, f"unknown key (expected one of {', '.join(sorted(_TOP))})")
    for key in ("title", "goal", "story", "teaches"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise fail(key, "missing (a non-empty string)")
    for key, count in (("steps", None), ("hints", HINTS)):
        items = data.get(key)
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
            raise fail(key, "missing (a list of non-empty strings)")
        if count and len(items) != count:
            raise fail(key, f"{len(items)} hints; give {count}, from a nudge to almost the answer")
    requires = data.get("requires", [])
    if not isinstance(requires, list) or any(r not in REQUIRES for r in requires):
        raise fail("requires", f"a list of {', '.join(REQUIRES)}")
    start = data.get("start", {})
    if not isinstance(start, dict):
        raise fail("start", "expected a table")
    for key in sorted(set(start) - START_KEYS):
        raise fail(f"start.{key}", f"unknown key (expected one of {', '.join(sorted(START_KEYS))})")
    checks = data.get("check")
    if not isinstance(checks, list) or not checks:
        raise fail("check", "missing (at least one [[check]])")
    prediction = None
    for i, c in enumerate(checks):
        if not isinstance(c, dict) or c.get("kind") not in CHECK_KINDS:
            raise fail(f"check[{i}].kind", f"one of {', '.join(CHECK_KINDS)}")
        if c["kind"] in ("event", "request", "zone") and not isinstance(c.get("match"), dict):
            raise fail(f"check[{i}].match", "missing (a table of fields to match)")
        if c["kind"] == "hostname" and not all(isinstance(c.get(k), str) for k in ("name", "status")):
            raise fail(f"check[{i}]", "a hostname check needs name and status")
        if c["kind"] == "catalog" and not isinstance(c.get("model"), str):
            raise fail(f"check[{i}].model", "missing (the model the catalog runs under)")
        if c["kind"] == "predictions":
            prediction = c.get("file")
            if not isinstance(prediction, str) or not (folder / prediction).is_file():
                raise fail(f"check[{i}].file", f"no prediction file {prediction!r} in {folder}")
            if not isinstance(c.get("models"), list) or not c["models"]:
                raise fail(f"check[{i}].models", "missing (the models to predict)")
    solution = data.get("solution")
    if not isinstance(solution, list) or not solution:
        raise fail("solution", "missing (at least one [[solution]] step)")
    for i, s in enumerate(solution):
        kinds = [k for k in STEP_KINDS if k in s] if isinstance(s, dict) else []
        if len(kinds) != 1:
            raise fail(f"solution[{i}]", f"give exactly one of {', '.join(STEP_KINDS)}")
    return Exercise(id=folder.name, number=int(folder.name[:2]), title=data["title"].strip(),
                    goal=data["goal"].strip(), story=data["story"].strip(), teaches=data["teaches"].strip(),
                    steps=tuple(s.strip() for s in data["steps"]), hints=tuple(h.strip() for h in data["hints"]),
                    requires=tuple(requires), start=start, checks=tuple(checks), solution=tuple(solution),
                    folder=folder, prediction=prediction)


def find(exercises: list[Exercise], ref: str) -> Exercise:
    """By number ("3", "03"), folder name, or the slug after the number."""
    ref = str(ref).strip()
    for e in exercises:
        if ref in (e.id, e.id[3:]) or (ref.isdigit() and int(ref) == e.number):
            return e
    raise ExerciseError(f"no exercise {ref!r} (choose from 1 to {len(exercises)}, or see `sni-lab workshop list`)")


_PLACE = re.compile(r"\{(ca|control|control_host|state|file|proxy|port|addr|origin)(?::([a-z0-9-]+))?\}")


def fill(text: str, ep: dict, file: str | None = None, state: str | None = None) -> str:
    """`{port:anycast}`, `{addr:saas-v1}`, `{origin:collector}`, `{ca}`, `{control}`, `{control_host}`,
    `{proxy}`, `{state}`, `{file}` from the running lab's endpoints; anything else is left as written."""
    edge = {l["name"]: l for l in ep.get("edge", ())}

    def one(m: re.Match) -> str:
        what, arg = m.group(1), m.group(2)
        if what == "port" and arg in edge:
            return str(edge[arg]["port"])
        if what == "addr" and arg in edge:
            return edge[arg]["host"]
        if what == "origin" and arg in ep.get("origins", {}):
            return ep["origins"][arg]
        if what == "ca" and "ca" in ep:
            return ep["ca"]
        if what == "control" and "control" in ep:
            return ep["control"]["url"]
        if what == "control_host" and "control" in ep:
            return urlsplit(ep["control"]["url"]).hostname or m.group(0)
        if what == "proxy" and isinstance(ep.get("proxy"), dict):
            return f"http://{ep['proxy']['host']}:{ep['proxy']['port']}"
        if what == "file" and file:
            return file
        if what == "state" and state:
            return state
        return m.group(0)
    return _PLACE.sub(one, text)
