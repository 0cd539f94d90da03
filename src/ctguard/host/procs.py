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


def to_background(nice: int = 10) -> list[str]:
    """Put this process behind the traffic and the daemon's loop: niceness `nice`, then SCHED_IDLE
    (it runs only on a CPU nothing else wants; and with no I/O priority of its own set, the kernel
    gives a SCHED_IDLE task the idle I/O class: include/linux/ioprio.h, task_nice_ioclass()).

    Only ever lowers (raising needs CAP_SYS_NICE, which the unit does not grant). Never raises:
    what could not be done is returned, for the caller to say once."""
    missed = []
    try:
        os.nice(nice)
    except OSError as exc:
        missed.append(f"nice {nice}: {exc.strerror}")
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError) as exc:
        missed.append(f"SCHED_IDLE: {getattr(exc, 'strerror', exc)}")
    return missed
