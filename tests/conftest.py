import contextlib
import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest

from lab.pki import LabCA
from lab.run import Lab
from lab.world import load

MITMPROXY = importlib.util.find_spec("mitmproxy") is not None
ENGINES = ["native", pytest.param("mitmproxy", marks=pytest.mark.skipif(
    not MITMPROXY, reason="the mitmproxy engine needs the extra: pip install 'sni-lab[mitmproxy]'"))]
# For a test that reads the native engine's own state (its protocol objects, its connections).
NATIVE_ONLY = pytest.mark.parametrize("engine", ["native"], indirect=True)


@pytest.fixture(scope="session")
def world():
    return load()


@pytest.fixture(scope="session")
def ca(tmp_path_factory):
    return LabCA.open(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    """Every engine test runs on both engines: the module's `lab` fixture starts the one named here."""
    if request.param == "mitmproxy":
        from lab.edge.mitm import MitmEdge
        if MitmEdge._active is not None:
            pytest.skip("another mitmproxy engine runs in this process: mitmproxy allows one")
    return request.param


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        pytest.skip(f"{tool} is not installed (make test installs it via scripts/sysdeps.sh)")
    return path


@contextlib.asynccontextmanager
async def engine_lab(engine: str, world, certs):
    """The world on free ports under `v2`, carried by `engine`: the edge test modules' `lab`."""
    async with Lab(world.with_free_ports(), certs, engine=engine) as running:
        running.set_model("v2")
        yield running


@contextlib.contextmanager
def limits(lab, **changes):
    """New connections get these limits; the world is restored afterwards."""
    saved = lab.world
    lab.set_world(dataclasses.replace(saved, limits=dataclasses.replace(saved.limits, **changes)))
    try:
        yield lab.world.limits
    finally:
        lab.set_world(saved)


@contextlib.contextmanager
def victim_at(lab, port: int, **changes):
    """Origin `victim` at 127.0.0.1:`port` (and these limits); the world is restored afterwards."""
    saved = lab.world
    lab.set_world(dataclasses.replace(
        saved, limits=dataclasses.replace(saved.limits, **changes),
        origins=tuple(dataclasses.replace(o, host="127.0.0.1", port=port) if o.name == "victim" else o
                      for o in saved.origins)))
    try:
        yield
    finally:
        lab.set_world(saved)
