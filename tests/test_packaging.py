"""The wheel a user installs: the catalog, the exercises and the pages travel in it, and run from it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_an_installed_wheel_carries_the_catalog_and_runs_it(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "absent from the `packages` configuration" not in built.stderr
    wheel, = tmp_path.glob("sni_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source, packaged in (("scenarios", "lab/catalog"), ("lab/exercises", "lab/exercises"),
                             ("lab/static", "lab/static"), ("lab/workshop/static", "lab/workshop/static")):
        files = _files(ROOT / source)
        assert files and {f"{packaged}/{f}" for f in files} <= names, source

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import lab.scenarios as s; print(s.__file__, s.DEFAULT_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    module, catalog = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(catalog) == site / "lab" / "catalog"
    ran = subprocess.run([sys.executable, "-m", "lab", "matrix", "--model", "v1", "--json"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)["summary"]
    assert summary["cases"] == len(list((ROOT / "scenarios").glob("*.toml"))) and summary["failed"] == 0
    assert list(elsewhere.iterdir()) == []
