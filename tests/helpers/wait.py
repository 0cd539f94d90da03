"""Waiting for a condition: the one poll loop of the tests, the benchmarks and the system test."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """True as soon as `predicate()` is true, polling every `interval` s; after `timeout` s, its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
