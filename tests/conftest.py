import shutil
from pathlib import Path

import pytest

from lab.pki import LabCA
from lab.world import load


@pytest.fixture(scope="session")
def world():
    return load()


@pytest.fixture(scope="session")
def ca(tmp_path_factory):
    return LabCA.open(tmp_path_factory.mktemp("certs"))


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        pytest.skip(f"{tool} is not installed (make test installs it via scripts/sysdeps.sh)")
    return path
