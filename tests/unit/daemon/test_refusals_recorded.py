"""The flight recorder and ctguard_refusals_total count a refused bump once (core.refusals),
however many samples refused it (issue 24's lab: 62 refusals in 5 s at the ceiling)."""

from __future__ import annotations

import pytest

from ctguard.core.decide import advance, decide
from ctguard.core.model import History, Outcome, Refuse
from ctguard.daemon.metrics import render
from ctguard.daemon.recorder import FlightRecorder
from helpers.builders import every, pol, run_at_ceiling, sample




@pytest.mark.parametrize("cooldown, until, expected", [(30, 4.9, 1), (30, 40.0, 2), (0, 12.0, 3)])
def test_the_counter_counts_refused_bumps(cooldown, until, expected):
    turns = every(0.1, until)
    h, _ = run_at_ceiling(f"[bump]\nceiling = 8192\ncooldown = {cooldown}", turns)
    t, kmax = turns[-1]
    assert f'ctguard_refusals_total{{reason="ceiling"}} {expected}\n' in render(sample(t, kmax, 8000), h, 8192)


def test_the_recorder_notes_each_refused_bump_once():
    p = pol("[bump]\nceiling = 8192\ncooldown = 30")
    r = FlightRecorder()
    h = History()
    for t, kmax in every(0.08, 4.9):
        s = sample(t, kmax, 8000)
        d = decide(p, s, h, s.at)
        outcomes = [Outcome(a, True, getattr(a, "reason", "")) for a in d.actions]
        h = advance(h, s, (), outcomes, s.at, p)
        r.turn(s, d.pressure, [o for o in outcomes if isinstance(o.action, Refuse)], ())
    assert [e["kind"] for e in r.events].count("refusal") == 1


