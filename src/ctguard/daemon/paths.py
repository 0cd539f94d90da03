"""Where the daemon finds the kernel: its roots, moved by tests to prepared trees."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Paths:
    proc_root: str = "/proc"
    sys_root: str = "/sys"
    run_netns: str = "/run/netns"
