"""A benchmark's --quick run as a smoke test: it must finish, and restore the kernel's values."""

from __future__ import annotations

import subprocess
import sys

from helpers.kernelenv import get_buckets, get_max, kernel_lock
from helpers.paths import REPO

BENCH = REPO / "bench"


def run_bench(name: str, *args: str, timeout: float = 300) -> str:
    with kernel_lock():
        before = (get_max(), get_buckets())
    proc = subprocess.run([sys.executable, str(BENCH / name), "--quick", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with kernel_lock():
        assert (get_max(), get_buckets()) == before, "the benchmark restores nf_conntrack_max and hashsize"
    return proc.stdout
