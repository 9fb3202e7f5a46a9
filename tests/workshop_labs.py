"""Labs for the workshop tests: `sni-lab up --free-ports` in a process of its own, and the CLI as a user runs it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lab.topology import default_path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class UpLab:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.state = directory / "state"
        self.proc = subprocess.Popen([sys.executable, "-m", "lab", "up", "--config", str(default_path()), "--free-ports",
                                      "--state", str(self.state), "--certs", str(directory / "certs"), "--json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sni-lab up did not start: {self.proc.stderr.read()}")
        self.ep = json.loads(line)
        self.url = self.ep["control"]["url"]

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lab", *args, "--state", str(self.state)], capture_output=True,
                              text=True, env=ENV, cwd=cwd or self.dir, timeout=timeout)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
