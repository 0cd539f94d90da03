"""The only place ctguard reads the time: wall clock, CLOCK_BOOTTIME and the boot id."""

from __future__ import annotations

import time
from pathlib import Path

from ctguard.core.model import Instant


def boot_id(proc_root: str | Path = "/proc") -> str:
    try:
        return (Path(proc_root) / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Clock:
    def __init__(self, proc_root: str | Path = "/proc") -> None:
        self.boot_id = boot_id(proc_root)

    def now(self) -> Instant:
        return Instant(time.time(), time.clock_gettime(time.CLOCK_BOOTTIME), self.boot_id)

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()
