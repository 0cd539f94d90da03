"""A refused bump counts once (issue 24's lab: "users lost: 62 bumps refused" in 5 s at the
ceiling): the incident, the journal, the metrics counter, the flight recorder and diagnosis all
count by core.refusals. Pure: decide and advance over made-up samples."""

from __future__ import annotations

import pytest

from ctguard.core import incident as incident_text
from ctguard.core import wording
from ctguard.core.decide import advance
from ctguard.core.model import Outcome, RefusalMark, Refuse
from ctguard.core.refusals import distinct, repeat_window, repeats
from helpers.builders import every, pol, run_at_ceiling, sample

# --- the rule ------------------------------------------------------------------------------------

MARK = RefusalMark(100.0, "ceiling", 8192)


@pytest.mark.parametrize("name, last, kind, current, t, window, expected", [
    ("nothing counted yet", None, "ceiling", 8192, 100.0, 30.0, False),
    ("same bound, same max, next sample", MARK, "ceiling", 8192, 100.08, 30.0, True),
    ("same bound, same max, within the cooldown", MARK, "ceiling", 8192, 129.9, 30.0, True),
    ("a cooldown later: the bump would have been made again", MARK, "ceiling", 8192, 130.0, 30.0, False),
    ("another bound refuses", MARK, "memory", 8192, 101.0, 30.0, False),
    ("the max moved (raised by hand, lowered by another writer)", MARK, "ceiling", 9216, 101.0, 30.0, False),
    ("a clock that went back is not a repeat", MARK, "ceiling", 8192, 99.0, 30.0, False),
])
def test_repeats(name, last, kind, current, t, window, expected):
    assert repeats(last, kind, current, t, window) is expected, name


@pytest.mark.parametrize("cooldown, window", [(30.0, 30.0), (0.0, 5.0), (2.0, 5.0), (600.0, 600.0)])
def test_window_is_the_cooldown_but_never_a_sample(cooldown, window):
    assert repeat_window(cooldown) == window


# --- the daemon's turns: decide -> (the refusal carried out) -> advance ---------------------------



CASES = [
    # name, policy, turns, refused bumps counted
    ("the lab: 62 samples at the ceiling within 5 s", "[bump]\nceiling = 8192\ncooldown = 30",
     every(0.08, 4.9), 1),
    ("40 s at the ceiling, cooldown 30: a bump a cooldown refused twice", "[bump]\nceiling = 8192\ncooldown = 30",
     every(0.5, 40.0), 2),
    ("cooldown 0: once per 5 s, not once per sample", "[bump]\nceiling = 8192\ncooldown = 0",
     every(0.1, 12.0), 3),
    ("the max moves under the ceiling's refusal: a new refused bump",
     "[bump]\nceiling = 8192\ncooldown = 30", every(0.5, 2.0, 8192) + [(2.5, 9216), (3.0, 9216)], 2),
]


@pytest.mark.parametrize("name, text, turns, expected", CASES, ids=[c[0] for c in CASES])
def test_one_refused_bump_counts_once_everywhere(name, text, turns, expected):
    h, refused = run_at_ceiling(text, turns)
    non_cooldown = [a for a in refused if a.kind != "cooldown"]
    assert len(non_cooldown) > expected          # refused on (nearly) every sample ...
    inc = h.incident
    assert inc is not None and inc.refusals == expected      # ... counted once per refused bump
    assert dict(h.refusals).get("ceiling", 0) == expected     # ctguard_refusals_total
    journaled = [a for a in non_cooldown if wording.entry(Outcome(a, True, a.reason)) is not None]
    assert len(journaled) == expected
    assert f", {expected} refused" in incident_text.end_message(inc)
    assert incident_text.summary(inc)["refusals"] == expected


def test_status_still_shows_the_refusal_it_repeats():
    # The repeat is not counted or journaled again, but `systemctl status` keeps saying it.
    _, refused = run_at_ceiling("[bump]\nceiling = 8192\ncooldown = 30", every(0.1, 1.0))
    last = [a for a in refused if a.kind != "cooldown"][-1]
    assert last.repeat and wording.last_action(Outcome(last, True, last.reason)) == "bump refused (ceiling)"


def test_an_operators_refused_bump_is_never_a_repeat():
    p = pol("[bump]\nceiling = 8192\ncooldown = 30")
    h, _ = run_at_ceiling("[bump]\nceiling = 8192\ncooldown = 30", every(0.5, 1.0))
    manual = Refuse(20000, 8192, "ceiling", "manual", None, 0.97, "operator asked for 20000, above the ceiling 8192")
    s = sample(1.5, 8192, 8000)
    after = advance(h, s, (), [Outcome(manual, True, manual.reason)], s.at, p)
    assert dict(after.refusals)["ceiling"] == dict(h.refusals)["ceiling"] + 1
    assert wording.entry(Outcome(manual, True, manual.reason)) is not None


# --- diagnosis: a recorded timeline -----------------------------------------------------------

def _ev(t: float, reason: str = "ceiling", old: int = 8192, new: int = 16384) -> dict:
    return {"t": t, "kind": "refusal", "reason": reason, "old": old, "new": new}


@pytest.mark.parametrize("name, events, window, expected", [
    ("a bundle of an older daemon: one per sample", [_ev(i * 0.08, new=16384 + 1024 * (i % 3)) for i in range(62)], 30.0, 1),
    ("each cooldown again", [_ev(float(i)) for i in range(0, 65)], 30.0, 3),
    ("bound changes", [_ev(0.0), _ev(0.1, "budget"), _ev(0.2), _ev(0.3, old=9216)], 30.0, 4),
    ("other events are not refusals", [{"t": 0.0, "kind": "bump", "old": 1, "new": 2}, _ev(1.0)], 30.0, 1),
])
def test_distinct_refusals_of_a_timeline(name, events, window, expected):
    assert len(distinct(events, window)) == expected, name


def _dns_past_the_ceiling(events: list[dict]):
    """The causes table's DNS-past-the-ceiling bundle, its timeline holding `events`."""
    from dataclasses import replace as dc_replace
    from helpers.causes import CASES
    data = CASES["DNS through the NAT past the ceiling"][0]
    return dc_replace(data, timeline={**data.timeline, "events": events})


@pytest.mark.parametrize("name, events, refused", [
    # The lab's drops-began bundle of a daemon before this fix: a refusal per sample for 5 s.
    ("an older bundle, 62 per-sample refusals", [_ev(1002.0 + i * 0.08, new=65536 + 1024 * (i % 4)) | {"netns": 7}
                                                  for i in range(62)], 1),
    ("this version's timeline: one a cooldown", [_ev(1002.0, old=32768, new=65536) | {"netns": 7},
                                                _ev(1032.0, old=32768, new=65536) | {"netns": 7}], 2),
])
def test_diagnosis_counts_refused_bumps(name, events, refused):
    from ctguard.core.diagnose import diagnose, facts, verdict
    data = _dns_past_the_ceiling(events)
    assert len(facts(data).refusals) == refused, name
    plural = "s" if refused != 1 else ""
    top = diagnose(data)[0]
    assert top.severity == "critical"
    assert f"{refused} bump{plural} refused at the ceiling" in top.summary, top.summary
    assert f"refused {refused} time(s)" in verdict(data) or f"refused a bump {refused} time(s)" in verdict(data)
