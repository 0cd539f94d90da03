"""Count-only ticks between full turns: how a small, idle table is watched cheaply.

A table with little room must be looked at often: a flood of [watch] guard_rate new flows/s
(default 100,000) fills the room below `act` of a table of 8,192 in 70 ms. Issue 15 did that
with full turns (sample every namespace's stat table, decide, record, report): ~0.9 ms of Python
each, 1.08% of a core idle with one namespace and 3.10% with 50 (bench_overhead.py --max 8192).

Between full turns, a tick reads only each namespace's entry count (the first data line of the
stat file the sampler holds open: ~4 us a namespace) and wakes a full turn when a count has risen
by a tenth of its room below `act`, or reached `warn`. The last quiet tick before the wake
becomes the reference of that turn's rate (`note_quiet`), so the bump is sized on the slope over
one tick period, as when every tick was a full turn: no "stale rate" confirmation delay.

Pure: the daemon reads the counts and the clock; this decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctguard.core.decide import demand, guard_interval, next_interval
from ctguard.core.model import Decision, History, Sample

if TYPE_CHECKING:   # the policy's nouns, typed only: the core never loads a file
    from ctguard.config.policy import Policy

# A rise of this share of the room below act since the last full turn wakes one: a flood at a
# tenth of guard_rate shows within a tick or two; slower growth waits for the next full turn
# (watch.interval) unless it piles up to the same rise first.
WAKE_SHARE = 0.1
WAKE_MIN = 16               # entries: a smaller rise is churn, not growth


@dataclass(frozen=True)
class Ticks:
    """Count-only reads due every `every` seconds until the next full turn."""

    every: float
    wake: tuple[tuple[int, int], ...]       # (inode, entry count that wakes a full turn)
    losses: tuple[tuple[int, int], ...]     # (inode, drop + early_drop at the last full sample)


def plan(policy: Policy, sample: Sample, decision: Decision) -> Ticks | None:
    """Ticks until the next full turn, or None when full turns are already as frequent.

    Only an idle table gets ticks: under pressure, while confirming a rate or while growing,
    the full turns come at fast_interval (or the guard period) anyway."""
    if decision.pressure or decision.confirm:
        return None
    every = guard_interval(policy, decision.headroom)
    if every is None or every >= next_interval(policy, decision):
        return None
    t = policy.thresholds
    act = t.act * sample.limits.max
    warn = math.ceil(t.warn * sample.limits.max)
    wake = []
    for ns in sample.namespaces:
        rise = max(WAKE_MIN, math.ceil(WAKE_SHARE * max(0.0, act - ns.count)))
        wake.append((ns.inode, max(ns.count + 1, min(ns.count + rise, warn))))
    losses = tuple((ns.inode, demand(ns) - ns.count) for ns in sample.namespaces)
    return Ticks(every, tuple(wake), losses)


def woken(ticks: Ticks, counts: Mapping[int, int]) -> str | None:
    """Why these counts need a full turn now, or None (a namespace not read is left to the turn)."""
    for inode, level in ticks.wake:
        count = counts.get(inode)
        if count is not None and count >= level:
            return f"netns {inode} holds {count} entries (a full turn is due at {level})"
    return None


def note_quiet(history: History, ticks: Ticks, at: float, counts: Mapping[int, int]) -> History:
    """The last quiet tick (CLOCK_BOOTTIME `at`) as the newest point of the rate's history.

    A tick reads counts only; the losses of the last full sample stand in for the drop and
    early_drop counters, which do not move while the table has room (ticks stop at `warn`)."""
    losses = dict(ticks.losses)
    point = (at, tuple((inode, count + losses.get(inode, 0)) for inode, count in counts.items()))
    return history.with_(points=history.points + (point,))
