"""The processes under /proc: the one walk the host role, the namespace discovery, the
other writers of max and the evidence's namespace table all use."""

from __future__ import annotations

import os
from pathlib import Path


def pids(proc_root: Path | str = "/proc") -> list[int]:
    """Every process id, ascending. OSError when /proc cannot be listed."""
    return sorted(int(p) for p in os.listdir(proc_root) if p.isdigit())


def comm(proc_root: Path | str, pid: int) -> str | None:
    """The process's name (/proc/PID/comm), or None when it is gone or unreadable."""
    try:
        return (Path(proc_root) / str(pid) / "comm").read_text().strip()
    except OSError:
        return None
