"""How fast a real kernel table-full line reaches `read_events()` (root; ~1 minute).

Measures, over several floods, the time from the kernel's printk timestamp of the first
table-full line to the moment `read_events()` returns it, for the default follower
(journal + /dev/kmsg fast path) and for the journal alone. Run it with -s to see figures:

    sudo python3 -m pytest -s -q tests/kernel/test_journal_latency.py
    CTGUARD_LATENCY_RUNS=20 CTGUARD_LATENCY_OUT=/tmp/lat.json sudo python3 -m pytest -s -q tests/kernel/test_journal_latency.py

The kernel prints at most 10 such lines per 5 s (net_ratelimit), so floods are 5.5 s apart.
"""

from __future__ import annotations

import json
import os
import selectors
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctguard.host.journal import JournalFollower
from helpers import kernelenv
from helpers.kernelenv import kernel_ready, netns_pair, saved_kernel_values, set_max

pytestmark = pytest.mark.skipif(kernel_ready() is not None, reason=str(kernel_ready()))

RUNS = int(os.environ.get("CTGUARD_LATENCY_RUNS", "10"))


def p95(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def test_latency_kernel_line_to_read_events(journald) -> None:  # noqa: F811
    results: dict[str, list[float]] = {"kmsg+journal": [], "journal": []}
    fast = JournalFollower(kmsg=Path("/dev/kmsg"))
    slow = JournalFollower()
    if fast._kmsg is None:
        results.pop("kmsg+journal")
    sel = selectors.DefaultSelector()
    sel.register(fast.fileno(), selectors.EVENT_READ, ("kmsg+journal", fast))
    sel.register(slow.fileno(), selectors.EVENT_READ, ("journal", slow))
    try:
        with saved_kernel_values(), netns_pair("ctgl") as pair:
            set_max(2048)
            inode = pair.receiver_inode
            port = 1
            for _ in range(RUNS):
                fast.read_events(), slow.read_events()
                started = time.monotonic()
                # In the background, so the followers see lines while the flood still runs.
                flood = subprocess.Popen(
                    ["ip", "netns", "exec", pair.sender, sys.executable, "-c", kernelenv.FLOOD_SCRIPT,
                     pair.receiver_addr, "4096", "0", str(port)],
                )
                port = (port + 4096) % 60000 + 1
                got: dict[str, float] = {}
                deadline = started + 3.0
                while len(got) < len(results) and time.monotonic() < deadline:
                    for key, _ in sel.select(deadline - time.monotonic()):
                        name, follower = key.data
                        evs = [e for e in follower.read_events() if e.netns == inode and not e.suppressed]
                        now = time.monotonic()
                        if evs and name not in got:
                            got[name] = now - evs[0].monotonic
                flood.wait(30)
                for name, lat in got.items():
                    if name in results:
                        results[name].append(lat)
                time.sleep(max(0.0, started + 5.5 - time.monotonic()))
    finally:
        sel.close()
        fast.close()
        slow.close()

    report = {
        name: {
            "runs": len(v),
            "median_ms": round(statistics.median(v) * 1000, 1) if v else None,
            "p95_ms": round(p95(v) * 1000, 1) if v else None,
            "max_ms": round(max(v) * 1000, 1) if v else None,
        }
        for name, v in results.items()
    }
    print("\nlatency from the kernel's table-full line to read_events():", json.dumps(report, indent=2))
    if out := os.environ.get("CTGUARD_LATENCY_OUT"):
        Path(out).write_text(json.dumps({"report": report, "samples_s": results}, indent=2))
    for name, v in results.items():
        assert len(v) >= RUNS // 2, f"{name}: only {len(v)} of {RUNS} floods produced a line in time"
    if "kmsg+journal" in results:
        assert statistics.median(results["kmsg+journal"]) < 0.25
    assert statistics.median(results["journal"]) < 1.0
