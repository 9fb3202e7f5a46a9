"""The documents a user reads say what the code does."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lab.topology import Limits

ROOT = Path(__file__).resolve().parents[1]


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_every_limit_is_in_the_readme_with_its_default():
    table = _section((ROOT / "README.md").read_text(), "Limits and defaults")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}
    fields = {f.name for f in dataclasses.fields(Limits)}
    assert fields - named == set(), "limits the README does not list"
    assert named - fields == set(), "the README lists limits the code does not have"
    for f in dataclasses.fields(Limits):
        row = next(r for r in rows if f"`{f.name}`" in r.split("|")[1])
        default = f.default
        shown = row.split("|")[2]
        numbers = [float(n.replace(",", "")) for n in re.findall(r"[\d,]+(?:\.\d+)?", shown)]
        units = {"KiB": 1024, "MiB": 1024 ** 2}
        scaled = [float(n) * units[u] for n, u in re.findall(r"([\d.]+) (KiB|MiB)", shown)]
        assert default in numbers or float(default) in scaled, f"{f.name}: default {default} not in {shown!r}"


def test_no_project_document_cites_a_design_file_users_do_not_have():
    cited = []
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("scenarios/**/*"), *ROOT.glob("lab/**/*.py")]:
        if path.is_file() and re.search(r"\.\./shared|(^|[^/])DESIGN\.md", path.read_text(errors="replace")):
            cited.append(str(path.relative_to(ROOT)))
    assert cited == [], "point these at docs/design.md"


def test_the_model_tables_are_the_code_s():
    from lab import models

    table = models.markdown().split("\n\n")[0].strip()
    for doc in ("README.md", "docs/design.md"):
        assert table in (ROOT / doc).read_text(), f"{doc}: the models table differs from lab/models.py"
