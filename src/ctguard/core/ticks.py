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

Issue 21 (scale of the host): while every table is calm (no pressure, no incident, no relief, no
resize), ticks also stand in for the full turns themselves. A full turn costs ~70 us a namespace
(the whole stat table parsed, decided, recorded, rendered for metrics): 2.1% of a core idle at 250
namespaces. A calm host therefore gets a tick every `watch.interval` (or the guard period, when
shorter) and a full turn only every IDLE_TURNS intervals (5 s), unless a tick wakes one sooner:
  - a count reaches its wake level (above), or
  - a count has grown, since the last full turn, at a pace that would fill the table within the
    window in which a full turn samples fast (`next_interval`'s "growing": 3 x max(horizon,
    interval)); checked once a tick is at least `watch.interval` past the full turn, which is when
    the full turn of a 1-per-interval schedule would have seen that growth, or
  - nf_conntrack_max changed (another writer), or the namespaces changed (/run/netns); the
    daemon checks those and passes `changed`.
What a calm tick does not see: the event counters. `drop` and `early_drop` only move with a full
table (a count at `warn` wakes a turn, and the kernel's table-full line wakes one at once);
`insert_failed` (clashes) and `invalid` can move at any fill, and are read at the next full
turn: within IDLE_TURNS intervals.

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
# Full turns while every table is calm come every IDLE_TURNS x watch.interval, ticks between them
# (see above): 5 s at the default interval keeps the idle cost of 250 namespaces under 0.5% of a
# core and a missed counter (insert_failed) near; a shorter interval the operator chose shortens it.
IDLE_TURNS = 5


@dataclass(frozen=True)
class Ticks:
    """Count-only reads due every `every` seconds until the next full turn, `full_in` seconds
    after the full sample taken at `at` (CLOCK_BOOTTIME)."""

    every: float
    wake: tuple[tuple[int, int], ...]       # (inode, entry count that wakes a full turn)
    losses: tuple[tuple[int, int], ...]     # (inode, drop + early_drop at the last full sample)
    full_in: float = math.inf               # seconds from the full sample to the next full turn
    at: float = 0.0                         # boot time of that full sample
    max: int = 0                            # nf_conntrack_max it read (another value wakes a turn)
    # (inode, count at the full sample, entries per second of growth that wakes a turn): the pace
    # that fills the table within the "growing" window, checked from `after` seconds on.
    pace: tuple[tuple[int, int, float], ...] = ()
    after: float = math.inf


def calm(history: History | None, sample: Sample) -> bool:
    """Whether full turns may be spaced out: no open incident, no relief held, no resize running."""
    if sample.resizing is not None:
        return False
    return history is None or (history.incident is None and not history.relief.active)


def plan(policy: Policy, sample: Sample, decision: Decision, history: History | None = None) -> Ticks | None:
    """Ticks until the next full turn, or None when full turns are already as frequent.

    Only an idle table gets ticks: under pressure, while confirming a rate or while growing,
    the full turns come at fast_interval (or the guard period) anyway. A calm host (`calm`) has
    its next full turn IDLE_TURNS intervals away, ticks every watch.interval in between."""
    if decision.pressure or decision.confirm:
        return None
    guard = guard_interval(policy, decision.headroom)
    if guard is None:       # the guard off ([watch] guard_rate = 0) or no headroom: full turns only
        return None
    turn = next_interval(policy, decision)
    every = min(guard, policy.watch.interval)
    idle = turn >= policy.watch.interval and calm(history, sample)
    full_in = max(turn, IDLE_TURNS * policy.watch.interval) if idle else turn
    if every >= full_in:
        return None
    t = policy.thresholds
    kmax = sample.limits.max
    act = t.act * kmax
    warn = math.ceil(t.warn * kmax)
    window = max(t.horizon, policy.watch.interval) * 3
    wake = []
    pace = []
    for ns in sample.namespaces:
        rise = max(WAKE_MIN, math.ceil(WAKE_SHARE * max(0.0, act - ns.count)))
        wake.append((ns.inode, max(ns.count + 1, min(ns.count + rise, warn))))
        pace.append((ns.inode, ns.count, max(0, kmax - ns.count) / window))
    losses = tuple((ns.inode, demand(ns) - ns.count) for ns in sample.namespaces)
    return Ticks(every, tuple(wake), losses, full_in, sample.at.boot, kmax, tuple(pace),
                 policy.watch.interval if idle else math.inf)


def woken(ticks: Ticks, counts: Mapping[int, int], at: float | None = None, kmax: int | None = None,
          changed: str = "") -> str | None:
    """Why these counts (read at boot time `at`, with nf_conntrack_max `kmax`) need a full turn
    now, or None (a namespace not read is left to the turn). `changed`: what the daemon saw change
    besides the counts (the namespaces), "" when nothing."""
    if changed:
        return changed
    if kmax is not None and ticks.max and kmax != ticks.max:
        return f"nf_conntrack_max is {kmax}, not {ticks.max}"
    for inode, level in ticks.wake:
        count = counts.get(inode)
        if count is not None and count >= level:
            return f"netns {inode} holds {count} entries (a full turn is due at {level})"
    elapsed = None if at is None else at - ticks.at
    if elapsed is not None and elapsed >= ticks.after:
        for inode, start, pace in ticks.pace:
            count = counts.get(inode)
            if count is not None and count - start >= max(WAKE_MIN, pace * elapsed):
                return (f"netns {inode} grew by {count - start} entries in {elapsed:.1f} s "
                        f"(a full turn is due at {pace:.0f}/s)")
    return None


def note_quiet(history: History, ticks: Ticks, at: float, counts: Mapping[int, int]) -> History:
    """The last quiet tick (CLOCK_BOOTTIME `at`) as the newest point of the rate's history.

    A tick reads counts only; the losses of the last full sample stand in for the drop and
    early_drop counters, which do not move while the table has room (ticks stop at `warn`)."""
    losses = dict(ticks.losses)
    point = (at, tuple((inode, count + losses.get(inode, 0)) for inode, count in counts.items()))
    return history.with_(points=history.points + (point,))
