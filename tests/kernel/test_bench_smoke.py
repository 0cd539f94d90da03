"""Each benchmark under bench/ runs in its tiny configuration (`--quick`) and prints its table.

Never a timing assertion here: the figures are for bench/README.md, not for pass/fail. What
is checked is that the command works end to end (exit 0), that the table has its header and
one row per run, and that the kernel values are restored afterwards.
"""

from __future__ import annotations

import pytest

from helpers.bench import run_bench
from helpers.kernelenv import needs_kernel

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder



def rows(out: str, first_word: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.split()[:1] == [first_word]]


def test_ramp_quick() -> None:
    out = run_bench("bench_ramp.py")
    assert "drop" in out and "1st bump ms" in out and "final max" in out
    runs = rows(out, "5000")
    assert [r[1] for r in runs] == ["none", "reactive", "default"]
    assert "resize ms" in out and rows(out, "20000"), out


def test_overhead_quick() -> None:
    out = run_bench("bench_overhead.py")
    assert "% core" in out and "RSS MB" in out
    cases = {line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith("#")}
    assert {"idle1", "idle50", "pressure"} <= cases, out


def test_journal_latency_quick() -> None:
    from helpers.journald import journald_unavailable_reason

    reason = journald_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = run_bench("bench_journal_latency.py")
    assert "latency ms" in out
    assert len(rows(out, "1")) == 1 and len(rows(out, "2")) == 1, out
    assert "median" in out, out


def test_resize_quick() -> None:
    out = run_bench("bench_resize.py")
    assert "wd gap" in out and "full->bump" in out, out
    assert {r[0] for r in rows(out, "never") + rows(out, "at-once")} == {"never", "at-once"}, out
    assert "max/buckets 4" in out and "resize x2" in out, out
