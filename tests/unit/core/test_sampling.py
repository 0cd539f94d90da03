"""How often a table is looked at: full turns and, between them, count-only ticks ([watch] guard_rate,
issue 15), as rows of (policy, reading) -> (turn interval, tick interval), and when a tick wakes a turn."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core import ticks
from ctguard.core.decide import MIN_GUARD_INTERVAL, advance, current_rate, decide, next_interval
from ctguard.core.model import History, Incident, Relieved, ReliefState, Sample, SetMax
from helpers.builders import at, pol, sample

NS = 4026531000


IDLE = ticks.IDLE_TURNS * 1.0      # at the default interval of 1 s


@pytest.mark.parametrize("text, max_, count, points, turn, tick, full", [
    # idle: count-only ticks every watch.interval, or as often as the headroom to act lasts at
    # guard_rate new flows/s when that is sooner; a calm host's full turns every IDLE_TURNS intervals
    ("", 8192, 100, (), 1.0, (6963 - 100) / 100_000, IDLE),
    ("[watch]\nguard_rate = 25000", 8192, 100, (), 1.0, (6963 - 100) / 25_000, IDLE),
    ("", 65536, 100, (), 1.0, (55705 - 100) / 100_000, IDLE),
    ("", 262144, 100, (), 1.0, 1.0, IDLE),                    # 2.2 s of headroom: ticks at the interval
    ("[watch]\ninterval = 2", 262144, 100, (), 2.0, 2.0, 10.0),
    ("[watch]\ninterval = 0.2\nfast_interval = 0.1", 1_048_576, 100, (), 0.2, 0.2, 1.0),   # an interval chosen short
    ("[watch]\ninterval = 10", 262144, 100, (), 10.0, (222822 - 100) / 100_000, 50.0),
    ("[watch]\ninterval = 10", 16_777_216, 100, (), 10.0, 10.0, 50.0),   # ticks never later than the interval
    ("[watch]\nguard_rate = 0", 8192, 100, (), 1.0, None, None),     # the guard off: full turns only
    ("", 2048, 1400, (), 1.0, MIN_GUARD_INTERVAL, IDLE),                # never below MIN_GUARD_INTERVAL
    # above warn, not growing: full turns at fast_interval, no ticks (a table parked at 73% costs no more)
    ("", 12288, 9000, (), 0.1, None, None),
    # above warn and growing: full turns at the guard interval when it is shorter than fast_interval
    ("", 65536, 46000, ((1009.5, ((NS, 45500),)),), (55705 - 46000) / 100_000, None, None),
])
def test_guard_interval(text, max_, count, points, turn, tick, full):
    p = pol(text)
    smp = sample(10, max_, count)
    h = History(points=points)
    d = decide(p, smp, h, at(10))
    assert next_interval(p, d) == pytest.approx(turn)
    planned = ticks.plan(p, smp, d, h)
    assert (planned.every if planned else None) == (pytest.approx(tick) if tick else None)
    assert (planned.full_in if planned else None) == (pytest.approx(full) if full else None)


@pytest.mark.parametrize("why, history, resizing, tick, full", [
    # Not calm: the full turns stay at watch.interval (a small table still gets its guard ticks)
    ("an incident is open", History(incident=Incident(at(0), NS)), None, (6963 - 100) / 100_000, 1.0),
    ("relief holds a timeout", History(relief=ReliefState(active=(Relieved(NS, "ns", "udp", 30, 10, at(0)),))),
     None, (6963 - 100) / 100_000, 1.0),
    ("a resize is running", History(), 16384, (6963 - 100) / 100_000, 1.0),
    ("calm", History(), None, (6963 - 100) / 100_000, IDLE),
])
def test_full_turns_are_spaced_out_only_on_a_calm_host(why, history, resizing, tick, full):
    p = pol()
    smp = replace(sample(10, 8192, 100), resizing=resizing)
    planned = ticks.plan(p, smp, decide(p, smp, history, at(10)), history)
    assert planned is not None, why
    assert (planned.every, planned.full_in) == (pytest.approx(tick), pytest.approx(full)), why


@pytest.mark.parametrize("max_, count, elapsed, now, kmax, changed, wakes", [
    # 262,144, 100 entries: growing means full within 3 x max(horizon 10, interval 1) = 30 s, so
    # (262,144 - 100) / 30 = 8,735 entries/s since the full turn; checked from 1 s (the interval) on
    (262144, 100, 1.0, 100 + 8734, None, "", False),
    (262144, 100, 1.0, 100 + 8735, None, "", True),
    (262144, 100, 2.0, 100 + 17469, None, "", False),     # two seconds: twice the rise
    (262144, 100, 2.0, 100 + 17470, None, "", True),
    (262144, 100, 0.5, 100 + 8735, None, "", False),      # before the interval: only the levels wake
    (262144, 100, 4.0, 100 + 22_282, None, "", True),     # a tenth of the room to act wakes at once
    (262144, 100, 4.0, 50, None, "", False),              # shrinking never wakes
    # a tiny table: WAKE_MIN entries at least, whatever the pace
    (128, 0, 3.0, 15, None, "", False),
    (128, 0, 3.0, 16, None, "", True),
    # what the daemon saw besides the counts
    (262144, 100, 1.0, 100, 262144, "", False),
    (262144, 100, 1.0, 100, 65536, "", True),             # another writer set nf_conntrack_max
    (262144, 100, 1.0, 100, None, "/run/netns changed", True),
])
def test_a_calm_tick_wakes_a_full_turn(max_, count, elapsed, now, kmax, changed, wakes):
    p = pol()
    smp = sample(10, max_, count)
    planned = ticks.plan(p, smp, decide(p, smp, History(), at(10)), History())
    assert planned is not None and planned.full_in == IDLE
    why = ticks.woken(planned, {NS: now}, smp.at.boot + elapsed, kmax, changed)
    assert (why is not None) == wakes, why


@pytest.mark.parametrize("max_, count, now, wakes", [
    # 8,192, 100 entries at the last turn: room below act 6,863, a tenth of it wakes (100 + 687)
    (8192, 100, 786, False),
    (8192, 100, 787, True),
    (8192, 100, 50, False),                 # shrinking never wakes
    # near warn the rise is capped: it wakes at warn (70% of 8,192 = 5,735)
    (8192, 5700, 5734, False),
    (8192, 5700, 5735, True),
    # a tiny table: at least WAKE_MIN (16) entries of rise, not a tenth of 108
    (128, 0, 15, False),
    (128, 0, 16, True),
])
def test_a_tick_wakes_a_full_turn(max_, count, now, wakes):
    p = pol()
    smp = sample(10, max_, count)
    planned = ticks.plan(p, smp, decide(p, smp, History(), at(10)))
    assert (ticks.woken(planned, {NS: now}) is not None) == wakes
    assert ticks.woken(planned, {}) is None, "a namespace a tick could not read is left to the next turn"


def test_the_quiet_tick_is_the_rate_reference():
    """A flood that starts between ticks: the turn it wakes measures its slope since the last
    quiet tick (not since the full turn up to 1 s back), so the bump is made at once, sized on
    a fresh rate, as when every tick was a full turn."""
    p = pol()
    first = sample(10, 8192, 100)
    d = decide(p, first, History(), at(10))
    h = advance(History(), first, [], [], at(10), p)
    planned = ticks.plan(p, first, d)
    quiet_at = first.at.boot + 0.9                       # the last quiet tick, 0.9 s later
    assert ticks.woken(planned, {NS: 120}) is None
    h = ticks.note_quiet(h, planned, quiet_at, {NS: 120})
    woke = sample(10.97, 8192, 5120)                     # 70 ms later: +5,000 (71,000 flows/s)
    rate, age = current_rate(h, woke, NS)
    assert age == pytest.approx(0.07) and rate == pytest.approx(5000 / 0.07)
    d = decide(p, woke, h, at(10.97))
    assert not d.confirm and d.of(SetMax), d
    # Without the tick the reference is the turn 0.97 s back: stale, so the bump waits to confirm.
    assert decide(p, woke, advance(History(), first, [], [], at(10), p), at(10.97)).confirm


def test_ticks_keep_the_losses_in_the_demand():
    """A tick's point is count + the flows lost at the last full sample (early drops and failed
    inserts; issue 22: `drop` counts packets, not flows, and no longer sizes), so the slope to the
    next full sample is not inflated by losses counted long before."""
    p = pol()
    base = sample(10, 8192, 100)
    lossy = Sample(base.at, base.limits, tuple(replace(n, stats=(("drop", 500), ("early_drop", 200)))
                                             for n in base.namespaces))
    planned = ticks.plan(p, lossy, decide(p, lossy, History(), at(10)))
    h = ticks.note_quiet(History(), planned, lossy.at.boot + 0.5, {NS: 100})
    assert h.points[-1] == (lossy.at.boot + 0.5, ((NS, 300),))


def test_guard_rate_is_validated():
    with pytest.raises(policy_mod.PolicyError) as err:
        pol("[watch]\nguard_rate = -1")
    assert "t.toml: [watch] guard_rate" in str(err.value)
