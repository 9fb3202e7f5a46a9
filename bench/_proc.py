"""A process's CPU time from Linux /proc, for the benches (a helper: `python -m bench` skips it)."""
from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the process's name, which may hold spaces (state, ppid, pgrp, ...;
    utime and stime are [11] and [12]); None when the process is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far; None as for `stat_fields`."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK
